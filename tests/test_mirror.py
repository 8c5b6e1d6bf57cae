"""The local mirror: hashes, clear offline errors, downloads and rebuilds (faked), and, when the
mirror is on this machine, the real files: real CIFAR-10 images classified by the real ResNets at
the accuracy their authors report."""

from __future__ import annotations

import dataclasses
import hashlib
import shutil
import time

import numpy as np
import pytest
import torch
from PIL import Image

from nclab import data, mirror, models

pytestmark = pytest.mark.usefixtures("one_thread")

# reported CIFAR-10 test accuracy of akamaster/pytorch_resnet_cifar10's checkpoints (its README)
REPORTED = {"resnet20": 91.73, "resnet32": 92.63, "resnet44": 93.10, "resnet56": 93.39}


def _sha(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()


@pytest.fixture
def roots(monkeypatch, tmp_path):
    monkeypatch.setenv("NCLAB_DATA", str(tmp_path / "data"))
    monkeypatch.setenv("NCLAB_WEIGHTS", str(tmp_path / "weights"))
    monkeypatch.delenv("NCLAB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    return tmp_path


def _fake(monkeypatch, name: str, payload: bytes, **changes) -> mirror.MirrorFile:
    spec = dataclasses.replace(mirror.MIRROR["resnet20"], path=f"fake/{name}.th",
                               sha256=_sha(payload),
                               origins=(f"https://example.invalid/{name}.th",), **changes)
    monkeypatch.setitem(mirror.MIRROR, name, spec)
    return spec


def test_file_and_content_hashes(tmp_path):
    (tmp_path / "f").write_bytes(b"nclab")
    assert mirror.file_sha256(tmp_path / "f") == _sha(b"nclab")
    a = {"x": np.arange(12, dtype=np.uint8).reshape(3, 4), "names": np.array(["a", "bc"])}
    np.savez(tmp_path / "plain.npz", **a)
    np.savez_compressed(tmp_path / "zipped.npz", **dict(reversed(a.items())))
    h = mirror.content_sha256(tmp_path / "plain.npz")
    assert mirror.content_sha256(tmp_path / "zipped.npz") == h  # same arrays, other zip bytes
    assert mirror.file_sha256(tmp_path / "plain.npz") != mirror.file_sha256(tmp_path / "zipped.npz")
    np.savez(tmp_path / "other.npz", x=a["x"] + 1, names=a["names"])
    assert mirror.content_sha256(tmp_path / "other.npz") != h
    np.savez(tmp_path / "cast.npz", x=a["x"].astype(np.int64), names=a["names"])
    assert mirror.content_sha256(tmp_path / "cast.npz") != h  # the dtype is part of the content


def test_unknown_name_lists_the_mirror():
    with pytest.raises(ValueError, match="cifar10_2k.*resnet20"):
        mirror.fetch("imagenet")


@pytest.mark.parametrize("how", ["env", "download=False", "unreachable"])
def test_missing_file_fails_fast_naming_file_origin_and_hash(roots, monkeypatch, how):
    spec = mirror.MIRROR["resnet20"]
    kwargs = {}
    if how == "env":
        monkeypatch.setenv("NCLAB_OFFLINE", "1")
    elif how == "download=False":
        kwargs["download"] = False
    else:  # a host that cannot resolve: the real reachability check, no monkeypatching
        spec = _fake(monkeypatch, "unreachable", b"x")
    name = "resnet20" if how != "unreachable" else "unreachable"
    t0 = time.perf_counter()
    with pytest.raises(mirror.MirrorFileMissing) as err:
        mirror.fetch(name, **kwargs)
    assert time.perf_counter() - t0 < 10
    msg = str(err.value)
    assert str(spec.local_path()) in msg and spec.origins[0] in msg and spec.sha256 in msg
    assert "NCLAB_WEIGHTS" in msg and spec.licence in msg
    assert not mirror.is_available(name)


def test_missing_dataset_names_every_origin_file(roots, monkeypatch):
    monkeypatch.setenv("NCLAB_OFFLINE", "1")
    with pytest.raises(mirror.MirrorFileMissing) as err:
        data.load("cifar10_2k", "test")
    msg = str(err.value)
    for url in mirror.MIRROR["cifar10_2k"].origins:
        assert url in msg
    assert "NCLAB_DATA" in msg and "cifar10/cifar10_train2k_test1k.npz" in msg


def test_wrong_hash_is_never_used(roots, monkeypatch):
    spec = _fake(monkeypatch, "bad", b"the real bytes")
    spec.local_path().parent.mkdir(parents=True)
    spec.local_path().write_bytes(b"tampered")
    with pytest.raises(mirror.MirrorHashMismatch) as err:
        mirror.fetch("bad")
    assert spec.sha256 in str(err.value) and _sha(b"tampered") in str(err.value)
    assert [r["state"] for r in mirror.status() if r["name"] == "bad"] == ["bad hash"]


def test_verified_file_is_hashed_once_and_rechecked_when_it_changes(roots, monkeypatch):
    spec = _fake(monkeypatch, "memo", b"published bytes")
    spec.local_path().parent.mkdir(parents=True)
    spec.local_path().write_bytes(b"published bytes")
    calls = []
    real = mirror.file_sha256
    monkeypatch.setattr(mirror, "file_sha256", lambda p: calls.append(p) or real(p))
    assert mirror.fetch("memo") == mirror.fetch("memo") == spec.local_path()
    assert len(calls) == 1, "an unchanged, verified file is not read again"
    spec.local_path().write_bytes(b"tampered after the check")
    with pytest.raises(mirror.MirrorHashMismatch):
        mirror.fetch("memo")


def test_download_verifies_before_it_lands(roots, monkeypatch):
    served = {"payload": b"weights v1"}
    spec = _fake(monkeypatch, "dl", b"weights v1")
    monkeypatch.setattr(mirror, "_reachable", lambda url, timeout=3.0: True)
    monkeypatch.setattr(mirror, "_download", lambda url, dest, timeout=30.0:
                        dest.write_bytes(served["payload"]))
    assert mirror.fetch("dl") == spec.local_path()
    assert spec.local_path().read_bytes() == b"weights v1"
    spec.local_path().unlink()
    served["payload"] = b"a corrupted download"
    with pytest.raises(mirror.MirrorHashMismatch):
        mirror.fetch("dl")
    assert not spec.local_path().exists()
    assert not list(spec.local_path().parent.iterdir()), "no temporary files left behind"


# --------------------------------------------------------------------------- rebuilds


def _strips(x: np.ndarray, folder, labels: np.ndarray, batches=(0, 1, 50)) -> list:
    """ConvNetJS's layout: one 1024x1000 RGBA PNG per 1000 images, one image per row."""
    files = []
    for i, b in enumerate(batches):
        chunk = x[1000 * i:1000 * (i + 1)].reshape(1000, 1024, 3)
        rgba = np.concatenate([chunk, np.full((1000, 1024, 1), 255, np.uint8)], axis=2)
        Image.fromarray(rgba, "RGBA").save(folder / f"cifar10_batch_{b}.png")
        files.append(folder / f"cifar10_batch_{b}.png")
    (folder / "cifar10_labels.js").write_text("var labels=[" + ",".join(map(str, labels)) + "];\n")
    return [*files, folder / "cifar10_labels.js"]


def _cifar_arrays(rng) -> dict:
    x = rng.integers(0, 256, (3000, 32, 32, 3), dtype=np.uint8)
    labels = rng.integers(0, 10, 51000).astype(np.uint8)
    return {"x": x, "labels": labels}


def test_cifar10_rebuild_from_convnetjs_strips(tmp_path):
    a = _cifar_arrays(np.random.default_rng(0))
    files = _strips(a["x"], tmp_path, a["labels"])
    mirror._build_cifar10(files, tmp_path / "out.npz")
    with np.load(tmp_path / "out.npz") as z:
        assert np.array_equal(z["x_train"], a["x"][:2000])
        assert np.array_equal(z["x_test"], a["x"][2000:])
        assert np.array_equal(z["y_train"], a["labels"][:2000])
        assert np.array_equal(z["y_test"], a["labels"][50000:51000])
        assert list(z["classes"])[:2] == ["airplane", "automobile"]
    Image.new("RGB", (32, 32)).save(files[0])
    with pytest.raises(ValueError, match="1024x1000"):
        mirror._build_cifar10(files, tmp_path / "bad.npz")


def test_fashion_rebuild_takes_the_first_2000(tmp_path):
    rng = np.random.default_rng(1)
    x, y = rng.integers(0, 256, (2500, 784), dtype=np.uint8), rng.integers(0, 10, 2500)
    np.savez(tmp_path / "x_test.npz", x)
    np.savez(tmp_path / "y_test.npz", y)
    mirror._build_fashion([tmp_path / "x_test.npz", tmp_path / "y_test.npz"], tmp_path / "o.npz")
    with np.load(tmp_path / "o.npz") as z:
        assert np.array_equal(z["x"], x[:2000].reshape(-1, 28, 28))
        assert np.array_equal(z["y"], y[:2000].astype(np.uint8))


# --------------------------------------------------------------------------- the real mirror

needs_cifar = pytest.mark.skipif(
    not mirror.is_available("cifar10_2k"),
    reason="the local mirror's real CIFAR-10 is not on this machine (see book/mirror.md)")


@needs_cifar
def test_real_cifar10_rebuilds_to_the_published_content(tmp_path):
    """Encoding the real images in the origin's layout and rebuilding gives the published arrays,
    so a user who downloads the origin files gets exactly the mirror's content."""
    with np.load(mirror.fetch("cifar10_2k")) as z:
        x = np.concatenate([z["x_train"], z["x_test"]])
        labels = np.zeros(51000, np.uint8)
        labels[:2000], labels[50000:] = z["y_train"], z["y_test"]
    mirror._build_cifar10(_strips(x, tmp_path, labels), tmp_path / "rebuilt.npz")
    assert mirror.content_sha256(tmp_path / "rebuilt.npz") == mirror.MIRROR["cifar10_2k"].content_sha256
    dest = tmp_path / "copy.npz"
    shutil.copy(tmp_path / "rebuilt.npz", dest)
    mirror._verify(mirror.MIRROR["cifar10_2k"], dest)  # accepted although its bytes differ


@needs_cifar
def test_real_cifar10_is_cifar10():
    tr, te = data.load("cifar10_2k", "train"), data.load("cifar10_2k", "test")
    assert tr.x.shape == (2000, 3, 32, 32) and te.x.shape == (1000, 3, 32, 32)
    assert tr.classes[0] == "airplane" and tr.classes[9] == "truck"
    assert te.y[:10].tolist() == [3, 8, 8, 0, 6, 6, 1, 6, 3, 1]  # the official test-set order
    assert torch.bincount(te.y).min() >= 80


@pytest.mark.skipif(not mirror.is_available("fashion_mnist_2k"),
                    reason="the local mirror's Fashion-MNIST is not on this machine")
def test_real_fashion_mnist_split():
    tr, te = data.load("fashion_mnist_2k", "train"), data.load("fashion_mnist_2k", "test")
    assert len(tr) == 1400 and len(te) == 600 and tr.x.shape[1:] == (3, 32, 32)
    assert tr.classes[9] == "Ankle boot"
    assert torch.equal(tr.x[:, 0], tr.x[:, 2])  # grey served as three equal channels
    whole = torch.bincount(torch.cat([tr.y, te.y]))
    assert (torch.bincount(te.y) - 0.3 * whole).abs().max() <= 1  # stratified


@needs_cifar
@pytest.mark.parametrize("name", list(REPORTED))
def test_real_resnets_reach_their_reported_accuracy(name):
    if not mirror.is_available(name):
        pytest.skip(f"{name}'s checkpoint is not in the local mirror")
    backbone, head = models.load_backbone(name), models.source_classifier(name)
    test = data.load("cifar10_2k", "test")
    with torch.no_grad():
        correct = sum(int((head(backbone(x)).argmax(1) == y).sum())
                      for x, y in data.batches(test, 500))
    acc = 100 * correct / len(test)
    assert abs(acc - REPORTED[name]) <= 2, f"{name}: {acc:.1f} % vs reported {REPORTED[name]} %"
