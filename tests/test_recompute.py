"""Activation recomputation of frozen blocks: same outputs, gradients and BatchNorm statistics as
plain autograd, fewer saved activations, and no trace left on the modules afterwards."""

from __future__ import annotations

import copy

import pytest
import timm
import torch
import torch.nn.functional as F
from torch import nn

from nclab import finetune as FT
from nclab import models as M
from nclab.recompute import activation_bytes, recompute_activations
from nclab.train import fit

pytestmark = pytest.mark.usefixtures("one_thread")


def _net() -> nn.Sequential:
    def block(c: int) -> nn.Sequential:
        return nn.Sequential(nn.Conv2d(c, c, 3, padding=1), nn.BatchNorm2d(c), nn.ReLU(),
                             nn.Dropout(0.3))
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), block(8), block(8), block(8),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 5))


def _step(model: nn.Module, x, y, recompute: list[nn.Module] | None, seed: int = 0):
    torch.manual_seed(seed)  # the same dropout masks in both runs
    model.zero_grad(set_to_none=True)
    if recompute is None:
        loss = F.cross_entropy(model(x), y)
    else:
        with recompute_activations(recompute):
            loss = F.cross_entropy(model(x), y)
    loss.backward()  # outside the with block: the recomputation is bound to the graph
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return loss.detach(), grads


def test_same_loss_grads_and_batchnorm_statistics():
    torch.manual_seed(0)
    a = _net().train()
    for p in [*a[2].parameters(), *a[3].parameters()]:
        p.requires_grad_(False)  # frozen blocks after the trained one
    b = copy.deepcopy(a)
    x, y = torch.randn(6, 3, 8, 8), torch.randint(0, 5, (6,))
    for seed in range(3):
        la, ga = _step(a, x, y, None, seed)
        lb, gb = _step(b, x, y, [b[2], b[3]], seed)
        assert torch.equal(la, lb)
        assert ga.keys() == gb.keys() and ga
        for n in ga:
            torch.testing.assert_close(gb[n], ga[n], rtol=1e-6, atol=1e-7)
    # running statistics were updated once per forward, not again by the recomputation
    for (n, ba), bb in zip(a.named_buffers(), b.buffers()):
        assert torch.equal(ba, bb), n
    assert int(b[2][1].num_batches_tracked) == 3


def test_fewer_saved_activations_and_no_trace_left():
    torch.manual_seed(0)
    net = _net().train()
    for p in [*net[2].parameters(), *net[3].parameters()]:
        p.requires_grad_(False)
    x, y = torch.randn(4, 3, 16, 16), torch.randint(0, 5, (4,))
    plain = activation_bytes(net, x, y)
    keys = list(net.state_dict())
    with recompute_activations([net[2], net[3]]):
        less = activation_bytes(net, x, y)
        assert "forward" in net[2].__dict__
    assert less < 0.7 * plain
    assert all("forward" not in m.__dict__ for m in net.modules())
    assert list(net.state_dict()) == keys


def test_no_grad_runs_plainly_and_bad_input():
    net = _net().eval()
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad(), recompute_activations([net[2]]):
        out = net(x)
    assert torch.equal(out, net(x).detach())
    with pytest.raises(ValueError, match="more than once"):
        with recompute_activations([net[2], net[2]]):
            pass
    with pytest.raises(TypeError, match="nn.Module"):
        with recompute_activations([lambda z: z]):
            pass
    with recompute_activations([net[2]]):
        with pytest.raises(ValueError, match="already has a patched forward"):
            with recompute_activations([net[2]]):
                pass
    assert "forward" not in net[2].__dict__


def _zoo():
    torch.manual_seed(0)
    vit = timm.create_model("vit_tiny_patch16_224", img_size=32, num_classes=0)
    return [("resnet_s", M.load_backbone("resnet_s", pretrained=False, width=8), 1),
            ("vit", vit, 8)]


@pytest.mark.parametrize("method", ["layer", "scl", "layer_lora"])
def test_finetuned_recompute_frozen_gives_the_same_gradients(method):
    for fam, backbone, block in _zoo():
        if method == "layer_lora" and fam == "resnet_s":
            continue  # LoRA targets linear/conv layers; covered on the ViT
        kw = {"lora_rank": 4} if method == "layer_lora" else {}
        plain = FT.prepare(backbone, method, block=block, num_classes=5, **kw)
        light = copy.deepcopy(plain)
        light.recompute_frozen = True
        assert light.frozen_after() and len(light.frozen_after()) == len(M.blocks(backbone)) - block
        x, y = torch.randn(4, 3, 32, 32), torch.randint(0, 5, (4,))
        lp, gp = _step(plain, x, y, None)
        torch.manual_seed(0)
        light.zero_grad(set_to_none=True)
        loss = F.cross_entropy(light(x), y)
        loss.backward()
        assert torch.allclose(loss.detach(), lp, rtol=1e-6), fam
        trained = {n for n, p in light.named_parameters() if p.requires_grad}
        assert trained == set(gp)
        for n, p in light.named_parameters():
            if p.requires_grad:
                torch.testing.assert_close(p.grad, gp[n], rtol=1e-5, atol=1e-6)
        assert activation_bytes(light, x, y) < activation_bytes(plain, x, y)
        for (n, bp), bl in zip(plain.named_buffers(), light.buffers()):
            assert torch.equal(bp, bl), (fam, n)


def test_prepare_flag_and_suffix_from_split():
    _, backbone, block = _zoo()[0]
    with pytest.raises(ValueError, match="recompute_frozen"):
        FT.prepare(backbone, "full", num_classes=5, recompute_frozen=True)
    m = FT.prepare(backbone, "layer", block=block, num_classes=5, freeze_norm=True,
                   recompute_frozen=True)
    assert m.recompute_frozen
    prefix, suffix = FT.split(m)
    assert suffix.recompute_frozen
    x, y = torch.randn(4, 3, 32, 32), torch.randint(0, 5, (4,))
    z = prefix(x).detach()
    plain_suffix = copy.deepcopy(suffix)
    plain_suffix.recompute_frozen = False
    for s in (suffix, plain_suffix):
        s.zero_grad(set_to_none=True)
        F.cross_entropy(s(z), y).backward()
    grads = {n: p.grad for n, p in plain_suffix.named_parameters() if p.grad is not None}
    assert grads
    for n, p in suffix.named_parameters():
        if n in grads:
            torch.testing.assert_close(p.grad, grads[n], rtol=1e-5, atol=1e-6)
    assert activation_bytes(suffix, z, y) < activation_bytes(plain_suffix, z, y)


def test_fit_with_recompute_frozen_matches_plain_fit():
    from nclab.data import synthetic_images

    data = synthetic_images(num_classes=3, per_class=8, size=16, seed=0)
    results = []
    for flag in (False, True):
        torch.manual_seed(0)
        bb = M.load_backbone("resnet_s", pretrained=False, width=8)
        m = FT.prepare(bb, "layer", block=2, num_classes=3, recompute_frozen=flag)
        h = fit(m, data, data, epochs=2, batch_size=8, device="cpu", progress=False, seed=1)
        results.append(h.final)
    assert results[0]["test_acc"] == results[1]["test_acc"]
    assert results[0]["test_loss"] == pytest.approx(results[1]["test_loss"], rel=1e-5)


def test_activation_bytes_by_hand():
    lin = nn.Linear(4, 3)
    x, y = torch.randn(5, 4), torch.randint(0, 3, (5,))
    # x is saved for the weight gradient (5*4 floats); cross-entropy keeps its log-softmax output
    # (5*3), the target (5 int64) and the mean's normaliser (a float scalar); the weight itself is
    # a parameter and not counted
    assert activation_bytes(lin, x, y) == 4 * 5 * 4 + 4 * 5 * 3 + 8 * 5 + 4
    lin.requires_grad_(False)
    assert activation_bytes(lin, x, y) == 0  # nothing needs a gradient: nothing is kept
