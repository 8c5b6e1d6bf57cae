"""nclab.collapse (UFM, terminal-phase training), nclab.widgets and the NC figures in nclab.plots."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

import nclab  # noqa: E402
from nclab import metrics, plots, widgets  # noqa: E402
from nclab.collapse import layerwise_nc1, train_terminal_phase, train_ufm  # noqa: E402


def test_ufm_collapses_and_records_history():
    r = train_ufm(num_classes=4, dim=8, per_class=5, lr=8.0, iters=400, record_every=100, seed=1)
    h = r.history
    assert list(h.iter) == [0, 100, 200, 300, 400]
    assert h.nc1.iloc[-1] < h.nc1.iloc[0] / 100
    assert h.self_duality.iloc[-1] < h.self_duality.iloc[0]
    assert h.acc.iloc[-1] == 1.0
    # the recorded values are the metrics of the returned features
    assert h.nc1.iloc[-1] == pytest.approx(metrics.nc1(r.H, r.y), rel=1e-9)
    assert r.W.shape == (4, 8) and r.H.shape == (20, 8)
    assert torch.get_num_threads() >= 1
    with pytest.raises(ValueError):
        train_ufm(num_classes=1)


def test_terminal_phase_history_and_layers():
    ds = nclab.data.synthetic_images(num_classes=3, per_class=12, size=16, seed=0)
    backbone = nclab.models.ConvNetS(width=4, depth=2)
    r = train_terminal_phase(backbone, ds, ds, epochs=2, lr=0.05, batch_size=12,
                             layers=["features.0"], device="cpu", progress=False)
    assert list(r.history.epoch) == [1, 2]
    for col in ("train_acc", "test_acc", "nc1_train", "nc1_test", "etf_error_train",
                "self_duality_test", "cdnv_train"):
        assert col in r.history
    assert set(r.layers.layer) == {"features.0", "penultimate"}
    # the recorded penultimate NC1 is that of the model's features on the data
    x = nclab.data.normalize(ds.x.float() / 255)
    with torch.no_grad():
        h = r.model.features(x)
    assert r.history.nc1_train.iloc[-1] == pytest.approx(metrics.nc1(h, ds.y), rel=1e-6)


def test_explorer_static_fallback_and_figures():
    assert widgets._has_widgets() is False  # no IPython kernel under pytest
    fig = widgets.collapse_explorer()
    assert isinstance(fig, plt.Figure) and len(fig.explorer_values) == 3
    v = fig.explorer_values
    assert v[1]["NC1"] < v[0]["NC1"]
    h, y = widgets.collapse_example(3, within=0.0, between=1.0)
    assert metrics.etf_error(h, y) < 1e-12  # 3 equally spaced means in 2-D: a simplex ETF
    plt.close("all")
    assert plots.simplex_etf_figure((3, 4)) is not None
    with pytest.raises(ValueError):
        plots.simplex_etf_figure((5,))
    plt.close("all")


def test_layerwise_nc1_rows_values_and_subsets():
    torch.manual_seed(0)
    ds = nclab.data.synthetic_images(num_classes=3, per_class=10, size=16, seed=0)
    other = nclab.data.synthetic_images(num_classes=3, per_class=6, size=16, seed=1)
    backbone = nclab.models.ConvNetS(width=4, depth=3).eval()
    names = [n for n, _ in nclab.models.blocks(backbone)]
    df = layerwise_nc1(backbone, {"train": ds, "test": other}, per_class=5, seeds=(0, 1))
    assert len(df) == 2 * 2 * len(names)
    assert list(df.columns) == ["seed", "split", "depth", "layer", "stage", "n", "nc1", "cdnv"]
    assert set(df.n) == {15} and set(df.stage) == {"features"}
    assert df[df.seed == 0].depth.max() == len(names)
    # a row is the NC1 of that block's pooled features on the seeded subset
    sub = nclab.data.subset_per_class(ds, 5, seed=1)
    feats, y = nclab.features.extract(backbone, nclab.data.batches(sub), names,
                                      return_features=True, progress=False)
    row = df[(df.seed == 1) & (df.split == "train") & (df.layer == names[1])].iloc[0]
    assert row.nc1 == pytest.approx(metrics.nc1(feats[names[1]], y), rel=1e-6)
    assert row.cdnv == pytest.approx(metrics.cdnv(feats[names[1]], y), rel=1e-6)
    # without per_class: whole splits, once, seed -1
    full = layerwise_nc1(backbone, {"train": ds}, layers=[names[0]])
    assert list(full.seed) == [-1] and list(full.n) == [30]
    with pytest.raises(ValueError):
        layerwise_nc1(backbone, {})
    with pytest.raises(ValueError):
        layerwise_nc1(backbone, {"train": other}, per_class=7)  # classes hold only 6


def test_collapse_animation_is_an_offline_player():
    player = widgets.collapse_animation(num_classes=3, within=[1.0, 0.1])
    html = player.data
    assert "<script" in html and "data:image/png;base64" in html  # frames embedded, own controls
    assert "font-awesome" not in html and "://" not in html.replace("data:", "")
    nc1 = [v["NC1"] for v in player.explorer_values]
    ref = [metrics.nc1(*widgets.collapse_example(3, w, 2.0)) for w in (1.0, 0.1)]
    assert nc1 == pytest.approx(ref) and nc1[1] < nc1[0]
    with pytest.raises(ValueError, match="within"):
        widgets.collapse_animation(within=[0.5, 0.0])


def test_nc1_by_sample_size_rows_and_values():
    from nclab.collapse import nc1_by_sample_size

    h, y = nclab.data.synthetic_features(num_classes=4, per_class=30, dim=16, within_std=1.0,
                                         between_scale=0.5, seed=0)
    df = nc1_by_sample_size(h, y, sizes=(5, 10, 30), seeds=(0, 1))
    assert list(df.columns) == ["per_class", "seed", "n", "nc1"]
    assert list(df.per_class) == [5, 5, 10, 10, 30, 30] and list(df.n) == [20, 20, 40, 40, 120, 120]
    idx = nclab.data.subset_per_class(y, 10, seed=1)
    assert df.nc1.iloc[3] == pytest.approx(metrics.nc1(h[idx], y[idx]), rel=1e-12)
    assert df.nc1.iloc[4] == pytest.approx(metrics.nc1(h, y), rel=1e-12)  # all samples
    # small between-class spread: the plug-in NC1 grows with the sample size
    mean = df.groupby("per_class").nc1.mean()
    assert mean.is_monotonic_increasing
    with pytest.raises(ValueError):
        nc1_by_sample_size(h, y, sizes=(31,))
    with pytest.raises(ValueError):
        nc1_by_sample_size(h[:10], y, sizes=(2,))


def test_chapter_configurations_per_profile():
    from nclab import collapse

    smoke, real = collapse.study("smoke"), collapse.study("real")
    assert real.models == nclab.PROFILES["real"].models and not smoke.models
    assert real.images == "cifar10_2k" and smoke.images is None
    assert real.projection_pretrained and not smoke.projection_pretrained
    assert real.projection_downstream == "fashion_mnist_2k" and smoke.projection_downstream is None
    for s in (smoke, real):
        assert s.checked <= set(collapse.CLAIMS)
        assert max(s.sample_sizes) > s.per_class // 2
        assert s.terminal_data == "digits"
    assert "projection" in real.checked and "projection" not in smoke.checked
    assert collapse.study("course").checked == frozenset()
    assert collapse.study(nclab.PROFILES["smoke"]) == smoke
    with pytest.raises(AttributeError):
        smoke.per_class = 3  # frozen
    # the per-class sizes fit the smallest class of the split they are drawn from
    digits_test = nclab.data.digits("test")
    assert smoke.per_class <= int(torch.bincount(digits_test.y).min())
    sets = smoke.projection_sets()
    assert list(sets) == ["digits train", "digits test", "synthetic patterns (stand-in)"]
    assert max(smoke.sample_sizes) <= int(torch.bincount(sets["digits train"].y).min())
    net = smoke.terminal_backbone()
    assert len(nclab.models.blocks(net)) == 4
    train, test = smoke.terminal_splits()
    assert (len(train), len(test)) == (1257, 540)

    q, qr = collapse.quickstart("smoke"), collapse.quickstart("real")
    assert (q.dataset, q.pretrained, q.stratified) == ("digits", False, True)
    assert (qr.dataset, qr.pretrained, qr.sizes) == ("cifar10_2k", True, (2000, 1000))
    train, test = q.load()
    assert (len(train), len(test)) == q.sizes
