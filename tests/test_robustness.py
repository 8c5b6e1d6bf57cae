"""Audit cases of issue 21 for the streaming statistics and the measures: named errors instead of
raw torch/Python ones, and no silent wrong answers."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from nclab.accumulators import ClassStats, ClassStatsGroup
from nclab.data import synthetic_features
from nclab.metrics import nc1, numerical_rank


def _data(k=3, n=20, d=6, seed=0):
    return synthetic_features(k, n, d, within_std=0.5, between_scale=2.0, seed=seed)


def test_merge_refuses_non_stats_and_itself():
    h, y = _data()
    a = ClassStats(3).update(h, y)
    with pytest.raises(TypeError, match="can only merge a ClassStats, got Tensor"):
        a.merge(h)
    n = a.num_samples
    with pytest.raises(ValueError, match="into itself"):
        a.merge(a)
    assert a.num_samples == n
    b = ClassStats(3).update(h, y)
    assert a.merge(b).num_samples == 2 * n


def test_counts_raises_a_pending_deferred_error():
    h, y = _data()
    s = ClassStats(3, check="deferred").update(h, y)
    bad = h.clone()
    bad[0, 0] = float("nan")
    s.update(bad, y)
    with pytest.raises(ValueError, match="NaN"):
        _ = s.counts
    assert float(s.counts.sum()) == len(y)  # the bad batch added nothing
    s.update(h, y.clone().fill_(7))
    with pytest.raises(ValueError, match="outside"):
        _ = s.sums


def test_num_classes_numpy_integers_and_bool():
    h, y = _data()
    for k in (np.int64(3), np.int32(3), torch.tensor(3)):
        assert ClassStats(k).update(h, y).num_classes == 3
        assert ClassStatsGroup(k).num_classes == 3
        assert nc1(h, y, num_classes=k) == pytest.approx(nc1(h, y), rel=1e-12)
    for bad in (True, False, torch.tensor(True), 3.0, np.float64(3), "3", None):
        with pytest.raises(TypeError, match="num_classes must be an integer"):
            ClassStats(bad)
        with pytest.raises(TypeError, match="num_classes must be an integer"):
            ClassStatsGroup(bad)
    for bad in (0, -1, np.int64(0)):
        with pytest.raises(ValueError, match="num_classes must be >= 1"):
            ClassStats(bad)
        with pytest.raises(ValueError, match="num_classes must be >= 1"):
            ClassStatsGroup(bad)


@pytest.mark.parametrize("rtol", [-1.0, 1.0, 2.0, float("nan"), True])
def test_nc1_validates_rtol(rtol):
    h, y = _data()
    with pytest.raises(ValueError, match="rtol must be a number in"):
        nc1(h, y, rtol=rtol)
    with pytest.raises(ValueError, match="rtol"):
        nc1(ClassStats(3).update(h, y), rtol=rtol)


def test_numerical_rank_warns_when_unconverged():
    h, y = _data(d=12)
    ref = numerical_rank(h, y)
    with pytest.warns(UserWarning, match="did not converge.*max_iter=0"):
        numerical_rank(h, y, max_iter=0)
    with pytest.warns(UserWarning, match="max_iter=1 "):
        numerical_rank(ClassStats(3, second_moments=True).update(h, y), max_iter=1)
    with pytest.raises(ValueError, match="max_iter"):
        numerical_rank(h, y, max_iter=-1)
    assert 1.0 <= ref <= 12.0


def test_ncc_agreement_checks_shapes():
    from nclab.metrics import ncc_agreement

    h, y = _data(d=6)
    w = torch.randn(3, 6, dtype=torch.float64)
    ok = ncc_agreement(h, y, w, torch.zeros(3))
    assert 0.0 <= ok <= 1.0
    with pytest.raises(ValueError, match=r"W must be \(K, 6\).*\(3, 7\)"):
        ncc_agreement(h, y, torch.randn(3, 7))
    with pytest.raises(ValueError, match=r"b must be \(3,\).*\(4,\)"):
        ncc_agreement(h, y, w, torch.zeros(4))
    with pytest.raises(ValueError, match=r"means must be \(K, 6\)"):
        ncc_agreement(h, y, w, means=torch.zeros(3, 5))


_MEASURES = ["nc1", "cdnv", "equinorm", "equiangularity", "etf_error", "nc1_trace"]


@pytest.mark.parametrize("name", _MEASURES)
def test_degenerate_features_raise_one_named_error(name):
    from nclab import metrics as M

    y = torch.arange(12) % 3
    fn = getattr(M, name)
    equal = torch.ones(12, 4, dtype=torch.float64)
    for x in (equal, ClassStats(3).update(equal, y)):  # direct and streaming paths
        args = (x,) if isinstance(x, ClassStats) else (x, y)
        with pytest.raises(M.DegenerateFeaturesError, match=f"(?i){name if name != 'nc1' else 'NC1'}"
                           r".*undefined|undefined.*coincid"):
            fn(*args)
    big = torch.randn(12, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    big[0, 0] = 1e200
    with pytest.raises(M.DegenerateFeaturesError, match="overflow"):
        fn(big, y)
    assert issubclass(M.DegenerateFeaturesError, ValueError)


def test_cdnv_names_coinciding_class_means_and_rank_of_zero_class():
    from nclab import metrics as M

    h, y = _data(k=3, d=4)
    h = h.clone()
    h[y == 1] += h[y == 0].mean(0) - h[y == 1].mean(0)  # class 1's mean := class 0's
    with pytest.raises(M.DegenerateFeaturesError, match="classes 0 and 1 have coinciding means"):
        M.cdnv(h, y)
    z = h.clone()
    z[y == 2] = 0
    with pytest.raises(M.DegenerateFeaturesError, match="class 2's features are all zero"):
        numerical_rank(z, y)
    with pytest.raises(M.DegenerateFeaturesError, match="class 2's features are all zero"):
        numerical_rank(ClassStats(3, second_moments=True).update(z, y))
