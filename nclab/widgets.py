"""Interactive explorers (ipywidgets) with a static fallback when no browser/kernel front end is there.

:func:`collapse_explorer` draws class-structured 2-D features - K classes whose means sit on a
circle of radius ``between`` with Gaussian spread ``within`` - and shows NC1, the trace ratio, CDNV
and the ETF error live as the sliders move. Without ipywidgets, or with ``interactive=False``, it
draws one static panel per setting instead. :func:`collapse_animation` is the explorer for a page
with no kernel (the built book, read offline): the same scatter and numbers as the within-class
spread shrinks, as a self-contained HTML/JavaScript player (Matplotlib's ``to_jshtml``: frames
embedded as images, its own play, step and speed controls, no network).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from . import metrics

__all__ = ["collapse_animation", "collapse_example", "collapse_explorer", "explorer_metrics"]


def collapse_example(num_classes: int = 4, within: float = 0.5, between: float = 2.0,
                     per_class: int = 60, dim: int = 2, seed: int = 0
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """Features (N, dim) and labels: class means ``between`` * (cos, sin) of K equally spaced
    angles (a simplex ETF up to a shift when dim = 2 and K = 3), plus ``within``-scaled Gaussian
    noise in every dimension."""
    if num_classes < 2:
        raise ValueError(f"need at least two classes, got {num_classes}")
    gen = torch.Generator().manual_seed(seed)
    angles = 2 * torch.pi * torch.arange(num_classes, dtype=torch.float64) / num_classes
    mus = torch.zeros(num_classes, dim, dtype=torch.float64)
    mus[:, 0], mus[:, 1] = between * torch.cos(angles), between * torch.sin(angles)
    y = torch.arange(num_classes).repeat_interleave(per_class)
    h = mus[y] + within * torch.randn(len(y), dim, generator=gen, dtype=torch.float64)
    return h, y


def explorer_metrics(h: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
    """The explorer's live numbers: NC1, trace-ratio NC1, CDNV and ETF error."""
    return {"NC1": metrics.nc1(h, y), "tr ratio": metrics.nc1_trace(h, y),
            "CDNV": metrics.cdnv(h, y), "ETF error": metrics.etf_error(h, y)}


def _draw(ax, num_classes: int, within: float, between: float, seed: int = 0) -> dict:
    from .plots import feature_scatter

    h, y = collapse_example(num_classes, within, between, seed=seed)
    vals = explorer_metrics(h, y)
    feature_scatter(h, y, ax=ax)
    ax.set_title(f"K={num_classes}, within={within:g}, between={between:g}", fontsize=9)
    text = "\n".join(f"{k} = {v:.3g}" for k, v in vals.items())
    ax.text(0.02, 0.98, text, transform=ax.transAxes, va="top", fontsize=8,
            bbox=dict(boxstyle="round", fc="white", alpha=0.8))
    return vals


def collapse_explorer(
    interactive: bool | None = None,
    settings: Sequence[tuple[int, float, float]] = ((3, 1.0, 2.0), (3, 0.3, 2.0), (6, 0.3, 4.0)),
):
    """Sliders for within-class spread, between-class scale and K, redrawing the scatter and the
    metrics. ``interactive=None`` uses widgets when ipywidgets is importable and an IPython kernel
    runs; otherwise (or with ``interactive=False``) returns a static figure of ``settings``
    ((K, within, between) each), whose metrics are in ``fig.explorer_values``."""
    if interactive is None:
        interactive = _has_widgets()
    if interactive:
        import ipywidgets as w
        import matplotlib.pyplot as plt
        from IPython.display import display

        out = w.Output()
        sliders = {
            "within": w.FloatLogSlider(value=0.5, base=10, min=-2, max=1, description="within"),
            "between": w.FloatSlider(value=2.0, min=0.2, max=6.0, step=0.1, description="between"),
            "num_classes": w.IntSlider(value=4, min=2, max=10, description="K"),
        }

        def redraw(_=None):
            with out:
                out.clear_output(wait=True)
                fig, ax = plt.subplots(figsize=(4.5, 4.5))
                _draw(ax, sliders["num_classes"].value, sliders["within"].value,
                      sliders["between"].value)
                plt.show()

        for s in sliders.values():
            s.observe(redraw, names="value")
        box = w.VBox([w.HBox(list(sliders.values())), out])
        display(box)
        redraw()
        return box
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(settings), figsize=(3.8 * len(settings), 3.9))
    fig.explorer_values = [_draw(ax, k, wi, be) for ax, (k, wi, be) in
                           zip(list(getattr(axes, "flat", [axes])), settings)]
    fig.tight_layout()
    return fig


def collapse_animation(num_classes: int = 4, between: float = 2.0,
                       within: Sequence[float] | None = None, seed: int = 0, interval: int = 400):
    """A player (``IPython.display.HTML``) of the explorer's scatter as the within-class spread runs
    through ``within`` (default: 16 values from 1.5 down to 0.05, log-spaced) at fixed K and
    between-class scale; every frame prints NC1, trace ratio, CDNV and ETF error. The same noise
    draw (``seed``) is scaled in every frame, so only the spread changes. Its metrics per frame are
    in the returned object's ``explorer_values``."""
    import matplotlib.pyplot as plt
    import numpy as np
    from IPython.display import HTML
    from matplotlib.animation import FuncAnimation

    spreads = [float(v) for v in (np.geomspace(1.5, 0.05, 16) if within is None else within)]
    if not spreads or any(not v > 0 for v in spreads):
        raise ValueError(f"within must be a non-empty sequence of spreads > 0, got {within!r}")
    fig, ax = plt.subplots(figsize=(4.2, 4.2))
    lim = 1.15 * between + 3 * max(spreads)

    def frame(i: int):
        ax.clear()
        _draw(ax, num_classes, spreads[i], between, seed=seed)
        ax.set_aspect("equal", adjustable="box")
        ax.set_xlim(-lim, lim)
        ax.set_ylim(-lim, lim)
        return []

    anim = FuncAnimation(fig, frame, frames=len(spreads), interval=interval, blit=False)
    html = HTML(_offline_player(anim.to_jshtml(default_mode="once")))
    plt.close(fig)
    html.explorer_values = [explorer_metrics(*collapse_example(num_classes, v, between, seed=seed))
                            for v in spreads]
    return html


# Matplotlib's player draws its buttons with Font Awesome icons from a CDN; offline they would be
# blank. The stylesheet link goes and each icon becomes a text symbol that every font has.
_ICONS = {"fa fa-fast-backward": "\u25ae\u25c0\u25c0", "fa fa-step-backward": "\u25c0\u25ae",
          "fa fa-play fa-flip-horizontal": "\u25c0", "fa fa-pause": "\u25ae\u25ae", "fa fa-play": "\u25b6",
          "fa fa-step-forward": "\u25ae\u25b6", "fa fa-fast-forward": "\u25b6\u25b6\u25ae",
          "fa fa-minus": "\u2212", "fa fa-plus": "+"}


def _offline_player(html: str) -> str:
    """``html`` of ``to_jshtml`` with no network reference: no stylesheet link, text icons."""
    import re

    html = re.sub(r"<link[^>]*font-awesome[^>]*>", "", html)
    for cls, text in _ICONS.items():
        html = html.replace(f'<i class="{cls}"></i>', f'<span aria-hidden="true">{text}</span>')
    if "<i class=\"fa" in html or "://" in re.sub(r"data:[^\"']*", "", html):
        raise RuntimeError("matplotlib's player changed: an icon or a network reference is left")
    return html


def _has_widgets() -> bool:
    try:
        import ipywidgets  # noqa: F401
        from IPython import get_ipython
    except ImportError:
        return False
    shell = get_ipython()
    return shell is not None and getattr(shell, "kernel", None) is not None
