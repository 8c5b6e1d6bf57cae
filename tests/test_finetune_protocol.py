"""The fine-tuning protocol of chapter 05: which parameters train, which BatchNorm buffers update,
what the cached prefix computes, training-set NC1, and the chapter's per-profile study.

A random-init CIFAR ResNet-20 (the architecture of the ``real`` chapter) on random 16-px images,
CPU, one thread.
"""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
from torch.nn.modules.batchnorm import _BatchNorm

from nclab import finetune as FT
from nclab import finetune_study as FS
from nclab import models as M
from nclab.data import TensorDataset, batches
from nclab.metrics import nc1
from nclab.runtime import PROFILES
from nclab.train import fit

pytestmark = pytest.mark.usefixtures("one_thread")
K = 3


@pytest.fixture(scope="module")
def backbone() -> torch.nn.Module:
    torch.manual_seed(0)
    return M.load_backbone("resnet20", pretrained=False).eval()


def _data(n: int = 24, seed: int = 0, shift: int = 0) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(shift, 256 - 64 + shift, (n, 3, 16, 16), generator=g, dtype=torch.uint8)
    return TensorDataset(x, torch.arange(n) % K)


def _buffers(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: b.clone() for n, b in model.named_buffers() if "running" in n}


def test_adapt_norm_stats_matches_the_data_and_changes_no_parameter(backbone):
    data = _data(shift=60)
    before = copy.deepcopy(backbone.state_dict())
    adapted = FT.adapt_norm_stats(backbone, data, batch_size=8)
    # the original is untouched, the copy has the same parameters
    assert all(torch.equal(v, backbone.state_dict()[k]) for k, v in before.items())
    for (n, p), (_, q) in zip(backbone.named_parameters(), adapted.named_parameters()):
        assert torch.equal(p, q), n
    # the first BatchNorm's running mean is the mean over batches of the conv1 output's batch mean
    conv, bn = adapted.conv1, adapted.bn1
    means = [conv(x).mean(dim=(0, 2, 3)) for x, _ in batches(data, 8)]
    assert torch.allclose(bn.running_mean, torch.stack(means).mean(0), atol=1e-5)
    assert not torch.allclose(bn.running_mean, backbone.bn1.running_mean, atol=1e-3)
    # momenta and mode restored
    assert all(m.momentum == 0.1 for m in adapted.modules() if isinstance(m, _BatchNorm))
    assert not adapted.training


@pytest.mark.parametrize("method", ["linear", "layer", "scl", "full"])
def test_cached_training_updates_the_norms_the_paper_updates(backbone, method):
    """After adapting the statistics on the downstream data, a cached-prefix run keeps the
    prefix's (now downstream) statistics and updates those of the trained part; full FT updates
    every one. Only the method's parameters change."""
    train = _data(shift=60)
    adapted = FT.adapt_norm_stats(backbone, train, batch_size=8)
    model = FT.prepare(adapted, method, block=7, num_classes=K)
    expected = {n for n, p in model.named_parameters() if p.requires_grad}
    params0 = {n: p.detach().clone() for n, p in model.named_parameters()}
    bufs0 = _buffers(model)
    cache = method != "full"
    fit(model, train, None, 1, batch_size=8, cache_prefix=cache, progress=False, device="cpu")
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, params0[n])}
    assert changed <= expected and changed, (method, changed - expected)
    moved = {n for n, b in _buffers(model).items() if not torch.equal(b, bufs0[n])}
    if method == "full":
        assert moved == {n for n in bufs0 if n.endswith(("running_mean", "running_var"))}
    else:
        # Block 7 (layer3.0) onwards runs in train mode in the suffix; before it, nothing moves
        prefix = {n for n in bufs0 if not n.startswith(("backbone.layer3",))}
        assert not (moved & prefix), sorted(moved & prefix)[:3]
        if method == "linear":  # the whole backbone is the cached prefix
            assert not moved
        else:
            assert any(n.startswith("backbone.layer3.0.") for n in moved)
    # the adapted statistics are the downstream data's, not the source's
    assert not torch.allclose(model.backbone.bn1.running_mean, backbone.bn1.running_mean, atol=1e-3)


def test_cached_prefix_forward_equals_the_model(backbone):
    adapted = FT.adapt_norm_stats(backbone, _data(shift=60), batch_size=8)
    model = FT.prepare(adapted, "scl", block=7, num_classes=K).eval()
    prefix, suffix = FT.split(model)
    x = torch.randn(4, 3, 16, 16)
    with torch.no_grad():
        assert torch.allclose(suffix.eval()(prefix.eval()(x)), model(x), atol=1e-5)


def test_features_nc1_on_train_and_test(backbone):
    train, test = _data(seed=1), _data(seed=2)
    model = FT.prepare(backbone, "scl", block=7, num_classes=K).eval()
    h, y = [], []
    with torch.no_grad():
        for x, yb in batches(train, 8):
            h.append(model.features(x))
            y.append(yb)
    expected = nc1(torch.cat(h), torch.cat(y), num_classes=K)
    assert FT.features_nc1(model, train, batch_size=5) == pytest.approx(expected, rel=1e-4)
    assert FT.features_nc1(model, test) != pytest.approx(expected, rel=1e-3)
    assert not model.training
    with pytest.raises(TypeError):
        FT.features_nc1(backbone, train)


def test_study_per_profile():
    smoke, real, course = (FS.study(PROFILES[n]) for n in ("smoke", "real", "course"))
    assert smoke.backbone == "convnet_s" and smoke.block == 4 and not smoke.cache
    assert real.backbone == "resnet20" and real.cache and real.per_class == 50
    assert real.second is not None and real.second != real.backbone
    assert real.sweep_seeds == PROFILES["real"].seeds
    assert course.backbone == "resnet50" and course.block == 8 and course.second == "resnet18"
    assert smoke.second_block == 3
    # real: the first block of each of ResNet-20's three stages and the last two
    assert real.sweep(9) == [1, 4, 7, 8, 9]
    assert real.many(9) == [2, 3, 6]
    assert smoke.sweep(6) == [1, 2, 3, 4, 5, 6]
    assert course.sweep(16) == [1, 3, 5, 7, 8, 9, 11, 13, 15, 16]
    assert all(n >= 2 for n in course.many(16))
    # Fig. 8: subsets strictly below the full set (whose point is Table 3's runs)
    assert real.scarce_sizes(50) == [3, 10]
    assert smoke.scarce_sizes(100) == [n for n in PROFILES["smoke"].shots_per_class if n < 100]
    assert course.scarce_sizes(316) == [3, 10, 32, 100]
    for s in (smoke, real, course):
        assert s.epochs == PROFILES[s.profile].finetune_epochs
        assert s.seeds == PROFILES[s.profile].seeds
        assert set(s.checked) <= set(FS.CLAIMS), set(s.checked) - set(FS.CLAIMS)


def test_study_adapt_run_and_tuned_block(backbone):
    """``adapt`` re-estimates BatchNorm statistics only for a cached study; ``run`` trains
    with the study's recipe and adds training-set NC1; ``tuned_block`` is layer3.0."""
    real = FS.study(PROFILES["real"])
    assert real.tuned_block(backbone) == 7
    smoke = FS.study(PROFILES["smoke"])
    assert smoke.tuned_block(backbone) == 4 and smoke.tuned_block(backbone, second=True) == 3
    train, test = _data(shift=60), _data(seed=3)
    assert smoke.adapt(backbone, train) is backbone
    adapted = real.adapt(backbone, train)
    assert adapted is not backbone
    assert not torch.allclose(adapted.bn1.running_mean, backbone.bn1.running_mean, atol=1e-3)
    study = dataclasses.replace(real, epochs=1, batch_size=8)
    row = study.run(adapted, "layer", train, test, seed=0, train_nc1=True)
    assert "model" not in row and row["block"] == 7 and row["history"].config
    assert row["train_nc1"] > 0 and row["train_nc1"] != pytest.approx(row["nc1"], rel=1e-3)
    lora = study.run(adapted, "layer_lora", train, test, seed=0)
    assert 0 < lora["params_percent"] < row["params_percent"]


@pytest.mark.parametrize("method", ["linear", "layer", "scl", "full"])
def test_finetune_diagram_marks_what_trains(method):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import to_hex

    from nclab.plots import finetune_diagram

    ax = finetune_diagram(6, 4, method)
    patches = {p.get_gid(): p for p in ax.patches if p.get_gid()}
    trains = {g for g, p in patches.items() if g.startswith("block")
              and to_hex(p.get_facecolor()) == "#f4a261"}
    expected = {"linear": set(), "layer": {"block4"}, "scl": {"block4"},
                "full": {f"block{k}" for k in range(1, 7)}}[method]
    assert trains == expected
    assert {f"block{k}" for k in range(1, 7)} | {"head"} <= set(patches)
    assert ("skip" in patches) == (method == "scl")
    with pytest.raises(ValueError):
        finetune_diagram(6, 7, method)
    plt.close(ax.figure)
