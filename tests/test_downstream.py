"""nclab.downstream: chapter 02's per-profile study, its split, feature cache and statistics."""

from __future__ import annotations

import dataclasses

import numpy as np
import pandas as pd
import pytest
import scipy.stats
import torch
from references import ref_nc1

from nclab import data, downstream, models, runtime, zoo

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("name", list(runtime.PROFILES))
def test_every_profile_has_a_consistent_study(name):
    s = downstream.study(name)
    assert s.profile == name and s.seeds == runtime.PROFILES[name].seeds
    assert set(s.family) | set(s.one_family) <= set(s.models) or name in ("course", "paper")
    for task in (*s.tasks, *s.encoder_tasks):
        assert task.dataset in data.DATASETS
    for m in (*s.models, *s.family, s.encoder):
        assert m in models.BACKBONES or downstream._small(m)[0] in downstream.SMALL_ARCH
    assert len(s.probe_seeds()) == (len(s.seeds) if s.resplit else 1)


def test_real_study_is_the_whole_zoo_with_the_four_resnets_as_one_family():
    s = downstream.study("real")
    assert len(s.models) == 23 and set(zoo.ZOO) <= set(s.models)
    assert s.family == tuple(f"resnet{n}" for n in models.CIFAR_RESNETS)
    assert [t.dataset for t in s.tasks] == ["fashion_mnist_2k", "digits"]
    assert s.encoder == "resnet56" and len(s.seeds) == 3 and s.resplit
    smoke = downstream.study("smoke")
    assert smoke.source is not None and smoke.pretrain_epochs > 0
    assert all(m not in models.BACKBONES for m in smoke.models)  # trained here: no download
    with pytest.raises(ValueError, match="small net"):
        downstream._small("resnet9000")


def test_split_is_stratified_disjoint_and_seeded():
    y = torch.arange(10).repeat_interleave(20)
    tr, te = downstream.split(y, seed=0)
    assert len(set(tr.tolist()) & set(te.tolist())) == 0 and len(tr) + len(te) == len(y)
    assert torch.bincount(y[te]).tolist() == [6] * 10  # 30 % of every class
    again, _ = downstream.split(y, seed=0)
    other, _ = downstream.split(y, seed=1)
    assert torch.equal(tr, again) and not torch.equal(tr, other)
    fixed = torch.zeros(len(y), dtype=torch.bool)
    fixed[:50] = True
    tr_f, te_f = downstream.split(y, seed=5, fixed=fixed)
    assert te_f.tolist() == list(range(50)) and len(tr_f) == 150
    with pytest.raises(ValueError, match="too few"):
        downstream.split(torch.tensor([0, 0, 1]), seed=0)


def _toy(seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    rows = []
    for task in ("a", "b"):
        for s in (0, 1):
            acc = rng.uniform(0.5, 0.9, 12)
            nc1 = 10 ** (-3 * acc + rng.normal(0, 0.05, 12))  # lower NC1 with higher acc
            rows += [dict(task=task, seed=s, model=f"m{i}", test_acc=acc[i], nc1=nc1[i],
                          h_score=acc[i] + rng.normal(0, 0.3), logme=-nc1[i])
                     for i in range(12)]
    return pd.DataFrame(rows)


def test_correlations_match_scipy_and_sign_agreement():
    df = _toy()
    out = downstream.correlations(df, n_boot=200)
    assert len(out) == 2 * 2 * 3 and set(out.n) == {12}
    for _, row in out.iterrows():
        grp = df[(df.task == row.task) & (df.seed == row.seed)]
        x = np.log10(grp.nc1) if row.score == "nc1" else grp[row.score]
        assert row.r == pytest.approx(scipy.stats.pearsonr(x, grp.test_acc)[0], abs=1e-9)
        assert row.rho == pytest.approx(scipy.stats.spearmanr(grp[row.score], grp.test_acc)[0],
                                        abs=1e-9)
        assert row.r_low <= row.r <= row.r_high and row.rho_low <= row.rho <= row.rho_high
        assert row.agree_low <= row.agreement <= row.agree_high
    nc1_rows = out[out.score == "nc1"]
    assert (nc1_rows.rho < -0.9).all() and np.allclose(nc1_rows.agreement, -nc1_rows.rho)
    # logme = -nc1 ranks exactly as NC1 does: the same agreement
    lm = out[out.score == "logme"].agreement.to_numpy()
    assert np.allclose(lm, nc1_rows.agreement.to_numpy())


def test_correlations_name_the_group_whose_accuracy_is_constant():
    df = _toy()
    df.loc[(df.task == "b") & (df.seed == 1), "test_acc"] = 1.0
    with pytest.raises(ValueError, match=r"'task': 'b', 'seed': 1.*test_acc is 1 for all 12 models"):
        downstream.correlations(df, n_boot=50)


def test_compare_scores_is_paired():
    df = _toy()
    same = downstream.compare_scores(df, "nc1", "logme", n_boot=200)
    assert np.allclose(same["diff"], 0) and np.allclose(same.low, 0) and np.allclose(same.high, 0)
    assert not same.b_better.any() and not same.a_better.any()
    worse = downstream.compare_scores(df, "nc1", "h_score", n_boot=200)
    assert (worse["diff"] < 0).all()  # the noisy score ranks worse than NC1 on every group


@pytest.fixture
def tiny(monkeypatch, tmp_path):
    """A two-model smoke study (1 pre-training epoch, disk cache in tmp) with a clean memory."""
    monkeypatch.setenv("NCLAB_CACHE", str(tmp_path))
    downstream.clear_cache()
    s = downstream.study("smoke")
    s = downstream.with_models(s, ("convnet_s-w4", "resnet_s-w4"))
    s = dataclasses.replace(s, family=("resnet_s-w4",), pretrain_epochs=1, seeds=(0, 1),
                           encoder="resnet_s-w4", encoder_tasks=s.encoder_tasks[:3])
    yield s
    downstream.clear_cache()


def test_studies_compute_features_once_per_process(tiny, monkeypatch):
    calls = []
    real_extract = downstream.extract

    def counting(model, data, layers, **kw):
        calls.append(tuple(layers))
        return real_extract(model, data, layers, **kw)

    monkeypatch.setattr(downstream, "extract", counting)
    df = downstream.across_models(tiny)
    assert list(df.columns) == ["model", "recipe", "task", "seed", "dim", "nc1", "train_acc",
                                "test_acc", "h_score", "logme"]
    assert len(df) == 2 * 1 * 2 and set(df.recipe) == {"convnet_s", "resnet_s"}
    assert (df.nc1 > 0).all() and df.test_acc.between(0, 1).all()
    first = len(calls)
    assert first == 2 * 2  # two models, one train and one test pass each
    lw = downstream.layerwise(tiny)
    # the family model's blocks were extracted with its output in across_models: only the random
    # init control is new
    assert len(calls) == first + 2
    n_layers = len(models.blocks(downstream.backbone(tiny, "resnet_s-w4"))) + 1
    assert len(lw) == 2 * 1 * 2 * n_layers and set(lw.init) == {"pre-trained", "random init"}
    out = lw[(lw.layer == "output") & (lw.init == "pre-trained")].reset_index(drop=True)
    ref = df[df.model == "resnet_s-w4"].reset_index(drop=True)
    assert np.allclose(out.nc1, ref.nc1) and np.allclose(out.test_acc, ref.test_acc)
    downstream.across_models(tiny)
    assert len(calls) == first + 2  # cached: no forward pass
    ad = downstream.across_datasets(tiny)
    assert list(ad.task) == [t.name for t in tiny.encoder_tasks for _ in (0, 1)]
    assert set(ad.classes) == {5, 10, 3}
    fits = downstream.layer_fits(lw)
    assert len(fits) == 2 * 2 and set(fits.blocks) == {n_layers - 1}
    assert fits.r.between(-1, 1).all() and fits.rho.between(-1, 1).all()
    picks = downstream.layer_choice(lw)
    assert (picks.acc_oracle >= picks.acc_nc1_pick).all()
    inner = lw[lw.layer != "output"]
    assert np.allclose(picks.nc1_min, inner.groupby(["init", "seed"], sort=False).nc1.min())


def test_zoo_table_lists_recipes_and_source_accuracy():
    table = downstream.zoo_table(downstream.study("real"))
    assert len(table) == 23 and table.source_acc.notna().all()
    assert set(table.recipe) == {"standard", "PGD adversarial", "mixed clean + PGD",
                                 "provably robust"}
    assert (table.set_index("model").recipe["convex_small_linf8"]) == "provably robust"


def test_checked_claims_are_known():
    for name in runtime.PROFILES:
        assert downstream.study(name).checked <= set(downstream.CLAIMS), name


def test_layer_seeds_default_to_the_probe_seeds():
    real, smoke = downstream.study("real"), downstream.study("smoke")
    assert real.layer_probe_seeds() == real.seeds[:1]  # 27-block ResNets: one split
    assert smoke.layer_probe_seeds() == smoke.probe_seeds() == smoke.seeds


def test_source_collapse_is_nc1_on_the_source_training_images(tiny):
    src = tiny.source
    df = downstream.source_collapse(tiny, src)
    assert list(df.columns) == ["model", "recipe", "source_nc1"]
    assert list(df.model) == list(tiny.models)
    for name, got in zip(df.model, df.source_nc1):
        h, y, is_test = downstream.features(tiny, name, src)
        assert is_test.any() and (~is_test).any()
        tr = (~is_test).numpy()
        y_tr = y.numpy()[tr]
        ref = ref_nc1(h["output"].double().numpy()[tr], y_tr, len(np.unique(y_tr)))
        assert got == pytest.approx(ref, rel=1e-8)
    one = downstream.source_collapse(tiny, src, models=["resnet_s-w4"])
    assert one.source_nc1.iloc[0] == df.set_index("model").source_nc1["resnet_s-w4"]


def test_recipe_study_is_one_architecture_with_its_source():
    real = downstream.recipe_study("real")
    assert len(real.models) == 8
    assert {zoo.ZOO[m].arch for m in real.models} == {"cnn wide"}
    assert {zoo.recipe_family(m) for m in real.models} == {"PGD adversarial", "mixed clean + PGD",
                                                          "provably robust"}
    assert real.source.dataset == runtime.profile("real").source and real.source.classes is None
    assert real.image_size == 32 and [t.dataset for t in real.tasks] == list(
        runtime.profile("real").downstream)
    assert downstream.recipe_study("course").models == real.models
    smoke = downstream.recipe_study("smoke")
    assert len(smoke.models) == 5 and smoke.source == downstream.study("smoke").source
    with pytest.raises(ValueError, match="source task"):
        downstream.source_collapse(dataclasses.replace(real, source=None))
