"""Correlations, linear fits with r², and bootstrap confidence intervals.

Thin, checked wrappers around ``scipy.stats`` that take lists, NumPy arrays or torch tensors and
return plain floats, so a chapter can write ``pearson(nc1_values, accuracies)``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import scipy.stats

__all__ = [
    "pearson",
    "spearman",
    "kendall",
    "weighted_kendall",
    "LinearFit",
    "linear_fit",
    "BootstrapCI",
    "bootstrap_ci",
]


def _pair(x, y) -> tuple[np.ndarray, np.ndarray]:
    """Two equally long 1-D float64 arrays with at least two finite points."""
    x = np.asarray(_to_numpy(x), dtype=np.float64).ravel()
    y = np.asarray(_to_numpy(y), dtype=np.float64).ravel()
    if x.shape != y.shape:
        raise ValueError(f"x and y must have the same length, got {x.size} and {y.size}")
    if x.size < 2:
        raise ValueError(f"need at least 2 points for a correlation, got {x.size}")
    bad = ~(np.isfinite(x) & np.isfinite(y))
    if bad.any():
        raise ValueError(f"{int(bad.sum())} of {x.size} pairs contain NaN/inf; drop them first")
    return x, y


def _to_numpy(a):
    if hasattr(a, "detach"):  # torch tensor
        return a.detach().cpu().double().numpy()
    return a


def pearson(x, y) -> float:
    """Pearson's r = cov(x, y) / (std(x) std(y)). NaN when either input is constant."""
    x, y = _pair(x, y)
    if np.ptp(x) == 0 or np.ptp(y) == 0:
        return float("nan")
    return float(np.corrcoef(x, y)[0, 1])


def spearman(x, y) -> float:
    """Spearman's ρ: Pearson's r of the ranks (ties get their average rank)."""
    x, y = _pair(x, y)
    if np.ptp(x) == 0 or np.ptp(y) == 0:
        return float("nan")
    return float(scipy.stats.spearmanr(x, y).statistic)


def kendall(x, y) -> float:
    """Kendall's τ-b (ties corrected): (concordant − discordant) pairs over the tie-adjusted count."""
    x, y = _pair(x, y)
    if np.ptp(x) == 0 or np.ptp(y) == 0:
        return float("nan")
    return float(scipy.stats.kendalltau(x, y).statistic)


def weighted_kendall(x, y) -> float:
    """Weighted Kendall τ (``scipy.stats.weightedtau``, hyperbolic weights 1/(r+1)): swaps among the
    top-ranked items (largest values) count more than swaps at the bottom — the usual score for
    ranking a pool of pre-trained models, where picking the best ones matters most."""
    x, y = _pair(x, y)
    if np.ptp(x) == 0 or np.ptp(y) == 0:
        return float("nan")
    return float(scipy.stats.weightedtau(x, y).statistic)


@dataclass(frozen=True)
class LinearFit:
    """Least-squares line ``y ≈ slope * x + intercept`` with Pearson's ``r`` and ``r2 = r**2``."""

    slope: float
    intercept: float
    r: float
    r2: float
    n: int

    def __call__(self, x):
        """The fitted line at ``x``."""
        return self.slope * np.asarray(_to_numpy(x), dtype=np.float64) + self.intercept


def linear_fit(x, y) -> LinearFit:
    """Ordinary least squares of ``y`` on ``x``: slope = cov(x, y)/var(x), intercept = ȳ − slope x̄."""
    x, y = _pair(x, y)
    if np.ptp(x) == 0:
        raise ValueError("x is constant: a line through it is undefined")
    xc, yc = x - x.mean(), y - y.mean()
    slope = float((xc @ yc) / (xc @ xc))
    r = pearson(x, y)
    return LinearFit(slope, float(y.mean() - slope * x.mean()), r, r * r, int(x.size))


@dataclass(frozen=True)
class BootstrapCI:
    """A statistic, its percentile bootstrap interval ``[low, high]`` and the resamples' values."""

    estimate: float
    low: float
    high: float
    level: float
    samples: np.ndarray

    def __iter__(self):  # allows ``est, lo, hi = bootstrap_ci(...)``
        return iter((self.estimate, self.low, self.high))

    def __str__(self) -> str:
        return f"{self.estimate:.3f} [{self.low:.3f}, {self.high:.3f}] ({self.level:.0%} CI)"


def bootstrap_ci(
    fn: Callable[..., float],
    *arrays: Sequence | np.ndarray,
    n_boot: int = 1000,
    level: float = 0.95,
    seed: int = 0,
) -> BootstrapCI:
    """Percentile bootstrap interval of ``fn(*arrays)``: resample the N rows (shared by every array)
    with replacement ``n_boot`` times and take the ``(1 ± level)/2`` quantiles of ``fn``.

    Resamples where ``fn`` is undefined (NaN, e.g. a constant resample) are dropped; the count kept
    is ``len(result.samples)``. Example: ``bootstrap_ci(pearson, nc1_values, accuracies)``.
    """
    if not arrays:
        raise ValueError("bootstrap_ci needs at least one array to resample")
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    if n_boot < 1:
        raise ValueError(f"n_boot must be >= 1, got {n_boot}")
    arrs = [np.asarray(_to_numpy(a)) for a in arrays]
    n = len(arrs[0])
    if any(len(a) != n for a in arrs):
        raise ValueError(f"arrays must share their first dimension, got {[len(a) for a in arrs]}")
    if n < 2:
        raise ValueError(f"need at least 2 rows to bootstrap, got {n}")
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, n, size=(n_boot, n))
    with np.errstate(all="ignore"):
        vals = np.array([_safe(fn, *[a[i] for a in arrs]) for i in idx], dtype=np.float64)
    vals = vals[np.isfinite(vals)]
    if vals.size == 0:
        raise ValueError("fn was undefined (NaN) on every bootstrap resample")
    alpha = (1 - level) / 2
    low, high = np.quantile(vals, [alpha, 1 - alpha])
    return BootstrapCI(float(fn(*arrs)), float(low), float(high), level, vals)


def _safe(fn: Callable[..., float], *args) -> float:
    try:
        return float(fn(*args))
    except ValueError:  # e.g. a resample where x is constant
        return float("nan")
