"""nclab.probe: agreement with scikit-learn's LogisticRegression, the MLP probe, input checks."""

import numpy as np
import pytest
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import StandardScaler

from nclab.data import synthetic_features
from nclab.probe import linear_probe, mlp_probe, sklearn_C


def _problem(seed=0, k=8, d=24, n=60):
    h, y = synthetic_features(k, n, d, within_std=1.0, between_scale=2.0, seed=seed,
                              dtype=torch.float32)
    h = h * torch.linspace(0.1, 10, d)  # badly scaled columns: standardisation matters
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    h, y = h[perm], y[perm]
    cut = len(y) // 2
    return h[:cut], y[:cut], h[cut:], y[cut:]


@pytest.mark.parametrize("weight_decay", [1e-4, 1e-2])
def test_linear_probe_agrees_with_sklearn(weight_decay):
    htr, ytr, hte, yte = _problem()
    res = linear_probe(htr, ytr, hte, yte, weight_decay=weight_decay)
    scaler = StandardScaler().fit(htr.double().numpy())
    ref = LogisticRegression(C=sklearn_C(weight_decay, len(ytr)), max_iter=5000, tol=1e-10)
    ref.fit(scaler.transform(htr.double().numpy()), ytr.numpy())
    sk_test = ref.score(scaler.transform(hte.double().numpy()), yte.numpy())
    sk_train = ref.score(scaler.transform(htr.double().numpy()), ytr.numpy())
    assert 0.3 < res.test_acc < 0.99  # a problem where accuracy is informative
    assert abs(res.test_acc - sk_test) <= 0.01
    assert abs(res.train_acc - sk_train) <= 0.01
    if weight_decay >= 1e-2:  # well-conditioned: the same optimum, coefficient by coefficient
        np.testing.assert_allclose(res.weight.numpy(), ref.coef_, atol=2e-3, rtol=2e-3)
    pred = res.predict(hte).numpy()
    assert (pred == ref.predict(scaler.transform(hte.double().numpy()))).mean() >= 0.97


def test_linear_probe_separable_and_result_fields():
    htr, ytr = synthetic_features(4, 30, 8, within_std=0.1, between_scale=5, seed=1)
    res = linear_probe(htr, ytr, htr, ytr, max_iter=50)
    assert res.train_acc == res.test_acc == 1.0
    assert res.weight.shape == (4, 8) and res.bias.shape == (4,)
    assert 1 <= res.iterations <= 50
    assert isinstance(res.train_acc, float)


def test_linear_probe_input_errors():
    htr, ytr, hte, yte = _problem()
    with pytest.raises(ValueError, match="widths differ"):
        linear_probe(htr, ytr, hte[:, :3], yte)
    bad = htr.clone()
    bad[0, 0] = float("nan")
    with pytest.raises(ValueError, match="1 rows contain NaN"):
        linear_probe(bad, ytr, hte, yte)
    with pytest.raises(ValueError, match="integers"):
        linear_probe(htr, ytr.float(), hte, yte)
    with pytest.raises(ValueError, match="outside"):
        linear_probe(htr, ytr, hte, yte, num_classes=3)


def test_mlp_probe_learns_and_is_seeded():
    htr, ytr, hte, yte = _problem(k=4, d=16)
    a = mlp_probe(htr, ytr, hte, yte, hidden=64, epochs=60, lr=1e-2, seed=3)
    b = mlp_probe(htr, ytr, hte, yte, hidden=64, epochs=60, lr=1e-2, seed=3)
    assert a.test_acc == b.test_acc and torch.equal(a.weight, b.weight)
    lin = linear_probe(htr, ytr, hte, yte)
    assert a.train_acc >= lin.train_acc - 0.02
    assert a.test_acc > 0.5
    mb = mlp_probe(htr, ytr, hte, yte, hidden=1024, epochs=5, batch_size=32, seed=0)
    assert mb.model[0].out_features == 1024 and mb.iterations == 5 * 4


def test_standardisation_keeps_tiny_features_and_ignores_constant_ones():
    htr, ytr, hte, yte = _problem(k=3, d=6)
    ref = linear_probe(htr, ytr, hte, yte)
    tiny = linear_probe(htr * 1e-12, ytr, hte * 1e-12, yte)  # e.g. a random-init GoogLeNet
    assert tiny.test_acc == pytest.approx(ref.test_acc, abs=0.01)
    pad = torch.full((len(htr), 1), 3.0)
    const = linear_probe(torch.cat([htr, pad], 1), ytr, torch.cat([hte, pad[: len(hte)]], 1), yte)
    assert const.test_acc == pytest.approx(ref.test_acc, abs=0.01)
    assert const.std[-1] == 1.0


def test_probe_layers_matches_its_parts():
    from nclab.data import batches, synthetic_images
    from nclab.features import extract
    from nclab.metrics import nc1
    from nclab.models import ConvNetS
    from nclab.probe import probe_layers
    from nclab.transfer import h_score

    torch.manual_seed(0)
    model = ConvNetS(width=4, depth=3).eval()
    tr = batches(synthetic_images(3, 12, size=16, seed=0), 16)
    te = batches(synthetic_images(3, 6, size=16, seed=1), 16)
    df = probe_layers(model, tr, te, scores=True, progress=False)
    assert df.layer.tolist() == ["features.0", "features.1", "features.2", "output"]
    assert df.depth.tolist() == [1, 2, 3, 4] and df.dim.tolist() == [4, 4, 8, 8]
    f, y = extract(model, tr, ["features.1"], return_features=True, progress=False)
    g, yt = extract(model, te, ["features.1"], return_features=True, progress=False)
    row = df.set_index("layer").loc["features.1"]
    assert row.nc1 == pytest.approx(nc1(f["features.1"].double(), y), rel=1e-9)
    assert row.test_acc == linear_probe(f["features.1"], y, g["features.1"], yt).test_acc
    assert row.h_score == pytest.approx(h_score(f["features.1"], y), rel=1e-9)


def test_probe_warns_on_test_classes_absent_from_training():
    htr, ytr, hte, yte = _problem(k=4, d=8)
    keep = ytr != 2
    with pytest.warns(UserWarning, match=r"test classes \[2\].*never occur in the training set"):
        res = linear_probe(htr[keep], ytr[keep], hte, yte)
    assert res.weight.shape[0] == 4  # the head still spans every label seen in either split
    assert (res.predict(hte) != 2).all()


def test_probe_single_class_training_set_and_empty_test_set():
    htr, ytr, hte, yte = _problem(k=4, d=8)
    one = ytr == 1
    with pytest.raises(ValueError, match=r"single class \(1\)"):
        linear_probe(htr[one], ytr[one], hte, yte)
    with pytest.raises(ValueError, match=r"single class \(1\)"):
        mlp_probe(htr[one], ytr[one], hte, yte, hidden=8, epochs=1)
    with pytest.warns(UserWarning, match="test set is empty"):
        res = linear_probe(htr, ytr, hte[:0], yte[:0], max_iter=5)
    assert np.isnan(res.test_acc) and 0 <= res.train_acc <= 1


def test_predict_checks_width_and_nan_rows():
    htr, ytr, hte, yte = _problem(k=3, d=6)
    res = linear_probe(htr, ytr, hte, yte, max_iter=20)
    with pytest.raises(ValueError, match=r"\(N, 6\).*got shape \(\d+, 5\)"):
        res.predict(hte[:, :5])
    with pytest.raises(ValueError, match=r"\(N, 6\)"):
        res.predict(hte[0])
    bad = hte.clone()
    bad[3, 2] = float("nan")
    with pytest.raises(ValueError, match="1 feature rows contain NaN"):
        res.predict(bad)


@pytest.mark.parametrize("kw, name", [(dict(batch_size=0), "batch_size"),
                                      (dict(batch_size=2.5), "batch_size"),
                                      (dict(weight_decay=float("nan")), "weight_decay"),
                                      (dict(weight_decay=-1.0), "weight_decay"),
                                      (dict(lr=float("inf")), "lr"), (dict(lr=0.0), "lr")])
def test_mlp_probe_argument_errors(kw, name):
    htr, ytr, hte, yte = _problem(k=3, d=6)
    with pytest.raises(ValueError, match=name):
        mlp_probe(htr, ytr, hte, yte, hidden=8, epochs=1, **kw)


def test_linear_probe_weight_decay_nan_and_num_classes_types():
    htr, ytr, hte, yte = _problem(k=3, d=6)
    with pytest.raises(ValueError, match="weight_decay"):
        linear_probe(htr, ytr, hte, yte, weight_decay=float("nan"))
    a = linear_probe(htr, ytr, hte, yte, num_classes=np.int64(5), max_iter=20)
    b = linear_probe(htr, ytr, hte, yte, num_classes=5, max_iter=20)
    assert a.weight.shape == (5, 6) and torch.equal(a.weight, b.weight)
    assert mlp_probe(htr, ytr, hte, yte, hidden=8, epochs=1, num_classes=np.int32(4),
                     batch_size=np.int64(8)).weight.shape == (4, 8)
    with pytest.raises(TypeError, match="num_classes.*bool"):
        linear_probe(htr, ytr, hte, yte, num_classes=True)
    with pytest.raises(TypeError, match="num_classes"):
        linear_probe(htr, ytr, hte, yte, num_classes=3.0)
    with pytest.raises(ValueError, match="num_classes must be >= 1"):
        linear_probe(htr, ytr, hte, yte, num_classes=0)
