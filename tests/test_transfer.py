"""nclab.transfer against float64 NumPy references, closed forms, invariances and scipy."""

import numpy as np
import pytest
import scipy.stats
import torch

from nclab.data import synthetic_features
from nclab.transfer import h_score, log_evidence, logme, rank_agreement


def _np_h_score(f, y):
    """Independent reference: dense covariances and NumPy's pinv."""
    f = np.asarray(f, dtype=np.float64)
    y = np.asarray(y)
    fc = f - f.mean(0)
    cov_f = fc.T @ fc / len(f)
    g = np.zeros_like(f)
    for k in np.unique(y):
        g[y == k] = f[y == k].mean(0)
    gc = g - f.mean(0)
    cov_g = gc.T @ gc / len(f)
    return float(np.trace(np.linalg.pinv(cov_f, rcond=1e-10) @ cov_g))


@pytest.mark.parametrize("n_per_class,dim", [(40, 12), (3, 30)])  # full rank, and d > N
def test_h_score_matches_numpy(n_per_class, dim):
    f, y = synthetic_features(5, n_per_class, dim, within_std=1.0, between_scale=2.0, seed=0)
    f = f + 3.0  # non-zero mean
    assert h_score(f, y, rtol=1e-10) == pytest.approx(_np_h_score(f.numpy(), y.numpy()),
                                                      rel=1e-8)


def test_h_score_invariances_and_range():
    f, y = synthetic_features(4, [20, 30, 25, 40], 10, between_scale=3.0, seed=1)
    base = h_score(f, y)
    assert 0 < base <= 3 + 1e-9  # at most min(d, K - 1)
    perm = torch.tensor([2, 0, 3, 1])
    assert h_score(f, perm[y]) == pytest.approx(base, rel=1e-10)
    q, _ = torch.linalg.qr(torch.randn(10, 10, dtype=torch.float64,
                                       generator=torch.Generator().manual_seed(0)))
    assert h_score(f @ q, y) == pytest.approx(base, rel=1e-8)
    assert h_score(f[torch.randperm(len(y))], y) < base  # shuffled pairing loses the signal


def test_log_evidence_equals_dense_gaussian_likelihood():
    for n, d in [(30, 8), (12, 20)]:
        g = np.random.default_rng(n)
        f = g.normal(size=(n, d))
        t = g.normal(size=(n, 3))
        for alpha, beta in [(1.0, 1.0), (0.3, 5.0), (20.0, 0.1)]:
            cov = np.eye(n) / beta + f @ f.T / alpha
            ref = scipy.stats.multivariate_normal(np.zeros(n), cov).logpdf(t.T)
            got = log_evidence(torch.from_numpy(f), torch.from_numpy(t), alpha, beta).numpy()
            np.testing.assert_allclose(got, ref, rtol=1e-9, atol=1e-8)


def test_logme_converges_with_non_decreasing_evidence():
    f, y = synthetic_features(6, 30, 16, within_std=1.0, between_scale=2.0, seed=2)
    res = logme(f, y, tol=1e-6, max_iter=500)
    assert res.converged and res.iterations < 500
    steps = np.diff(res.history, axis=0)
    assert (steps >= -1e-10).all(), steps.min()
    assert res.score == pytest.approx(res.evidence.mean())
    # at convergence the evidence is a maximum: nudging alpha or beta does not increase it
    ev = lambda a, b: log_evidence(f, torch.nn.functional.one_hot(y).double(), a, b).numpy()  # noqa: E731
    best = ev(torch.tensor(res.alpha), torch.tensor(res.beta))
    for fa, fb in [(1.05, 1), (0.95, 1), (1, 1.05), (1, 0.95)]:
        assert (ev(torch.tensor(res.alpha * fa), torch.tensor(res.beta * fb)) <= best + 1e-9).all()
    np.testing.assert_allclose(best / len(y), res.evidence, rtol=1e-12)
    # stopping rule: the last update changed alpha/beta by less than tol (relative) only
    short = logme(f, y, tol=1e-6, max_iter=2)
    assert not short.converged and short.iterations == 2


def test_logme_prefers_informative_features_and_handles_d_gt_n():
    f, y = synthetic_features(5, 20, 8, within_std=0.5, between_scale=3.0, seed=3)
    shuffled = f[torch.randperm(len(y), generator=torch.Generator().manual_seed(0))]
    assert logme(f, y).score > logme(shuffled, y).score
    onehot = torch.nn.functional.one_hot(y).double()
    assert logme(onehot + 0.01 * torch.randn_like(onehot), y).score > logme(f, y).score
    wide, yw = synthetic_features(3, 5, 40, seed=4)
    assert np.isfinite(logme(wide, yw).score)


def test_rank_agreement_matches_scipy_with_ties():
    scores = np.array([3.0, 1.0, 2.0, 2.0, 5.0, 4.0])
    acc = np.array([0.9, 0.5, 0.7, 0.6, 0.95, 0.95])  # ties in both
    ra = rank_agreement(scores, acc)
    assert ra.pearson == pytest.approx(scipy.stats.pearsonr(scores, acc).statistic)
    assert ra.spearman == pytest.approx(scipy.stats.spearmanr(scores, acc).statistic)
    assert ra.kendall == pytest.approx(scipy.stats.kendalltau(scores, acc).statistic)
    assert ra.weighted_kendall == pytest.approx(scipy.stats.weightedtau(scores, acc).statistic)
    assert ra.n == 6
    # NC1-style scores: lower is better; agreement is computed on the negated score
    nc1 = -scores
    low = rank_agreement(nc1, acc, lower_is_better=True)
    assert low.as_dict() == pytest.approx(ra.as_dict())
    raw = rank_agreement(nc1, acc)
    assert raw.kendall == pytest.approx(-ra.kendall)
    perfect = rank_agreement([1, 2, 3, 4], [0.1, 0.2, 0.3, 0.4])
    assert [perfect.spearman, perfect.kendall, perfect.weighted_kendall] == pytest.approx([1.0] * 3)
    with pytest.raises(ValueError, match="at least 3"):
        rank_agreement([1, 2], [1, 2])
