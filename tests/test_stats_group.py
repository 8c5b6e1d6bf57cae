"""ClassStatsGroup: several feature sets with shared labels streamed together must give exactly the
statistics of one ClassStats per set, raise the same errors (naming the set), and cost a number of
operations that does not grow with the number of sets of one width."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.profiler import ProfilerActivity, profile

from nclab.metrics import ClassStats, ClassStatsGroup, cdnv, nc1

K = 6
DIMS = {"stem": 8, "a": 8, "b": 16, "c": 5, "d": 16, "e": 8}


def _batches(dtype=torch.float64, seed=0, sizes=(7, 1, 13, 4, 9)):
    gen = torch.Generator().manual_seed(seed)
    out = []
    for n in sizes:
        y = torch.randint(0, K, (n,), generator=gen)
        hs = {name: (torch.randn(n, d, generator=gen, dtype=torch.float64)
                     + y[:, None].double()).to(dtype) for name, d in DIMS.items()}
        out.append((hs, y))
    return out


@pytest.mark.parametrize("check", ["eager", "deferred"])
def test_group_equals_one_classstats_per_set(check):
    group = ClassStatsGroup(K, check=check)
    single = {n: ClassStats(K) for n in DIMS}
    for hs, y in _batches():
        group.update(hs, y)
        for n, h in hs.items():
            single[n].update(h, y)
    out = group.stats()
    assert list(out) == list(DIMS)  # the caller's order, not the width order used inside
    for n, s in out.items():
        ref = single[n]
        assert s.dim == DIMS[n] and s.num_samples == ref.num_samples
        for a, b in ((s.sums, ref.sums), (s.counts, ref.counts), (s.sq_norms, ref.sq_norms),
                     (s.second_moment, ref.second_moment)):
            np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-12, atol=1e-12)
        assert nc1(s) == pytest.approx(nc1(ref), rel=1e-10)
        assert cdnv(s) == pytest.approx(cdnv(ref), rel=1e-10)


def test_low_precision_input_and_numpy_reference():
    group = ClassStatsGroup(K)
    feats = {n: [] for n in DIMS}
    labels = []
    for hs, y in _batches(dtype=torch.bfloat16, seed=1):
        group.update(hs, y)
        labels.append(y)
        for n, h in hs.items():
            feats[n].append(h.double().numpy())
    y = torch.cat(labels).numpy()
    for n, s in group.stats().items():
        h = np.concatenate(feats[n])
        sums = np.stack([h[y == k].sum(0) for k in range(K)])
        np.testing.assert_allclose(s.sums.numpy(), sums, rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(s.second_moment.numpy(), h.T @ h, rtol=1e-12)
        np.testing.assert_allclose(s.sq_norms.numpy(),
                                   [(h[y == k] ** 2).sum() for k in range(K)], rtol=1e-12)


def test_low_memory_keeps_no_second_moment():
    group = ClassStatsGroup(K, low_memory=True)
    for hs, y in _batches():
        group.update(hs, y)
    s = group.stats()["b"]
    assert s.second_moment is None and s.low_memory
    with pytest.raises(ValueError, match="low_memory"):
        nc1(s)
    assert cdnv(s) > 0


def test_bad_input_names_the_feature_set():
    (hs, y), *_ = _batches()
    bad = dict(hs)
    bad["d"] = bad["d"].clone()
    bad["d"][0, 0] = float("nan")
    with pytest.raises(ValueError, match="'d': features contain 1 non-finite"):
        ClassStatsGroup(K, check="eager").update(bad, y)
    group = ClassStatsGroup(K, check="deferred")
    group.update(bad, y)  # no sync: raised by the next call, and the batch added nothing
    with pytest.raises(ValueError, match="'d': features contain 1 non-finite"):
        group.stats()
    with pytest.raises(ValueError, match=r"outside \[0, 6\)"):
        ClassStatsGroup(K, check="eager").update(hs, y + K)
    group = ClassStatsGroup(K)
    group.update(hs, y)
    with pytest.raises(ValueError, match="every name"):
        group.update({"stem": hs["stem"]}, y)
    with pytest.raises(ValueError, match="columns"):
        group.update({**hs, "a": hs["b"]}, y)
    with pytest.raises(ValueError, match="'a': .*2-D"):
        group.update({**hs, "a": hs["a"][:, :, None]}, y)
    with pytest.raises(ValueError, match="'a': features and labels have different lengths"):
        group.update({**hs, "a": hs["a"][:2]}, y)
    with pytest.raises(ValueError, match="non-empty dict"):
        group.update({}, y)
    with pytest.raises(ValueError, match="empty"):
        ClassStatsGroup(K).stats()


def test_deferred_bad_batch_adds_nothing():
    batches = _batches()
    clean = ClassStatsGroup(K, check="deferred")
    dirty = ClassStatsGroup(K, check="deferred")
    hs0, y0 = batches[0]
    dirty.update({**hs0, "c": torch.full_like(hs0["c"], float("inf"))}, y0)
    with pytest.raises(ValueError, match="'c'"):
        dirty.check()
    for hs, y in batches[1:]:
        clean.update(hs, y)
        dirty.update(hs, y)
    for n in DIMS:
        assert torch.equal(clean.stats()[n].sums, dirty.stats()[n].sums)


def _op_count(fn) -> int:
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    return sum(1 for e in prof.events() if e.name.startswith("aten::") and (
        e.cpu_parent is None or not e.cpu_parent.name.startswith("aten::")))


def test_operations_do_not_grow_with_the_number_of_sets():
    y = torch.randint(0, K, (32,))
    counts = {}
    for t in (2, 12):
        hs = {f"layer{i}": torch.randn(32, 24) for i in range(t)}
        group = ClassStatsGroup(K, check="eager")
        group.update(hs, y)
        counts[t] = _op_count(lambda hs=hs, group=group: group.update(hs, y))
        single = {n: ClassStats(K) for n in hs}
        for n, h in hs.items():
            single[n].update(h, y)
        per_set = _op_count(lambda hs=hs, single=single: [single[n].update(h, y)
                                                            for n, h in hs.items()])
        if t == 12:
            assert counts[t] * 4 < per_set
    assert counts[12] == counts[2]


def test_names_given_up_front():
    empty = ClassStatsGroup(K, names=["a", "b"]).stats()
    assert list(empty) == ["a", "b"] and all(s.num_samples == 0 for s in empty.values())
    (hs, y), *_ = _batches()
    group = ClassStatsGroup(K, names=list(DIMS))
    group.update(hs, y)
    assert group.stats()["b"].num_samples == len(y)
    with pytest.raises(ValueError, match="every name"):
        ClassStatsGroup(K, names=["b", "a"]).update({"a": hs["a"], "b": hs["b"]}, y)
    with pytest.raises(ValueError, match="distinct and non-empty"):
        ClassStatsGroup(K, names=["a", "a"])
