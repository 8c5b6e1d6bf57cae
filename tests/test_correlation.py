"""nclab.correlation against scipy / NumPy float64 references and known answers."""

import numpy as np
import pytest
import scipy.stats
import torch

from nclab.correlation import (
    bootstrap_ci,
    kendall,
    linear_fit,
    pearson,
    spearman,
    weighted_kendall,
)

RNG = np.random.default_rng(0)
X = RNG.normal(size=40)
Y = 0.7 * X + RNG.normal(scale=0.5, size=40)


def test_correlations_match_scipy():
    assert pearson(X, Y) == pytest.approx(scipy.stats.pearsonr(X, Y).statistic, abs=1e-12)
    assert spearman(X, Y) == pytest.approx(scipy.stats.spearmanr(X, Y).statistic, abs=1e-12)
    assert kendall(X, Y) == pytest.approx(scipy.stats.kendalltau(X, Y).statistic, abs=1e-12)
    assert weighted_kendall(X, Y) == pytest.approx(scipy.stats.weightedtau(X, Y).statistic,
                                                   abs=1e-12)


def test_known_answers_and_ties():
    a = [1, 2, 3, 4, 5]
    assert pearson(a, [2, 4, 6, 8, 10]) == pytest.approx(1.0)
    assert spearman(a, [1, 4, 9, 16, 25]) == pytest.approx(1.0)  # monotone, not linear
    assert kendall(a, [5, 4, 3, 2, 1]) == pytest.approx(-1.0)
    # tau-b with ties: 10 pairs, 1 tied in y, 9 concordant, 0 discordant -> 9 / sqrt(10 * 9)
    assert kendall(a, [1, 2, 2, 4, 5]) == pytest.approx(9 / np.sqrt(90))
    assert np.isnan(pearson(a, [3, 3, 3, 3, 3]))


def test_accepts_torch_and_rejects_bad_input():
    assert pearson(torch.tensor(X), torch.tensor(Y)) == pytest.approx(pearson(X, Y))
    with pytest.raises(ValueError, match="same length"):
        pearson([1, 2, 3], [1, 2])
    with pytest.raises(ValueError, match="NaN"):
        spearman([1, 2, np.nan], [1, 2, 3])
    with pytest.raises(ValueError, match="at least 2"):
        kendall([1], [1])


def test_linear_fit_matches_polyfit():
    fit = linear_fit(X, Y)
    slope, intercept = np.polyfit(X, Y, 1)
    assert fit.slope == pytest.approx(slope, abs=1e-12)
    assert fit.intercept == pytest.approx(intercept, abs=1e-12)
    res = Y - fit(X)
    r2 = 1 - (res @ res) / ((Y - Y.mean()) @ (Y - Y.mean()))
    assert fit.r2 == pytest.approx(r2, abs=1e-12)
    assert fit.r == pytest.approx(pearson(X, Y))
    with pytest.raises(ValueError, match="constant"):
        linear_fit([1, 1, 1], [1, 2, 3])


def test_bootstrap_ci_covers_and_is_reproducible():
    ci = bootstrap_ci(pearson, X, Y, n_boot=500, seed=1)
    assert ci.low < ci.estimate < ci.high
    assert ci.estimate == pytest.approx(pearson(X, Y))
    est, lo, hi = bootstrap_ci(pearson, X, Y, n_boot=500, seed=1)
    assert (lo, hi) == (ci.low, ci.high)
    # the mean of a normal sample: the 95 % interval is close to mean ± 1.96 sd/sqrt(n)
    z = RNG.normal(size=400)
    m = bootstrap_ci(np.mean, z, n_boot=2000, seed=0)
    half = 1.96 * z.std() / np.sqrt(len(z))
    assert m.low == pytest.approx(z.mean() - half, abs=0.25 * half)
    assert m.high == pytest.approx(z.mean() + half, abs=0.25 * half)
    wider = bootstrap_ci(np.mean, z, n_boot=2000, level=0.99, seed=0)
    assert wider.high - wider.low > m.high - m.low
    with pytest.raises(ValueError, match="share"):
        bootstrap_ci(pearson, X, Y[:-1])
