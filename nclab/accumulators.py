"""Streaming per-class statistics: the state and update half of the neural-collapse measures.

A :class:`ClassStats` keeps, in float64, for features ``h_i`` in R^d with labels ``y_i`` in [0, K):
the count ``n_k``, the sum ``sum_{y_i = k} h_i`` and (by default) the second moment
``sum_{y_i = k} h_i h_i^T`` of every class, so that one streaming pass over any chunking of the data
gives the class means ``mu_k`` and the within-class covariance

    Sigma_W = (1/N) sum_i (h_i - mu_{y_i})(h_i - mu_{y_i})^T.

Two accumulators built on the same data in any split merge exactly (``merge``, ``+``), and a
distributed run sums them over processes (``all_reduce``). The measures that read them (NC1 - NC4,
CDNV, numerical rank, the collapse report) are in :mod:`nclab.metrics`, which re-exports both
classes: ``from nclab.metrics import ClassStats`` keeps working.

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
import operator
from collections.abc import Iterable

import torch

__all__ = ["ClassStats", "ClassStatsGroup", "DegenerateFeaturesError"]

_F64 = torch.float64


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
    """``num_classes`` as a Python int >= 1: NumPy/torch integers accepted, bool and floats refused."""
    if isinstance(num_classes, bool) or (isinstance(num_classes, torch.Tensor)
                                         and num_classes.dtype == torch.bool):
        raise ValueError(f"num_classes must be a positive int, got bool {num_classes!r}")
    try:
        k = operator.index(num_classes)
    except TypeError:
        raise ValueError(f"num_classes must be a positive int, got {num_classes!r}") from None
    if k < 1:
        raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
    return k


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


def _augmented(h: torch.Tensor) -> torch.Tensor:
    """[h | 1 | ||h||^2] in float64 (N, d + 2): one index_add then gives sums, counts, norms."""
    n, d = h.shape
    aug = torch.empty(n, d + 2, dtype=_F64, device=h.device)
    aug[:, :d].copy_(h)
    aug[:, d].fill_(1.0)
    torch.linalg.vecdot(aug[:, :d], aug[:, :d], out=aug[:, d + 1])
    return aug


class _Done:
    """Stands in for a completed CUDA event."""

    def record(self) -> None:
        return None

    def synchronize(self) -> None:
        return None


def _bad_pending(owner: ClassStats | ClassStatsGroup) -> tuple | None:
    """Consume ``owner``'s pending deferred check, waiting for its device flags: the ``(features,
    labels)`` of that batch if it was bad (labels outside [0, K) or non-finite norms), else None."""
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


# --------------------------------------------------------------------------- ClassStats
class ClassStats:
    """Streaming per-class statistics of features, accumulated in float64.

    Holds per class ``k``: the count ``n_k``, the sum ``sum_i h_i`` and the squared-norm sum
    ``sum_i ||h_i||^2``; and, unless ``low_memory``, the total second moment
    ``S = sum_i h_i h_i^T`` (d x d) - or, with ``second_moments=True``, one d x d second moment per
    class (K d^2 memory; needed by :func:`nclab.metrics.numerical_rank`). ``update`` accepts any chunking and
    order; the result does not depend on them (up to float64 rounding).

    Args:
        num_classes: K; labels must lie in [0, K).
        dim: feature width d (inferred from the first batch if None).
        device: where the statistics live (default: the device of the first batch).
        second_moments: keep per-class second moments (for the numerical rank).
        low_memory: keep only O(K d) statistics (no d x d). ``nc1`` then needs the features again:
            use :func:`nclab.metrics.nc1_lowmem`; every other metric works from these statistics.
        check: when bad input (NaN/Inf, labels outside [0, K)) raises. ``"eager"``: inside the
            ``update`` that received it (one device sync per update). ``"deferred"``: no sync;
            the batch is left out of the statistics on the device and the ``ValueError`` is
            raised by the next ``update``, ``check()`` or read of the statistics. ``"auto"``:
            eager on CPUs (a sync is free there), deferred on GPUs, so that streaming many layer
            taps does not stall the forward pass (nclab's own streaming loops use it). Default
            ``"eager"``. Either way bad data never enters
            the statistics and always raises.
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
        self._acc: torch.Tensor | None = None  # (K, d + 2): [sums | counts | squared norms]
        self.second_moment: torch.Tensor | None = None  # (d, d), total
        self.class_second_moments: torch.Tensor | None = None  # (K, d, d)
        if dim is not None and self.device is not None:
            self._allocate(dim, self.device)

    # ---------------------------------------------------------------- state
    def _allocate(self, dim: int, device: torch.device) -> None:
        self._graphs = {}
        k = self.num_classes
        self.dim, self.device = dim, device
        self._acc = torch.zeros(k, dim + 2, dtype=_F64, device=device)
        if self.second_moments:
            self.class_second_moments = torch.zeros(k, dim, dim, dtype=_F64, device=device)
        elif not self.low_memory:
            self.second_moment = torch.zeros(dim, dim, dtype=_F64, device=device)

    def _tensors(self) -> dict[str, torch.Tensor]:
        names = ("_acc", "second_moment", "class_second_moments")
        return {n: getattr(self, n) for n in names if getattr(self, n) is not None}

    @property
    def counts(self) -> torch.Tensor | None:
        """n_k per class (K,), float64 (raises first a pending deferred error, see ``check``)."""
        self.check()
        return None if self._acc is None else self._acc[:, self.dim]

    @property
    def sums(self) -> torch.Tensor | None:
        """sum_{i in k} h_i per class (K, d), float64 (raises first a pending deferred error)."""
        self.check()
        return None if self._acc is None else self._acc[:, : self.dim]

    @property
    def sq_norms(self) -> torch.Tensor | None:
        """sum_{i in k} ||h_i||^2 per class (K,), float64 (raises first a pending deferred error)."""
        self.check()
        return None if self._acc is None else self._acc[:, self.dim + 1]

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
                raise DegenerateFeaturesError("squared feature norms overflow float64: rescale the features")
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

    @property
    def means(self) -> torch.Tensor:
        """Class means mu_k (K, d), float64; NaN rows for classes without samples."""
        self._require_data()
        return self.sums / self.counts[:, None]

    @property
    def total_second_moment(self) -> torch.Tensor:
        """S = sum_i h_i h_i^T (d, d), float64."""
        self._require_data()
        if self.class_second_moments is not None:
            return self.class_second_moments.sum(0)
        if self.second_moment is None:
            raise ValueError(
                "this ClassStats was built with low_memory=True and holds no d x d second moment: "
                "use nclab.metrics.nc1_lowmem(data, ...) (two passes, O(K d) memory) for NC1"
            )
        return self.second_moment

    def _require_data(self) -> None:
        self.check()
        if self.counts is None or float(self.counts.sum()) == 0:
            raise ValueError("ClassStats is empty: call update(h, y) with some samples first")

    def __repr__(self) -> str:
        mode = ("per-class second moments" if self.second_moments else
                "low memory" if self.low_memory else "total second moment")
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
        d, k = h.shape[1], self.num_classes
        y = y.long()
        deferred = self.check_mode == "deferred" or (self.check_mode == "auto"
                                                     and h.device.type != "cpu")
        if deferred and h.device.type == "cuda" and self.class_second_moments is None:
            graph = self._graph_for(h, y)
            if graph is not None:
                return self._replay(graph, h, y)
        if deferred:  # no sync: a bad batch adds zeros; its error is raised later
            flags = torch.zeros(2, dtype=_F64, device=h.device)
            h64 = self._accumulate_deferred(h, y, flags)
            host = torch.empty(2, dtype=_F64, pin_memory=h.device.type == "cuda")
            host.copy_(flags, non_blocking=True)
            event = torch.cuda.Event() if h.device.type == "cuda" else _Done()
            event.record()
            self._pending = (host, event, h, y)
        else:  # one device sync, before anything touches the state
            y_safe = y.clamp(0, k - 1)
            bad, nf = torch.stack([(y_safe != y).sum(), (~torch.isfinite(h)).sum()
                                   if h.dtype.is_floating_point else y.new_zeros(())]).tolist()
            if bad or nf:
                _raise_bad(h, y, k, nf, bad)
            aug = _augmented(h)
            h64 = aug[:, :d]
            _class_sums(self._acc, y, aug)
        if self.class_second_moments is not None:
            order = torch.argsort(y)
            ys, hs = y[order], h64[order]
            classes, sizes = torch.unique_consecutive(ys, return_counts=True)
            start = 0
            for c, n_c in zip(classes.tolist(), sizes.tolist()):
                hc = hs[start:start + n_c]
                self.class_second_moments[c].addmm_(hc.T, hc)
                start += n_c
        elif self.second_moment is not None and not deferred:  # (deferred: added already)
            self.second_moment.addmm_(h64.T, h64)
        return self

    # ---------------------------------------------------------------- CUDA-graph update
    def _accumulate_deferred(self, h: torch.Tensor, y: torch.Tensor,
                             flags: torch.Tensor) -> torch.Tensor:
        """The update's device work with no host sync (few kernels: it is also captured in a CUDA
        graph). ``flags`` receives [number of bad labels, sum of squared norms] (the latter is
        non-finite iff some feature is NaN/Inf); a bad batch adds exact zeros. Returns the
        float64 features (zeroed for a bad batch)."""
        d, k = h.shape[1], self.num_classes
        y_safe = y.clamp(0, k - 1)
        aug = _augmented(h)
        torch.stack([(y_safe != y).sum().to(_F64), aug[:, d + 1].sum()], out=flags)
        ok = (flags[0] == 0) & torch.isfinite(flags[1])
        aug = torch.where(ok, aug, 0.0)
        _class_sums(self._acc, y_safe, aug)
        if self.second_moment is not None:
            self.second_moment.addmm_(aug[:, :d].T, aug[:, :d])
        return aug[:, :d]

    def _graph_for(self, h: torch.Tensor, y: torch.Tensor):
        """A captured CUDA graph of the deferred update for this batch shape (one kernel launch
        per update instead of ~20: streaming many taps then costs little CPU time)."""
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
                    with torch.cuda.stream(side):  # warm-up: labels -1 make it add zeros
                        self._accumulate_deferred(static_h, static_y, flags)
                    torch.cuda.current_stream().wait_stream(side)
                    g = torch.cuda.CUDAGraph()
                    with torch.cuda.graph(g):
                        self._accumulate_deferred(static_h, static_y, flags)
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
        """Add ``other``'s statistics into ``self`` in place (moved to ``self``'s device). Merging an
        object into itself is refused (it would double every count)."""
        self._compatible(other)
        if other is self:
            raise ValueError("cannot merge a ClassStats into itself (every count would double); "
                             "merge a copy or another object")
        self.check()
        other.check()
        if other._acc is None:
            return self
        if self._acc is None:
            self._allocate(other.dim, self.device if self.device is not None else other.device)
        for name, t in other._tensors().items():
            getattr(self, name).add_(t.to(self.device))
        return self

    @torch.no_grad()
    def sync(self, group=None) -> ClassStats:
        """Sum the statistics of every ``torch.distributed`` rank into every rank (all-reduce).

        Call it once, after the last ``update`` on each rank. A no-op when ``torch.distributed`` is
        not initialised (single process). Ranks that saw no data take part with zeros."""
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
        for t in self._tensors().values():
            dist.all_reduce(t, op=dist.ReduceOp.SUM, group=group)
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
    ~16 small kernels per feature set, a batch costs one concatenation into a joint float64 buffer
    ``[h_1 | ... | h_T | 1 | ||h_1||^2 ... ||h_T||^2]`` (feature sets of equal width side by side),
    one ``index_add`` for every class sum, count and squared norm, and one batched GEMM
    ``S_g += H_g^T H_g`` per group of equal widths: ~20 launches whatever T (ResNet-18's 9 taps: 4
    width groups; a ViT's 12 layers: 1). Every name must come in every update, in one order:
    ``names`` if given, else the first update's. ``check`` and ``low_memory`` mean what they mean
    for :class:`ClassStats`; errors name the feature set that caused them."""

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
        self._moments: list[torch.Tensor] = []  # per group (G, d, d)
        self._indicator: torch.Tensor | None = None  # (D, T): column t sums tap t's squares
        self._acc: torch.Tensor | None = None  # (K, D + 1 + T)
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
        raise DegenerateFeaturesError("squared feature norms overflow float64: rescale the features")

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
        k = self.num_classes
        y = y.long()
        h64 = torch.cat([hs[name] for name in self._order], 1).to(_F64)
        sq = (h64 * h64) @ self._indicator
        buf = torch.cat([h64, h64.new_ones(n, 1), sq], 1)
        y_safe = y.clamp(0, k - 1)
        deferred = self.check_mode == "deferred" or (self.check_mode == "auto"
                                                     and y.device.type != "cpu")
        if deferred:  # no host sync; a bad batch adds zeros and raises at the next call
            flags = torch.stack([(y_safe != y).sum().to(_F64), sq.sum()])
            ok = (flags[0] == 0) & torch.isfinite(flags[1])
            buf = torch.where(ok, buf, 0.0)
            host = torch.empty(2, dtype=_F64, pin_memory=y.device.type == "cuda")
            host.copy_(flags, non_blocking=True)
            event = torch.cuda.Event() if y.device.type == "cuda" else _Done()
            event.record()
            self._pending = (host, event, dict(hs), y)
        else:
            bad, finite = torch.stack([(y_safe != y).sum().to(_F64),
                                       torch.isfinite(sq).all().to(_F64)]).tolist()
            if bad or not finite:
                self._raise_for(hs, y)
        _class_sums(self._acc, y_safe, buf)
        for (d, col, names), s in zip(self._groups, self._moments):
            hg = buf[:, col:col + len(names) * d].view(n, len(names), d).transpose(0, 1)
            s.baddbmm_(hg.transpose(1, 2), hg)
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
            cs._acc.copy_(torch.cat([self._acc[:, col:col + d], self._acc[:, total:total + 1],
                                     self._acc[:, total + 1 + j:total + 2 + j]], 1))
            if not self.low_memory:
                gi, i = moment_of[name]
                cs.second_moment.copy_(self._moments[gi][i])
            out[name] = cs
        return out
