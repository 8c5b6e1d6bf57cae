"""Interactive explorers (ipywidgets) with a static fallback when no browser/kernel front end is there.

:func:`collapse_explorer` draws class-structured 2-D features - K classes whose means sit on a
circle of radius ``between`` with Gaussian spread ``within`` - and shows NC1, the trace ratio, CDNV
and the ETF error live as the sliders move. Without ipywidgets, or with ``interactive=False`` (as in
the executed book), it draws one static panel per setting instead.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from . import metrics

__all__ = ["collapse_example", "collapse_explorer", "explorer_metrics"]


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


def _has_widgets() -> bool:
    try:
        import ipywidgets  # noqa: F401
        from IPython import get_ipython
    except ImportError:
        return False
    shell = get_ipython()
    return shell is not None and getattr(shell, "kernel", None) is not None
