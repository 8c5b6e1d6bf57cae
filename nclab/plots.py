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

    from .correlation import linear_fit

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


# --------------------------------------------------------------------------- neural-collapse geometry
# (appended by the metrics / chapter 1 author)
__all__ += ["simplex_etf_figure", "collapse_curves", "feature_scatter"]


def simplex_etf_figure(ks: Sequence[int] = (3, 4)):
    """Simplex ETFs drawn in their smallest space: K = 3 in 2-D, K = 4 in 3-D (vectors from the
    origin, the polygon/tetrahedron of their tips). Returns the figure."""
    import itertools

    import matplotlib.pyplot as plt

    from .metrics import simplex_etf

    fig = plt.figure(figsize=(4.2 * len(ks), 4))
    colors = plt.get_cmap("tab10").colors
    for i, k in enumerate(ks):
        m = simplex_etf(k).numpy()  # (K, K-1) unit rows, cosines -1/(K-1)
        if k - 1 not in (2, 3):
            raise ValueError(f"can only draw K = 3 (2-D) or K = 4 (3-D), got K = {k}")
        ax = fig.add_subplot(1, len(ks), i + 1, projection="3d" if k == 4 else None)
        for c, v in enumerate(m):
            ax.plot(*[[0, t] for t in v], color=colors[c], lw=2.5)
            ax.scatter(*[[t] for t in v], color=colors[c], s=50)
        for a, b in itertools.combinations(range(k), 2):
            ax.plot(*[[m[a, j], m[b, j]] for j in range(k - 1)], color="0.6", lw=0.8, ls="--")
        ax.set_title(f"K = {k}: cosines = {-1 / (k - 1):.3f}")
        if k == 3:
            ax.set_aspect("equal")
            ax.axhline(0, color="0.9", lw=0.5, zorder=0)
            ax.axvline(0, color="0.9", lw=0.5, zorder=0)
    fig.tight_layout()
    return fig


def collapse_curves(history, x: str = "iter", metrics: Sequence[str] = ("nc1", "etf_error",
                                                                         "self_duality"),
                    hue: str | None = None, axes=None, logy: bool = True, title: str | None = None):
    """One panel per collapse metric against ``x`` (iteration or epoch), log scale, one line per
    ``hue`` value (e.g. seed or split). ``history`` is a long-format DataFrame."""
    import matplotlib.pyplot as plt
    import seaborn as sns

    if axes is None:
        _, axes = plt.subplots(1, len(metrics), figsize=(3.6 * len(metrics), 3.2))
    axes = np.atleast_1d(axes)
    for ax, m in zip(axes, metrics):
        sns.lineplot(data=history, x=x, y=m, hue=hue, ax=ax, legend=ax is axes[-1])
        if logy:
            ax.set_yscale("log")
        ax.set_title(m)
        ax.set_ylabel("")
    if title:
        axes[0].figure.suptitle(title)
    axes[0].figure.tight_layout()
    return axes


def feature_scatter(H, y, ax=None, title: str | None = None, means: bool = True):
    """Features projected on their top-2 principal directions (2-D features as they are), one colour
    per class, class means as black-edged stars."""
    import torch

    ax = _axes(ax, (4, 4))
    h = torch.as_tensor(H, dtype=torch.float64)
    y = torch.as_tensor(y)
    if h.shape[1] > 2:
        c = h - h.mean(0)
        _, _, vh = torch.linalg.svd(c, full_matrices=False)
        h = c @ vh[:2].T
    k = int(y.max()) + 1
    pts = h.numpy()
    ax.scatter(pts[:, 0], pts[:, 1], c=y.numpy(), cmap="tab10", vmin=0, vmax=9, s=10, alpha=0.6)
    if means:
        mu = torch.stack([h[y == c].mean(0) for c in range(k)]).numpy()
        ax.scatter(mu[:, 0], mu[:, 1], c=np.arange(k), cmap="tab10", vmin=0, vmax=9, s=160,
                   marker="*", edgecolors="k")
    ax.set_aspect("equal", adjustable="datalim")
    ax.set_xticks([])
    ax.set_yticks([])
    if title:
        ax.set_title(title)
    return ax


# --------------------------------------------------------------------------- fine-tuning (ch. 05)
__all__ += ["finetune_diagram"]

_TRAINS, _FROZEN = "#f4a261", "#d9d9d9"


def finetune_diagram(num_blocks: int = 5, block: int = 3, method: str = "scl", ax=None,
                     block_labels: Sequence[str] | None = None):
    """The paper's Fig. 6 as a diagram: ``x -> Block 1 -> ... -> Block L -> h -> g``, the blocks
    that train (``method``: ``"layer"``/``"scl"``: Block ``block`` and the head ``g``;
    ``"linear"``: the head; ``"full"``: everything) in orange, the frozen ones in grey, and for
    ``"scl"`` the parameter-free skip ``h + pad(pool(z_k))`` from Block k's output ``z_k`` to the
    classifier's input. Patches carry ``gid`` ``"block<k>"``, ``"head"`` and (SCL) ``"skip"``."""
    from matplotlib.patches import FancyArrowPatch, FancyBboxPatch

    if method not in ("linear", "layer", "scl", "full"):
        raise ValueError(f"method must be linear, layer, scl or full, got {method!r}")
    if not 1 <= block <= num_blocks:
        raise ValueError(f"block must lie in [1, {num_blocks}], got {block}")
    labels = list(block_labels) if block_labels is not None else [
        f"Block {k}" for k in range(1, num_blocks + 1)]
    if len(labels) != num_blocks:
        raise ValueError(f"{len(labels)} block_labels for {num_blocks} blocks")
    ax = _axes(ax, figsize=(1.25 * num_blocks + 3.2, 2.4))
    w, gap, y0, hgt = 1.0, 0.35, 0.0, 0.8

    def box(x: float, text: str, trains: bool, gid: str):
        patch = FancyBboxPatch((x, y0), w, hgt, boxstyle="round,pad=0.02,rounding_size=0.08",
                               fc=_TRAINS if trains else _FROZEN, ec="black", lw=1, gid=gid)
        ax.add_patch(patch)
        ax.text(x + w / 2, y0 + hgt / 2, text, ha="center", va="center", fontsize=8)
        return patch

    def arrow(x1: float, x2: float) -> None:
        ax.add_patch(FancyArrowPatch((x1, y0 + hgt / 2), (x2, y0 + hgt / 2),
                                     arrowstyle="-|>", mutation_scale=10, lw=1))

    ax.text(-0.35, y0 + hgt / 2, "x", ha="center", va="center", fontsize=11)
    x = 0.0
    arrow(-0.2, x)
    for k, label in enumerate(labels, start=1):
        trains = method == "full" or (method in ("layer", "scl") and k == block)
        box(x, label, trains, f"block{k}")
        arrow(x + w, x + w + gap)
        if k == block and method in ("layer", "scl"):
            ax.text(x + w / 2, y0 - 0.18, "tuned", ha="center", va="top", fontsize=8)
        x += w + gap
    plus_x = x + 0.15
    ax.text(plus_x, y0 + hgt / 2, "+" if method == "scl" else "h", ha="center", va="center",
            fontsize=12, fontweight="bold" if method == "scl" else "normal")
    arrow(plus_x + 0.18, plus_x + 0.18 + gap)
    box(plus_x + 0.18 + gap, "head g", True, "head")
    if method == "scl":
        x_k = (block - 1) * (w + gap) + w + gap / 2
        ax.add_patch(FancyArrowPatch((x_k, y0 + hgt / 2), (plus_x, y0 + hgt / 2 + 0.12),
                                     connectionstyle="arc3,rad=-0.35", arrowstyle="-|>",
                                     mutation_scale=10, lw=1.4, color="C0", gid="skip"))
        mid = (x_k + plus_x) / 2
        ax.text(mid, y0 + hgt + 0.55 + 0.04 * (num_blocks - block), r"pad(pool($z_k$)): no parameters",
                ha="center", va="bottom", fontsize=8, color="C0")
    ax.set_xlim(-0.6, plus_x + 0.18 + gap + w + 0.2)
    ax.set_ylim(-0.6, hgt + 1.4)
    ax.set_aspect("equal")
    ax.axis("off")
    names = {"linear": "Linear probe", "layer": "Layer FT", "scl": "SCL FT", "full": "Full FT"}
    ax.set_title(f"{names[method]}: orange trains, grey is frozen", fontsize=10)
    return ax


# --------------------------------------------------------------------------- real features in 2-D (ch. 01)
__all__ += ["class_mean_plane", "feature_projection"]


def class_mean_plane(features, labels, num_classes: int | None = None, dims: int = 2):
    """The plane of :func:`feature_projection`, in float64: ``(center, directions)``.

    ``center`` is the mean of the class means, ``mu_G = (1/K) sum_k mu_k`` (d,); ``directions``
    (d, dims) are the top right-singular vectors of ``M~ = [mu_k - mu_G]_k`` (K x d), i.e. the
    top principal directions of the centred class means. When ``M~`` has rank r < dims (e.g.
    K = 2), the remaining directions are the top principal directions of the within-class
    residuals ``h_i - mu_{y_i}`` orthogonal to the first r."""
    import torch

    h = torch.as_tensor(features).detach().cpu().double()
    y = torch.as_tensor(labels).detach().cpu().long()
    if h.ndim != 2 or len(h) != len(y):
        raise ValueError(f"features must be (N, d) with N = len(labels), got {tuple(h.shape)} "
                         f"and {len(y)} labels")
    if not 1 <= dims <= h.shape[1]:
        raise ValueError(f"dims must lie in [1, d = {h.shape[1]}], got {dims}")
    k = int(num_classes) if num_classes is not None else int(y.max()) + 1
    present = [c for c in range(k) if bool((y == c).any())]
    if len(present) < 2:
        raise ValueError("need at least two classes with samples")
    mu = torch.stack([h[y == c].mean(0) for c in present])
    center = mu.mean(0)
    _, s, vh = torch.linalg.svd(mu - center, full_matrices=False)
    r = int((s > s[0] * 1e-10).sum()) if s[0] > 0 else 0
    v = vh[: min(r, dims)].T
    if v.shape[1] < dims:
        lut = torch.zeros(k, dtype=torch.long)
        lut[torch.tensor(present)] = torch.arange(len(present))
        resid = h - mu[lut[y]]
        resid = resid - resid @ v @ v.T
        _, _, vw = torch.linalg.svd(resid, full_matrices=False)
        v = torch.cat([v, vw[: dims - v.shape[1]].T], dim=1)
    return center.numpy(), v.numpy()


def feature_projection(features, labels, *, plane=None, ax=None, title: str | None = None,
                       class_names: Sequence[str] | None = None, means: bool = True,
                       legend: bool = False, size: float = 6):
    """Scatter features in 2-D, one colour per class: ``z_i = V^T (h_i - mu_G)``.

    The plane ``(mu_G, V)`` defaults to :func:`class_mean_plane` of these features (PCA of the
    centred class means, so the axes show the between-class geometry and a collapsed class is a
    tight blob around its mean); pass another set's plane to draw e.g. test features in the
    training features' plane. Class means are drawn as black-edged stars. Returns the figure
    (a new one if ``ax`` is None); the scatter's offsets are the ``z_i``."""
    import matplotlib.pyplot as plt
    import torch

    h = torch.as_tensor(features).detach().cpu().double().numpy()
    y = torch.as_tensor(labels).detach().cpu().long().numpy()
    center, v = plane if plane is not None else class_mean_plane(h, y)
    center, v = np.asarray(center, dtype=np.float64), np.asarray(v, dtype=np.float64)
    if v.shape != (h.shape[1], 2) or center.shape != (h.shape[1],):
        raise ValueError(f"plane must be (center (d,), directions (d, 2)) with d = {h.shape[1]}, "
                         f"got {center.shape} and {v.shape}")
    z = (h - center) @ v
    if ax is None:
        _, ax = plt.subplots(figsize=(4, 4))
    cmap = plt.get_cmap("tab10")
    colors = cmap(y % 10)
    ax.scatter(z[:, 0], z[:, 1], c=colors, s=size, alpha=0.5, linewidths=0)
    classes = np.unique(y)
    if means:
        mu = np.stack([z[y == c].mean(0) for c in classes])
        ax.scatter(mu[:, 0], mu[:, 1], c=cmap(classes % 10), s=140, marker="*",
                   edgecolors="k", linewidths=0.8)
    if legend:
        from matplotlib.lines import Line2D

        names = [class_names[c] if class_names is not None else str(c) for c in classes]
        handles = [Line2D([], [], ls="", marker="o", color=cmap(c % 10)) for c in classes]
        ax.legend(handles, names, fontsize=7, loc="center left", bbox_to_anchor=(1, 0.5),
                  frameon=False)
    ax.set_xticks([])
    ax.set_yticks([])
    if title:
        ax.set_title(title, fontsize=9)
    return ax.figure
