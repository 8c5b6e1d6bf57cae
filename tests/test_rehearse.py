"""The rehearsal of `course` (NCLAB_REHEARSAL=1): the profile it returns, the stand-in data of
nclab.data.load, and the random-init weights written where torchvision / timm read real ones."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from nclab import data, mirror, runtime
from nclab.runtime import PROFILES, REHEARSAL_SIZES, profile, rehearsal, rehearsing


@pytest.fixture
def rehearse_env(monkeypatch, tmp_path):
    """A rehearsal of `course` with scratch torch hub / Hugging Face caches under tmp_path."""
    from huggingface_hub import constants

    monkeypatch.setenv("NCLAB_REHEARSAL", "1")
    monkeypatch.setenv("NCLAB_PROFILE", "course")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    old_hub = torch.hub.get_dir()
    torch.hub.set_dir(str(tmp_path / "torch" / "hub"))
    yield tmp_path
    torch.hub.set_dir(old_hub)


@pytest.mark.parametrize("value, on", [("1", True), ("true", True), ("yes", True), ("0", False),
                                       ("", False), ("no", False)])
def test_rehearsing_reads_the_environment(monkeypatch, value, on):
    monkeypatch.setenv("NCLAB_REHEARSAL", value)
    assert rehearsing() is on


def test_rehearsal_keeps_the_course_profile_and_shrinks_only_sizes(monkeypatch, capsys):
    monkeypatch.setenv("NCLAB_REHEARSAL", "1")
    monkeypatch.setattr(runtime, "_announced", set())
    p = profile("course")
    course = PROFILES["course"]
    assert p.rehearsal and p.name == "course"
    changed = {f.name for f in dataclasses.fields(p) if getattr(p, f.name) != getattr(course, f.name)}
    assert changed == set(REHEARSAL_SIZES) | {"rehearsal", "downstream", "models"}
    assert p.downstream == course.downstream[:2]
    assert set(p.models) == set(course.models) - {"densenet169", "densenet201"}
    for same in ("source", "image_size", "fewshot_dataset", "fewshot_scale"):
        assert getattr(p, same) == getattr(course, same)
    assert p.pretrain_epochs == 1 and p.seeds == (0,) and p.episodes < course.episodes
    first = capsys.readouterr().out
    assert "REHEARSAL of the 'course' profile" in first and "stand-in data" in first
    profile("course")
    assert capsys.readouterr().out == ""  # announced once per process
    # other profiles pass through unchanged (chapters load `real` by name, e.g. the recipe study)
    assert profile("smoke") is PROFILES["smoke"] and profile("real") is PROFILES["real"]


def test_rehearsal_of_a_cpu_profile_is_refused():
    with pytest.raises(ValueError, match="course"):
        rehearsal(PROFILES["smoke"])
    assert not PROFILES["course"].rehearsal


@pytest.mark.parametrize("name", ["dtd", "fgvc_aircraft", "oxford_pets"])
def test_synthetic_stand_ins_have_the_real_class_counts_and_mixed_sizes(name):
    k, n_train, n_test, (w, h) = data.STAND_IN_SIZES[name]
    train = data.stand_in(name, "train", transform=lambda img: img)  # the PIL images
    test = data.stand_in(name, "test")
    assert len(train.classes) == len(test.classes) == k
    assert len(train) == k * n_train and len(test) == k * n_test
    assert sorted(set(train.targets)) == list(range(k))
    sizes = {train[i][0].size for i in range(2)}
    assert sizes == {(w, h), (h, w)}  # PIL images, landscape and portrait, before the transform
    assert "NOT real data" in repr(train)
    assert test[0][0].shape == (3, h, w) and test[0][0].dtype == torch.uint8  # load's default
    again = data.stand_in(name, "train", transform=lambda img: img)[1][0]
    assert list(again.getdata())[:50] == list(train[1][0].getdata())[:50]  # deterministic


def test_load_serves_stand_ins_in_a_rehearsal_and_materializes_at_224(monkeypatch):
    monkeypatch.setenv("NCLAB_REHEARSAL", "1")
    ds = data.load("dtd", "train", image_size=224)
    assert "stand-in" in repr(ds)
    t = data.materialize(ds)
    assert t.x.shape == (len(ds), 3, 224, 224) and t.x.dtype == torch.uint8
    assert t.num_classes == 47
    capped = data.load_tensors("oxford_pets", "test", image_size=64, max_per_class=1)
    assert capped.x.shape[1:] == (3, 64, 64) and len(capped) == 37
    with pytest.raises(ValueError, match="stand-in"):
        data.stand_in("digits")


def test_cifar100_class_names_in_label_order():
    names = data._cifar100_classes()
    assert len(names) == len(set(names)) == 100
    assert names[:5] == ["apple", "aquarium_fish", "baby", "bear", "beaver"] and names[-1] == "worm"


needs_cifar = pytest.mark.skipif(not mirror.is_available("cifar10_2k"),
                                 reason="the real CIFAR-10 images are not in the local mirror "
                                        "(NCLAB_DATA; see book/mirror.md)")


@needs_cifar
@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
def test_cifar_stand_ins_are_the_mirrors_real_images(monkeypatch, name):
    monkeypatch.setenv("NCLAB_REHEARSAL", "1")
    k, n_train, n_test, _ = data.STAND_IN_SIZES[name]
    real = data.cifar10_2k("train")
    ds = data.load(name, "train")
    assert isinstance(ds, data.TensorDataset) and ds.num_classes == k
    assert torch.equal(torch.bincount(ds.y), torch.full((k,), n_train))
    rows = {bytes(x.numpy()) for x in real.x}
    assert all(bytes(x.numpy()) in rows for x in ds.x[:: max(1, len(ds) // 20)])
    assert data.load(name, "test", image_size=64).x.shape[1:] == (3, 64, 64)


def test_random_weights_are_refused_outside_a_rehearsal_or_a_scratch_cache(monkeypatch, tmp_path):
    from nclab.rehearse import write_weights

    with pytest.raises(RuntimeError, match="not a rehearsal"):
        write_weights(PROFILES["course"])
    monkeypatch.delenv("TORCH_HOME", raising=False)
    with pytest.raises(RuntimeError, match="TORCH_HOME"):
        write_weights(rehearsal(PROFILES["course"]))


def test_random_weights_load_through_the_real_loaders(rehearse_env):
    import timm

    from nclab.models import load_backbone
    from nclab.rehearse import MARKER, write_weights

    prof = rehearsal(PROFILES["course"])
    with pytest.raises(RuntimeError, match="no weights named"):
        write_weights(prof, names=["resnet20"])
    paths = write_weights(prof, names=["mobilenet_v2", "convnext_atto"], progress=False)
    assert len(paths) == 2 and all(p.is_file() for p in paths)
    assert paths[0].parent == rehearse_env / "torch" / "hub" / "checkpoints"
    assert (rehearse_env / "torch" / "hub" / MARKER).is_file()
    assert (rehearse_env / "hf" / "hub" / MARKER).is_file()
    assert write_weights(prof, names=["mobilenet_v2"], progress=False) == []  # kept
    net = load_backbone("mobilenet_v2")  # the torch hub path, as with the real file
    saved = torch.load(paths[0], weights_only=True)
    assert torch.equal(net.features[0][0].weight, saved["features.0.0.weight"])
    atto = timm.create_model("convnext_atto", pretrained=True, num_classes=0)  # timm's own loader
    from safetensors.torch import load_file

    assert torch.equal(atto.stem[0].weight, load_file(str(paths[1]))["stem.0.weight"])


def test_a_cache_holding_other_files_is_refused(rehearse_env):
    from nclab.rehearse import write_weights

    ckpt = rehearse_env / "torch" / "hub" / "checkpoints"
    ckpt.mkdir(parents=True)
    (ckpt / "real.pth").write_bytes(b"x")
    with pytest.raises(RuntimeError, match="not a rehearsal cache"):
        write_weights(rehearsal(PROFILES["course"]), names=["mobilenet_v2"], progress=False)
