"""Transferability scores beside NC1 — H-score and LogME — and how well a score ranks models.

Both scores read frozen features ``H`` (N, d) of a downstream training set and its labels ``y`` in
[0, K); higher means "expected to transfer better" (for NC1 lower is better: see
:func:`rank_agreement`). Everything is computed in float64 on the features' device.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
import torch

from ._checks import features_labels
from .correlation import kendall, pearson, spearman, weighted_kendall

__all__ = ["h_score", "logme", "log_evidence", "LogME", "rank_agreement", "RankAgreement"]


def _features_labels(features, labels) -> tuple[torch.Tensor, torch.Tensor, int]:
    f, y = features_labels(features, labels)
    if len(y) < 2:
        raise ValueError(f"need at least 2 samples, got {len(y)}")
    return f.to(torch.float64), y, int(y.max()) + 1


# --------------------------------------------------------------------------- H-score
def h_score(features, labels, rtol: float | None = None) -> float:
    """H-score (Bao et al. 2019): ``tr(Cov(f)⁺ · Cov(E[f | y]))``.

    Both covariances are over the sample (divided by N): ``Cov(f) = (1/N) Σ_i (h_i − h̄)(h_i − h̄)ᵀ``
    and ``Cov(E[f|y]) = Σ_k (n_k/N)(mu_k − h̄)(mu_k − h̄)ᵀ`` with ``mu_k`` the class means and
    ``h̄`` the sample mean. Between 0 and min(d, K − 1); invariant to label permutations, to
    orthogonal rotations and to invertible linear maps of the features.

    Pseudo-inverse tolerance: eigenvalues of ``Cov(f)`` at or below ``rtol · λ_max`` count as zero
    (their directions are dropped); the default ``rtol = d · eps(float64)`` is
    ``torch.linalg.pinv``'s and NumPy's ``matrix_rank`` convention.
    """
    f, y, k = _features_labels(features, labels)
    n, d = f.shape
    fc = f - f.mean(0)
    cov = fc.T @ fc / n
    evals, evecs = torch.linalg.eigh(cov)
    tol = (rtol if rtol is not None else d * torch.finfo(torch.float64).eps) * evals.max()
    keep = evals > tol
    counts = torch.bincount(y, minlength=k).to(f)
    sums = torch.zeros(k, d, dtype=f.dtype, device=f.device).index_add_(0, y, fc)
    present = counts > 0
    means = sums[present] / counts[present, None]  # centred class means mu_k - h̄
    proj = means @ evecs[:, keep]  # coordinates in Cov(f)'s eigenbasis
    weights = counts[present] / n
    return float((weights[:, None] * proj.pow(2) / evals[keep]).sum())


# --------------------------------------------------------------------------- LogME
@dataclass
class LogME:
    """LogME result: ``score`` = mean over classes of the maximised log evidence divided by N;
    per class ``evidence`` (/N), ``alpha`` (prior precision), ``beta`` (noise precision);
    ``history`` (iterations + 1, K) the per-class evidence / N after each fixed-point update
    (row 0 at the start, alpha = beta = 1); ``converged`` whether every class met ``tol``."""

    score: float
    evidence: np.ndarray
    alpha: np.ndarray
    beta: np.ndarray
    history: np.ndarray
    iterations: int
    converged: bool

    def __float__(self) -> float:
        return self.score


def _spectrum(f: torch.Tensor, targets: torch.Tensor, rel: float = 1e-12):
    """From one eigendecomposition of the Gram matrix (the SVD ``F = U S Vᵀ``): the nonzero
    eigenvalues ``sigma = s²`` of ``FᵀF`` (r,) and ``z² = (Uᵀ Y)²`` (r, K)."""
    n, d = f.shape
    if n >= d:
        sigma, v = torch.linalg.eigh(f.T @ f)  # (d,), (d, d)
        keep = sigma > rel * sigma.max().clamp_min(1e-300)
        t = v[:, keep].T @ (f.T @ targets)  # = s * Uᵀ Y
        sigma = sigma[keep]
        z2 = t.pow(2) / sigma[:, None]
    else:
        sigma, u = torch.linalg.eigh(f @ f.T)  # (n,), (n, n)
        keep = sigma > rel * sigma.max().clamp_min(1e-300)
        sigma = sigma[keep]
        z2 = (u[:, keep].T @ targets).pow(2)
    return sigma, z2


def _evidence(sigma, z2, y2, alpha, beta, n: int, d: int):
    """log p(y | F, α, β) for every target column, and the ``m`` norms and residuals it uses."""
    denom = alpha[None, :] + beta[None, :] * sigma[:, None]  # (r, K)
    m2 = (beta[None, :] ** 2 * sigma[:, None] * z2 / denom**2).sum(0)  # ‖m‖²
    shrink = alpha[None, :] / denom
    res2 = y2 - (z2 * (1 - shrink**2)).sum(0)  # ‖F m − y‖²
    res2 = res2.clamp_min(0)
    logdet = torch.log(denom).sum(0) + (d - len(sigma)) * torch.log(alpha)
    ev = (0.5 * d * torch.log(alpha) + 0.5 * n * torch.log(beta) - 0.5 * n * math.log(2 * math.pi)
          - 0.5 * beta * res2 - 0.5 * alpha * m2 - 0.5 * logdet)
    return ev, m2, res2


def log_evidence(features, targets, alpha, beta) -> torch.Tensor:
    """Log evidence ``log p(y | F, α, β)`` of Bayesian linear regression ``y = F w + ε``,
    ``w ~ N(0, α⁻¹ I)``, ``ε ~ N(0, β⁻¹ I)``, for each column of ``targets`` (N, K) at the given
    α, β (scalars or (K,)), i.e. the Gaussian log density of ``y`` under ``N(0, β⁻¹ I + α⁻¹ F Fᵀ)``
    (not divided by N). Computed from the spectrum of ``F`` as :func:`logme` does."""
    f = torch.as_tensor(features).to(torch.float64)
    t = torch.as_tensor(targets, device=f.device).to(torch.float64)
    if t.ndim == 1:
        t = t[:, None]
    k = t.shape[1]
    alpha = torch.as_tensor(alpha, dtype=torch.float64, device=f.device).expand(k).clone()
    beta = torch.as_tensor(beta, dtype=torch.float64, device=f.device).expand(k).clone()
    sigma, z2 = _spectrum(f, t)
    return _evidence(sigma, z2, t.pow(2).sum(0), alpha, beta, *f.shape)[0]


def logme(features, labels, tol: float = 1e-4, max_iter: int = 100) -> LogME:
    """LogME (You et al. 2021): for each class's one-hot column ``y_k``, the log evidence of Bayesian
    linear regression from the features (used as given: no centring, no bias) to ``y_k``, maximised
    over the prior precision α and noise precision β; divided by N and averaged over classes.

    Fixed-point updates (MacKay), from α = β = 1, all classes at once from ONE eigendecomposition of
    the Gram matrix (``FᵀF`` when N ≥ d, else ``F Fᵀ``, i.e. the SVD of F):
    ``γ = Σ_i βσ_i / (α + βσ_i)``, ``α ← γ / ‖m‖²``, ``β ← (N − γ) / ‖F m − y‖²`` with
    ``m = β (αI + βFᵀF)⁻¹ Fᵀ y``. A class stops when its ``λ = α/β`` changes by less than ``tol``
    (relative) or its evidence / N by less than ``tol`` (absolute), or when its update is not finite
    (the maximum lies at β → ∞: y in the span of F); all stop after ``max_iter`` updates.
    Returns a :class:`LogME` (``float()`` works).
    """
    if tol <= 0 or max_iter < 1:
        raise ValueError(f"tol must be > 0 and max_iter >= 1, got tol={tol}, max_iter={max_iter}")
    f, y, k = _features_labels(features, labels)
    n, d = f.shape
    targets = torch.nn.functional.one_hot(y, k).to(f)
    present = targets.sum(0) > 0
    targets = targets[:, present]  # a class absent from the labels has no evidence to compute
    k = targets.shape[1]
    sigma, z2 = _spectrum(f, targets)
    y2 = targets.pow(2).sum(0)
    alpha = torch.ones(k, dtype=f.dtype, device=f.device)
    beta = torch.ones_like(alpha)
    ev, m2, res2 = _evidence(sigma, z2, y2, alpha, beta, n, d)
    history = [ev]
    active = torch.ones(k, dtype=torch.bool, device=f.device)
    iterations = 0
    for _ in range(max_iter):
        iterations += 1
        gamma = (beta[None, :] * sigma[:, None] / (alpha[None, :] + beta[None, :] * sigma[:, None])
                 ).sum(0)
        new_alpha = gamma / m2
        new_beta = (n - gamma) / res2
        new_ev, new_m2, new_res2 = _evidence(sigma, z2, y2, new_alpha, new_beta, n, d)
        # a class whose update is not finite sits at a supremum at infinity (e.g. y in the span of
        # F when N <= d: beta -> inf, the evidence tends to a limit); it keeps its last values
        ok = (torch.isfinite(new_ev) & (new_alpha > 0) & (new_beta > 0) & active)
        lam_change = ((new_alpha / new_beta) / (alpha / beta) - 1).abs()
        ev_change = (new_ev - ev).abs() / n
        alpha = torch.where(ok, new_alpha, alpha)
        beta = torch.where(ok, new_beta, beta)
        ev = torch.where(ok, new_ev, ev)
        m2 = torch.where(ok, new_m2, m2)
        res2 = torch.where(ok, new_res2, res2)
        history.append(ev)
        active = ok & (lam_change >= tol) & (ev_change >= tol)
        if not bool(active.any()):
            break
    converged = not bool(active.any())
    hist = torch.stack(history).cpu().numpy() / n
    evidence = hist[-1]
    return LogME(float(evidence.mean()), evidence, alpha.cpu().numpy(), beta.cpu().numpy(), hist,
                 iterations, converged)


# --------------------------------------------------------------------------- ranking
@dataclass(frozen=True)
class RankAgreement:
    """How well a transferability score ranks models by their measured accuracy.

    Sign convention: positive = the score orders the models as their accuracy does (scores where
    lower is better, such as NC1, are negated first). ``weighted_kendall`` weighs disagreements
    among the best models most (scipy's hyperbolic weights)."""

    pearson: float
    spearman: float
    kendall: float
    weighted_kendall: float
    n: int

    def as_dict(self) -> dict[str, float]:
        return asdict(self)


def rank_agreement(scores, accuracies, lower_is_better: bool = False) -> RankAgreement:
    """Pearson r, Spearman ρ, Kendall τ-b and weighted Kendall τ between a score and accuracy over a
    pool of models (one entry per model / model-dataset pair).

    With ``lower_is_better`` (NC1: a smaller value predicts better transfer) the score is negated
    before every statistic, so positive always means "ranks like the accuracy". This is not just a
    sign flip for the weighted τ: its weights favour the items the score ranks at the top, which
    after negation are the models with the smallest NC1."""
    s = np.asarray(scores.detach().cpu() if hasattr(scores, "detach") else scores, dtype=np.float64)
    a = np.asarray(accuracies.detach().cpu() if hasattr(accuracies, "detach") else accuracies,
                   dtype=np.float64)
    if s.shape != a.shape or s.ndim != 1:
        raise ValueError(f"scores and accuracies must be 1-D of equal length, got {s.shape} and "
                         f"{a.shape}")
    if len(s) < 3:
        raise ValueError(f"need at least 3 models to compare rankings, got {len(s)}")
    if lower_is_better:
        s = -s
    return RankAgreement(pearson(s, a), spearman(s, a), kendall(s, a), weighted_kendall(s, a),
                         len(s))
