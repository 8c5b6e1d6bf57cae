"""nclab.metrics against an independent float64 NumPy implementation of the same formulas."""

from __future__ import annotations

import os
import tempfile

import numpy as np
import pytest
import torch
from references import ref_nc1, ref_parts

from nclab import metrics as M
from nclab.metrics import ClassStats

# --------------------------------------------------------------------------- NumPy reference


def ref_nc1_trace(H, y, K):
    _, _, _, sw, sb, _ = ref_parts(H, y, K)
    return float(np.trace(sw) / np.trace(sb))


def ref_cdnv(H, y, K):
    n, mus, _, _, _, C = ref_parts(H, y, K)
    var = np.array([np.sum(C[np.asarray(y) == k] ** 2) / n[k] for k in range(K)])
    vals = [(var[i] + var[j]) / (2 * np.sum((mus[i] - mus[j]) ** 2))
            for i in range(K) for j in range(K) if i != j]
    return float(np.mean(vals))


def ref_numerical_rank(H, y, K):
    H, y = np.asarray(H, np.float64), np.asarray(y)
    return float(np.mean([np.linalg.norm(H[y == k], "fro") ** 2 / np.linalg.norm(H[y == k], 2) ** 2
                          for k in range(K)]))


def ref_nc2(H, y, K):
    _, _, Mt, _, _, _ = ref_parts(H, y, K)
    norms = np.linalg.norm(Mt, axis=1)
    unit = Mt / norms[:, None]
    cos = unit @ unit.T
    off = ~np.eye(K, dtype=bool)
    G = Mt @ Mt.T
    E = np.eye(K) - np.ones((K, K)) / K
    etf = np.linalg.norm(G / np.linalg.norm(G) - E / np.linalg.norm(E))
    return float(norms.std() / norms.mean()), float(cos[off].std()), float(etf)


def ref_self_duality(H, y, K, W):
    _, _, Mt, _, _, _ = ref_parts(H, y, K)
    W = np.asarray(W, np.float64)
    return float(np.sum((W / np.linalg.norm(W) - Mt / np.linalg.norm(Mt)) ** 2))


def ref_ncc(H, y, K, W, b):
    H = np.asarray(H, np.float64)
    _, mus, _, _, _, _ = ref_parts(H, y, K)
    clf = np.argmax(H @ np.asarray(W, np.float64).T + np.asarray(b, np.float64), axis=1)
    d2 = ((H[:, None, :] - mus[None]) ** 2).sum(-1)
    return float(np.mean(clf == np.argmin(d2, axis=1)))


# --------------------------------------------------------------------------- data


def make_data(K=5, d=20, per_class=60, spread=1.0, scale=4.0, seed=0, dtype=torch.float64,
              offset=2.0):
    """Class-structured random data; per_class may be a list (imbalanced)."""
    rng = np.random.default_rng(seed)
    counts = [per_class] * K if isinstance(per_class, int) else list(per_class)
    mus = scale * rng.standard_normal((K, d)) + offset
    y = np.concatenate([np.full(c, k) for k, c in enumerate(counts)])
    rng.shuffle(y)
    # anisotropic within-class noise so that Sigma_W is not a multiple of the identity
    A = rng.standard_normal((d, d)) / np.sqrt(d)
    H = mus[y] + spread * rng.standard_normal((len(y), d)) @ A
    return torch.tensor(H, dtype=dtype), torch.tensor(y)


CASES = {
    "balanced": dict(K=5, d=20, per_class=60),
    "d>N": dict(K=4, d=150, per_class=12),
    "K-1>d": dict(K=12, d=5, per_class=30),
    "imbalanced": dict(K=4, d=16, per_class=[5, 80, 200, 13]),
}


def rel(a, b):
    return abs(a - b) / max(abs(b), 1e-300)


# --------------------------------------------------------------------------- vs reference


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-8), (torch.float32, 1e-5)])
def test_against_numpy_reference(case, dtype, tol):
    H, y = make_data(**CASES[case], dtype=dtype)
    K = CASES[case]["K"]
    Hn, yn = H.double().numpy(), y.numpy()
    assert rel(M.nc1(H, y), ref_nc1(Hn, yn, K)) <= tol
    assert rel(M.nc1(H, y, global_mean="weighted"), ref_nc1(Hn, yn, K, weighted=True)) <= tol
    assert rel(M.nc1_trace(H, y), ref_nc1_trace(Hn, yn, K)) <= tol
    assert rel(M.cdnv(H, y), ref_cdnv(Hn, yn, K)) <= tol
    assert rel(M.numerical_rank(H, y), ref_numerical_rank(Hn, yn, K)) <= tol
    en, ea, etf = ref_nc2(Hn, yn, K)
    assert rel(M.equinorm(H, y), en) <= tol
    assert rel(M.equiangularity(H, y), ea) <= tol
    assert rel(M.etf_error(H, y), etf) <= tol
    W = torch.randn(K, H.shape[1], generator=torch.Generator().manual_seed(1), dtype=dtype)
    b = torch.randn(K, generator=torch.Generator().manual_seed(2), dtype=dtype)
    assert rel(M.self_duality(H, W, y), ref_self_duality(Hn, yn, K, W.double().numpy())) <= tol
    # NC4 with a classifier close to NCC so that agreement is neither 0 nor 1 trivially
    mus = torch.tensor(ref_parts(Hn, yn, K)[1], dtype=dtype)
    Wn = mus + 0.5 * W
    bn = -0.5 * (mus * mus).sum(1) + b
    got = M.ncc_agreement(H, y, Wn, bn)
    assert got == pytest.approx(ref_ncc(Hn, yn, K, Wn.double().numpy(), bn.double().numpy()),
                                abs=1e-12)
    # ClassStats route agrees with the same reference
    stats = ClassStats(K, second_moments=True).update(H, y)
    assert rel(M.nc1(stats), ref_nc1(Hn, yn, K)) <= max(tol, 1e-9)
    assert rel(M.numerical_rank(stats), ref_numerical_rank(Hn, yn, K)) <= max(tol, 1e-9)
    assert rel(M.self_duality(stats, W), ref_self_duality(Hn, yn, K, W.double().numpy())) <= tol


def test_ncc_matches_classifier_built_from_means():
    H, y = make_data(K=6, d=10, per_class=40, spread=2.0)
    mus = M.class_means(H, y)
    # argmax(mu_k.h - ||mu_k||^2/2) is exactly the nearest-mean rule
    assert M.ncc_agreement(H, y, mus, -0.5 * (mus * mus).sum(1)) == 1.0
    # with training means given explicitly (a ClassStats) the answer is the same
    assert M.ncc_agreement(H, y, mus, -0.5 * (mus * mus).sum(1),
                           means=ClassStats(6).update(H, y)) == 1.0


# --------------------------------------------------------------------------- streaming


def _ragged_chunks(H, y, seed):
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(len(y), generator=g)
    H, y = H[perm], y[perm]
    cuts = sorted(torch.randint(1, len(y), (7,), generator=g).tolist())
    edges = [0, *cuts, len(y)]
    return [(H[a:b], y[a:b]) for a, b in zip(edges[:-1], edges[1:])]


@pytest.mark.parametrize("second_moments", [False, True])
def test_chunking_order_and_merge_invariance(second_moments):
    H, y = make_data(K=6, d=24, per_class=[30, 50, 20, 70, 40, 33], seed=3)
    one = ClassStats(6, second_moments=second_moments).update(H, y)
    many = ClassStats(6, second_moments=second_moments)
    for hc, yc in _ragged_chunks(H, y, seed=5):
        many.update(hc, yc)
    parts = _ragged_chunks(H, y, seed=9)
    a, b = ClassStats(6, second_moments=second_moments), ClassStats(6, second_moments=second_moments)
    for i, (hc, yc) in enumerate(parts):
        (a if i % 2 else b).update(hc, yc)
    merged = a.merge(b)
    for fn in (M.nc1, M.nc1_trace, M.cdnv, M.equinorm, M.equiangularity, M.etf_error):
        ref = fn(one)
        assert rel(fn(many), ref) <= 1e-12, fn.__name__
        assert rel(fn(merged), ref) <= 1e-12, fn.__name__
    assert merged.num_samples == one.num_samples == len(y)
    # streamed and direct routes agree
    assert rel(M.nc1(one), M.nc1(H, y)) <= 1e-9
    assert rel(M.cdnv(one), M.cdnv(H, y)) <= 1e-9
    assert rel(M.nc1_trace(one), M.nc1_trace(H, y)) <= 1e-9


def test_float32_batches_accumulate_in_float64():
    H, y = make_data(K=4, d=8, per_class=50, dtype=torch.float32)
    s = ClassStats(4).update(H, y)
    assert s.sums.dtype == torch.float64 and s.second_moment.dtype == torch.float64
    assert rel(M.nc1(s), M.nc1(H.double(), y)) <= 1e-9
    sb = ClassStats(4).update(H.bfloat16(), y)  # bf16 input is accepted (values as given)
    assert rel(M.nc1(sb), M.nc1(H.bfloat16().double(), y)) <= 1e-9


def test_nc1_lowmem_equals_dense_route():
    H, y = make_data(K=7, d=300, per_class=25, seed=4)
    chunks = _ragged_chunks(H, y, seed=1)
    dense = M.nc1(H, y)
    assert rel(M.nc1_lowmem(chunks, 7), dense) <= 1e-10
    assert rel(M.nc1_lowmem(lambda: iter(chunks), 7), dense) <= 1e-10
    assert rel(M.nc1_lowmem(chunks, 7, global_mean="weighted"),
               M.nc1(H, y, global_mean="weighted")) <= 1e-10
    with pytest.raises(ValueError, match="two passes"):
        M.nc1_lowmem(iter(chunks), 7)
    low = ClassStats(7, low_memory=True).update(H, y)
    assert low.second_moment is None
    assert rel(M.cdnv(low), M.cdnv(H, y)) <= 1e-9  # first-order metrics work from low memory
    with pytest.raises(ValueError, match="nc1_lowmem"):
        M.nc1(low)
    rep = M.collapse_report(low)
    assert rep.nc1 is None and rep.numerical_rank is None


def _sync_worker(rank: int, world: int, path: str, out: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{path}", rank=rank, world_size=world)
    try:
        H, y = make_data(K=5, d=12, per_class=40, seed=8)
        part = slice(rank, None, world)
        # rank 1 builds its statistics lazily (dim=None) to exercise allocation in sync
        s = ClassStats(5, second_moments=True)
        if rank == 0:
            s.update(H[part], y[part])
        else:
            s.update(H[part][:10], y[part][:10]).update(H[part][10:], y[part][10:])
        s.sync()
        far = ClassStats(5).update(H[part] + 1e8, y[part]).sync()  # a shared offset, 1e8 x spread
        torch.save({"nc1": M.nc1(s), "rank": M.numerical_rank(s), "n": s.num_samples,
                    "nc1_far": M.nc1(far)}, f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


def test_sync_over_two_gloo_processes():
    import torch.multiprocessing as mp

    H, y = make_data(K=5, d=12, per_class=40, seed=8)
    single = ClassStats(5, second_moments=True).update(H, y)
    with tempfile.TemporaryDirectory() as tmp:
        init, out = os.path.join(tmp, "init"), os.path.join(tmp, "res")
        mp.spawn(_sync_worker, args=(2, init, out), nprocs=2, join=True)
        results = [torch.load(f"{out}.{r}", weights_only=True) for r in range(2)]
    for r in results:
        assert r["n"] == len(y)
        assert rel(r["nc1"], M.nc1(single)) <= 1e-12
        assert rel(r["rank"], M.numerical_rank(single)) <= 1e-10
        assert rel(r["nc1_far"], M.nc1(single)) <= 1e-8


def test_sync_is_noop_without_distributed():
    H, y = make_data(K=3, d=4, per_class=10)
    s = ClassStats(3).update(H, y)
    before = M.nc1(s)
    assert M.nc1(s.sync()) == before


# --------------------------------------------------------------------------- large shared offset
OFFSETS = [1e0, 1e2, 1e4, 1e6, 1e7, 1e8]
OFFSET_MEASURES = ("nc1", "nc1_trace", "cdnv", "equinorm", "etf_error")


def _offset_data(offset):
    """K=4, d=8, N=200 float64 features of spread ~1 plus ``offset`` in every coordinate, and the
    same data with the offset removed (exact: a difference of nearby float64 numbers)."""
    H, y = make_data(K=4, d=8, per_class=[40, 60, 50, 50], scale=1.0, spread=0.5, offset=0.0, seed=11)
    shifted = H + offset
    return shifted, shifted - offset, y


def _offset_refs(centred, y):
    Hn, yn = centred.numpy(), y.numpy()
    en, _, etf = ref_nc2(Hn, yn, 4)
    return {"nc1": ref_nc1(Hn, yn, 4), "nc1_trace": ref_nc1_trace(Hn, yn, 4),
            "cdnv": ref_cdnv(Hn, yn, 4), "equinorm": en, "etf_error": etf}


def _assert_offset_exact(stats, refs, what):
    for name in OFFSET_MEASURES:
        assert rel(getattr(M, name)(stats), refs[name]) <= 1e-8, (what, name)


class _ThreadGroup:
    """An in-process stand-in for an all-reduce over ``world`` ranks (one thread per rank): every
    rank's tensor becomes the sum of all ranks' tensors, added in rank order."""

    def __init__(self, world):
        import threading

        self.slots = [None] * world
        self.barrier = threading.Barrier(world)

    def reducer(self, rank):
        def reduce_sum(t):
            self.slots[rank] = t.clone()
            self.barrier.wait()
            total = self.slots[0].clone()
            for other in self.slots[1:]:
                total += other
            self.barrier.wait()
            t.copy_(total)
        return reduce_sum


def _thread_sync(parts, dim):
    """Run ClassStats._sync_with on every part, one thread per rank; returns the parts."""
    import threading

    group = _ThreadGroup(len(parts))
    errors = []

    def run(rank):
        try:
            if parts[rank]._acc is None:  # a rank without data, as sync() allocates it
                parts[rank]._allocate(dim, torch.device("cpu"))
            parts[rank]._sync_with(group.reducer(rank))
        except Exception as err:  # pragma: no cover - reported below
            errors.append(err)
            group.barrier.abort()

    threads = [threading.Thread(target=run, args=(r,)) for r in range(len(parts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    return parts


@pytest.mark.parametrize("offset", OFFSETS)
def test_streaming_statistics_exact_under_a_large_offset(offset):
    """Issue 21 item 4: an offset up to 1e8 x the spread leaves every streamed, merged, grouped and
    synced statistic within 1e-8 of a float64 NumPy reference on the centred data (a raw second
    moment drifted by 1e-3 at 1e6 and by 100 % at 1e8)."""
    H, centred, y = _offset_data(offset)
    refs = _offset_refs(centred, y)
    for name in OFFSET_MEASURES:  # the direct route
        assert rel(getattr(M, name)(H, y), refs[name]) <= 1e-8, ("direct", name)
    _assert_offset_exact(ClassStats(4).update(H, y), refs, "one update")
    chunks = _ragged_chunks(H, y, seed=2)
    for check in ("eager", "deferred"):
        s = ClassStats(4, check=check)
        for hc, yc in chunks:
            s.update(hc, yc)
        _assert_offset_exact(s, refs, f"batches, {check}")
    per_class = ClassStats(4, second_moments=True)
    for hc, yc in chunks:
        per_class.update(hc, yc)
    _assert_offset_exact(per_class, refs, "batches, second_moments")
    np.testing.assert_allclose(per_class.Sigma_W.numpy(), ref_parts(centred.numpy(), y.numpy(), 4)[3],
                               rtol=1e-9, atol=1e-12)
    # merge: parts of different sizes and shifts (one part offset by a further 1e3 x spread
    # relative to the first batch, so the two shifts differ)
    a, b = ClassStats(4), ClassStats(4)
    for i, (hc, yc) in enumerate(chunks):
        (a if i < 2 else b).update(hc, yc)
    _assert_offset_exact(a.merge(b), refs, "merge")
    # ClassStatsGroup: two feature sets of one width and one of another
    group = M.ClassStatsGroup(4, check="eager")
    for hc, yc in chunks:
        group.update({"h": hc, "twin": hc.clone(), "head": hc[:, :5]}, yc)
    out = group.stats()
    _assert_offset_exact(out["h"], refs, "group")
    _assert_offset_exact(out["twin"], refs, "group twin")
    head_refs = _offset_refs(centred[:, :5], y)
    _assert_offset_exact(out["head"], head_refs, "group, other width")
    # distributed sync: three ranks, one without data, combined by the same all-reduces as sync()
    parts = [ClassStats(4), ClassStats(4), ClassStats(4, second_moments=False)]
    for i, (hc, yc) in enumerate(chunks):
        parts[i % 2].update(hc, yc)
    for part in _thread_sync(parts, H.shape[1]):
        assert part.num_samples == len(y)
        _assert_offset_exact(part, refs, "sync")


def test_sync_with_per_class_scatters_and_merge_agree():
    H, y = make_data(K=5, d=12, per_class=[30, 20, 50, 10, 40], seed=8)
    H = H + 1e7
    chunks = _ragged_chunks(H, y, seed=4)
    single = ClassStats(5, second_moments=True)
    for hc, yc in chunks:
        single.update(hc, yc)
    parts = [ClassStats(5, second_moments=True) for _ in range(3)]
    for i, (hc, yc) in enumerate(chunks):
        parts[i % 3].update(hc, yc)
    merged = ClassStats(5, second_moments=True)
    for p in parts:
        merged.merge(p)
    for p in _thread_sync(parts, 12) + [merged]:
        np.testing.assert_allclose(p.counts.numpy(), single.counts.numpy())
        np.testing.assert_allclose(p.class_scatters.numpy(), single.class_scatters.numpy(),
                                   rtol=1e-9, atol=1e-9)
        np.testing.assert_allclose(p.within_ss.numpy(), single.within_ss.numpy(), rtol=1e-10)
        assert rel(M.nc1(p), M.nc1(single)) <= 1e-10
        assert rel(M.numerical_rank(p), M.numerical_rank(single)) <= 1e-8


def test_uncentred_views_match_numpy():
    """The uncentred quantities formed from the centred state: sums, squared norms, S, per-class S."""
    H, y = make_data(K=3, d=6, per_class=[5, 9, 7], seed=2)
    Hn, yn = H.numpy(), y.numpy()
    s = ClassStats(3, second_moments=True).update(H[:8], y[:8]).update(H[8:], y[8:])
    t = ClassStats(3).update(H[:8], y[:8]).update(H[8:], y[8:])
    for k in range(3):
        hk = Hn[yn == k]
        np.testing.assert_allclose(s.sums[k].numpy(), hk.sum(0), rtol=1e-12)
        np.testing.assert_allclose(float(s.sq_norms[k]), (hk ** 2).sum(), rtol=1e-12)
        np.testing.assert_allclose(s.class_second_moments[k].numpy(), hk.T @ hk, rtol=1e-11, atol=1e-11)
        np.testing.assert_allclose(float(s.within_ss[k]), ((hk - hk.mean(0)) ** 2).sum(), rtol=1e-11)
    np.testing.assert_allclose(t.second_moment.numpy(), Hn.T @ Hn, rtol=1e-12, atol=1e-11)
    np.testing.assert_allclose(t.total_second_moment.numpy(), s.total_second_moment.numpy(),
                               rtol=1e-12, atol=1e-11)
    np.testing.assert_allclose(t.Sigma_W.numpy(), ref_parts(Hn, yn, 3)[3], rtol=1e-11, atol=1e-13)
    assert s.second_moment is None and t.class_second_moments is None


# --------------------------------------------------------------------------- invariances, known answers


def test_invariances_rotation_scale_permutation():
    H, y = make_data(K=6, d=10, per_class=[20, 40, 25, 30, 50, 35], seed=2)
    Q, _ = torch.linalg.qr(torch.randn(10, 10, generator=torch.Generator().manual_seed(0),
                                       dtype=torch.float64))
    perm = torch.tensor([3, 0, 5, 1, 4, 2])
    fns = (M.nc1, M.nc1_trace, M.cdnv, M.numerical_rank, M.equinorm, M.equiangularity,
           M.etf_error)
    for fn in fns:
        base = fn(H, y)
        assert rel(fn(H @ Q, y), base) <= 1e-9, f"{fn.__name__} rotation"
        assert rel(fn(7.5 * H, y), base) <= 1e-9, f"{fn.__name__} scale"
        assert rel(fn(H, perm[y]), base) <= 1e-9, f"{fn.__name__} label permutation"
    # NC1-type metrics are also translation invariant (the numerical rank is not: uncentred)
    for fn in (M.nc1, M.nc1_trace, M.cdnv, M.etf_error):
        assert rel(fn(H + 3.0, y), fn(H, y)) <= 1e-9


def test_perfect_collapse_and_simplex_etf():
    K, d = 5, 9
    means = M.simplex_etf(K, d, scale=3.0, seed=1)
    G = means @ means.T
    assert torch.allclose(G / 9.0, torch.eye(K, dtype=torch.float64) * (1 + 1 / (K - 1))
                          - 1 / (K - 1), atol=1e-12)
    y = torch.arange(K).repeat_interleave(7)
    H = means[y].clone()
    assert M.nc1(H, y) <= 1e-12
    assert M.nc1(ClassStats(K).update(H, y)) <= 1e-12
    assert M.cdnv(H, y) <= 1e-12 and M.nc1_trace(H, y) <= 1e-12
    assert M.etf_error(H, y) <= 1e-12
    assert M.equinorm(H, y) <= 1e-12 and M.equiangularity(H, y) <= 1e-12
    assert M.self_duality(H, 0.3 * means, y) <= 1e-12  # W proportional to the centred means
    assert M.numerical_rank(H, y) == pytest.approx(1.0, abs=1e-12)  # each class is rank one
    # a non-ETF (random means) is far from it
    Hr, yr = make_data(K=K, d=d, per_class=7)
    assert M.etf_error(Hr, yr) > 0.1


def test_collapse_report_has_every_metric():
    H, y = make_data(K=4, d=6, per_class=30)
    W = torch.randn(4, 6, dtype=torch.float64)
    rep = M.collapse_report(H, y, W=W, b=torch.zeros(4, dtype=torch.float64))
    d = rep.as_dict()
    assert d["nc1"] == pytest.approx(M.nc1(H, y))
    assert d["cdnv"] == pytest.approx(M.cdnv(H, y))
    assert d["self_duality"] == pytest.approx(M.self_duality(H, W, y))
    assert d["ncc_agreement"] == pytest.approx(M.ncc_agreement(H, y, W))
    assert d["num_classes"] == 4 and d["num_samples"] == 120 and d["dim"] == 6
    s = M.collapse_report(ClassStats(4, second_moments=True).update(H, y), W=W)
    assert s.ncc_agreement is None and s.numerical_rank == pytest.approx(rep.numerical_rank)


def test_rank_deficient_between_class_and_tolerance():
    # K - 1 > d: Sigma_B is full rank d; and d >= K: rank K - 1 (one null direction dropped)
    for K, d in ((10, 3), (3, 10)):
        H, y = make_data(K=K, d=d, per_class=20)
        assert rel(M.nc1(H, y), ref_nc1(H.numpy(), y.numpy(), K)) <= 1e-8
    # a between-class spectrum spanning 1e8 (the exact SVD fallback) still matches the reference
    H, y = make_data(K=4, d=6, per_class=25, spread=1e-3)
    H[:, 0] += 1e4 * (y == 1)  # one class far away along one axis: lambda ratio ~1e-8
    assert rel(M.nc1(H, y), ref_nc1(H.numpy(), y.numpy(), 4)) <= 1e-6
    # an rtol that keeps only the largest eigenvalue gives a smaller NC1
    H, y = make_data(K=5, d=8, per_class=20)
    assert M.nc1(H, y, rtol=0.999) < M.nc1(H, y)


# --------------------------------------------------------------------------- bad input


def test_bad_inputs_raise_clear_errors():
    H, y = make_data(K=3, d=4, per_class=10)
    s = ClassStats(3)
    bad = H.clone()
    bad[0, 0], bad[1, 1], bad[2, 2] = float("nan"), float("inf"), float("nan")
    with pytest.raises(ValueError, match="3 non-finite values .*2 NaN"):
        s.update(bad, y)
    with pytest.raises(ValueError, match="non-finite"):
        M.nc1(bad, y)
    y_bad = y.clone()
    y_bad[0], y_bad[1] = 7, -1
    with pytest.raises(ValueError, match=r"outside \[0, 3\) \(values: -1, 7\)"):
        s.update(H, y_bad)
    assert s.num_samples == 0  # failed updates add nothing
    with pytest.raises(ValueError, match="nclab.features"):
        s.update(H[:, :, None, None], y)
    with pytest.raises(ValueError, match="different lengths"):
        s.update(H, y[:-1])
    with pytest.raises(ValueError, match="integer"):
        s.update(H, y.double())
    with pytest.raises(ValueError, match="devices?"):
        s.update(H.to("meta"), y)
    with pytest.raises(ValueError, match="lives on"):
        ClassStats(3, device="cpu").update(H.to("meta"), y.to("meta"))
    with pytest.raises(ValueError, match="at least two classes"):
        M.nc1(H[y == 0], y[y == 0] * 0)
    with pytest.raises(ValueError, match="empty"):
        M.nc1(ClassStats(3))
    with pytest.raises(ValueError, match="columns"):
        ClassStats(3, dim=5).update(H, y)
    with pytest.raises(ValueError, match="global_mean"):
        M.nc1(H, y, global_mean="median")
    with pytest.raises(ValueError, match="second_moments=True"):
        M.numerical_rank(ClassStats(3).update(H, y))
    with pytest.raises(ValueError, match="W must be"):
        M.self_duality(H, y, y)
    with pytest.raises(ValueError, match="cannot merge"):
        ClassStats(3).merge(ClassStats(4))


def test_deferred_check_raises_later_and_drops_the_bad_batch():
    H, y = make_data(K=3, d=4, per_class=10)
    s = ClassStats(3, check="deferred").update(H[:10], y[:10])
    bad = H[10:20].clone()
    bad[0, 0] = float("nan")
    s.update(bad, y[10:20])  # no sync, no error yet
    with pytest.raises(ValueError, match="1 non-finite"):
        s.update(H[20:], y[20:])  # the previous batch's error fires first
    s.update(H[20:], y[20:])
    y_bad = y[10:20].clone()
    y_bad[3] = 5
    s.update(H[10:20], y_bad)
    with pytest.raises(ValueError, match=r"values: 5"):
        M.nc1(s)  # or at the next read
    ref = ClassStats(3).update(H[:10], y[:10]).update(H[20:], y[20:])
    assert s.num_samples == ref.num_samples
    assert M.nc1(s) == pytest.approx(M.nc1(ref), rel=1e-12)
    with pytest.raises(ValueError, match="check must be"):
        ClassStats(3, check="later")


def test_missing_classes_named_or_dropped():
    H, y = make_data(K=5, d=6, per_class=20)
    keep = (y != 1) & (y != 3)
    Hm, ym = H[keep], y[keep]
    with pytest.raises(ValueError, match=r"classes 1, 3"):
        M.nc1(Hm, ym, num_classes=5)
    with pytest.raises(ValueError, match=r"classes 1, 3"):
        M.cdnv(ClassStats(5).update(Hm, ym))
    relabel = torch.tensor([0, -1, 1, -1, 2])[ym]
    for fn in (M.nc1, M.cdnv, M.etf_error, M.numerical_rank):
        with pytest.warns(UserWarning, match="dropping 2 classes"):
            got = fn(Hm, ym, num_classes=5, allow_missing=True)
        assert rel(got, fn(Hm, relabel)) <= 1e-9
    with pytest.warns(UserWarning):
        got = M.nc1(ClassStats(5).update(Hm, ym), allow_missing=True)
    assert rel(got, M.nc1(Hm, relabel)) <= 1e-9


def test_default_check_is_eager():
    stats = ClassStats(3)
    assert stats.check_mode == "eager"
    with pytest.raises(ValueError, match="3"):
        stats.update(torch.zeros(2, 4), torch.tensor([0, 3]))
    assert stats.num_samples == 0  # the bad batch added nothing
