"""Autograding for the course's assignments: run a student's code on hidden cases, score, explain.

Every ``check_*`` function takes the student's function (or model builder), runs it on cases that
are generated at check time from a seed (so they are not written in any notebook), compares with
nclab's own implementation or with a property that needs no reference, and returns a
:class:`Score`: points, the maximum, and one line of feedback per case (which case, expected vs
got, the exception and its message). A ``NotImplementedError`` from a stub scores zero for that part
with the feedback "not implemented yet".

A :class:`Score` renders as a table in a notebook with one row per check (points and a short
reason; the failing cases folded below), prints as text the same way (:meth:`Score.details` lists
every case), adds up with ``+`` and can be asserted in pytest: ``assert score.full_marks, score``.
:func:`attempt` wraps the notebook lines that try a student's functions, so that a stub says
"not implemented yet" in one line instead of a traceback.

Conventions graded (the paper's, eq. 4): ``mu_G`` is the mean of the class means,
``Sigma_W = (1/N) sum_i (h_i - mu_{y_i})(h_i - mu_{y_i})^T``,
``Sigma_B = (1/K) sum_k (mu_k - mu_G)(mu_k - mu_G)^T``, ``NC1 = (1/K) tr(Sigma_W Sigma_B^+)``,
``CDNV = mean over pairs k != l of (sigma_k^2 + sigma_l^2) / (2 ||mu_k - mu_l||^2)`` with
``sigma_k^2 = (1/N_k) sum_{i: y_i = k} ||h_i - mu_k||^2``.
"""

from __future__ import annotations

import html
import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "CaseResult",
    "Score",
    "feature_cases",
    "check_function",
    "tensor_close",
    "check_sigma_w",
    "check_sigma_b",
    "check_nc1",
    "check_cdnv",
    "check_layerwise_nc1",
    "check_choose_layer",
    "check_probe_accuracy",
    "check_scl_model",
    "NOT_IMPLEMENTED",
    "attempt",
]

NOT_IMPLEMENTED = "not implemented yet"
_STATUS_ICON = {"pass": "✔", "fail": "✘", "error": "✘", "not implemented": "…"}
_STATUS_COLOUR = {"pass": "#1a7f37", "fail": "#cf222e", "error": "#cf222e",
                  "not implemented": "#9a6700"}


# --------------------------------------------------------------------------- score
@dataclass(frozen=True)
class CaseResult:
    """One graded case: which ``part`` (e.g. ``"sigma_w"``), which ``case``, the points earned out
    of ``max_points``, ``status`` in {pass, fail, error, not implemented} and a feedback line."""

    part: str
    case: str
    points: float
    max_points: float
    status: str
    message: str


@dataclass
class Score:
    """The result of one or more checks. ``points``/``max_points`` sum the cases; ``full_marks``
    says all passed; ``part(name)`` selects one part; ``a + b`` combines two scores."""

    title: str
    results: list[CaseResult] = field(default_factory=list)

    @property
    def points(self) -> float:
        return round(float(sum(r.points for r in self.results)), 9)

    @property
    def max_points(self) -> float:
        return round(float(sum(r.max_points for r in self.results)), 9)

    @property
    def fraction(self) -> float:
        return self.points / self.max_points if self.max_points else 0.0

    @property
    def full_marks(self) -> bool:
        return bool(self.results) and all(r.status == "pass" for r in self.results)

    @property
    def parts(self) -> dict[str, tuple[float, float]]:
        """``{part: (points, max_points)}`` in the order the parts were graded."""
        out: dict[str, list[float]] = {}
        for r in self.results:
            acc = out.setdefault(r.part, [0.0, 0.0])
            acc[0] += r.points
            acc[1] += r.max_points
        return {k: (round(v[0], 9), round(v[1], 9)) for k, v in out.items()}

    def part(self, name: str) -> Score:
        """The sub-score of one part; ``ValueError`` listing the parts if there is none."""
        sel = [r for r in self.results if r.part == name]
        if not sel:
            raise ValueError(f"no part {name!r} in this score; parts: {list(self.parts)}")
        return Score(f"{self.title}: {name}", sel)

    def __add__(self, other: Score) -> Score:
        if not isinstance(other, Score):
            return NotImplemented
        return Score(self.title if self.title == other.title else f"{self.title} + {other.title}",
                     self.results + other.results)

    @staticmethod
    def total(title: str, *scores: Score) -> Score:
        """One score titled ``title`` holding every case of ``scores``."""
        return Score(title, [r for s in scores for r in s.results])

    def _part_rows(self) -> list[tuple[str, str, float, float, str]]:
        """One row per part: ``(status, part, points, max_points, reason)``. The status is
        ``pass`` when every case passed, ``not implemented`` when the function is a stub, else
        ``fail``; the reason names the first failing case and how many failed."""
        rows = []
        for part, (pts, mx) in self.parts.items():
            mine = [r for r in self.results if r.part == part]
            bad = [r for r in mine if r.status != "pass"]
            if not bad:
                rows.append(("pass", part, pts, mx, f"all {len(mine)} cases pass"))
            elif any(r.status == "not implemented" for r in bad):
                rows.append(("not implemented", part, pts, mx, NOT_IMPLEMENTED))
            else:
                first = bad[0]
                rows.append(("fail", part, pts, mx, f"{len(bad)} of {len(mine)} cases fail; "
                             f"{first.case}: {first.message}"))
        return rows

    def __str__(self) -> str:
        """The score and one line per part (check): status, points and a short reason; every
        case is in :meth:`details`."""
        lines = [f"{self.title}: {_fmt_pts(self.points)} / {_fmt_pts(self.max_points)} points"]
        width = max((len(p) for p in self.parts), default=0)
        for status, part, pts, mx, reason in self._part_rows():
            lines.append(f"  {_STATUS_ICON[status]} {part:<{width}}  {_fmt_pts(pts):>4} / "
                         f"{_fmt_pts(mx):<3} {reason}")
        return "\n".join(lines)

    __repr__ = __str__

    def details(self) -> str:
        """Every case on its own line, grouped by part (a stub's hint once per part)."""
        lines = [f"{self.title}: {_fmt_pts(self.points)} / {_fmt_pts(self.max_points)} points"]
        for part, (pts, mx) in self.parts.items():
            lines.append(f"  {part}: {_fmt_pts(pts)} / {_fmt_pts(mx)}")
            mine = [r for r in self.results if r.part == part]
            if all(r.status == "not implemented" for r in mine):
                lines.append(f"    {_STATUS_ICON['not implemented']} all {len(mine)} cases: "
                             f"{mine[0].message}")
                continue
            for r in mine:
                lines.append(f"    {_STATUS_ICON[r.status]} {r.case}: {r.message}")
        return "\n".join(lines)

    def _repr_html_(self) -> str:
        e = html.escape
        rows = []
        for status, part, pts, mx, reason in self._part_rows():
            colour = _STATUS_COLOUR[status]
            rows.append(
                f"<tr><td style='color:{colour};text-align:center'>{_STATUS_ICON[status]}</td>"
                f"<td>{e(part)}</td>"
                f"<td style='text-align:right'>{_fmt_pts(pts)} / {_fmt_pts(mx)}</td>"
                f"<td style='text-align:left'>{e(reason)}</td></tr>"
            )
        failed = [r for r in self.results if r.status in ("fail", "error")]
        more = ""
        if failed:
            items = "".join(f"<li>{e(r.part)} / {e(r.case)}: {e(r.message)}</li>" for r in failed)
            more = (f"<details><summary>the {len(failed)} failing case(s)</summary><ul>{items}"
                    "</ul></details>")
        pct = 100 * self.fraction
        return (
            f"<div><strong>{e(self.title)}: {_fmt_pts(self.points)} / "
            f"{_fmt_pts(self.max_points)} points ({pct:.0f}%)</strong>"
            "<table><thead><tr><th></th><th>check</th><th>points</th>"
            "<th style='text-align:left'>result</th></tr></thead><tbody>"
            + "".join(rows) + "</tbody></table>" + more + "</div>"
        )


@contextmanager
def attempt(what: str | None = None) -> Iterator[None]:
    """Run the lines that try a student's functions. While one of them is still a stub (raises
    ``NotImplementedError``), the rest of the block is skipped and one line says which function
    (``what``, else the function that raised) is not written yet, instead of a traceback. Any
    other exception propagates with its traceback: it is a bug to see."""
    try:
        yield
    except NotImplementedError as err:
        tb = err.__traceback__
        while tb is not None and tb.tb_next is not None:
            tb = tb.tb_next
        qual = tb.tb_frame.f_code.co_qualname if tb is not None else "a function"
        name = what or qual.split("<locals>.")[-1]
        print(f"{_STATUS_ICON['not implemented']} {name}: {NOT_IMPLEMENTED}; this cell runs once "
              "it is written (the grading cell scores it 0)")


def _fmt_pts(x: float) -> str:
    return f"{x:.0f}" if abs(x - round(x)) < 1e-9 else f"{x:.2f}"


# --------------------------------------------------------------------------- engine
Compare = Callable[[Any, Any], "str | None"]


def _clone(x: Any) -> Any:
    if isinstance(x, torch.Tensor):
        return x.clone()
    if isinstance(x, np.ndarray):
        return x.copy()
    if isinstance(x, dict):
        return {k: _clone(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return type(x)(_clone(v) for v in x)
    return x


def _exception_line(err: BaseException) -> str:
    msg = str(err).strip().splitlines()
    return f"{type(err).__name__}: {msg[0]}" if msg else type(err).__name__


def check_function(
    part: str,
    fn: Callable[..., Any],
    cases: Sequence[tuple[str, tuple]],
    reference: Callable[..., Any],
    compare: Compare,
    points: float = 1.0,
    title: str | None = None,
) -> Score:
    """Grade ``fn`` against ``reference`` on ``cases`` (``(case_name, args)`` pairs).

    Each case is worth ``points / len(cases)``. The reference sees its own copy of the inputs.
    ``compare(expected, got)`` returns ``None`` when ``got`` is right, else the feedback line.
    After a ``NotImplementedError`` the remaining cases are not run and score zero as well.
    """
    if not callable(fn):
        raise TypeError(f"{part}: expected a function to grade, got {type(fn).__name__}")
    if not cases:
        raise ValueError("cases is empty")
    each = points / len(cases)
    results: list[CaseResult] = []
    stub: str | None = None
    for name, args in cases:
        if stub is not None:
            results.append(CaseResult(part, name, 0.0, each, "not implemented", stub))
            continue
        expected = reference(*_clone(args))
        try:
            got = fn(*_clone(args))
        except NotImplementedError as err:
            hint = str(err).strip()
            stub = NOT_IMPLEMENTED + (f" ({hint})" if hint else "")
            results.append(CaseResult(part, name, 0.0, each, "not implemented", stub))
            continue
        except Exception as err:  # noqa: BLE001  (any failure of student code is feedback)
            results.append(CaseResult(part, name, 0.0, each, "error",
                                      f"raised {_exception_line(err)}"))
            continue
        try:
            problem = compare(expected, got)
        except Exception as err:  # noqa: BLE001
            problem = f"could not compare the result: {_exception_line(err)}"
        if problem is None:
            results.append(CaseResult(part, name, each, each, "pass", "ok"))
        else:
            results.append(CaseResult(part, name, 0.0, each, "fail", problem))
    return Score(title or part, results)


def _short(t: torch.Tensor, k: int = 4) -> str:
    flat = t.flatten()
    vals = ", ".join(f"{v:.4g}" for v in flat[:k].tolist())
    return f"[{vals}{', ...' if flat.numel() > k else ''}]"


def _as_float64(got: Any, what: str) -> torch.Tensor:
    if isinstance(got, torch.Tensor):
        return got.detach().to("cpu", torch.float64)
    if isinstance(got, (np.ndarray, float, int, np.floating, np.integer)):
        return torch.as_tensor(np.asarray(got, dtype=np.float64))
    raise TypeError(f"returned {type(got).__name__}; expected {what}")


def tensor_close(rtol: float = 1e-4, atol: float = 1e-10,
                 diagnoses: Sequence[tuple[Callable[[torch.Tensor], torch.Tensor | None], str]] = ()
                 ) -> Compare:
    """A comparison for tensors/scalars: shape must match; relative error (Frobenius) ``<= rtol``.

    ``diagnoses`` are ``(alternative(expected_args) -> value, message)`` pairs already bound to a
    case by the caller: when the student's result matches an alternative, its message (e.g. "you
    divided by N - 1") is added to the feedback.
    """

    def compare(expected: Any, got: Any) -> str | None:
        exp = _as_float64(expected, "a tensor")
        try:
            g = _as_float64(got, f"a tensor of shape {tuple(exp.shape)}")
        except TypeError as err:
            return str(err)
        if g.shape != exp.shape and not (g.numel() == 1 and exp.numel() == 1):
            return f"expected shape {tuple(exp.shape)}, got shape {tuple(g.shape)}"
        g = g.reshape(exp.shape)
        if not torch.isfinite(g).all():
            bad = int((~torch.isfinite(g)).sum())
            return f"got {bad} non-finite value(s) (NaN/inf); expected {_short(exp)}"
        err = float((g - exp).norm() / max(float(exp.norm()), atol))
        if err <= rtol:
            return None
        if exp.numel() == 1:
            msg = f"expected {float(exp):.6g}, got {float(g):.6g}"
        else:
            msg = f"expected {_short(exp)}, got {_short(g)} (relative error {err:.2g})"
        for alternative, hint in diagnoses:
            alt = alternative(exp)
            if alt is not None and float((g - alt).norm()) <= rtol * max(float(alt.norm()), atol):
                msg += f" -- {hint}"
                break
        return msg

    return compare


# --------------------------------------------------------------------------- hidden feature cases
def feature_cases(seed: int = 0) -> list[tuple[str, tuple[torch.Tensor, torch.Tensor, int]]]:
    """Hidden, class-structured feature sets ``(H, y, K)`` drawn from ``seed``: balanced,
    imbalanced, more dimensions than samples (d > N), two classes, many classes, float32 input,
    and labels in shuffled order. Every class has at least one sample."""
    from .data import synthetic_features

    gen = torch.Generator().manual_seed(seed)

    def draw(lo: int, hi: int) -> int:
        return int(torch.randint(lo, hi + 1, (1,), generator=gen))

    def make(k: int, counts: int | list[int], d: int, sub: int, dtype=torch.float64):
        h, y = synthetic_features(num_classes=k, per_class=counts, dim=d, within_std=1.0,
                                  between_scale=3.0 + 2.0 * float(torch.rand(1, generator=gen)),
                                  seed=seed * 1000 + sub)
        h = h + 2.0 * torch.randn(1, d, generator=gen, dtype=h.dtype)  # off-centre
        perm = torch.randperm(len(y), generator=gen)  # labels in no particular order
        return h[perm].to(dtype), y[perm]

    cases = []
    k, n, d = draw(3, 5), draw(6, 15), draw(4, 10)
    cases.append((f"balanced (K={k}, {n} per class, d={d})", (*make(k, n, d, 1), k)))
    k, d = draw(3, 6), draw(5, 12)
    counts = [draw(2, 40) for _ in range(k)]
    counts[0] = 2  # one tiny class makes the choice of mu_G visible
    cases.append((f"imbalanced (K={k}, counts {counts}, d={d})", (*make(k, counts, d, 2), k)))
    k, n = draw(3, 4), draw(2, 4)
    d = k * n + draw(5, 20)
    cases.append((f"d > N (K={k}, {n} per class, d={d})", (*make(k, n, d, 3), k)))
    counts = [draw(3, 8), draw(15, 30)]
    d = draw(2, 6)
    cases.append((f"two classes (counts {counts}, d={d})", (*make(2, counts, d, 4), 2)))
    k, d = draw(8, 12), draw(10, 20)
    cases.append((f"many classes (K={k}, 6 per class, d={d})", (*make(k, 6, d, 5), k)))
    k, n, d = 3, draw(10, 20), draw(4, 8)
    cases.append((f"float32 input (K={k}, {n} per class, d={d})",
                  (*make(k, n, d, 6, dtype=torch.float32), k)))
    return cases


def _f64(h: torch.Tensor) -> torch.Tensor:
    return torch.as_tensor(h).detach().to("cpu", torch.float64)


def _class_means(h: torch.Tensor, y: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    counts = torch.bincount(y, minlength=k).to(h.dtype)
    sums = torch.zeros(k, h.shape[1], dtype=h.dtype).index_add_(0, y, h)
    return sums / counts[:, None], counts


# Alternatives that match common mistakes, used only to explain a wrong answer (the grade itself
# comes from nclab.metrics).
def _alt_sigma_w_unbiased(h, y, k):
    mu, _ = _class_means(h, y, k)
    c = h - mu[y]
    return c.T @ c / (len(y) - 1)


def _alt_sigma_w_per_class(h, y, k):
    mu, counts = _class_means(h, y, k)
    c = h - mu[y]
    w = (1.0 / counts)[y]
    return (c * w[:, None]).T @ c / k


def _alt_sigma_w_global(h, y, k):
    c = h - h.mean(0)
    return c.T @ c / len(y)


def _alt_sigma_b_weighted(h, y, k):
    mu, _ = _class_means(h, y, k)
    c = mu - h.mean(0)
    return c.T @ c / k


def _alt_sigma_b_unbiased(h, y, k):
    mu, _ = _class_means(h, y, k)
    c = mu - mu.mean(0)
    return c.T @ c / (k - 1)


def _alt_sigma_b_counts(h, y, k):
    mu, counts = _class_means(h, y, k)
    c = mu - h.mean(0)
    return (c * (counts / counts.sum())[:, None]).T @ c


def _alt_nc1_no_k(h, y, k):
    return _ref_nc1(h, y, k) * k


def _alt_cdnv_std(h, y, k):
    mu, counts = _class_means(h, y, k)
    var = torch.zeros(k, dtype=h.dtype).index_add_(0, y, ((h - mu[y]) ** 2).sum(1)) / counts
    dist = torch.cdist(mu, mu)
    iu = torch.triu_indices(k, k, 1)
    return ((var[:, None] + var[None, :]) / (2 * dist))[iu[0], iu[1]].mean()


def _alt_cdnv_unbiased(h, y, k):
    mu, counts = _class_means(h, y, k)
    var = torch.zeros(k, dtype=h.dtype).index_add_(0, y, ((h - mu[y]) ** 2).sum(1))
    var = var / (counts - 1).clamp_min(1)
    dist2 = torch.cdist(mu, mu) ** 2
    iu = torch.triu_indices(k, k, 1)
    return ((var[:, None] + var[None, :]) / (2 * dist2))[iu[0], iu[1]].mean()


# References: nclab.metrics, in float64.
def _stats(h: torch.Tensor, y: torch.Tensor, k: int):
    from . import metrics

    stats = metrics.ClassStats(k, h.shape[1])
    stats.update(_f64(h), torch.as_tensor(y))
    return stats


def _ref_sigma_w(h, y, k) -> torch.Tensor:
    """Sigma_W = (1/N) sum_k sum_i (h_i - mu_k)(h_i - mu_k)^T from nclab's streaming statistics
    (its centred per-class scatters: no cancellation when features share a large offset)."""
    return _f64(_stats(h, y, k).Sigma_W)


def _ref_sigma_b(h, y, k) -> torch.Tensor:
    """Sigma_B = (1/K) sum_k (mu_k - mu_G)(mu_k - mu_G)^T, mu_G the mean of nclab's class means."""
    mu = _f64(_stats(h, y, k).means)
    c = mu - mu.mean(0)
    return c.T @ c / k


def _ref_nc1(h, y, k) -> torch.Tensor:
    from . import metrics

    return torch.as_tensor(float(metrics.nc1(_stats(h, y, k))), dtype=torch.float64)


def _ref_cdnv(h, y, k) -> torch.Tensor:
    from . import metrics

    return torch.as_tensor(float(metrics.cdnv(_stats(h, y, k))), dtype=torch.float64)


def _feature_check(part: str, fn: Callable, reference: Callable,
                   alternatives: Sequence[tuple[Callable, str]], seed: int, points: float,
                   rtol: float) -> Score:
    cases = feature_cases(seed)
    results: list[CaseResult] = []
    each = points / len(cases)
    stub = None
    for name, args in cases:
        h, y, k = args
        h64 = _f64(h)
        diagnoses = [(lambda _e, alt=alt, a=(h64, y, k): _f64(alt(*a)), msg)
                     for alt, msg in alternatives]
        tol = max(rtol, 2e-4) if h.dtype == torch.float32 else rtol
        if stub is not None:
            results.append(CaseResult(part, name, 0.0, each, "not implemented", stub))
            continue
        sc = check_function(part, fn, [(name, args)], lambda a, b, c: reference(_f64(a), b, c),
                            tensor_close(rtol=tol, diagnoses=diagnoses), points=each)
        r = sc.results[0]
        if r.status == "not implemented":
            stub = r.message
        results.append(r)
    return Score(part, results)


_N1 = "looks like you divided by N - 1; the paper divides by N"
_SAMPLE_MU_G = ("looks like mu_G is the mean of all samples; the paper uses the mean of the class "
                "means, (1/K) sum_k mu_k, which differs when classes are imbalanced")


def check_sigma_w(fn: Callable, seed: int = 0, points: float = 2.0, rtol: float = 1e-6) -> Score:
    """Grade ``fn(H, y, K) -> Sigma_W (d, d)`` against ``nclab.metrics`` on :func:`feature_cases`."""
    alts = [(_alt_sigma_w_unbiased, _N1),
            (_alt_sigma_w_per_class, "looks like you averaged per-class covariances with equal "
             "weights; Sigma_W averages over all N samples: (1/N) sum_i ..."),
            (_alt_sigma_w_global, "looks like you centred on the global mean; centre each sample on "
             "its own class mean mu_{y_i}")]
    return _feature_check("sigma_w", fn, _ref_sigma_w, alts, seed, points, rtol)


def check_sigma_b(fn: Callable, seed: int = 0, points: float = 2.0, rtol: float = 1e-6) -> Score:
    """Grade ``fn(H, y, K) -> Sigma_B (d, d)`` against ``nclab.metrics`` on :func:`feature_cases`."""
    alts = [(_alt_sigma_b_weighted, _SAMPLE_MU_G),
            (_alt_sigma_b_unbiased, "looks like you divided by K - 1; the paper divides by K"),
            (_alt_sigma_b_counts, "looks like you weighted the classes by their sizes and used the "
             "sample mean; the paper weights every class by 1/K around the mean of class means")]
    return _feature_check("sigma_b", fn, _ref_sigma_b, alts, seed, points, rtol)


def check_nc1(fn: Callable, seed: int = 0, points: float = 2.0, rtol: float = 1e-5) -> Score:
    """Grade ``fn(H, y, K) -> NC1`` (a float or 0-d tensor) against ``nclab.metrics.nc1``."""
    alts = [(_alt_nc1_no_k, "looks like you forgot the 1/K in front of the trace"),
            (lambda h, y, k: _ref_nc1(h, y, k) * len(y) / (len(y) - 1), _N1),
            (lambda h, y, k: torch.trace(_ref_sigma_w(h, y, k) @ torch.linalg.pinv(
                _alt_sigma_b_weighted(h, y, k))) / k, _SAMPLE_MU_G)]
    return _feature_check("nc1", fn, _ref_nc1, alts, seed, points, rtol)


def check_cdnv(fn: Callable, seed: int = 0, points: float = 2.0, rtol: float = 1e-5) -> Score:
    """Grade ``fn(H, y, K) -> CDNV`` (mean over class pairs) against ``nclab.metrics.cdnv``."""
    alts = [(_alt_cdnv_std, "looks like you divided by the distance ||mu_k - mu_l||; CDNV divides "
             "by its square"),
            (_alt_cdnv_unbiased, "looks like you divided the class variances by N_k - 1; use N_k")]
    return _feature_check("cdnv", fn, _ref_cdnv, alts, seed, points, rtol)


# --------------------------------------------------------------------------- where to probe
def _tiny_models_and_data(seed: int):
    """Hidden (model, data, K) cases for the layer-wise checks: random-init small nets on
    class-structured synthetic images."""
    from .data import TensorDataset, batches, synthetic_images
    from .models import ConvNetS, ResNetS

    torch.manual_seed(seed)
    resnet = ResNetS(width=4, depths=(1, 1, 1)).eval()
    torch.manual_seed(seed + 1)
    convnet = ConvNetS(width=4, depth=3).eval()
    out = []
    for i, (name, model, k) in enumerate([("ResNetS(width=4)", resnet, 3),
                                          ("ConvNetS(width=4, depth=3)", convnet, 4)]):
        full = synthetic_images(num_classes=k, per_class=20, size=16, noise=0.3,
                                seed=seed * 10 + i)  # one set of class patterns, split in two
        train = TensorDataset(full.x[0::2], full.y[0::2], full.classes)
        test = TensorDataset(full.x[1::2], full.y[1::2], full.classes)
        out.append((name, model, batches(train, 16), batches(test, 16), k))
    return out


def _layers_of(model: nn.Module) -> list[str]:
    from .models import blocks

    return [name for name, _ in blocks(model)] + ["output"]


def _ref_layerwise_nc1(model, data, layers) -> dict[str, float]:
    from . import metrics
    from .features import extract

    stats = extract(model, data, layers, progress=False, amp=False, device="cpu")
    return {name: float(metrics.nc1(s)) for name, s in stats.items()}


def _compare_dicts(rtol: float) -> Compare:
    def compare(expected: dict, got: Any) -> str | None:
        if not isinstance(got, dict):
            return f"returned {type(got).__name__}; expected a dict {{layer name: NC1}}"
        missing = [k for k in expected if k not in got]
        extra = [k for k in got if k not in expected]
        if missing or extra:
            return f"layer names differ: missing {missing}, unexpected {extra}"
        for k, v in expected.items():
            try:
                g = float(got[k])
            except (TypeError, ValueError):
                return f"NC1 of {k!r} is {type(got[k]).__name__}, not a number"
            if not math.isfinite(g) or abs(g - v) > rtol * abs(v) + 1e-9:
                return f"NC1 of layer {k!r}: expected {v:.6g}, got {g:.6g}"
        return None

    return compare


def check_layerwise_nc1(fn: Callable, seed: int = 0, points: float = 2.0,
                        rtol: float = 1e-3) -> Score:
    """Grade ``fn(model, data, layers) -> {layer: NC1}`` (NC1 of the average-pooled output of each
    layer on ``data``, an iterable of ``(x, y)`` batches) against ``nclab.features.extract`` +
    ``nclab.metrics.nc1`` on hidden random-init small nets and synthetic images."""
    cases = [(f"{name}, {k} classes, layers {_layers_of(model)}", (model, test, _layers_of(model)))
             for name, model, _train, test, k in _tiny_models_and_data(seed)]
    return check_function("layerwise_nc1", fn, cases, _ref_layerwise_nc1, _compare_dicts(rtol),
                          points)


def _choose_cases(seed: int) -> list[tuple[str, tuple[dict[str, float]]]]:
    gen = torch.Generator().manual_seed(seed)
    cases = []
    for desc, n, where in [("minimum in the middle", 6, "mid"), ("minimum at the output", 5, "last"),
                           ("minimum at the first layer", 4, "first"), ("a tie", 5, "tie"),
                           ("one layer", 1, "first")]:
        vals = (10 ** (3 * torch.rand(n, generator=gen) - 1)).tolist()
        names = [f"layer{i + 1}" for i in range(n - 1)] + ["output"]
        lo = min(vals) / 2
        if where == "mid":
            vals[n // 2] = lo
        elif where == "last":
            vals[-1] = lo
        elif where == "first":
            vals[0] = lo
        else:
            vals[1] = vals[3] = lo
        cases.append((f"{desc}: {dict(zip(names, [round(v, 3) for v in vals]))}",
                      (dict(zip(names, vals)),)))
    return cases


def check_choose_layer(fn: Callable, seed: int = 0, points: float = 1.0) -> Score:
    """Grade ``fn(nc1_by_layer: dict) -> layer name``: the layer with the smallest NC1 (the most
    collapsed features), the earliest one on a tie (it is cheaper to run)."""

    def reference(d: dict[str, float]) -> str:
        return min(d, key=d.get)

    def compare(expected: str, got: Any) -> str | None:
        if got == expected:
            return None
        return f"expected {expected!r}, got {got!r}"

    return check_function("choose_layer", fn, _choose_cases(seed), reference, compare, points)


def _ref_probe_accuracy(model, train, test, layer) -> float:
    from .features import extract
    from .probe import linear_probe

    f_tr, y_tr = extract(model, train, [layer], return_features=True, progress=False, amp=False,
                         device="cpu")
    f_te, y_te = extract(model, test, [layer], return_features=True, progress=False, amp=False,
                         device="cpu")
    return float(linear_probe(f_tr[layer], y_tr, f_te[layer], y_te).test_acc)


def check_probe_accuracy(fn: Callable, seed: int = 0, points: float = 2.0,
                         atol: float = 0.03) -> Score:
    """Grade ``fn(model, train, test, layer) -> test accuracy`` (a fraction in [0, 1]) of a linear
    probe on the average-pooled ``layer`` features, against ``nclab.probe.linear_probe`` on
    ``nclab.features.extract`` features (tolerance ``atol``)."""
    cases = []
    for name, model, train, test, k in _tiny_models_and_data(seed):
        layer = _layers_of(model)[1]
        cases.append((f"{name}, {k} classes, layer {layer!r}", (model, train, test, layer)))

    def compare(expected: float, got: Any) -> str | None:
        try:
            g = float(got)
        except (TypeError, ValueError):
            return f"returned {type(got).__name__}; expected the test accuracy as a float"
        if abs(g - expected) <= atol:
            return None
        msg = f"expected test accuracy {expected:.3f}, got {g:.3f}"
        if g > 1.0:
            msg += " -- return a fraction in [0, 1], not a percentage"
        return msg

    return check_function("probe_accuracy", fn, cases, _ref_probe_accuracy, compare, points)


# --------------------------------------------------------------------------- SCL FT properties
def _scl_cases(seed: int) -> list[tuple[str, Callable[[], nn.Module], str, int]]:
    """(description, make_backbone, block name, K). Backbones are random-init and built lazily."""
    from .models import ResNetS

    def convnext() -> nn.Module:
        import timm

        torch.manual_seed(seed)  # a slim ConvNeXt-atto: same modules, fewer and narrower blocks
        return timm.create_model("convnext_atto", pretrained=False, num_classes=0,
                                 depths=(1, 1, 1, 1), dims=(16, 32, 64, 128))

    def resnet() -> nn.Module:
        torch.manual_seed(seed)
        return ResNetS(width=8, depths=(1, 1, 1))

    return [("timm convnext_atto, block 'stages.1'", convnext, "stages.1", 5),
            ("timm convnext_atto, block 'stages.3' (no padding needed)", convnext, "stages.3", 4),
            ("nclab ResNetS(width=8), block 'layer2.0'", resnet, "layer2.0", 3)]


def _pad_pool(block_out: torch.Tensor, d: int, front: bool = False) -> torch.Tensor:
    v = block_out.flatten(2).mean(-1) if block_out.ndim > 2 else block_out
    gap = d - v.shape[1]
    return F.pad(v, (gap, 0) if front else (0, gap))


def _scl_one(build: Callable, skip: bool, make: Callable, block_name: str, k: int,
             seed: int) -> list[tuple[str, str, str]]:
    """Run the three property checks of one case; returns (property, status, message) triples."""
    props = ["trainable parameters", "gradients reach the block and the head",
             "forward = head(penultimate + pad(pool(block output)))" if skip
             else "forward = head(penultimate)"]
    backbone = make()
    d = int(backbone.num_features)
    block = backbone.get_submodule(block_name)
    try:
        model = build(backbone, block_name, k, skip=skip)
    except NotImplementedError as err:
        hint = str(err).strip()
        msg = NOT_IMPLEMENTED + (f" ({hint})" if hint else "")
        return [(p, "not implemented", msg) for p in props]
    except Exception as err:  # noqa: BLE001
        return [(p, "error", f"building the model raised {_exception_line(err)}") for p in props]
    problem = None
    if not isinstance(model, nn.Module):
        problem = f"the builder returned {type(model).__name__}, not an nn.Module"
    elif not any(m is backbone for m in model.modules()):
        problem = ("the model does not contain the backbone it was given; keep it as a submodule "
                   "(do not copy it)")
    head = getattr(model, "head", None)
    if problem is None and not (isinstance(head, nn.Linear) and head.in_features == d
                                and head.out_features == k):
        problem = (f"model.head must be nn.Linear({d}, {k}) (penultimate width -> classes), got "
                   f"{head!r}")
    if problem is not None:
        return [(p, "fail", problem) for p in props]

    out: list[tuple[str, str, str]] = []
    # 1. which parameters train
    named = list(model.named_parameters())
    names = {id(p): n for n, p in named}
    wanted = {id(p) for p in block.parameters()} | {id(p) for p in head.parameters()}
    extra = [n for n, p in named if p.requires_grad and id(p) not in wanted]
    missing = [n for n, p in named if not p.requires_grad and id(p) in wanted]
    if len({id(p) for p in block.parameters()} - set(names)) > 0:
        missing.append("(block parameters missing from the model)")
    if extra or missing:
        msg = []
        if extra:
            msg.append(f"{len(extra)} tensor(s) train but should be frozen, e.g. {extra[:3]}")
        if missing:
            msg.append(f"{len(missing)} tensor(s) of the block/head are frozen, e.g. {missing[:3]}")
        out.append((props[0], "fail", "; ".join(msg)))
    else:
        out.append((props[0], "pass", "ok"))

    gen = torch.Generator().manual_seed(seed + 7)
    x = torch.randn(4, 3, 32, 32, generator=gen)
    # 2. gradients flow to the block and the head
    try:
        model.train()
        model.zero_grad(set_to_none=True)
        model(x).float().square().mean().backward()
        dead = [names.get(id(p), "?") for p in list(block.parameters()) + list(head.parameters())
                if p.requires_grad and (p.grad is None or not torch.isfinite(p.grad).all())]
        if not any(p.grad is not None and p.grad.abs().sum() > 0 for p in block.parameters()):
            out.append((props[1], "fail", "no gradient reaches the fine-tuned block; do not run "
                        "it under torch.no_grad() or detach its output"))
        elif dead:
            out.append((props[1], "fail", f"no (finite) gradient for {dead[:3]}"))
        else:
            out.append((props[1], "pass", "ok"))
    except Exception as err:  # noqa: BLE001
        out.append((props[1], "error", f"forward/backward raised {_exception_line(err)}"))
    model.zero_grad(set_to_none=True)

    # 3. the forward, from hooks on the student's own modules
    captured: dict[str, torch.Tensor] = {}
    model.eval()
    try:
        h_block = block.register_forward_hook(lambda m, i, o: captured.__setitem__("block", o))
        try:
            with torch.no_grad():
                pen = backbone(x)
        finally:
            h_block.remove()
        h_head = head.register_forward_pre_hook(lambda m, a: captured.__setitem__("head", a[0]))
        try:
            with torch.no_grad():
                logits = model(x)
        finally:
            h_head.remove()
    except Exception as err:  # noqa: BLE001
        out.append((props[2], "error", f"the forward raised {_exception_line(err)}"))
        return out
    with torch.no_grad():
        want_feat = pen + _pad_pool(captured["block"], d) if skip else pen
        want = head(want_feat)
    if not isinstance(logits, torch.Tensor) or logits.shape != want.shape:
        shape = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
        out.append((props[2], "fail", f"the forward returned {shape}; expected logits of shape "
                    f"{tuple(want.shape)}"))
        return out
    err = float((logits - want).norm() / want.norm().clamp_min(1e-12))
    if err <= 1e-4:
        out.append((props[2], "pass", "ok"))
        return out
    msg = f"the logits differ from the expected ones (relative error {err:.2g})"
    got_feat = captured.get("head")
    if got_feat is not None and got_feat.shape == want_feat.shape:
        alternatives = [(pen, "the head sees only the penultimate features: add the skip")]
        if skip:
            alternatives.append((pen + _pad_pool(captured["block"], d, front=True),
                                 "the zeros must be padded at the end (channels 0..C-1 line up)"))
        else:
            alternatives.append((want_feat + _pad_pool(captured["block"], d),
                                 "Layer FT (skip=False) has no skip connection"))
        for alt, hint in alternatives:
            if torch.allclose(got_feat, alt, rtol=1e-4, atol=1e-6):
                msg += f" -- {hint}"
                break
    out.append((props[2], "fail", msg))
    return out


def check_scl_model(build: Callable, skip: bool = True, seed: int = 0, points: float = 3.0) -> Score:
    """Grade ``build(backbone, block, num_classes, skip=skip) -> nn.Module`` on properties alone.

    For each hidden case (random-init timm ConvNeXt-atto and nclab ResNetS backbones, different
    blocks) it checks that (1) exactly the block's and the new ``model.head``'s parameters train,
    (2) gradients reach them, and (3) with ``skip=True`` the logits equal
    ``head(penultimate + pad(pool(block output)))`` (average pool over space, zeros appended up to
    the penultimate width ``d``), with ``skip=False`` ``head(penultimate)`` (Layer FT). The block
    output and the penultimate features are read with hooks, so no reference implementation is
    needed. The model must keep the given backbone as a submodule and its classifier as
    ``model.head`` (``nn.Linear(d, num_classes)``).
    """
    part = "scl_model" if skip else "layer_ft_model"
    cases = _scl_cases(seed)
    each = points / (3 * len(cases))
    results = []
    for desc, make, block_name, k in cases:
        for prop, status, msg in _scl_one(build, skip, make, block_name, k, seed):
            results.append(CaseResult(part, f"{desc}: {prop}", each if status == "pass" else 0.0,
                                      each, status, msg))
    return Score(part, results)
