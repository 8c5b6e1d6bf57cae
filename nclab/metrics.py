"""Neural-collapse measures (the compute half): NC1 - NC4, CDNV, numerical rank, the report.

Notation (paper eq. 4, App. D): features ``h_i`` in R^d with labels ``y_i`` in [0, K); class means
``mu_k``; global mean ``mu_G`` = the mean of the class means (the paper's convention; the
sample-weighted mean is an option); ``M~`` the d x K matrix of centred means ``mu_k - mu_G``;

    Sigma_W = (1/N) sum_i (h_i - mu_{y_i})(h_i - mu_{y_i})^T
    Sigma_B = (1/K) sum_k (mu_k - mu_G)(mu_k - mu_G)^T = M~ M~^T / K
    NC1     = (1/K) tr(Sigma_W Sigma_B^+).

Every function takes either a :class:`ClassStats` (accumulated in one streaming pass) or
``(features, labels)`` directly. Everything is computed in float64, so neither the input dtype
(bf16, fp16, fp32) nor a global TF32 setting moves the result.

The fast route: ``Sigma_B`` has rank r <= K - 1, so its pseudo-inverse comes from the thin SVD of
the d x K matrix ``M~`` (done on the CPU: it is tiny); with ``U`` its r left singular vectors and
``lambda_j = s_j^2 / K`` the non-zero eigenvalues of ``Sigma_B``,

    NC1 = (1/K) sum_j u_j^T Sigma_W u_j / lambda_j,

so only the projections of the centred features on r directions are needed. With
``(features, labels)`` this takes two passes over the data and O(K d) memory (no d x d matrix); a
:class:`ClassStats` instead keeps the d x d within-class scatter ``N Sigma_W`` so that one
streaming pass suffices. Both routes read centred moments only (class means relative to a shift,
within-class scatters about the class means), so a feature offset far larger than the spread does
not cost digits (to 1e-8 relative at an offset 1e8 times the spread, float64 input).
:func:`nc1_lowmem` runs the two-pass route on any re-iterable stream (features too wide for d x d).

The streaming statistics themselves (:class:`ClassStats`, :class:`ClassStatsGroup`: input checks,
update, merge, distributed sync) live in :mod:`nclab.accumulators`; this module reads them and
re-exports both classes, so ``from nclab.metrics import ClassStats`` works as before.

Degenerate features (one policy for every measure, streaming path included): when a measure is
undefined it raises :class:`DegenerateFeaturesError` (a ``ValueError``) naming the measure and the
reason, never returning NaN, inf or 0 silently: zero between-class spread or all class means
coinciding (``nc1``, ``nc1_trace``, ``equinorm``, ``etf_error``), two coinciding class means
(``cdnv``), a centred class mean of zero length (``equiangularity``), a class whose features are
all zero (``numerical_rank``), and class means or variances that overflow float64 (every measure;
``ClassStats.update`` raises it when squared deviations from the class means overflow). Missing
classes keep their own ``ValueError`` (``allow_missing=True`` drops them).

Pseudo-inverse tolerance: eigenvalues of ``Sigma_B`` at most ``rtol * lambda_max`` are treated as
zero, ``rtol = 1e-10`` by default (NumPy's ``pinv`` default, 1e-15, lies below the rounding noise of
an explicitly formed d x d float64 ``Sigma_B`` once d is in the thousands).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass

import torch

from .accumulators import (  # the state half; re-exported: ``from nclab.metrics import ClassStats``
    _F64,
    ClassStats,
    ClassStatsGroup,
    DegenerateFeaturesError,
    _bad_counts,
    _check_features,
    _check_labels,
    _check_same_device,
    _infer_k,
    _raise_bad,
)

__all__ = [
    "ClassStats",
    "ClassStatsGroup",
    "DegenerateFeaturesError",
    "CollapseReport",
    "nc1",
    "nc1_lowmem",
    "nc1_trace",
    "cdnv",
    "numerical_rank",
    "equinorm",
    "equiangularity",
    "etf_error",
    "self_duality",
    "ncc_agreement",
    "collapse_report",
    "class_means",
    "simplex_etf",
]

_DEFAULT_RTOL = 1e-10
_CHUNK_ELEMS = 1 << 24  # rows per float64 chunk = this // d (128 MiB of float64; x4 on GPUs)


# --------------------------------------------------------------------------- moments
@dataclass
class _Moments:
    """First-order statistics of the present classes, with within-class sums of squares."""

    counts: torch.Tensor  # (K',) float64
    means: torch.Tensor  # (K', d) float64, relative to ``shift`` (mu_k - c)
    within_ss: torch.Tensor  # (K',) sum_{i in k} ||h_i - mu_k||^2
    classes: list[int]  # original indices of the present classes
    num_classes: int  # K before dropping missing classes
    shift: torch.Tensor  # (d,) c: every measure but cdnv's coincidence scale is shift-invariant

    @property
    def k(self) -> int:
        return len(self.classes)

    @property
    def n(self) -> float:
        return float(self.counts.sum())


def _present(counts: torch.Tensor, allow_missing: bool) -> torch.Tensor:
    missing = torch.nonzero(counts == 0).flatten().tolist()
    if missing and not allow_missing:
        shown = ", ".join(map(str, missing[:20])) + (" ..." if len(missing) > 20 else "")
        raise ValueError(
            f"{len(missing)} of {len(counts)} classes have no samples (classes {shown}): pass "
            "num_classes matching the data, or allow_missing=True to drop them"
        )
    if missing:
        warnings.warn(f"dropping {len(missing)} classes without samples: {missing[:20]}",
                      stacklevel=3)
    present = torch.nonzero(counts > 0).flatten()
    if len(present) < 2:
        raise ValueError(f"collapse metrics need at least two classes with samples, got "
                         f"{len(present)}")
    return present


def _moments_from_stats(stats: ClassStats, allow_missing: bool) -> _Moments:
    stats._require_data()
    keep = _present(stats.counts, allow_missing)
    shift, rel = stats._relative_means()
    return _Moments(stats.counts[keep], rel[keep], stats.within_ss[keep], keep.tolist(),
                    stats.num_classes, shift)


def _chunked(h: torch.Tensor, y: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    elems = _CHUNK_ELEMS * (4 if h.device.type == "cuda" else 1)
    rows = max(1, elems // max(1, h.shape[1]))
    return [(h[i:i + rows], y[i:i + rows]) for i in range(0, max(1, len(h)), rows)]


def _features_sums(
    h: torch.Tensor, y: torch.Tensor, num_classes: int | None, allow_missing: bool
) -> tuple[_Moments, list[tuple[torch.Tensor, torch.Tensor]], torch.Tensor]:
    """One pass over in-memory features: class counts, means (relative to the shift, all K rows,
    0 for empty classes) and exact within-class sums of squares (centred moments)."""
    _check_features(h)
    _check_labels(y, h.shape[0])
    _check_same_device(h, y)
    k = _infer_k(y, num_classes)
    chunks = _chunked(h, y)
    stats = ClassStats(k, low_memory=True, check="eager")  # few big chunks: a sync each is free
    for hc, yc in chunks:
        stats.update(hc, yc)
    mom = _moments_from_stats(stats, allow_missing)
    return mom, chunks, stats._relative_means()[1]


def _features_moments(
    h: torch.Tensor, y: torch.Tensor, num_classes: int | None, allow_missing: bool
) -> _Moments:
    """Class moments of in-memory features with exact (centred) within-class sums of squares."""
    return _features_sums(h, y, num_classes, allow_missing)[0]


def _proj_pass(
    data: Iterable[tuple[torch.Tensor, torch.Tensor]],
    means_all: torch.Tensor,
    u_scaled: torch.Tensor,
    shift: torch.Tensor,
) -> torch.Tensor:
    """sum_i ||(h_i - mu_{y_i}) U Lambda^{-1/2}||^2, as (h - c) U - ((M - c) U)[y] (one GEMM per
    chunk; ``means_all`` are the class means relative to the shift ``c``)."""
    mu_u = means_all @ u_scaled
    proj = torch.zeros((), dtype=_F64, device=means_all.device)
    for h, y in data:
        _check_features(h)
        _check_labels(y, h.shape[0])
        if h.shape[0] == 0:
            continue
        y = y.to(means_all.device).long()
        p = (h.to(device=means_all.device, dtype=_F64) - shift) @ u_scaled
        p -= mu_u[y]
        proj += (p * p).sum()
    return proj


def _resolve(x, labels, num_classes, allow_missing, fn: str) -> tuple[_Moments, ClassStats | None]:
    if isinstance(x, ClassStats):
        if labels is not None:
            raise ValueError(f"{fn}(stats) takes no labels: they are already in the ClassStats")
        if num_classes is not None and num_classes != x.num_classes:
            raise ValueError(f"num_classes={num_classes} disagrees with the ClassStats "
                             f"({x.num_classes} classes)")
        return _finite_moments(_moments_from_stats(x, allow_missing), fn), x
    if labels is None:
        raise ValueError(f"{fn} needs a ClassStats, or features and labels: {fn}(H, y)")
    return _finite_moments(_features_moments(x, labels, num_classes, allow_missing), fn), None


def _undefined(fn: str, why: str) -> DegenerateFeaturesError:
    """The one error of every degenerate case: '<measure> is undefined: <why>'."""
    return DegenerateFeaturesError(f"{fn} is undefined: {why}")


def _spread(value: float, fn: str, what: str) -> float:
    """``value`` - a size of the between-class spread (a trace, a norm, an eigenvalue) - if it is
    positive and finite; else ``fn``'s DegenerateFeaturesError: 0 means all class means coincide,
    inf or NaN an overflow of float64."""
    if value > 0 and math.isfinite(value):
        return value
    why = ("all class means coincide (zero between-class spread)" if value == 0 else
           "it overflows float64; rescale the features")
    raise _undefined(fn, f"{what} = {value} ({why})")


def _finite_moments(mom: _Moments, fn: str) -> _Moments:
    """``mom``, or a DegenerateFeaturesError when a class mean or within-class sum of squares is
    not finite (feature values whose squares overflow float64)."""
    if not all(bool(torch.isfinite(t).all()) for t in (mom.means, mom.within_ss, mom.shift)):
        raise _undefined(fn, "class means or within-class variances overflow float64 (feature "
                             "values too large); rescale the features")
    return mom


# --------------------------------------------------------------------------- between-class part
def _global_mean(mom: _Moments, global_mean: str) -> torch.Tensor:
    if global_mean == "classes":
        return mom.means.mean(0)
    if global_mean == "weighted":
        return (mom.counts[:, None] * mom.means).sum(0) / mom.counts.sum()
    raise ValueError(f"global_mean must be 'classes' (paper: mean of class means) or 'weighted' "
                     f"(sample-weighted), got {global_mean!r}")


def _centred_means(mom: _Moments, global_mean: str = "classes") -> torch.Tensor:
    """M~ as (K', d): rows mu_k - mu_G."""
    return mom.means - _global_mean(mom, global_mean)


def _sigma_b_eig(m_tilde: torch.Tensor, rtol: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Non-zero eigenpairs of Sigma_B = M~^T M~ / K for M~ (K', d) given as rows mu_k - mu_G.

    Returns ``U`` (d, r) on M~'s device and ``lambda`` (r,), keeping lambda > rtol * lambda_max.
    Fast path: eigh of the K' x K' Gram M~ M~^T on the CPU (tiny), U = M~^T V / s. When the kept
    spectrum spans more than 1e6 (where the Gram's squared condition number would cost digits)
    the thin SVD of M~ itself is used instead."""
    if not (isinstance(rtol, (int, float)) and not isinstance(rtol, bool) and 0 <= rtol < 1):
        raise ValueError(f"rtol must be a number in [0, 1) (relative eigenvalue cut-off of Sigma_B), "
                         f"got {rtol!r}")
    k = m_tilde.shape[0]
    m_cpu = m_tilde.cpu()
    gram = m_cpu @ m_cpu.T
    _spread(float(gram.diagonal().max()), "NC1", "max_k ||mu_k - mu_G||^2")
    evals, evecs = torch.linalg.eigh(gram)
    lam_max = _spread(float(evals[-1]) / k, "NC1", "lambda_max(Sigma_B)")
    lam = evals / k
    keep = lam > rtol * lam_max
    if float(lam[keep].min()) >= 1e-6 * lam_max:
        s = evals[keep].sqrt()
        v = evecs[:, keep].to(m_tilde.device)
        u = (m_tilde.T @ v) / s.to(m_tilde.device)
        return u, lam[keep].to(m_tilde.device)
    _, sv, vh = torch.linalg.svd(m_cpu, full_matrices=False)
    lam = sv * sv / k
    keep = lam > rtol * lam.max()
    return vh[keep].T.contiguous().to(m_tilde.device), lam[keep].to(m_tilde.device)


# --------------------------------------------------------------------------- NC1
def nc1(
    x: ClassStats | torch.Tensor,
    labels: torch.Tensor | None = None,
    *,
    num_classes: int | None = None,
    global_mean: str = "classes",
    rtol: float = _DEFAULT_RTOL,
    allow_missing: bool = False,
) -> float:
    """NC1 = (1/K) tr(Sigma_W Sigma_B^+) (paper eq. 4); smaller = more collapsed.

    ``x`` is a :class:`ClassStats` or features (N, d) with ``labels``. K = ``num_classes`` if
    given, else the largest label + 1. ``global_mean``: ``"classes"`` (paper, mean of the class
    means) or ``"weighted"`` (sample-weighted). Eigenvalues of Sigma_B <= ``rtol * lambda_max`` count
    as zero. Classes without samples raise unless ``allow_missing`` (then dropped, K shrinks)."""
    if isinstance(x, ClassStats):
        mom, stats = _resolve(x, labels, num_classes, allow_missing, "nc1")
        u, lam = _sigma_b_eig(_centred_means(mom, global_mean), rtol)
        w = ((stats.within_scatter @ u) * u).sum(0) / mom.n  # u_j^T Sigma_W u_j
        return float((w / lam).sum()) / mom.k
    if labels is None:
        raise ValueError("nc1 needs a ClassStats, or features and labels: nc1(H, y)")
    mom, chunks, means_all = _features_sums(x, labels, num_classes, allow_missing)
    u, lam = _sigma_b_eig(_centred_means(mom, global_mean), rtol)
    proj = _proj_pass(chunks, means_all, u / lam.sqrt(), mom.shift)
    return float(proj) / mom.n / mom.k


def nc1_lowmem(
    data: Iterable[tuple[torch.Tensor, torch.Tensor]] | Callable[[], Iterable],
    num_classes: int,
    *,
    device: torch.device | str | None = None,
    global_mean: str = "classes",
    rtol: float = _DEFAULT_RTOL,
    allow_missing: bool = False,
    progress: bool = False,
) -> float:
    """NC1 with O(K d) memory in two passes over ``data`` - for very wide features.

    ``data`` yields ``(h, y)`` batches and must be re-iterable (a list, ``nclab.data.batches``-style
    object) or be a zero-argument callable returning a fresh iterable (e.g. a generator function
    that runs the model). Pass 1 accumulates class means; pass 2 projects the centred features on
    the r <= K-1 eigenvectors of Sigma_B. Same number as :func:`nc1` up to float64 rounding."""

    def stream() -> Iterator:
        it = data() if callable(data) else data
        if not callable(data) and iter(it) is it:
            raise ValueError("nc1_lowmem needs two passes: pass a re-iterable (list, batches "
                             "object) or a callable returning a fresh iterator, not an iterator")
        if progress:
            from tqdm.auto import tqdm

            return iter(tqdm(it, desc="nc1_lowmem", leave=False))
        return iter(it)

    stats = ClassStats(num_classes, device=device, low_memory=True)
    for h, y in stream():
        stats.update(h if device is None else h.to(device), y if device is None else y.to(device))
    mom = _moments_from_stats(stats, allow_missing)
    u, lam = _sigma_b_eig(_centred_means(mom, global_mean), rtol)
    proj = _proj_pass(stream(), stats._relative_means()[1], u / lam.sqrt(), mom.shift)
    return float(proj) / mom.n / mom.k


def nc1_trace(
    x: ClassStats | torch.Tensor,
    labels: torch.Tensor | None = None,
    *,
    num_classes: int | None = None,
    global_mean: str = "classes",
    allow_missing: bool = False,
) -> float:
    """Trace-ratio NC1: tr(Sigma_W) / tr(Sigma_B), no pseudo-inverse."""
    mom, _ = _resolve(x, labels, num_classes, allow_missing, "nc1_trace")
    tr_w = float(mom.within_ss.sum()) / mom.n
    m = _centred_means(mom, global_mean)
    tr_b = _spread(float((m * m).sum()) / mom.k, "nc1_trace", "tr(Sigma_B)")
    return tr_w / tr_b


def cdnv(
    x: ClassStats | torch.Tensor,
    labels: torch.Tensor | None = None,
    *,
    num_classes: int | None = None,
    allow_missing: bool = False,
) -> float:
    """Class-distance normalised variance (Galanti et al. 2022), averaged over class pairs i != j:

    (Var_i + Var_j) / (2 ||mu_i - mu_j||^2),  Var_k = (1/n_k) sum_{i in k} ||h_i - mu_k||^2."""
    mom, _ = _resolve(x, labels, num_classes, allow_missing, "cdnv")
    var = mom.within_ss / mom.counts
    dist2 = _pairwise_sq(mom.means)
    k = mom.k
    off = ~torch.eye(k, dtype=torch.bool, device=dist2.device)
    # coinciding up to float64 rounding: ||mu_i - mu_j|| <= 1e-12 max_k ||mu_k|| (absolute means)
    absolute = mom.means + mom.shift
    scale2 = float((absolute * absolute).sum(1).max())
    same = torch.nonzero((dist2 <= 1e-24 * scale2) & off)
    if len(same):
        i, j = (mom.classes[int(t)] for t in same[0])
        raise _undefined("cdnv", f"classes {i} and {j} have coinciding means (||mu_i - mu_j|| <= "
                                 f"1e-12 max ||mu_k||; {len(same) // 2} such pairs)")
    _spread(float(dist2.max()), "cdnv", "max ||mu_i - mu_j||^2")
    ratio = (var[:, None] + var[None, :]) / (2 * dist2)
    return float(ratio[off].mean())


def _pairwise_sq(m: torch.Tensor) -> torch.Tensor:
    """||m_i - m_j||^2 for all rows, from exact differences (no Gram cancellation), in blocks."""
    k, d = m.shape
    rows = max(1, _CHUNK_ELEMS // max(1, k * d))
    out = torch.empty(k, k, dtype=m.dtype, device=m.device)
    for i in range(0, k, rows):
        diff = m[i:i + rows, None, :] - m[None, :, :]
        out[i:i + rows] = (diff * diff).sum(-1)
    return out


def _power_top_eig(matvec: Callable[[torch.Tensor], torch.Tensor], v0: torch.Tensor,
                   tol: float, max_iter: int) -> float:
    """Largest eigenvalue of a PSD operator by power iteration (Rayleigh quotient)."""
    v = v0 / v0.norm()
    lam_prev = 0.0
    for it in range(max_iter):
        w = matvec(v)
        lam_t = (v * w).sum()
        nrm = w.norm()
        if float(nrm) == 0.0:
            return 0.0
        v = w / nrm
        if it % 4 == 3 or it == max_iter - 1:
            lam = float(lam_t)
            if abs(lam - lam_prev) <= tol * abs(lam):
                return lam
            lam_prev = lam
    warnings.warn(f"numerical_rank: power iteration did not converge to tol={tol} within "
                  f"max_iter={max_iter} steps; the spectral norm (and the rank) is approximate, "
                  f"raise max_iter", UserWarning, stacklevel=3)
    return float((v * matvec(v)).sum())


def _rank_ratio(fro: float, top: float, k: int) -> float:
    """||H_k||_F^2 / ||H_k||_2^2, or a DegenerateFeaturesError for all-zero or overflowing H_k."""
    if not (math.isfinite(fro) and math.isfinite(top)):
        raise _undefined("numerical_rank", f"class {k}'s squared features overflow float64; rescale "
                                           f"the features")
    if top <= 0:
        raise _undefined("numerical_rank", f"class {k}'s features are all zero (||H_k||_2 = 0)")
    return fro / top


def numerical_rank(
    x: ClassStats | torch.Tensor,
    labels: torch.Tensor | None = None,
    *,
    num_classes: int | None = None,
    allow_missing: bool = False,
    tol: float = 1e-13,
    max_iter: int = 2000,
) -> float:
    """Numerical rank (paper App. D): (1/K) sum_k ||H_k||_F^2 / ||H_k||_2^2 over each class's
    uncentred feature matrix H_k; the spectral norm comes from power iteration (relative change of
    the Rayleigh quotient <= ``tol``, at most ``max_iter`` steps). Takes features, or a
    ``ClassStats(..., second_moments=True)``. An unconverged power iteration warns."""
    if isinstance(max_iter, bool) or not isinstance(max_iter, int) or max_iter < 0:
        raise ValueError(f"max_iter must be an int >= 0, got {max_iter!r}")
    gen = torch.Generator().manual_seed(0)
    if isinstance(x, ClassStats):
        if num_classes is not None and num_classes != x.num_classes:
            raise ValueError(f"num_classes={num_classes} disagrees with the ClassStats")
        if x.class_second_moments is None:
            raise ValueError("numerical_rank needs per-class second moments: build the ClassStats "
                             "with second_moments=True (K*d*d memory), or pass features and labels")
        x._require_data()
        keep = _present(x.counts, allow_missing).tolist()
        second, sums, sq_norms = x.class_second_moments, x.sums, x.sq_norms  # formed once
        shift, _ = x._relative_means()
        # all-zero up to the rounding of means stored relative to the shift c: ||h||^2 <= (1e-12 ||c||)^2
        zero = sq_norms <= 1e-24 * float(shift @ shift) * x.counts
        ranks = []
        for k in keep:
            if bool(zero[k]):
                _rank_ratio(0.0, 0.0, k)  # raises: class k's features are all zero
            s_k = second[k]
            v0 = sums[k] + 1e-3 * sums[k].norm() * torch.randn(
                x.dim, generator=gen, dtype=_F64).to(s_k.device)
            if float(v0.norm()) == 0:
                v0 = torch.ones(x.dim, dtype=_F64, device=s_k.device)
            top = _power_top_eig(lambda v, s_k=s_k: s_k @ v, v0, tol, max_iter)
            ranks.append(_rank_ratio(float(sq_norms[k]), top, k))
        return sum(ranks) / len(ranks)
    if labels is None:
        raise ValueError("numerical_rank needs a ClassStats or features and labels")
    h, y = x, labels
    _check_features(h)
    _check_labels(y, h.shape[0])
    _check_same_device(h, y)
    k_all = _infer_k(y, num_classes)
    nonfinite, bad_y = _bad_counts(h, y, k_all)
    if nonfinite or bad_y:
        _raise_bad(h, y, k_all, nonfinite, bad_y)
    counts = torch.bincount(y.long(), minlength=k_all).to(_F64)
    keep = _present(counts, allow_missing).tolist()
    order = torch.argsort(y)
    hs, ys = h[order], y[order].long()
    bounds = torch.cumsum(torch.bincount(ys, minlength=k_all), 0).tolist()
    ranks = []
    for k in keep:
        hk = hs[(bounds[k - 1] if k else 0):bounds[k]].to(_F64)
        v0 = hk.sum(0)
        v0 = v0 + 1e-3 * v0.norm() * torch.randn(h.shape[1], generator=gen, dtype=_F64).to(h.device)
        if float(v0.norm()) == 0:
            v0 = torch.ones(h.shape[1], dtype=_F64, device=h.device)
        if hk.shape[0] < hk.shape[1]:  # iterate in the smaller space
            v0 = hk @ v0
            top = _power_top_eig(lambda v, hk=hk: hk @ (hk.T @ v), v0, tol, max_iter)
        else:
            top = _power_top_eig(lambda v, hk=hk: hk.T @ (hk @ v), v0, tol, max_iter)
        fro = float((hk * hk).sum())
        ranks.append(_rank_ratio(fro, top, k))
    return sum(ranks) / len(ranks)


# --------------------------------------------------------------------------- NC2 - NC4
def class_means(
    x: ClassStats | torch.Tensor,
    labels: torch.Tensor | None = None,
    *,
    num_classes: int | None = None,
) -> torch.Tensor:
    """Class means mu_k (K, d) in float64 (NaN rows for classes without samples)."""
    if isinstance(x, ClassStats):
        return x.means
    if labels is None:
        raise ValueError("class_means needs a ClassStats, or features and labels")
    _check_features(x)
    _check_labels(labels, x.shape[0])
    _check_same_device(x, labels)
    stats = ClassStats(_infer_k(labels, num_classes), low_memory=True, check="eager")
    for hc, yc in _chunked(x, labels):
        stats.update(hc, yc)
    return stats.means


def equinorm(
    x: ClassStats | torch.Tensor,
    labels: torch.Tensor | None = None,
    *,
    num_classes: int | None = None,
    global_mean: str = "classes",
    allow_missing: bool = False,
) -> float:
    """NC2 equinorm: std / mean of the norms ||mu_k - mu_G|| (population std; 0 = equal norms)."""
    mom, _ = _resolve(x, labels, num_classes, allow_missing, "equinorm")
    norms = _centred_means(mom, global_mean).norm(dim=1)
    _spread(float(norms.mean()), "equinorm", "the mean length of the centred class means")
    return float(norms.std(correction=0) / norms.mean())


def equiangularity(
    x: ClassStats | torch.Tensor,
    labels: torch.Tensor | None = None,
    *,
    num_classes: int | None = None,
    global_mean: str = "classes",
    allow_missing: bool = False,
) -> float:
    """NC2 equiangularity: population std of the cosines between centred means mu_i - mu_G,
    mu_j - mu_G over pairs i != j (0 = all angles equal, as in a simplex ETF)."""
    mom, _ = _resolve(x, labels, num_classes, allow_missing, "equiangularity")
    m = _centred_means(mom, global_mean)
    norms = m.norm(dim=1, keepdim=True)
    zero = torch.nonzero(norms.flatten() == 0).flatten().tolist()
    if zero:
        raise _undefined("equiangularity", f"the centred means of classes "
                                           f"{[mom.classes[i] for i in zero][:20]} have length 0 (they "
                                           f"equal the global mean), so their angles are undefined")
    _spread(float(norms.max()), "equiangularity", "the largest centred class-mean length")
    m = m / norms
    cos = m @ m.T
    off = ~torch.eye(mom.k, dtype=torch.bool, device=m.device)
    return float(cos[off].std(correction=0))


def _etf_distance(g: torch.Tensor) -> float:
    k = g.shape[0]
    etf = torch.eye(k, dtype=_F64, device=g.device) - 1.0 / k
    return float((g / g.norm() - etf / etf.norm()).norm())


def etf_error(
    x: ClassStats | torch.Tensor,
    labels: torch.Tensor | None = None,
    *,
    num_classes: int | None = None,
    global_mean: str = "classes",
    allow_missing: bool = False,
) -> float:
    """NC2 distance to a simplex ETF: || G/||G||_F - (I - 11^T/K)/||I - 11^T/K||_F ||_F with
    G = M~^T M~ the K x K Gram of the centred class means (0 = simplex ETF, up to scale)."""
    mom, _ = _resolve(x, labels, num_classes, allow_missing, "etf_error")
    m = _centred_means(mom, global_mean)
    g = m @ m.T
    _spread(float(g.norm()), "etf_error", "||G||_F of the centred class means' Gram")
    return _etf_distance(g)


def self_duality(
    x: ClassStats | torch.Tensor,
    W: torch.Tensor,
    labels: torch.Tensor | None = None,
    *,
    num_classes: int | None = None,
    global_mean: str = "classes",
    allow_missing: bool = False,
) -> float:
    """NC3 self-duality: || W/||W||_F - M~^T/||M~||_F ||_F^2 for a K x d classifier W (rows w_k),
    M~^T the K x d matrix of centred class means (0 = classifier aligned with the means)."""
    if not isinstance(W, torch.Tensor) or W.ndim != 2:
        raise ValueError("W must be the (K, d) classifier weight, e.g. model.fc.weight; call "
                         "self_duality(stats, W) or self_duality(features, W, labels=y)")
    mom, _ = _resolve(x, labels, num_classes, allow_missing, "self_duality")
    m = _centred_means(mom, global_mean)
    if W.shape[0] != mom.num_classes or W.shape[1] != m.shape[1]:
        raise ValueError(f"W has shape {tuple(W.shape)}; expected (K, d) = "
                         f"({mom.num_classes}, {m.shape[1]})")
    w = W.detach().to(device=m.device, dtype=_F64)[mom.classes]
    return float(((w / w.norm() - m / m.norm()) ** 2).sum())


@torch.no_grad()
def ncc_agreement(
    features: torch.Tensor,
    labels: torch.Tensor,
    W: torch.Tensor,
    b: torch.Tensor | None = None,
    *,
    means: ClassStats | torch.Tensor | None = None,
    num_classes: int | None = None,
) -> float:
    """NC4: the fraction of samples where the classifier argmax_k (W h + b)_k equals the nearest
    class mean argmin_k ||h - mu_k|| (means from ``means`` - a ClassStats or a (K, d) tensor, e.g.
    the training means - else from these features and labels)."""
    _check_features(features)
    _check_labels(labels, features.shape[0])
    _check_same_device(features, labels)
    d = features.shape[1]
    if not isinstance(W, torch.Tensor) or W.ndim != 2 or W.shape[1] != d:
        raise ValueError(f"W must be (K, {d}) for features of width {d}, got "
                         f"{tuple(W.shape) if isinstance(W, torch.Tensor) else type(W).__name__}")
    if b is not None and (not isinstance(b, torch.Tensor) or tuple(b.shape) != (W.shape[0],)):
        raise ValueError(f"b must be ({W.shape[0]},) like W's rows, got "
                         f"{tuple(b.shape) if isinstance(b, torch.Tensor) else type(b).__name__}")
    k = W.shape[0] if num_classes is None else num_classes
    if isinstance(means, ClassStats):
        mu = means.means
    elif means is None:
        mu = class_means(features, labels, num_classes=k)
    else:
        mu = means.to(_F64)
        if mu.ndim != 2 or mu.shape[1] != d:
            raise ValueError(f"means must be (K, {d}) for features of width {d}, got {tuple(mu.shape)}")
    if mu.shape[0] != W.shape[0]:
        raise ValueError(f"{mu.shape[0]} class means but W has {W.shape[0]} rows")
    mu = mu.to(features.device)
    present = ~torch.isnan(mu).any(1)
    agree = 0
    for hc, _ in _chunked(features, labels):
        h64 = hc.to(_F64)
        logits = h64 @ W.detach().to(device=hc.device, dtype=_F64).T
        if b is not None:
            logits = logits + b.detach().to(device=hc.device, dtype=_F64)
        d2 = (h64 * h64).sum(1, keepdim=True) - 2 * h64 @ mu.nan_to_num(0).T + (mu * mu).sum(1)
        d2 = d2.masked_fill(~present, math.inf)
        agree += int((logits.argmax(1) == d2.argmin(1)).sum())
    return agree / max(1, features.shape[0])


# --------------------------------------------------------------------------- report, ETF
@dataclass
class CollapseReport:
    """Every collapse metric at once (None where the inputs did not allow it)."""

    nc1: float | None
    nc1_trace: float
    cdnv: float
    equinorm: float
    equiangularity: float
    etf_error: float
    numerical_rank: float | None = None
    self_duality: float | None = None
    ncc_agreement: float | None = None
    num_classes: int = 0
    num_samples: int = 0
    dim: int = 0

    def as_dict(self) -> dict:
        return asdict(self)


def collapse_report(
    x: ClassStats | torch.Tensor,
    labels: torch.Tensor | None = None,
    *,
    W: torch.Tensor | None = None,
    b: torch.Tensor | None = None,
    num_classes: int | None = None,
    global_mean: str = "classes",
    allow_missing: bool = False,
) -> CollapseReport:
    """All collapse metrics of a ClassStats or of (features, labels); with the classifier ``W``
    (and ``b``) also NC3 self-duality and (features only) NC4 agreement. NC1 of a low-memory
    ClassStats and the numerical rank of a ClassStats without per-class moments are None."""
    kw = dict(num_classes=num_classes, allow_missing=allow_missing)
    with warnings.catch_warnings():
        if allow_missing:
            warnings.simplefilter("ignore")
        is_stats = isinstance(x, ClassStats)
        if is_stats:
            mom, _ = _resolve(x, labels, num_classes, allow_missing, "collapse_report")
            dim = x.dim
        else:
            mom, _ = _resolve(x, labels, num_classes, allow_missing, "collapse_report")
            dim = x.shape[1]
        nc1_val = None if (is_stats and x.low_memory) else nc1(
            x, labels, global_mean=global_mean, **kw)
        rank = None
        if not is_stats or x.second_moments:
            rank = numerical_rank(x, labels, **kw)
        return CollapseReport(
            nc1=nc1_val,
            nc1_trace=nc1_trace(x, labels, global_mean=global_mean, **kw),
            cdnv=cdnv(x, labels, **kw),
            equinorm=equinorm(x, labels, global_mean=global_mean, **kw),
            equiangularity=equiangularity(x, labels, global_mean=global_mean, **kw),
            etf_error=etf_error(x, labels, global_mean=global_mean, **kw),
            numerical_rank=rank,
            self_duality=None if W is None else self_duality(
                x, W, labels, global_mean=global_mean, **kw),
            ncc_agreement=None if (W is None or is_stats) else ncc_agreement(
                x, labels, W, b, num_classes=mom.num_classes),
            num_classes=mom.k,
            num_samples=int(round(mom.n)),
            dim=dim,
        )


def simplex_etf(num_classes: int, dim: int | None = None, *, scale: float = 1.0,
                seed: int | None = None) -> torch.Tensor:
    """A simplex equiangular tight frame: K unit vectors (rows, (K, dim)) with pairwise cosine
    -1/(K-1), i.e. M = sqrt(K/(K-1)) P (I - 11^T/K) for a d x K partial isometry P. ``dim``
    defaults to K - 1 (the smallest space that holds it); ``seed`` draws a random rotation."""
    k = num_classes
    if not isinstance(k, int) or k < 2:
        raise ValueError(f"a simplex ETF needs num_classes >= 2, got {k!r}")
    d = k - 1 if dim is None else dim
    if d < k - 1:
        raise ValueError(f"a K={k} simplex ETF needs dim >= K-1 = {k - 1}, got {d}")
    centred = torch.eye(k, dtype=_F64) - 1.0 / k
    # orthonormal basis of the (K-1)-dim space orthogonal to 1: first K-1 left singular vectors
    basis, _, _ = torch.linalg.svd(centred)
    coords = centred @ basis[:, : k - 1]  # (K, K-1), rows have norm sqrt((K-1)/K)
    coords = coords * math.sqrt(k / (k - 1))
    rot = torch.eye(d, dtype=_F64)[: k - 1]  # (K-1, d)
    if seed is not None:
        gen = torch.Generator().manual_seed(seed)
        q, _ = torch.linalg.qr(torch.randn(d, d, generator=gen, dtype=_F64))
        rot = q[: k - 1]
    return scale * coords @ rot
