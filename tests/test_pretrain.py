"""Tests for nclab.pretrain: augmentation levels, PGD, losses, heads, the cache and the study."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from nclab import pretrain as P
from nclab.data import TensorDataset, class_subset, digits, synthetic_images
from nclab.models import ConvNetS


@pytest.fixture(autouse=True)
def _tmp_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("NCLAB_CACHE", str(tmp_path / "cache"))


def _tiny_source(n_per_class: int = 16, k: int = 3) -> TensorDataset:
    return synthetic_images(num_classes=k, per_class=n_per_class, size=16, seed=0)


def _net(seed: int = 0) -> ConvNetS:
    torch.manual_seed(seed)
    return ConvNetS(width=4, depth=2)


def _state_equal(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


# --------------------------------------------------------------------------- pretrain + cache
def test_pretrain_ce_trains_returns_eval_backbone_and_caches(monkeypatch):
    src = _tiny_source()
    net = _net()
    init = {k: v.clone() for k, v in net.state_dict().items()}
    out = P.pretrain(net, src, epochs=2, batch_size=16, device="cpu", progress=False)
    assert out is net and not out.training
    assert any(not torch.equal(init[k], v) for k, v in out.state_dict().items())
    # the classifier is dropped: same keys as the bare backbone, output = features
    assert set(out.state_dict()) == set(init)
    assert out(torch.zeros(2, 3, 16, 16)).shape == (2, net.num_features)
    files = list(P.cache_path("x").parent.glob("pretrain-*.pt"))
    assert len(files) == 1

    # a second identical call loads and never trains
    def boom(*a, **k):
        raise AssertionError("retrained although cached")

    monkeypatch.setattr(P, "_train", boom)
    again = P.pretrain(_net(), src, epochs=2, batch_size=16, device="cpu", progress=False)
    assert _state_equal(again, out) and not again.training
    # any change of configuration is a different key (and would train)
    with pytest.raises(AssertionError, match="retrained"):
        P.pretrain(_net(), src, epochs=2, batch_size=16, lr=0.01, device="cpu", progress=False)
    with pytest.raises(AssertionError, match="retrained"):
        P.pretrain(_net(seed=1), src, epochs=2, batch_size=16, device="cpu", progress=False)


def test_pretrain_is_deterministic_without_cache():
    src = _tiny_source()
    a = P.pretrain(_net(), src, epochs=1, batch_size=16, aug_level=5, device="cpu",
                   cache=False, progress=False)
    b = P.pretrain(_net(), src, epochs=1, batch_size=16, aug_level=5, device="cpu",
                   cache=False, progress=False)
    assert _state_equal(a, b)
    assert not list(P.cache_path("x").parent.glob("pretrain-*.pt"))


def test_config_hash_depends_on_data_and_weights():
    src = _tiny_source()
    k0 = P.config_hash(_net(), src, lr=0.1)
    assert P.config_hash(_net(), src, lr=0.1) == k0
    assert P.config_hash(_net(), src, lr=0.2) != k0
    assert P.config_hash(_net(seed=3), src, lr=0.1) != k0
    other = TensorDataset(src.x.clone(), src.y.clone(), src.classes)
    other.x[0, 0, 0, 0] ^= 1
    assert P.config_hash(_net(), other, lr=0.1) != k0


def test_pretrain_ce_learns_digits():
    src = class_subset(digits("train"), range(5))
    net = P.pretrain(_net(), src, epochs=4, batch_size=64, lr=0.1, device="cpu",
                     cache=False, progress=False)
    # features are discriminative: a nearest-class-mean classifier on them beats chance by far
    from nclab.data import batches

    with torch.no_grad():
        h = torch.cat([net(x) for x, _ in batches(src, 256)])
    mu = torch.stack([h[src.y == k].mean(0) for k in range(5)])
    acc = (torch.cdist(h, mu).argmin(1) == src.y).float().mean().item()
    assert acc > 0.6, acc


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(epochs=0), "epochs"),
        (dict(epochs=1, aug_level=6), "aug_level"),
        (dict(epochs=1, loss="hinge"), "loss"),
        (dict(epochs=1, proj_head_layers=4), "proj_head_layers"),
        (dict(epochs=1, adversarial_eps=-1), "1/255"),
        (dict(epochs=1, temperature=0), "temperature"),
        (dict(epochs=1, loss="supcon", adversarial_eps=2), "supcon"),
    ],
)
def test_pretrain_rejects_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        P.pretrain(_net(), _tiny_source(), device="cpu", progress=False, **kwargs)


def test_pretrain_rejects_non_tensor_dataset():
    with pytest.raises(ValueError, match="TensorDataset"):
        P.pretrain(_net(), [(torch.zeros(3, 8, 8), 0)], epochs=1, progress=False)
