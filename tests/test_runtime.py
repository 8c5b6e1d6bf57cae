import random

import numpy as np
import pytest
import torch

from nclab import runtime


def test_profile_default_is_smoke_without_cuda(monkeypatch):
    monkeypatch.delenv("NCLAB_PROFILE", raising=False)
    expected = "course" if torch.cuda.is_available() else "smoke"
    assert runtime.profile().name == expected


@pytest.mark.parametrize("name", ["smoke", "real", "course", "paper", " Smoke "])
def test_profile_from_env(monkeypatch, name):
    monkeypatch.setenv("NCLAB_PROFILE", name)
    p = runtime.profile()
    assert p.name == name.strip().lower()
    assert p is runtime.PROFILES[p.name]


def test_profile_unknown_lists_valid(monkeypatch):
    monkeypatch.setenv("NCLAB_PROFILE", "fast")
    with pytest.raises(ValueError, match="smoke, real, course, paper"):
        runtime.profile()
    with pytest.raises(ValueError, match="'huge'"):
        runtime.profile("huge")


def test_profile_is_frozen():
    p = runtime.profile("smoke")
    with pytest.raises(AttributeError):
        p.finetune_epochs = 1  # type: ignore[misc]


def test_profiles_grow_from_smoke_to_paper():
    s, c, p = (runtime.PROFILES[k] for k in ("smoke", "course", "paper"))
    assert s.pretrain_epochs <= c.pretrain_epochs <= p.pretrain_epochs
    assert s.finetune_epochs <= p.finetune_epochs and p.finetune_epochs == 200


def test_real_profile_uses_the_mirror_and_registered_names():
    from nclab import data, fewshot, models

    r = runtime.PROFILES["real"]
    assert r.image_size == 32 and r.source == "cifar10_2k"
    assert set(r.models) == {f"resnet{n}" for n in models.CIFAR_RESNETS}
    assert all(models.BACKBONES[m].source == "mirror" for m in r.models)
    assert all(d in data.DATASETS for d in (*r.downstream, r.source))
    assert r.fewshot_dataset in fewshot.FEWSHOT_DATASETS


def test_seed_everything_reproduces_all_generators():
    def draw():
        return random.random(), np.random.rand(), torch.rand(3)

    runtime.seed_everything(123)
    a = draw()
    runtime.seed_everything(123)
    b = draw()
    assert a[0] == b[0] and a[1] == b[1] and torch.equal(a[2], b[2])
    runtime.seed_everything(124)
    assert draw()[0] != a[0]
    assert torch.backends.cudnn.deterministic


def test_seed_everything_rejects_bad_seed():
    with pytest.raises(ValueError):
        runtime.seed_everything(-1)


def test_device_is_a_torch_device():
    dev = runtime.device()
    assert dev.type in {"cuda", "mps", "cpu"}
    if not torch.cuda.is_available():
        assert dev.type in {"mps", "cpu"}


def test_cache_and_data_dirs(monkeypatch, tmp_path):
    monkeypatch.setenv("NCLAB_CACHE", str(tmp_path / "c"))
    monkeypatch.setenv("NCLAB_DATA", str(tmp_path / "d"))
    assert runtime.cache_dir() == tmp_path / "c" and (tmp_path / "c").is_dir()
    assert runtime.data_dir() == tmp_path / "d"
    assert runtime.data_dir(tmp_path / "x") == tmp_path / "x"


def test_cpu_threads_sets_the_intra_op_threads_on_a_cpu(monkeypatch):
    before = torch.get_num_threads()
    try:
        monkeypatch.setattr(runtime, "device", lambda: torch.device("cpu"))
        runtime.cpu_threads(1)
        assert torch.get_num_threads() == 1
        runtime.cpu_threads(2)
        assert torch.get_num_threads() == 2
        monkeypatch.setattr(runtime, "device", lambda: torch.device("cuda"))
        runtime.cpu_threads(1)
        assert torch.get_num_threads() == 2  # a GPU run keeps its threads
    finally:
        torch.set_num_threads(before)


def test_profile_passes_a_profile_through():
    real = runtime.PROFILES["real"]
    assert runtime.profile(real) is real
    assert runtime.profile("real") is real
