import time

import numpy as np
import pytest
import torch
from PIL import Image

from nclab import data


@pytest.fixture(scope="module")
def train():
    return data.digits("train")


def test_digits_shapes_classes_and_balance(train):
    test = data.digits("test")
    assert train.x.shape == (1257, 3, 32, 32) and test.x.shape == (540, 3, 32, 32)
    assert train.x.dtype == torch.uint8 and train.y.dtype == torch.int64
    assert train.classes == [str(d) for d in range(10)]
    counts = torch.bincount(train.y, minlength=10)
    assert counts.min() >= 120 and counts.max() <= 131  # stratified split of ~180 per class
    assert torch.equal(train.x[:, 0], train.x[:, 2])  # grey scans repeated on 3 channels
    assert int(train.x.max()) == 255 and int(train.x.min()) == 0


def test_digits_split_is_fixed_and_disjoint(train):
    again = data.digits("train")
    assert torch.equal(again.x, train.x) and torch.equal(again.y, train.y)
    test = data.digits("test")
    flat_train = {bytes(v) for v in train.x[:, 0].numpy()}
    overlap = sum(bytes(v) in flat_train for v in test.x[:, 0].numpy())
    assert overlap <= 2  # the raw set holds a couple of duplicate scans, nothing more


def test_digits_matches_sklearn_pixels():
    from sklearn.datasets import load_digits

    ds = data.digits("train", size=8)
    raw = load_digits().images
    # every served 8x8 image is one of sklearn's scans scaled to 0..255
    lut = {bytes(np.round(im / 16 * 255).astype(np.uint8)): None for im in raw}
    assert all(bytes(v.numpy()) in lut for v in ds.x[:20, 0])


def test_dataset_getitem_and_len(train):
    img, label = train[0]
    assert img.dtype == torch.float32 and img.shape == (3, 32, 32)
    assert 0.0 <= float(img.min()) and float(img.max()) <= 1.0
    assert label == int(train.y[0]) and len(train) == 1257
    with pytest.raises(ValueError, match="split"):
        data.digits("val")


def test_subset_per_class_exact_and_deterministic(train):
    a = data.subset_per_class(train, 7, seed=3)
    b = data.subset_per_class(train, 7, seed=3)
    c = data.subset_per_class(train, 7, seed=4)
    assert torch.bincount(a.y).tolist() == [7] * 10
    assert torch.equal(a.x, b.x) and torch.equal(a.y, b.y)
    assert not torch.equal(a.x, c.x)
    idx = data.subset_per_class(train.y, 7, seed=3)
    assert torch.equal(train.y[idx], a.y) and len(set(idx.tolist())) == 70


def test_subset_per_class_too_few(train):
    with pytest.raises(ValueError, match="fewer than 1000"):
        data.subset_per_class(train, 1000)
    with pytest.raises(ValueError):
        data.subset_per_class(train, 0)


def test_class_subset_relabels(train):
    down = data.class_subset(train, [5, 6, 7, 8, 9])
    assert down.classes == ["5", "6", "7", "8", "9"]
    assert set(down.y.tolist()) == set(range(5))
    assert len(down) == int(sum((train.y == k).sum() for k in range(5, 10)))
    kept = data.class_subset(train, [9, 5], relabel=False)
    assert set(kept.y.tolist()) == {5, 9}
    with pytest.raises(ValueError, match="not in"):
        data.class_subset(train, [10])


def test_batches_normalises_shuffles_and_resizes(train):
    loader = data.batches(train, batch_size=100, shuffle=True, size=16, seed=1)
    assert len(loader) == 13
    first = [y for _, y in loader]
    second = [y for _, y in loader]
    assert sum(len(y) for y in first) == 1257
    assert not torch.equal(torch.cat(first), torch.cat(second))  # new order each epoch
    assert torch.equal(torch.cat(first).sort().values, train.y.sort().values)
    x, _ = next(iter(data.batches(train, batch_size=4, size=16)))
    assert x.shape == (4, 3, 16, 16) and x.dtype == torch.float32
    x32, _ = next(iter(data.batches(train, batch_size=4)))
    manual = data.normalize(train.x[:4])
    assert torch.allclose(x32, manual)
    ref = (train.x[:4].float() / 255 - torch.tensor(data.IMAGENET_MEAN).view(1, 3, 1, 1)) / (
        torch.tensor(data.IMAGENET_STD).view(1, 3, 1, 1))
    assert torch.allclose(manual, ref, atol=1e-6)
    assert len(data.batches(train, batch_size=100, drop_last=True)) == 12


def test_synthetic_features_structure():
    h, y = data.synthetic_features(num_classes=4, per_class=[10, 20, 30, 40], dim=8,
                                   within_std=0.0, between_scale=3.0, seed=0)
    assert h.shape == (100, 8) and torch.bincount(y).tolist() == [10, 20, 30, 40]
    for k in range(4):
        hk = h[y == k]
        assert torch.allclose(hk, hk[0].expand_as(hk))  # no spread: perfect collapse
        assert torch.isclose(hk[0].norm(), torch.tensor(3.0, dtype=h.dtype))
    h2, _ = data.synthetic_features(num_classes=4, per_class=5, dim=8, seed=1)
    h3, _ = data.synthetic_features(num_classes=4, per_class=5, dim=8, seed=1)
    assert torch.equal(h2, h3)
    with pytest.raises(ValueError):
        data.synthetic_features(num_classes=3, per_class=[1, 2])


def test_synthetic_images_are_separable():
    ds = data.synthetic_images(num_classes=3, per_class=20, size=16, seed=0)
    assert ds.x.shape == (60, 3, 16, 16) and ds.x.dtype == torch.uint8
    flat = ds.x.flatten(1).float()
    means = torch.stack([flat[ds.y == k].mean(0) for k in range(3)])
    nearest = torch.cdist(flat, means).argmin(1)
    assert (nearest == ds.y).float().mean() > 0.95


def test_registry_unknown_name_lists_valid():
    with pytest.raises(ValueError, match="cifar10"):
        data.load("imagenet22k")
    with pytest.raises(ValueError, match="split"):
        data.load("cifar10", split="val")


def test_offline_error_is_fast_and_names_files(monkeypatch, tmp_path):
    monkeypatch.setattr(data, "_reachable", lambda url, timeout=3.0: False)
    t0 = time.perf_counter()
    with pytest.raises(data.DatasetUnavailableError) as err:
        data.load("cifar10", "train", root=tmp_path)
    assert time.perf_counter() - t0 < 5
    msg = str(err.value)
    assert "cifar-10-python.tar.gz" in msg and str(tmp_path) in msg
    with pytest.raises(FileNotFoundError, match="download=False"):
        data.load("oxford_pets", "test", root=tmp_path, download=False)


def _write_dtd(root, classes=("banded", "dotted"), per_class=3, size=(40, 30)):
    base = root / "dtd" / "dtd"
    lines = []
    rng = np.random.default_rng(0)
    for c in classes:
        (base / "images" / c).mkdir(parents=True)
        for i in range(per_class):
            arr = rng.integers(0, 255, size=(size[1] + 7 * i, size[0], 3), dtype=np.uint8)
            Image.fromarray(arr).save(base / "images" / c / f"{c}_{i:04d}.jpg")
            lines.append(f"{c}/{c}_{i:04d}.jpg")
    (base / "labels").mkdir()
    for split in ("train", "val", "test"):
        (base / "labels" / f"{split}1.txt").write_text("\n".join(lines) + "\n")


def test_folder_dataset_from_its_own_layout(tmp_path):
    _write_dtd(tmp_path)
    ds = data.load("dtd", "train", root=tmp_path, image_size=24)
    assert len(ds) == 6 and ds.classes == ["banded", "dotted"]
    img, label = ds[0]
    assert img.shape == (3, 24, 24) and img.dtype == torch.uint8 and label == 0
    tensors = data.materialize(ds)
    assert tensors.x.shape == (6, 3, 24, 24)
    assert tensors.y.tolist() == [0, 0, 0, 1, 1, 1]
    assert tensors.classes == ["banded", "dotted"]


def test_materialize_rejects_mixed_sizes(tmp_path):
    _write_dtd(tmp_path)
    ds = data.load("dtd", "train", root=tmp_path)  # no image_size: sizes differ
    with pytest.raises(ValueError, match="differ in size"):
        data.materialize(ds)


def test_load_tensors_resizes_mixed_sizes_and_caps(tmp_path):
    _write_dtd(tmp_path, per_class=4)
    ds = data.load_tensors("dtd", "train", image_size=20, root=tmp_path)
    assert isinstance(ds, data.TensorDataset) and ds.x.shape == (8, 3, 20, 20)
    capped = data.load_tensors("dtd", "train", image_size=20, max_per_class=2, root=tmp_path)
    assert torch.bincount(capped.y).tolist() == [2, 2]
    native = data.load_tensors("digits", "test", image_size=224)
    assert native.x.shape[-1] == 32  # fixed-size sets keep their resolution
