"""Streaming per-class statistics: the state and update half of the neural-collapse measures.

A :class:`ClassStats` keeps, in float64, for features ``h_i`` in R^d with labels ``y_i`` in [0, K),
centred moments of every class: the count ``n_k``, the class mean ``mu_k`` (stored relative to a
shift ``c``, the mean of the first batch) and the within-class sum of squares
``sum_{y_i = k} ||h_i - mu_k||^2``; by default also the within-class scatter

    N Sigma_W = sum_i (h_i - mu_{y_i})(h_i - mu_{y_i})^T

(d x d, summed over classes; ``second_moments=True`` keeps one per class). Nothing is formed as an
uncentred sum of squares, so the statistics stay exact when the features share an offset far larger
than their spread (a raw ``sum h h^T - n mu mu^T`` loses every digit at an offset 1e8 times the
spread). A batch is folded in by Chan, Golub and LeVeque's pairwise update: with the batch's count
``n_b``, mean ``m_b`` and centred scatter ``W_b``, and ``delta = m_b - m_a``,

    n = n_a + n_b,  m = m_a + delta n_b / n,  W = W_a + W_b + delta delta^T n_a n_b / n,

the same rule that ``merge`` applies to two accumulators and ``sync`` to the ranks of a distributed
run; the result does not depend on the chunking or the order (up to float64 rounding). The
uncentred quantities of earlier versions (``sums``, ``sq_norms``, ``second_moment``,
``class_second_moments``, ``total_second_moment``) are still read as before; they are formed from
the centred ones (adding non-negative terms, no cancellation). The measures that read the
statistics (NC1 - NC4, CDNV, numerical rank, the collapse report) are in :mod:`nclab.metrics`,
which re-exports both classes: ``from nclab.metrics import ClassStats`` keeps working.

Input checks: features must be a 2-D finite tensor and labels integers in [0, K) on the same device.
By default ``ClassStats.update`` raises on bad input inside the call that received it, which costs
one host sync per call. ``check="auto"`` (what :func:`nclab.features.extract` and
:func:`nclab.train.fit` use) does not synchronise on a GPU: its checks run on the device, a bad
batch adds nothing, and the ``ValueError`` is raised by the next ``update`` or read. The update of
a given batch shape is captured once as a CUDA graph, so each further update is a handful of
launches. Many feature sets with shared labels (the layer taps of one forward pass) go into one
:class:`ClassStatsGroup`, which updates all of them in a fixed number of kernels per batch.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import torch

from ._checks import positive_int

__all__ = ["ClassStats", "ClassStatsGroup", "DegenerateFeaturesError"]

_F64 = torch.float64
_OVERFLOW = ("squared deviations of the features from their class means overflow float64: "
             "rescale the features")


class DegenerateFeaturesError(ValueError):
    """A collapse measure is undefined for these features: zero between-class spread, coinciding
    class means, all-zero features, or values whose squares overflow float64. The message names
    the quantity and why (see :mod:`nclab.metrics`)."""


# --------------------------------------------------------------------------- input checks
def _check_features(h: torch.Tensor, name: str = "features") -> None:
    if not isinstance(h, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(h).__name__}")
    if h.ndim != 2:
        raise ValueError(
            f"{name} must be 2-D (N, d), got shape {tuple(h.shape)}. Pool feature maps first: "
            "nclab.features.extract(..., pool='avg') does it for you, or h.mean(dim=(2, 3)) for "
            "(N, C, H, W) maps / a token average for (N, T, D) transformer outputs."
        )
    if h.dtype == torch.bool or h.is_complex():
        raise ValueError(f"{name} must be real numbers, got dtype {h.dtype}")


def _check_labels(y: torch.Tensor, n: int) -> None:
    if not isinstance(y, torch.Tensor):
        raise TypeError(f"labels must be a torch.Tensor, got {type(y).__name__}")
    if y.ndim != 1:
        raise ValueError(f"labels must be 1-D (N,), got shape {tuple(y.shape)}")
    if y.dtype.is_floating_point or y.is_complex() or y.dtype == torch.bool:
        raise ValueError(f"labels must be an integer tensor, got dtype {y.dtype}")
    if len(y) != n:
        raise ValueError(f"features and labels have different lengths: {n} rows vs {len(y)} labels")


def _check_same_device(h: torch.Tensor, y: torch.Tensor) -> None:
    if h.device != y.device:
        raise ValueError(
            f"features are on {h.device} but labels on {y.device}: move both to one device"
        )


def _bad_counts(h: torch.Tensor, y: torch.Tensor, k: int) -> tuple[int, int]:
    """(number of non-finite feature entries, number of labels outside [0, k)), one device sync."""
    nonfinite = (~torch.isfinite(h)).sum() if h.dtype.is_floating_point else h.new_zeros((),
                                                                                       dtype=torch.long)
    bad_y = ((y < 0) | (y >= k)).sum()
    a, b = torch.stack([nonfinite.long(), bad_y.long()]).tolist()
    return a, b


def _raise_bad(h: torch.Tensor, y: torch.Tensor, k: int, nonfinite: int, bad_y: int) -> None:
    if nonfinite:
        nan = int(torch.isnan(h).sum())
        raise ValueError(
            f"features contain {nonfinite} non-finite values ({nan} NaN, {nonfinite - nan} +/-Inf) "
            f"out of {h.numel()}: check the model (e.g. fp16 overflow; try bf16 or fp32)"
        )
    if bad_y:
        vals = torch.unique(y[(y < 0) | (y >= k)]).tolist()
        shown = ", ".join(map(str, vals[:10])) + (" ..." if len(vals) > 10 else "")
        raise ValueError(
            f"{bad_y} labels are outside [0, {k}) (values: {shown}); pass the right num_classes "
            "or relabel the classes to 0..K-1 (nclab.data.class_subset does it)"
        )


def _num_classes(num_classes) -> int:
    """``num_classes`` as a Python int >= 1 (see :func:`nclab._checks.positive_int`)."""
    return positive_int(num_classes, "num_classes")


def _infer_k(y: torch.Tensor, num_classes: int | None) -> int:
    if num_classes is not None:
        return _num_classes(num_classes)
    if len(y) == 0:
        raise ValueError("no samples: cannot infer num_classes from empty labels")
    return int(y.max()) + 1


def _normalize_device(device: torch.device | str) -> torch.device:
    """``cuda`` -> ``cuda:<current>`` so that it compares equal to tensors' devices."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None and torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return device


class _Done:
    """Stands in for a completed CUDA event."""

    def record(self) -> None:
        return None

    def synchronize(self) -> None:
        return None


def _bad_pending(owner: ClassStats | ClassStatsGroup) -> tuple | None:
    """Consume ``owner``'s pending deferred check, waiting for its device flags: the ``(features,
    labels)`` of that batch if it was bad (labels outside [0, K) or a non-finite sum of squares),
    else None."""
    if owner._pending is None:
        return None
    flags, event, h, y = owner._pending
    owner._pending = None
    event.synchronize()
    bad_y, sq_total = flags.tolist()
    return (h, y) if bad_y or not math.isfinite(sq_total) else None


def _class_sums(out: torch.Tensor, y: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """out[k] += sum of the rows v[i] with y[i] == k (in place). Atomic index_add_ on GPUs; on
    CPUs index_put_(accumulate=True), measured several times faster there for (N, d) rows."""
    if out.device.type == "cpu":
        return out.index_put_((y,), v, accumulate=True)
    return out.index_add_(0, y, v)




def _chan_combine(acc: torch.Tensor, dim: int, nb: torch.Tensor, mb: torch.Tensor, m2b: torch.Tensor,
                  indicator: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Fold a part (counts ``nb`` (K,), means ``mb`` (K, D), within sums of squares ``m2b`` (K, T))
    into ``acc`` = [means (D) | counts | within sums of squares (T)] in place (Chan et al.):
    ``delta = mb - m_a``, ``m += delta nb / n``, ``m2 += m2b + (na nb / n) ||delta||^2`` (per tap:
    the columns of ``indicator`` (D, T); None: one tap of all D columns). Returns ``delta`` (K, D)
    and the weights ``na nb / n`` (K,) for the scatter correction ``W += delta^T diag(w) delta``.
    Classes with ``nb = 0`` are left exactly as they were; no host sync (CUDA-graph safe)."""
    na = acc[:, dim]
    n = na + nb
    frac = nb / n.clamp_min(1.0)
    w = na * frac
    delta = mb - acc[:, :dim]
    sq = delta * delta
    sq = sq.sum(1, keepdim=True) if indicator is None else sq @ indicator
    acc[:, :dim].addcmul_(delta, frac[:, None])
    acc[:, dim].copy_(n)
    acc[:, dim + 1:].add_(m2b.view(acc.shape[0], -1)).addcmul_(sq, w[:, None])
    return delta, w


def _batch_centred(h: torch.Tensor, y: torch.Tensor, k: int, shift: torch.Tensor,
                   indicator: torch.Tensor | None = None):
    """Centred moments of one batch ``h`` (N, D), no state change: the batch's counts (K,), means
    relative to ``shift`` (K, D) and within sums of squares (K, T) (per tap: the columns of
    ``indicator`` (D, T); None: one tap), and a float64 buffer (N + K, D + 1) whose first N rows
    hold the centred features ``h - shift - m_b[y]`` in the first D columns (the last K rows are
    left for Chan's correction, so that one GEMM of N + K rows updates a scatter). A NaN/Inf
    feature, or squares overflowing float64, make the sums of squares non-finite. About four
    passes over the batch, no host sync."""
    n, dim = h.shape
    buf = torch.empty(n + k, dim + 1, dtype=_F64, device=h.device)
    x = buf[:n, :dim]
    torch.sub(h, shift, out=x)
    buf[:n, dim].fill_(1.0)
    s = torch.zeros(k, dim + 1, dtype=_F64, device=h.device)
    _class_sums(s, y, buf[:n])
    nb = s[:, dim]
    mb = s[:, :dim] / nb.clamp_min(1.0)[:, None]
    x.sub_(mb[y])
    sq = torch.linalg.vecdot(x, x)[:, None] if indicator is None else (x * x) @ indicator
    m2b = torch.zeros(k, sq.shape[1], dtype=_F64, device=h.device)
    _class_sums(m2b, y, sq)
    return nb, mb, m2b, buf


def _shift_for(h: torch.Tensor, acc: torch.Tensor, shift: torch.Tensor, deferred: bool) -> torch.Tensor:
    """The shift this batch is centred by: the stored one, or this batch's mean while nothing has
    been accumulated (any vector near the data works: moments are stored relative to it). Eager:
    decided on the host (no reduction once data came); deferred: on the device (CUDA-graph safe)."""
    count = acc[:, shift.shape[0]]  # [means (D) | counts | ...]
    if not deferred:
        return h.mean(0, dtype=_F64) if float(count.sum()) == 0 else shift
    return torch.where(count.sum() == 0, h.mean(0, dtype=_F64), shift)


def _class_scatters_add(out: torch.Tensor, c: torch.Tensor, y: torch.Tensor) -> None:
    """out[k] += sum_{y_i = k} c_i c_i^T (K, d, d) in place: one GEMM per class present in the
    batch (one host sync; only for ``second_moments=True``)."""
    order = torch.argsort(y)
    ys, cs = y[order], c[order]
    classes, sizes = torch.unique_consecutive(ys, return_counts=True)
    start = 0
    for cls, n_c in zip(classes.tolist(), sizes.tolist()):
        block = cs[start:start + n_c]
        out[cls].addmm_(block.T, block)
        start += n_c


# --------------------------------------------------------------------------- ClassStats
class ClassStats:
    """Streaming per-class statistics of features, accumulated in float64 as centred moments.

    Holds per class ``k``: the count ``n_k``, the mean ``mu_k`` and the within-class sum of squares
    ``sum_i ||h_i - mu_k||^2``; and, unless ``low_memory``, the within-class scatter
    ``N Sigma_W = sum_i (h_i - mu_{y_i})(h_i - mu_{y_i})^T`` (d x d) - or, with
    ``second_moments=True``, one d x d scatter per class (K d^2 memory; needed by
    :func:`nclab.metrics.numerical_rank`). ``update`` accepts any chunking and order; the result
    does not depend on them (up to float64 rounding), nor on an offset shared by the features.

    Read them as ``counts``, ``means``, ``within_ss``, ``within_scatter``, ``Sigma_W`` and
    ``class_scatters``; the uncentred ``sums``, ``sq_norms``, ``second_moment`` (total, d x d),
    ``class_second_moments`` and ``total_second_moment`` are formed from them on each read.

    Args:
        num_classes: K; labels must lie in [0, K).
        dim: feature width d (inferred from the first batch if None).
        device: where the statistics live (default: the device of the first batch).
        second_moments: keep per-class scatters (for the numerical rank).
        low_memory: keep only O(K d) statistics (no d x d). ``nc1`` then needs the features again:
            use :func:`nclab.metrics.nc1_lowmem`; every other metric works from these statistics.
        check: when bad input (NaN/Inf, labels outside [0, K)) raises. ``"eager"``: inside the
            ``update`` that received it (one device sync per update). ``"deferred"``: no sync;
            the batch is left out of the statistics on the device and the ``ValueError`` is
            raised by the next ``update``, ``check()`` or read of the statistics. ``"auto"``:
            eager on CPUs (a sync is free there), deferred on GPUs, so that streaming many layer
            taps does not stall the forward pass (nclab's own streaming loops use it). Default
            ``"eager"``. Either way bad data never enters the statistics and always raises.
    """

    def __init__(
        self,
        num_classes: int,
        dim: int | None = None,
        device: torch.device | str | None = None,
        second_moments: bool = False,
        low_memory: bool = False,
        check: str = "eager",
    ) -> None:
        if check not in ("auto", "eager", "deferred"):
            raise ValueError(f"check must be 'auto', 'eager' or 'deferred', got {check!r}")
        num_classes = _num_classes(num_classes)
        if dim is not None and (not isinstance(dim, int) or dim < 1):
            raise ValueError(f"dim must be a positive int or None, got {dim!r}")
        if second_moments and low_memory:
            raise ValueError("second_moments=True needs K*d*d memory; it contradicts low_memory=True")
        self.num_classes = num_classes
        self.dim = dim
        self.device = _normalize_device(device) if device is not None else None
        self.second_moments = second_moments
        self.low_memory = low_memory
        self.check_mode = check
        self._pending: tuple | None = None  # deferred check: (host flags, event, h, y)
        self._graphs: dict = {}  # CUDA graphs of the deferred update, by (shape, dtype)
        self._host_flags: torch.Tensor | None = None
        self._event = None
        self._shift: torch.Tensor | None = None  # (d,): means are stored relative to it
        self._acc: torch.Tensor | None = None  # (K, d + 2): [means - shift | counts | within SS]
        self._scatter: torch.Tensor | None = None  # (d, d): sum of the class scatters
        self._class_scatter: torch.Tensor | None = None  # (K, d, d)
        if dim is not None and self.device is not None:
            self._allocate(dim, self.device)

    # ---------------------------------------------------------------- state
    def _allocate(self, dim: int, device: torch.device) -> None:
        self._graphs = {}
        k = self.num_classes
        self.dim, self.device = dim, device
        self._shift = torch.zeros(dim, dtype=_F64, device=device)
        self._acc = torch.zeros(k, dim + 2, dtype=_F64, device=device)
        if self.second_moments:
            self._class_scatter = torch.zeros(k, dim, dim, dtype=_F64, device=device)
        elif not self.low_memory:
            self._scatter = torch.zeros(dim, dim, dtype=_F64, device=device)

    def _tensors(self) -> dict[str, torch.Tensor]:
        names = ("_shift", "_acc", "_scatter", "_class_scatter")
        return {n: getattr(self, n) for n in names if getattr(self, n) is not None}

    @property
    def counts(self) -> torch.Tensor | None:
        """n_k per class (K,), float64 (raises first a pending deferred error, see ``check``)."""
        self.check()
        return None if self._acc is None else self._acc[:, self.dim]

    def _relative_means(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(shift c (d,), mu_k - c (K, d)): the stored means, exact relative to the shift (what
        translation-invariant measures should read); rows of empty classes are 0."""
        self.check()
        return self._shift, self._acc[:, : self.dim]

    @property
    def means(self) -> torch.Tensor:
        """Class means mu_k (K, d), float64; NaN rows for classes without samples."""
        self._require_data()
        mu = self._shift + self._acc[:, : self.dim]
        return mu.masked_fill(self._acc[:, self.dim, None] == 0, math.nan)

    def _means0(self) -> torch.Tensor:
        """Class means with 0 rows for empty classes."""
        return (self._shift + self._acc[:, : self.dim]) * (self._acc[:, self.dim, None] > 0)

    @property
    def within_ss(self) -> torch.Tensor | None:
        """sum_{i in k} ||h_i - mu_k||^2 per class (K,), float64."""
        self.check()
        return None if self._acc is None else self._acc[:, self.dim + 1]

    @property
    def sums(self) -> torch.Tensor | None:
        """sum_{i in k} h_i = n_k mu_k per class (K, d), float64 (raises first a pending deferred
        error)."""
        self.check()
        return None if self._acc is None else self._means0() * self._acc[:, self.dim, None]

    @property
    def sq_norms(self) -> torch.Tensor | None:
        """sum_{i in k} ||h_i||^2 = within SS + n_k ||mu_k||^2 per class (K,), float64."""
        self.check()
        if self._acc is None:
            return None
        mu = self._means0()
        return self._acc[:, self.dim + 1] + self._acc[:, self.dim] * (mu * mu).sum(1)

    def _uncentre(self, scatter: torch.Tensor) -> torch.Tensor:
        mu = self._means0()
        return scatter + (mu * self._acc[:, self.dim, None]).T @ mu

    @property
    def within_scatter(self) -> torch.Tensor:
        """N Sigma_W = sum_i (h_i - mu_{y_i})(h_i - mu_{y_i})^T (d, d), float64."""
        self._require_data()
        if self._class_scatter is not None:
            return self._class_scatter.sum(0)
        if self._scatter is None:
            raise ValueError(
                "this ClassStats was built with low_memory=True and holds no d x d scatter: "
                "use nclab.metrics.nc1_lowmem(data, ...) (two passes, O(K d) memory) for NC1"
            )
        return self._scatter

    @property
    def Sigma_W(self) -> torch.Tensor:  # noqa: N802 (the paper's symbol)
        """Within-class covariance Sigma_W = (1/N) sum_i (h_i - mu_{y_i})(h_i - mu_{y_i})^T."""
        return self.within_scatter / float(self.counts.sum())

    @property
    def class_scatters(self) -> torch.Tensor | None:
        """sum_{i in k} (h_i - mu_k)(h_i - mu_k)^T per class (K, d, d), if ``second_moments``."""
        self.check()
        return self._class_scatter

    @property
    def second_moment(self) -> torch.Tensor | None:
        """S = sum_i h_i h_i^T (d, d), float64; None with ``low_memory`` or ``second_moments``
        (then see ``class_second_moments``)."""
        self.check()
        return None if self._scatter is None else self._uncentre(self._scatter)

    @property
    def class_second_moments(self) -> torch.Tensor | None:
        """sum_{i in k} h_i h_i^T per class (K, d, d), float64, if ``second_moments``."""
        self.check()
        if self._class_scatter is None:
            return None
        mu = self._means0()
        return self._class_scatter + (mu * self._acc[:, self.dim, None])[:, :, None] * mu[:, None, :]

    @property
    def total_second_moment(self) -> torch.Tensor:
        """S = sum_i h_i h_i^T (d, d), float64 (prefer ``within_scatter``: exact under offsets)."""
        return self._uncentre(self.within_scatter)

    def reset(self) -> ClassStats:
        """Zero every statistic (keeps K, d and the device)."""
        for t in self._tensors().values():
            t.zero_()
        return self

    def check(self) -> ClassStats:
        """Raise now the ``ValueError`` of a bad batch found by a deferred check (if any)."""
        bad = _bad_pending(self)
        if bad is not None:
            h, y = bad
            k = self.num_classes
            nonfinite = int((~torch.isfinite(h)).sum()) if h.dtype.is_floating_point else 0
            bad_y = int(((y < 0) | (y >= k)).sum())
            if not bad_y and not nonfinite:
                raise DegenerateFeaturesError(_OVERFLOW)
            _raise_bad(h, y, k, nonfinite, bad_y)
        return self

    @property
    def num_samples(self) -> int:
        """N, the number of samples accumulated so far."""
        self.check()
        return 0 if self.counts is None else int(round(float(self.counts.sum())))

    @property
    def missing_classes(self) -> list[int]:
        """Classes in [0, K) without a sample yet."""
        self.check()
        if self.counts is None:
            return list(range(self.num_classes))
        return torch.nonzero(self.counts == 0).flatten().tolist()

    def _require_data(self) -> None:
        self.check()
        if self.counts is None or float(self.counts.sum()) == 0:
            raise ValueError("ClassStats is empty: call update(h, y) with some samples first")

    def __repr__(self) -> str:
        mode = ("per-class second moments" if self.second_moments else
                "low memory" if self.low_memory else "within-class scatter")
        return (f"ClassStats(num_classes={self.num_classes}, dim={self.dim}, device={self.device}, "
                f"N={self.num_samples}, {mode})")

    # ---------------------------------------------------------------- accumulation
    @torch.no_grad()
    def update(self, h: torch.Tensor, y: torch.Tensor) -> ClassStats:
        """Add a batch: features ``h`` (N, d) of any real dtype, integer labels ``y`` (N,).

        Raises ``ValueError`` on non-2-D features, length mismatch, mixed devices, non-finite
        features (with how many) and labels outside [0, K) (with which values)."""
        _check_features(h)
        _check_labels(y, h.shape[0])
        _check_same_device(h, y)
        if self.device is not None and h.device != self.device:
            raise ValueError(
                f"features are on {h.device} but this ClassStats lives on {self.device}: move the "
                "batch (h.to(stats.device)) or build the ClassStats with device=None"
            )
        if self.dim is not None and h.shape[1] != self.dim:
            raise ValueError(f"features have {h.shape[1]} columns but this ClassStats has dim "
                             f"{self.dim}")
        if h.shape[0] == 0:
            return self
        self.check()  # a previous batch's deferred error fires first
        if self._acc is None:
            self._allocate(h.shape[1], h.device)
        y = y.long()
        deferred = self.check_mode == "deferred" or (self.check_mode == "auto"
                                                     and h.device.type != "cpu")
        if deferred and h.device.type == "cuda" and self._class_scatter is None:
            graph = self._graph_for(h, y)
            if graph is not None:
                return self._replay(graph, h, y)
        if deferred:  # no sync: a bad batch adds nothing; its error is raised later
            flags = torch.zeros(2, dtype=_F64, device=h.device)
            self._accumulate(h, y, flags)
            host = torch.empty(2, dtype=_F64, pin_memory=h.device.type == "cuda")
            host.copy_(flags, non_blocking=True)
            event = torch.cuda.Event() if h.device.type == "cuda" else _Done()
            event.record()
            self._pending = (host, event, h, y)
        else:
            self._accumulate(h, y, None)
        return self

    def _accumulate(self, h: torch.Tensor, y: torch.Tensor, flags: torch.Tensor | None) -> None:
        """Fold the batch into the state (Chan et al.). ``flags`` None: eager, one device sync
        before the state changes, raising on bad input. Else deferred (no host sync, so it is also
        captured in a CUDA graph when there are no per-class scatters): ``flags`` receives [number
        of bad labels, the batch's within sum of squares] (non-finite iff a feature is NaN/Inf or
        squares overflow) and a bad batch changes nothing."""
        n, d = h.shape
        k = self.num_classes
        y_safe = y.clamp(0, k - 1)
        shift = _shift_for(h, self._acc, self._shift, deferred=flags is not None)
        nb, mb, m2b, buf = _batch_centred(h, y_safe, k, shift)
        c = buf[:n, :d]
        if flags is None:  # non-finite features make the sum of squares non-finite
            bad, total = torch.stack([(y_safe != y).sum().to(_F64), m2b.sum()]).tolist()
            if bad or not math.isfinite(total):
                nf = int((~torch.isfinite(h)).sum()) if h.dtype.is_floating_point else 0
                if bad or nf:
                    _raise_bad(h, y, k, nf, int(bad))
                raise DegenerateFeaturesError(_OVERFLOW)
        else:
            torch.stack([(y_safe != y).sum().to(_F64), m2b.sum()], out=flags)
            ok = (flags[0] == 0) & torch.isfinite(flags[1])
            nb, mb, m2b = (torch.where(ok, t, 0.0) for t in (nb, mb, m2b))
            c.masked_fill_(~ok, 0.0)
            shift = torch.where(ok, shift, self._shift)
        self._shift.copy_(shift)
        delta, w = _chan_combine(self._acc, d, nb, mb, m2b)
        if self._scatter is not None:  # W += C^T C + delta^T diag(w) delta, as one GEMM
            torch.mul(delta, w.sqrt()[:, None], out=buf[n:, :d])
            a = buf[:, :d]
            self._scatter.addmm_(a.T, a)
        if self._class_scatter is not None:
            _class_scatters_add(self._class_scatter, c, y_safe)
            self._class_scatter.baddbmm_((delta * w[:, None])[:, :, None], delta[:, None, :])

    # ---------------------------------------------------------------- CUDA-graph update
    def _graph_for(self, h: torch.Tensor, y: torch.Tensor):
        """A captured CUDA graph of the deferred update for this batch shape (one kernel launch
        per update instead of ~25: streaming many taps then costs little CPU time)."""
        key = (tuple(h.shape), h.dtype)
        if key in self._graphs:
            return self._graphs[key]
        graph = None
        if len(self._graphs) < 4 and not torch.cuda.is_current_stream_capturing():
            try:
                with torch.cuda.device(h.device):
                    static_h = torch.zeros(h.shape, dtype=h.dtype, device=h.device)
                    static_y = torch.full((h.shape[0],), -1, dtype=torch.long, device=h.device)
                    flags = torch.zeros(2, dtype=_F64, device=h.device)
                    side = torch.cuda.Stream()
                    side.wait_stream(torch.cuda.current_stream())
                    with torch.cuda.stream(side):  # warm-up: labels -1 make it change nothing
                        self._accumulate(static_h, static_y, flags)
                    torch.cuda.current_stream().wait_stream(side)
                    g = torch.cuda.CUDAGraph()
                    with torch.cuda.graph(g):
                        self._accumulate(static_h, static_y, flags)
                    graph = (g, static_h, static_y, flags)
            except Exception:  # capture unsupported here: the plain deferred path is used
                graph = None
        self._graphs[key] = graph
        return graph

    def _replay(self, graph, h: torch.Tensor, y: torch.Tensor) -> ClassStats:
        g, static_h, static_y, flags = graph
        static_h.copy_(h)
        static_y.copy_(y)
        g.replay()
        if self._host_flags is None:
            self._host_flags = torch.empty(2, dtype=_F64, pin_memory=True)
        self._host_flags.copy_(flags, non_blocking=True)
        if self._event is None:
            self._event = torch.cuda.Event()
        self._event.record()
        self._pending = (self._host_flags, self._event, h, y)
        return self

    def _compatible(self, other: ClassStats) -> None:
        if not isinstance(other, ClassStats):
            raise TypeError(f"can only merge a ClassStats, got {type(other).__name__}")
        if other.num_classes != self.num_classes:
            raise ValueError(f"cannot merge ClassStats with {other.num_classes} classes into one "
                             f"with {self.num_classes}")
        if (other.second_moments, other.low_memory) != (self.second_moments, self.low_memory):
            raise ValueError("cannot merge ClassStats built with different second_moments / "
                             "low_memory options")
        if self.dim is not None and other.dim is not None and self.dim != other.dim:
            raise ValueError(f"cannot merge ClassStats of dim {other.dim} into dim {self.dim}")

    @torch.no_grad()
    def merge(self, other: ClassStats) -> ClassStats:
        """Add ``other``'s statistics into ``self`` in place (moved to ``self``'s device), by the
        pairwise update of centred moments. Merging an object into itself is refused (it would
        double every count)."""
        self._compatible(other)
        if other is self:
            raise ValueError("cannot merge a ClassStats into itself (every count would double); "
                             "merge a copy or another object")
        self.check()
        other.check()
        if other._acc is None or float(other._acc[:, other.dim].sum()) == 0:
            return self
        if self._acc is None:
            self._allocate(other.dim, self.device if self.device is not None else other.device)
        theirs = {n: t.to(self.device) for n, t in other._tensors().items()}
        d = self.dim
        if float(self._acc[:, d].sum()) == 0:
            for name, t in theirs.items():
                getattr(self, name).copy_(t)
            return self
        acc = theirs["_acc"]
        mb = acc[:, :d] + (theirs["_shift"] - self._shift)  # their means relative to our shift
        delta, w = _chan_combine(self._acc, d, acc[:, d], mb, acc[:, d + 1])
        if self._scatter is not None:
            self._scatter.add_(theirs["_scatter"]).addmm_((delta * w[:, None]).T, delta)
        if self._class_scatter is not None:
            self._class_scatter.add_(theirs["_class_scatter"]).baddbmm_(
                (delta * w[:, None])[:, :, None], delta[:, None, :])
        return self

    @torch.no_grad()
    def sync(self, group=None) -> ClassStats:
        """Combine the statistics of every ``torch.distributed`` rank into every rank.

        Call it once, after the last ``update`` on each rank. A no-op when ``torch.distributed`` is
        not initialised (single process). Ranks that saw no data take part with zeros. Centred
        moments cannot simply be summed: ``_sync_with`` makes the three all-reduces."""
        import torch.distributed as dist

        self.check()
        if not (dist.is_available() and dist.is_initialized()):
            return self
        dev = self.device
        if dev is None:
            dev = torch.device("cuda", torch.cuda.current_device()) if (
                dist.get_backend(group) == "nccl") else torch.device("cpu")
        dim = torch.tensor([self.dim or 0], dtype=torch.long, device=dev)
        dist.all_reduce(dim, op=dist.ReduceOp.MAX, group=group)
        dim = int(dim)
        if dim == 0:
            return self
        if self.dim is not None and self.dim != dim:
            raise ValueError(f"ranks disagree on the feature width: {self.dim} here, {dim} elsewhere")
        if self._acc is None:
            self._allocate(dim, dev)
        return self._sync_with(lambda t: dist.all_reduce(t, op=dist.ReduceOp.SUM, group=group))

    @torch.no_grad()
    def _sync_with(self, reduce_sum: Callable[[torch.Tensor], object]) -> ClassStats:
        """The combination behind :meth:`sync`, for any in-place sum over ranks ``reduce_sum``.

        1. A common shift ``c``: the count-weighted mean of the ranks' shifts; each rank re-expresses
           its means relative to it (a difference of nearby vectors, exact).
        2. Sum ``n_k`` and ``n_k (mu_k - c)`` -> the global means ``m_k`` relative to ``c``.
        3. Each rank adds its parallel-axis term ``n_k^r (mu_k^r - m_k)(mu_k^r - m_k)^T`` to its
           scatters (and ``n_k^r ||mu_k^r - m_k||^2`` to its within sums of squares); sum those.
        Every rank calls it once with the same sequence of reductions."""
        d = self.dim
        n_r = self._acc[:, d].clone()
        total_r = n_r.sum()
        has = total_r > 0
        head = torch.cat([torch.where(has, self._shift * total_r, 0.0), total_r.view(1)])
        reduce_sum(head)
        total = float(head[d])
        if total == 0:
            return self
        shift = head[:d] / total
        present = (n_r > 0)[:, None]
        rel = torch.where(present, self._acc[:, :d] + (self._shift - shift), 0.0)
        first = torch.cat([rel * n_r[:, None], n_r[:, None]], 1)
        reduce_sum(first)
        n = first[:, d]
        mean = first[:, :d] / n.clamp_min(1.0)[:, None]
        delta = torch.where(present, rel - mean, 0.0)
        wd = delta * n_r[:, None]
        m2 = self._acc[:, d + 1] + (wd * delta).sum(1)
        parts = [m2.view(-1)]
        if self._scatter is not None:
            parts.append((self._scatter + wd.T @ delta).view(-1))
        if self._class_scatter is not None:
            parts.append((self._class_scatter + wd[:, :, None] * delta[:, None, :]).view(-1))
        flat = torch.cat(parts)
        reduce_sum(flat)
        k = self.num_classes
        self._shift.copy_(shift)
        self._acc[:, :d].copy_(mean)
        self._acc[:, d].copy_(n)
        self._acc[:, d + 1].copy_(flat[:k])
        if self._scatter is not None:
            self._scatter.copy_(flat[k:k + d * d].view(d, d))
        if self._class_scatter is not None:
            self._class_scatter.copy_(flat[k:].view(k, d, d))
        return self

    def to(self, device: torch.device | str) -> ClassStats:
        """Move the statistics to ``device`` (in place); returns ``self``."""
        self.check()
        device = _normalize_device(device)
        for name, t in self._tensors().items():
            setattr(self, name, t.to(device))
        self.device = device
        self._graphs = {}
        return self


# --------------------------------------------------------------------------- ClassStatsGroup
class ClassStatsGroup:
    """Streaming class statistics of several feature sets that share their labels - the layer taps
    of one forward pass - updated together in a fixed number of kernels per batch.

    ``group.update({name: h_name}, y)`` has the effect of ``stats[name].update(h_name, y)`` for
    every name, and ``group.stats()`` returns those ``{name: ClassStats}`` (the same numbers up to
    float64 summation order; empty ones for every name in ``names`` if no batch came). Instead of
    ~25 small kernels per feature set, a batch costs one concatenation into a joint float64 buffer
    ``[h_1 | ... | h_T | 1]`` (feature sets of equal width side by side), one ``index_add`` for
    every class sum and count, one for the per-tap within sums of squares, and per group of equal
    widths one batched GEMM over the N centred rows and K correction rows ``sqrt(w_k) delta_k``
    (the centred scatter plus Chan's correction): a number of launches that does not grow with T
    (ResNet-18's 9 taps: 4 width groups; a ViT's 12 layers: 1). Every name must come in every
    update, in one order: ``names`` if given, else the first update's. ``check`` and
    ``low_memory`` mean what they mean for :class:`ClassStats`; errors name the feature set that
    caused them."""

    def __init__(self, num_classes: int, device: torch.device | str | None = None,
                 low_memory: bool = False, check: str = "auto",
                 names: Iterable[str] | None = None) -> None:
        if check not in ("auto", "eager", "deferred"):
            raise ValueError(f"check must be 'auto', 'eager' or 'deferred', got {check!r}")
        num_classes = _num_classes(num_classes)
        self.num_classes = num_classes
        self.device = _normalize_device(device) if device is not None else None
        self.low_memory = low_memory
        self.check_mode = check
        self.names: list[str] | None = None if names is None else list(names)
        if self.names is not None and (not self.names or len(set(self.names)) != len(self.names)):
            raise ValueError(f"names must be distinct and non-empty, got {self.names}")
        self._dims: dict[str, int] = {}
        self._order: list[str] = []  # names sorted by width (stable): equal widths adjacent
        self._offsets: dict[str, int] = {}
        self._groups: list[tuple[int, int, list[str]]] = []  # (width, first column, names)
        self._moments: list[torch.Tensor] = []  # per group (G, d, d): centred within scatters
        self._indicator: torch.Tensor | None = None  # (D, T): column t sums tap t's squares
        self._shift: torch.Tensor | None = None  # (D,)
        self._acc: torch.Tensor | None = None  # (K, D + 1 + T): [means - shift | counts | SS]
        self._pending: tuple | None = None

    def __repr__(self) -> str:
        widths = ", ".join(f"{n}: {self._dims.get(n)}" for n in self.names or [])
        return f"ClassStatsGroup(num_classes={self.num_classes}, {{{widths}}})"

    def _allocate(self, hs: dict[str, torch.Tensor], device: torch.device) -> None:
        self.names = list(hs)
        self._dims = {n: h.shape[1] for n, h in hs.items()}
        self._order = sorted(self.names, key=lambda n: self._dims[n])
        self.device = device
        col = 0
        self._groups = []
        for n in self._order:
            d = self._dims[n]
            self._offsets[n] = col
            if self._groups and self._groups[-1][0] == d:
                self._groups[-1][2].append(n)
            else:
                self._groups.append((d, col, [n]))
            col += d
        total, t = col, len(self.names)
        self._indicator = torch.zeros(total, t, dtype=_F64, device=device)
        for j, n in enumerate(self._order):
            self._indicator[self._offsets[n]:self._offsets[n] + self._dims[n], j] = 1.0
        self._shift = torch.zeros(total, dtype=_F64, device=device)
        self._acc = torch.zeros(self.num_classes, total + 1 + t, dtype=_F64, device=device)
        self._moments = [] if self.low_memory else [
            torch.zeros(len(ns), d, d, dtype=_F64, device=device) for d, _, ns in self._groups]

    def _validate(self, hs: dict[str, torch.Tensor], y: torch.Tensor) -> None:
        if not isinstance(hs, dict) or not hs:
            raise ValueError("ClassStatsGroup.update takes a non-empty dict {name: features (N, d)}")
        for name, h in hs.items():
            try:
                _check_features(h)
                _check_labels(y, h.shape[0])
                _check_same_device(h, y)
            except (TypeError, ValueError) as err:
                raise type(err)(f"{name!r}: {err}") from None
        if self.names is not None:
            if list(hs) != self.names:
                raise ValueError(f"this group streams {self.names}; got {list(hs)} (every name, "
                                 "in the same order, in every update)")
        if self._acc is not None:
            for name, h in hs.items():
                if h.shape[1] != self._dims[name]:
                    raise ValueError(f"{name!r} has {h.shape[1]} columns, earlier batches "
                                     f"{self._dims[name]}")
        devices = {h.device for h in hs.values()}
        if len(devices) > 1 or (self.device is not None and devices != {self.device}):
            raise ValueError(f"features are on {sorted(map(str, devices))}; this group lives on "
                             f"{self.device}: move every batch to one device")

    def _raise_for(self, hs: dict[str, torch.Tensor], y: torch.Tensor) -> None:
        """Raise the ValueError of a bad batch, naming the feature set."""
        k = self.num_classes
        bad_y = int(((y < 0) | (y >= k)).sum())
        for name, h in hs.items():
            nonfinite = int((~torch.isfinite(h)).sum()) if h.dtype.is_floating_point else 0
            if nonfinite or bad_y:
                try:
                    _raise_bad(h, y, k, nonfinite, bad_y)
                except ValueError as err:
                    raise ValueError(f"{name!r}: {err}") from None
        raise DegenerateFeaturesError(_OVERFLOW)

    def check(self) -> ClassStatsGroup:
        """Raise now the ``ValueError`` of a bad batch found by a deferred check (if any)."""
        bad = _bad_pending(self)
        if bad is not None:
            self._raise_for(*bad)
        return self

    @torch.no_grad()
    def update(self, hs: dict[str, torch.Tensor], y: torch.Tensor) -> ClassStatsGroup:
        """Add one batch: ``hs`` = {name: features (N, d_name)}, labels ``y`` (N,) shared by all."""
        self._validate(hs, y)
        self.check()
        n = len(y)
        if n == 0:
            return self
        if self._acc is None:
            self._allocate(hs, next(iter(hs.values())).device)
        k, total = self.num_classes, self._indicator.shape[0]
        y = y.long()
        y_safe = y.clamp(0, k - 1)
        deferred = self.check_mode == "deferred" or (self.check_mode == "auto"
                                                     and y.device.type != "cpu")
        h = torch.cat([hs[name] for name in self._order], 1)
        shift = _shift_for(h, self._acc, self._shift, deferred)
        nb, mb, m2b, buf = _batch_centred(h, y_safe, k, shift, self._indicator)
        c = buf[:n, :total]
        flags = torch.stack([(y_safe != y).sum().to(_F64), m2b.sum()])
        if deferred:  # no host sync; a bad batch changes nothing and raises at the next call
            ok = (flags[0] == 0) & torch.isfinite(flags[1])
            nb, mb, m2b = (torch.where(ok, t, 0.0) for t in (nb, mb, m2b))
            c.masked_fill_(~ok, 0.0)
            shift = torch.where(ok, shift, self._shift)
            host = torch.empty(2, dtype=_F64, pin_memory=y.device.type == "cuda")
            host.copy_(flags, non_blocking=True)
            event = torch.cuda.Event() if y.device.type == "cuda" else _Done()
            event.record()
            self._pending = (host, event, dict(hs), y)
        else:
            bad, sq_total = flags.tolist()
            if bad or not math.isfinite(sq_total):
                self._raise_for(hs, y)
        self._shift.copy_(shift)
        delta, w = _chan_combine(self._acc, total, nb, mb, m2b, self._indicator)
        if self._moments:  # rows N..N+K: sqrt(w) delta, so one batched GEMM adds both terms
            torch.mul(delta, w.sqrt()[:, None], out=buf[n:, :total])
        for (d, col, names), s in zip(self._groups, self._moments):
            g = len(names)
            a = buf[:, col:col + g * d].view(n + k, g, d).transpose(0, 1)  # (G, N + K, d)
            s.baddbmm_(a.transpose(1, 2), a)
        return self

    def stats(self) -> dict[str, ClassStats]:
        """``{name: ClassStats}`` with the statistics streamed so far (copies, in update order)."""
        self.check()
        if self._acc is None:
            if self.names is None:
                raise ValueError("ClassStatsGroup is empty and has no names: call "
                                 "update({name: h}, y) first, or give names=")
            return {n: ClassStats(self.num_classes, device=self.device, low_memory=self.low_memory,
                                  check=self.check_mode) for n in self.names}
        total, out = self._indicator.shape[0], {}
        position = {n: j for j, n in enumerate(self._order)}
        moment_of = {n: (gi, i) for gi, (_, _, ns) in enumerate(self._groups)
                     for i, n in enumerate(ns)}
        for name in self.names:
            d, col, j = self._dims[name], self._offsets[name], position[name]
            cs = ClassStats(self.num_classes, dim=d, device=self.device,
                            low_memory=self.low_memory, check=self.check_mode)
            cs._shift.copy_(self._shift[col:col + d])
            cs._acc.copy_(torch.cat([self._acc[:, col:col + d], self._acc[:, total:total + 1],
                                     self._acc[:, total + 1 + j:total + 2 + j]], 1))
            if not self.low_memory:
                gi, i = moment_of[name]
                cs._scatter.copy_(self._moments[gi][i])
            out[name] = cs
        return out
