"""Tests for nclab.fewshot: backbones, split lists, episodes, the interval, the evaluation."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from sklearn.linear_model import LogisticRegression

from nclab import fewshot as fs
from nclab.data import DatasetUnavailableError, TensorDataset

# CIFAR-100's 100 fine labels, alphabetical (torchvision's order): an independent reference.
CIFAR100 = """apple aquarium_fish baby bear beaver bed bee beetle bicycle bottle bowl boy bridge bus
butterfly camel can castle caterpillar cattle chair chimpanzee clock cloud cockroach couch crab
crocodile cup dinosaur dolphin elephant flatfish forest fox girl hamster house kangaroo keyboard
lamp lawn_mower leopard lion lizard lobster man maple_tree motorcycle mountain mouse mushroom
oak_tree orange orchid otter palm_tree pear pickup_truck pine_tree plain plate poppy porcupine
possum rabbit raccoon ray road rocket rose sea seal shark shrew skunk skyscraper snail snake spider
squirrel streetcar sunflower sweet_pepper table tank telephone television tiger tractor train trout
tulip turtle wardrobe whale willow_tree wolf woman worm""".split()


def n_params(m: torch.nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


# --------------------------------------------------------------------------- backbones
def resnet12_count(widths, se_reduction=None) -> int:
    """Conv weights (3x3 x3 + 1x1 shortcut, no bias) + BN affine (4 BNs per block) [+ SE]."""
    total, c_in = 0, 3
    for c in widths:
        total += 9 * c_in * c + 2 * 9 * c * c + c_in * c + 4 * 2 * c
        if se_reduction:
            h = c // se_reduction
            total += c * h + h + h * c + c
        c_in = c
    return total


def test_parameter_counts_follow_the_stated_convention():
    assert n_params(fs.ConvNet4()) == 3 * 64 * 9 + 3 * 64 * 64 * 9 + 4 * 2 * 64 == 112_832
    r12 = fs.ResNet12()
    assert n_params(r12) == resnet12_count((64, 160, 320, 640)) == 12_424_320
    assert abs(n_params(r12) / 1e6 - 12.4) < 0.05  # the ~12.4 M quoted for ResNet12
    assert n_params(fs.ResNet12(pool_last=False)) == n_params(r12)  # pooling has no parameters
    assert n_params(fs.SEResNet12()) == resnet12_count((64, 160, 320, 640), 4) == 12_696_648


@pytest.mark.parametrize("size", [32, 84])
def test_backbones_embed_both_input_sizes(size):
    x = torch.randn(2, 3, size, size)
    for model, d in [(fs.ConvNet4(), 64), (fs.ResNet12(), 640), (fs.SEResNet12(), 640)]:
        model.eval()
        assert model.num_features == d
        assert model(x).shape == (2, d)


def test_resnet12_pooling_choice():
    """Default: max-pool after all four blocks (Tian et al.'s code); pool_last=False: first three."""
    shapes = {}
    for pool_last in (True, False):
        m = fs.ResNet12(widths=(4, 4, 4, 8), pool_last=pool_last).eval()
        seen: list[tuple[int, ...]] = []
        m.layer4.register_forward_hook(lambda mod, i, o, seen=seen: seen.append(tuple(o.shape)))
        m(torch.randn(1, 3, 84, 84))
        shapes[pool_last] = seen[0][-2:]
    assert shapes == {True: (5, 5), False: (10, 10)}


def test_se_gate_of_one_recovers_resnet12():
    torch.manual_seed(0)
    plain = fs.ResNet12(widths=(8, 8, 16, 16)).eval()
    se = fs.SEResNet12(widths=(8, 8, 16, 16)).eval()
    missing = se.load_state_dict(plain.state_dict(), strict=False).missing_keys
    assert missing and all(".se." in k for k in missing)
    x = torch.randn(3, 3, 32, 32)
    assert not torch.allclose(se(x), plain(x), atol=1e-4)  # a real gate changes the output
    with torch.no_grad():
        for i in range(1, 5):
            last = getattr(se, f"layer{i}").se.fc[2]
            last.weight.zero_()
            last.bias.fill_(40.0)  # sigmoid(40) == 1 in float32
    torch.testing.assert_close(se(x), plain(x))


def test_make_backbone_scales_widths():
    m = fs.make_backbone("resnet12", scale=0.125)
    assert m.widths == (8, 20, 40, 80) and m.num_features == 80
    assert fs.make_backbone("convnet4", scale=0.25).num_features == 16
    assert isinstance(fs.make_backbone("SEResNet12"), fs.SEResNet12)
    with pytest.raises(ValueError, match="convnet4, resnet12, seresnet12"):
        fs.make_backbone("resnet18")


# --------------------------------------------------------------------------- splits
def test_cifar_fs_lists_are_disjoint_complete_and_valid():
    lists = {s: fs.split_classes("cifar_fs", s) for s in fs.SPLITS}
    assert [len(lists[s]) for s in fs.SPLITS] == [64, 16, 20]
    union = [c for s in fs.SPLITS for c in lists[s]]
    assert len(set(union)) == 100 and sorted(union) == sorted(CIFAR100)
    # each CIFAR-100 superclass holds 5 fine classes, whatever the split
    import json
    from importlib import resources

    supers: dict[str, int] = {}
    for s in fs.SPLITS:
        text = resources.files("nclab").joinpath("resources", f"cifar_fs_{s}.json").read_text()
        for sup, _fine in json.loads(text):
            supers[sup] = supers.get(sup, 0) + 1
    assert len(supers) == 20 and set(supers.values()) == {5}


def test_miniimagenet_lists_are_disjoint_and_complete():
    lists = {s: fs.split_classes("miniimagenet", s) for s in fs.SPLITS}
    assert [len(lists[s]) for s in fs.SPLITS] == [64, 16, 20]
    union = [w for s in fs.SPLITS for w in lists[s]]
    assert len(set(union)) == 100
    assert all(re.fullmatch(r"n\d{8}", w) for w in union)
    with pytest.raises(ValueError, match="valid splits"):
        fs.split_classes("miniimagenet", "meta-test")


def fake_cifar100(per_class: int, offset: int) -> TensorDataset:
    """CIFAR-100-like data whose pixel value encodes (class, part) so the merge can be checked."""
    y = torch.arange(100).repeat_interleave(per_class)
    x = (y + offset).to(torch.uint8).view(-1, 1, 1, 1).expand(-1, 3, 4, 4).contiguous()
    return TensorDataset(x, y, CIFAR100)


def test_cifar_fs_merges_train_and_test_images_per_class():
    parts = [fake_cifar100(5, 0), fake_cifar100(1, 100)]  # "500 + 100" in miniature
    for split, k in [("train", 64), ("val", 16), ("test", 20)]:
        ds = fs.cifar_fs(split, cifar100=parts)
        names = fs.split_classes("cifar_fs", split)
        assert ds.classes == names and ds.num_classes == k
        assert torch.equal(torch.bincount(ds.y, minlength=k), torch.full((k,), 6))
        pix = ds.x[:, 0, 0, 0].long()
        original = torch.tensor([CIFAR100.index(n) for n in names])[ds.y]
        assert torch.all((pix == original) | (pix == original + 100))  # right class, both parts
        assert int((pix >= 100).sum()) == k
    bad = TensorDataset(torch.zeros(2, 3, 4, 4, dtype=torch.uint8), torch.tensor([0, 1]), ["a", "b"])
    with pytest.raises(ValueError, match="CIFAR-100"):
        fs.cifar_fs("test", cifar100=[bad])


def test_mini_imagenet_reads_a_folder_and_names_what_is_missing(tmp_path):
    from PIL import Image

    wnids = fs.split_classes("miniimagenet", "test")
    with pytest.raises(DatasetUnavailableError, match=wnids[0]) as err:
        fs.mini_imagenet("test", root=tmp_path, progress=False)
    assert str(tmp_path) in str(err.value)
    for k, w in enumerate(wnids):
        (tmp_path / "test" / w).mkdir(parents=True)
        for j in range(2):
            Image.new("RGB", (10, 12), (k, j, 0)).save(tmp_path / "test" / w / f"{j}.png")
    ds = fs.mini_imagenet("test", root=tmp_path, progress=False)
    assert ds.x.shape == (40, 3, 84, 84) and ds.x.dtype == torch.uint8
    assert ds.classes == wnids
    assert torch.equal(ds.x[:, 0, 40, 40].long(), ds.y)  # image of folder k holds red value k
    assert ds is not None and len(fs.load_split("miniimagenet", "test", root=tmp_path,
                                                 progress=False, image_size=32).x[0, 0]) == 32


CIFAR10 = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def fake_cifar10(per_class: int, offset: int) -> TensorDataset:
    """A fake mirror part: CIFAR-10 class names, pixel value = original label + offset."""
    y = torch.arange(10).repeat_interleave(per_class)
    x = (y + offset).to(torch.uint8).view(-1, 1, 1, 1).expand(-1, 3, 32, 32).contiguous()
    return TensorDataset(x, y, CIFAR10)


def test_cifar10_fs_pools_both_parts_and_splits_five_unseen_classes():
    parts = [fake_cifar10(4, 0), fake_cifar10(2, 100)]  # "2000 train + 1000 test" in miniature
    tr, te = (fs.cifar10_fs(s, cifar10=parts) for s in ("train", "test"))
    assert tr.classes == CIFAR10[:5] == fs.split_classes("cifar10_fs", "train")
    assert te.classes == CIFAR10[5:] == fs.split_classes("cifar10_fs", "test")
    assert not set(tr.classes) & set(te.classes)
    vehicles = {"airplane", "automobile", "ship", "truck"}
    assert len(vehicles & set(tr.classes)) == len(vehicles & set(te.classes)) == 2  # mixed sides
    for ds, first in ((tr, 0), (te, 5)):
        assert ds.x.shape == (30, 3, 32, 32) and ds.x.dtype == torch.uint8
        assert torch.equal(torch.bincount(ds.y, minlength=5), torch.full((5,), 6))
        pix = ds.x[:, 0, 0, 0].long()
        original = ds.y + first
        assert torch.all((pix == original) | (pix == original + 100))  # right class, both parts
        assert int((pix >= 100).sum()) == 10
    with pytest.raises(ValueError, match="valid splits"):
        fs.cifar10_fs("val", cifar10=parts)
    bad = TensorDataset(torch.zeros(2, 3, 4, 4, dtype=torch.uint8), torch.tensor([0, 1]), ["a", "b"])
    with pytest.raises(ValueError, match="CIFAR-10"):
        fs.cifar10_fs("test", cifar10=[bad])


def test_fashion_mnist_fs_is_a_ten_class_meta_test_only():
    names = [f"c{k}" for k in range(10)]
    parts = [TensorDataset(torch.zeros(n, 3, 32, 32, dtype=torch.uint8),
                           torch.arange(10).repeat_interleave(n // 10), names) for n in (30, 20)]
    ds = fs.fashion_mnist_fs("test", fashion=parts)
    assert ds.classes == names and len(ds) == 50
    assert torch.equal(torch.bincount(ds.y), torch.full((10,), 5))
    with pytest.raises(ValueError, match="valid splits"):
        fs.fashion_mnist_fs("train", fashion=parts)


def _mirror_has(name: str) -> bool:
    from nclab import mirror

    return mirror.is_available(name)


@pytest.mark.skipif(not _mirror_has("cifar10_2k"),
                    reason="the cifar10_2k mirror is absent (set NCLAB_DATA to a mirror copy)")
def test_cifar10_fs_on_the_real_mirror():
    tr, te = fs.load_split("cifar10_fs", "train"), fs.load_split("cifar10_fs", "test")
    assert len(tr) + len(te) == 3000 and (len(tr), len(te)) == (1490, 1510)
    assert torch.bincount(te.y).min() >= 20  # enough for 5-shot + 15 queries per class
    assert "cifar10_fs" in fs.FEWSHOT_DATASETS


def test_digits_fs_splits_the_ten_digits():
    tr, te = fs.digits_fs("train"), fs.digits_fs("test")
    assert tr.classes == ["0", "1", "2", "3", "4"] and te.classes == ["5", "6", "7", "8", "9"]
    assert len(tr) + len(te) == 1797  # every digit image, train and test parts merged
    assert torch.bincount(te.y).min() >= 170
    with pytest.raises(ValueError, match="valid splits"):
        fs.digits_fs("val")
    with pytest.raises(ValueError, match="unknown few-shot dataset"):
        fs.load_split("tiered", "test")


# --------------------------------------------------------------------------- episodes
def test_sample_episode_properties():
    labels = torch.arange(12).repeat_interleave(30)[torch.randperm(360, generator=torch.Generator()
                                                                   .manual_seed(1))]
    for ways, shots, queries in [(5, 1, 15), (5, 5, 15), (3, 10, 20)]:
        ep = fs.sample_episode(labels, ways, shots, queries, torch.Generator().manual_seed(7))
        assert len(set(ep.classes.tolist())) == ways
        assert len(ep.support) == ways * shots and len(ep.query) == ways * queries
        assert not set(ep.support.tolist()) & set(ep.query.tolist())
        assert len(set(ep.support.tolist())) == ways * shots
        assert len(set(ep.query.tolist())) == ways * queries
        for idx, y, n in [(ep.support, ep.support_y, shots), (ep.query, ep.query_y, queries)]:
            assert torch.equal(torch.bincount(y, minlength=ways), torch.full((ways,), n))
            assert torch.equal(labels[idx], ep.classes[y])  # label j <-> original classes[j]
        again = fs.sample_episode(labels, ways, shots, queries, torch.Generator().manual_seed(7))
        assert all(torch.equal(a, b) for a, b in zip(vars(ep).values(), vars(again).values()))
    other = fs.sample_episode(labels, 5, 1, 15, torch.Generator().manual_seed(8))
    first = fs.sample_episode(labels, 5, 1, 15, torch.Generator().manual_seed(7))
    assert not torch.equal(other.query, first.query)


def test_sample_episode_rejects_impossible_requests():
    labels = torch.tensor([0] * 20 + [1] * 20 + [2] * 5)
    with pytest.raises(ValueError, match="2: 5"):
        fs.sample_episode(labels, 2, 1, 15)
    with pytest.raises(ValueError, match="the labels have 3"):
        fs.sample_episode(torch.tensor([0] * 20 + [1] * 20 + [2] * 20), 5, 1, 15)
    with pytest.raises(ValueError, match="integer"):
        fs.sample_episode(torch.rand(10), 2, 1, 1)


def test_confidence_interval_formula():
    mean, half = fs.confidence_interval([0.2, 0.4, 0.6, 0.8])
    s = np.sqrt((0.3**2 + 0.1**2 + 0.1**2 + 0.3**2) / 3)  # sample std, n - 1
    assert mean == pytest.approx(0.5) and half == pytest.approx(1.96 * s / 2)
    assert fs.confidence_interval([1.0, 1.0, 1.0]) == (1.0, 0.0)
    with pytest.raises(ValueError, match=">= 2"):
        fs.confidence_interval([0.5])


def test_confidence_interval_covers_the_true_mean_about_95_percent():
    rng = np.random.default_rng(0)
    hits = 0
    for _ in range(2000):
        mean, half = fs.confidence_interval(rng.binomial(75, 0.6, size=200) / 75)
        hits += abs(mean - 0.6) <= half
    assert 0.93 < hits / 2000 < 0.97


# --------------------------------------------------------------------------- evaluation
def nc1_reference(h: np.ndarray, y: np.ndarray) -> float:
    """Float64 NumPy NC1 = (1/K) tr(Sigma_W Sigma_B^+), mu_G the mean of the class means."""
    k = int(y.max()) + 1
    mu = np.stack([h[y == c].mean(0) for c in range(k)])
    centred = h - mu[y]
    sigma_w = centred.T @ centred / len(h)
    b = mu - mu.mean(0)
    sigma_b = b.T @ b / k
    return float(np.trace(sigma_w @ np.linalg.pinv(sigma_b, hermitian=True)) / k)


def features(between: float, seed: int = 0, k: int = 8, per_class: int = 40, dim: int = 16):
    from nclab.data import synthetic_features

    h, y = synthetic_features(k, per_class, dim, 1.0, between, seed=seed)
    return torch.nn.functional.normalize(h, dim=1), y


def test_evaluate_embeddings_matches_a_hand_computed_first_episode():
    h, y = features(2.0)
    rep = fs.evaluate_embeddings(h, y, ways=5, shots=(1, 5), queries=15, episodes=6, seed=3,
                                 progress=False)
    assert [r.shots for r in rep] == [1, 5] and len(rep) == 2
    for r in rep:
        ep = fs.sample_episode(y, 5, r.shots, 15, torch.Generator().manual_seed(3))
        hn = h.numpy()
        clf = LogisticRegression(max_iter=1000).fit(hn[ep.support], ep.support_y.numpy())
        acc = np.mean(clf.predict(hn[ep.query]) == ep.query_y.numpy())
        assert r.episode_accuracy[0] == pytest.approx(acc)
        assert r.episode_nc1[0] == pytest.approx(nc1_reference(hn[ep.query], ep.query_y.numpy()),
                                                 rel=1e-6)
        assert (r.accuracy, r.ci95) == pytest.approx(fs.confidence_interval(r.episode_accuracy))
        assert r.nc1 == pytest.approx(r.episode_nc1.mean())
        assert r.episodes == 6 and r.ways == 5 and r.queries == 15
    assert rep.nc1 == pytest.approx(np.concatenate([r.episode_nc1 for r in rep]).mean())
    again = fs.evaluate_embeddings(h, y, episodes=6, seed=3, progress=False)
    assert np.array_equal(again[5].episode_accuracy, rep[5].episode_accuracy)


def test_evaluate_embeddings_extremes_and_shot_ordering():
    sep, y = features(30.0)
    rep = fs.evaluate_embeddings(sep, y, episodes=10, progress=False)
    assert rep[1].accuracy == 1.0 and rep[5].accuracy == 1.0
    collapsed_nc1 = rep.nc1
    noise = torch.nn.functional.normalize(torch.randn(320, 16, generator=torch.Generator()
                                                      .manual_seed(0)), dim=1)
    rep = fs.evaluate_embeddings(noise, y, episodes=30, progress=False)
    for r in rep:  # chance is 1/ways = 0.2
        assert abs(r.accuracy - 0.2) < max(2 * r.ci95, 0.05)
        assert r.nc1 > 1 > 100 * collapsed_nc1  # no class structure: Sigma_W dominates
    mid, y = features(1.5)
    rep = fs.evaluate_embeddings(mid, y, episodes=30, progress=False)
    assert rep[5].accuracy > rep[1].accuracy + rep[1].ci95
    with pytest.raises(ValueError, match="episodes"):
        fs.evaluate_embeddings(mid, y, episodes=1, progress=False)
    with pytest.raises(ValueError, match="rows"):
        fs.evaluate_embeddings(mid[:10], y, progress=False)


def test_evaluate_with_an_encoder_prints_a_table():
    data = fs.digits_fs("test")
    data = TensorDataset(data.x[::6], data.y[::6], data.classes)  # ~30 images per class
    torch.manual_seed(0)
    enc = fs.ConvNet4(width=8).train()
    rep = fs.evaluate(enc, data, queries=10, episodes=4, device="cpu", progress=False, name="c4")
    assert enc.training  # the caller's mode is restored
    text = str(rep)
    assert "accuracy %" in text and "query NC1" in text and "c4" in text
    assert "<table" in rep._repr_html_()
    frame = rep.to_frame()
    assert list(frame["shots"]) == [1, 5] and frame["accuracy %"].between(0, 100).all()
    feats, labels = fs.embed(enc, data, device="cpu", progress=False)
    assert torch.allclose(feats.norm(dim=1), torch.ones(len(feats)), atol=1e-5)
    as_pair = fs.evaluate(enc, (data.x, data.y), queries=10, episodes=4, device="cpu",
                          progress=False)
    assert np.array_equal(as_pair[1].episode_accuracy, rep[1].episode_accuracy)
    table = fs.summary_table({"c4": rep, "again": as_pair})
    assert list(table.index) == ["c4", "again"]
    assert {"1-shot acc %", "5-shot acc %", "query NC1"} <= set(table.columns)
    with pytest.raises(TypeError, match="TensorDataset"):
        fs.embed(enc, [1, 2, 3], progress=False)


def test_pretrain_fewshot_trains_caches_and_freezes(tmp_path, monkeypatch):
    monkeypatch.setenv("NCLAB_CACHE", str(tmp_path))
    meta_train = fs.digits_fs("train")
    meta_train = TensorDataset(meta_train.x[::8], meta_train.y[::8], meta_train.classes)
    torch.manual_seed(0)
    enc = fs.ConvNet4(width=4)
    before = [p.detach().clone() for p in enc.parameters()]
    fresh = fs.ConvNet4(width=4)
    fresh.load_state_dict(enc.state_dict())
    out = fs.pretrain_fewshot(enc, meta_train, epochs=1, batch_size=32, device="cpu",
                              progress=False)
    assert not out.training and not any(p.requires_grad for p in out.parameters())
    assert any(not torch.equal(a, b) for a, b in zip(before, out.parameters()))
    assert out(torch.randn(2, 3, 32, 32)).shape == (2, 4)
    assert any(tmp_path.rglob("*.pt"))
    again = fs.pretrain_fewshot(fresh, meta_train, epochs=1, batch_size=32, device="cpu",
                                progress=False)  # same configuration: loaded from the cache
    for a, b in zip(out.state_dict().values(), again.state_dict().values()):
        assert torch.equal(a, b)


def test_study_reads_the_profile_and_guards_only_measured_claims():
    from nclab.runtime import PROFILES

    real = fs.study("real")
    assert (real.dataset, real.scale, real.epochs, real.episodes) == (
        "cifar10_fs", PROFILES["real"].fewshot_scale, PROFILES["real"].fewshot_epochs,
        PROFILES["real"].episodes)
    assert real.gain_checked == tuple(fs.BACKBONES) and real.below_paper
    assert real.cross_domain == "fashion_mnist_fs" and real.cross_models == PROFILES["real"].models
    smoke = fs.study(PROFILES["smoke"])
    assert smoke.dataset == "digits_fs" and "convnet4" not in smoke.gain_checked
    assert smoke.cross_domain is None and not smoke.below_paper
    course = fs.study("course")
    assert course.gain_checked == () and course.cross_domain is None
    assert set(real.gain_checked) <= set(fs.BACKBONES)
