"""Seaborn figures the chapters share. Each function draws on ``ax`` (a new figure if None) and
returns the axes, so a chapter can compose panels. Other modules' figures are appended at the end."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

__all__ = ["scatter_fit", "layer_curves", "agreement_bars"]


def _axes(ax, figsize=(5, 4)):
    import matplotlib.pyplot as plt

    if ax is None:
        _, ax = plt.subplots(figsize=figsize)
    return ax


def scatter_fit(
    data,
    x: str,
    y: str,
    hue: str | None = None,
    style: str | None = None,
    ax=None,
    logx: bool = False,
    fit: bool = True,
    title: str | None = None,
    xlabel: str | None = None,
    ylabel: str | None = None,
):
    """Scatter ``y`` against ``x`` (columns of the DataFrame ``data``) with the least-squares line
    (in ``log10 x`` when ``logx``) and its Pearson r and r² in the legend."""
    import seaborn as sns

    from .stats import linear_fit

    ax = _axes(ax)
    sns.scatterplot(data=data, x=x, y=y, hue=hue, style=style, ax=ax, s=60)
    if fit and len(data) >= 3:
        xs = np.asarray(data[x], dtype=float)
        xs_fit = np.log10(xs) if logx else xs
        line = linear_fit(xs_fit, np.asarray(data[y], dtype=float))
        grid = np.linspace(xs_fit.min(), xs_fit.max(), 50)
        ax.plot(10**grid if logx else grid, line(grid), "k--", lw=1,
                label=f"fit: r = {line.r:+.2f}, r² = {line.r2:.2f}")
        ax.legend(fontsize=8)
    if logx:
        ax.set_xscale("log")
    ax.set_xlabel(xlabel or x)
    ax.set_ylabel(ylabel or y)
    if title:
        ax.set_title(title)
    return ax


def layer_curves(
    data,
    hue: str | None = "model",
    x: str = "depth",
    ys: Sequence[str] = ("nc1", "test_acc"),
    style: str | None = None,
    axes=None,
    lognc1: bool = True,
):
    """One panel per column in ``ys`` (default NC1 and probe accuracy) against layer ``depth``,
    one line per ``hue`` value (e.g. model). NC1 on a log axis."""
    import matplotlib.pyplot as plt
    import seaborn as sns

    if axes is None:
        _, axes = plt.subplots(1, len(ys), figsize=(5 * len(ys), 3.8))
    axes = np.atleast_1d(axes)
    for ax, col in zip(axes, ys, strict=True):
        sns.lineplot(data=data, x=x, y=col, hue=hue, style=style, marker="o", ax=ax)
        if col == "nc1" and lognc1:
            ax.set_yscale("log")
        ax.set_xlabel("layer (1 = first block)" if x == "depth" else x)
        ax.set_ylabel({"nc1": "NC1 (downstream train)", "test_acc": "linear-probe test acc",
                       "train_acc": "linear-probe train acc"}.get(col, col))
    for ax in axes[1:]:
        if ax.get_legend() is not None:
            ax.get_legend().remove()
    return axes


def agreement_bars(table, x: str = "score", y: str = "estimate", low: str = "low",
                   high: str = "high", hue: str | None = "statistic", ax=None,
                   title: str | None = None):
    """Bars of a ranking statistic per transferability score with their bootstrap intervals.
    ``table`` is a DataFrame with one row per (score, statistic): ``estimate``, ``low``, ``high``."""
    import seaborn as sns

    ax = _axes(ax, (6, 3.6))
    sns.barplot(data=table, x=x, y=y, hue=hue, ax=ax, errorbar=None)
    # error bars at the bar centres, in the order seaborn drew them
    for bar_container, (_, grp) in zip(ax.containers, table.groupby(hue, sort=False), strict=False):
        centres = [b.get_x() + b.get_width() / 2 for b in bar_container]
        est = grp[y].to_numpy()
        ax.errorbar(centres, est, yerr=[est - grp[low].to_numpy(), grp[high].to_numpy() - est],
                    fmt="none", ecolor="k", capsize=3, lw=1)
    ax.axhline(0, color="k", lw=0.8)
    ax.set_ylim(-1.05, 1.05)
    ax.set_ylabel("agreement with probe accuracy")
    ax.set_xlabel("")
    if title:
        ax.set_title(title)
    return ax
