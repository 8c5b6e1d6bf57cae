"""Fine-tuning methods: which parameters train, what the forward computes, Table 3's counts.

Random-init models, CPU, 32-px inputs (the ViTs are resized to 32 px: 1 patch + CLS) and
batches of 2, to keep the file fast on a shared CPU.
"""

from __future__ import annotations

import contextlib
import copy

import pytest
import timm
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from nclab import finetune as FT
from nclab import models as M

SIZE = 32


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def zoo() -> dict[str, tuple[nn.Module, int]]:
    """family -> (backbone, block used by the block methods). Small members of each family (the
    same classes as the registry models, so the same code paths) keep the file fast on CPU; the
    registry's full-size models are covered by tests/test_models.py and the Table 3 counts below."""
    from open_clip.transformer import VisionTransformer

    torch.manual_seed(0)
    dense = torchvision.models.DenseNet(growth_rate=8, block_config=(2, 2, 2, 2),
                                        num_init_features=16, bn_size=2)
    clip = VisionTransformer(image_size=SIZE, patch_size=16, width=64, layers=4, heads=2,
                             mlp_ratio=4.0, output_dim=32)
    return {
        "resnet": (M.load_backbone("resnet18", pretrained=False), 5),
        "densenet": (M.strip_classifier(dense).eval(), 3),
        "mobilenet_v2": (M.load_backbone("mobilenet_v2", pretrained=False), 14),
        "vit": (timm.create_model("vit_tiny_patch16_224", img_size=SIZE, num_classes=0).eval(), 8),
        "clip": (M.strip_classifier(clip).eval(), 3),
    }


def _expected_trainable(m: FT.FineTuned) -> set[str]:
    names = {n for n, _ in m.named_parameters()}
    head = {n for n in names if n.startswith("head.")}
    block = {n for n in names if m.block_name and n.startswith(f"backbone.{m.block_name}.")}
    if m.method in ("linear", "mlp"):
        return head
    if m.method in ("layer", "scl"):
        return head | block
    if m.method == "full":
        return names
    return head | {n for n in block if ".lora_A." in n or ".lora_B." in n}


def _batch(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(2, 3, SIZE, SIZE, generator=g), torch.tensor([0, 2])


def _first_bn(model: nn.Module) -> nn.Module | None:
    return next((m for m in model.modules() if isinstance(m, nn.BatchNorm2d)), None)


@pytest.mark.filterwarnings("ignore:layer_lora")  # CLIP's attention gets no LoRA (tested below)
@pytest.mark.parametrize("fam", ["resnet", "densenet", "mobilenet_v2", "vit", "clip"])
@pytest.mark.parametrize("method", FT.METHODS)
def test_method_trains_exactly_its_parameters(zoo, fam, method):
    backbone, k = zoo[fam]
    if method == "mlp" and fam != "resnet":
        pytest.skip("kept few on CPU: the MLP head does not depend on the family")
    torch.manual_seed(0)
    m = FT.prepare(backbone, method, block=k, num_classes=3, lora_rank=8)
    assert m.training and m.method == method
    assert m.block == (k if method in FT.BLOCK_METHODS else None)
    if method in FT.BLOCK_METHODS:
        assert m.block_name == M.blocks(backbone)[k - 1][0]
    trainable = {n for n, p in m.named_parameters() if p.requires_grad}
    assert trainable == _expected_trainable(m) and trainable
    # the backbone given to prepare() is untouched (prepare works on a copy)
    assert all(p.requires_grad for p in backbone.parameters())
    assert not any("lora_" in n for n, _ in backbone.named_parameters())

    before = {n: p.detach().clone() for n, p in m.named_parameters()}
    bn = _first_bn(m.backbone)
    bn_before = bn.running_mean.clone() if bn is not None else None
    opt = torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=0.1)
    x, y = _batch()
    for _ in range(2 if method == "layer_lora" else 1):  # LoRA's A moves once B != 0
        opt.zero_grad()
        F.cross_entropy(m(x), y).backward()
        opt.step()
    bn_biases = {f"{q}.bias" for q, mod in m.named_modules() if isinstance(mod, nn.BatchNorm2d)}
    for n, p in m.named_parameters():
        if n in trainable:
            assert p.grad is not None, f"trainable {n} got no gradient"
            if torch.equal(p, before[n]):
                # the one legitimate exception: a BatchNorm shift that only feeds (conv ->
                # train-mode BatchNorm) paths, which subtract it again, has an exactly zero gradient
                # (MobileNetV2's linear bottlenecks)
                assert n in bn_biases and p.grad.abs().max() < 1e-6, f"trainable {n} did not move"
        else:
            assert torch.equal(p, before[n]), f"frozen {n} changed"
    if bn is not None:  # BatchNorm statistics update on the downstream data, frozen or not
        assert not torch.equal(bn.running_mean, bn_before)


@pytest.mark.parametrize("fam", ["resnet", "densenet", "mobilenet_v2", "vit", "clip"])
def test_scl_forward_by_hand(zoo, fam):
    backbone, k = zoo[fam]
    m = FT.prepare(backbone, "scl", block=k, num_classes=5).eval()
    x, _ = _batch(1)
    outs = []
    hook = m.block_module().register_forward_hook(lambda _m, _i, o: outs.append(o))
    with torch.no_grad():
        h = m.backbone(x)  # penultimate features
        hook.remove()
        z = outs[0]
        pooled = z.mean(dim=(2, 3)) if z.dim() == 4 else z[:, 0]  # CNN average; ViT/CLIP: CLS
        assert pooled.shape[1] <= h.shape[1]
        pad = torch.cat([pooled, torch.zeros(len(x), h.shape[1] - pooled.shape[1])], dim=1)
        want = m.head(h + pad)
        got = m(x)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert pooled.abs().max() > 0, "the skip must carry the block's output"
    with torch.no_grad():
        torch.testing.assert_close(m.features(x), h + pad, rtol=1e-5, atol=1e-6)
    # Layer FT on the same weights has no skip
    layer = FT.prepare(m.backbone, "layer", block=k, num_classes=5).eval()
    layer.head.load_state_dict(m.head.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(layer(x), m.head(h))


@pytest.mark.parametrize("fam,expected", [
    ("resnet", {"conv1", "conv2", "downsample.0"}),
    ("densenet", None),
    ("mobilenet_v2", {"conv.0.0", "conv.2"}),  # the depthwise conv (groups > 1) is skipped
    ("vit", {"attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2"}),
    ("clip", {"mlp.c_fc", "mlp.c_proj"}),  # nn.MultiheadAttention is skipped (see finetune)
])
def test_lora_only_in_the_chosen_block(zoo, fam, expected):
    backbone, k = zoo[fam]
    warns = pytest.warns(UserWarning, match="MultiheadAttention") if fam == "clip" else (
        contextlib.nullcontext())
    with warns:
        m = FT.prepare(backbone, "layer_lora", block=k, num_classes=3, lora_rank=4).eval()
    prefix = f"backbone.{m.block_name}."
    inserted = FT.lora_modules(m)
    assert inserted and all(n.startswith(prefix) for n in inserted)
    if expected is None:  # DenseNet: both convolutions of every dense layer of the block
        n_layers = len(m.block_module())  # 2 dense layers here
        assert len(inserted) == 2 * n_layers
    else:
        assert {n[len(prefix):] for n in inserted} == expected
    lora_params = [n for n, _ in m.named_parameters() if "lora_" in n]
    assert lora_params and all(n.startswith(prefix) for n in lora_params)
    # LoRA starts at B = 0: the adapted backbone computes the same features as before
    x, _ = _batch(2)
    with torch.no_grad():
        torch.testing.assert_close(m.backbone(x), backbone(x), rtol=1e-5, atol=1e-5)


# Table 3, "% params trained" (the paper, Li et al. 2024): ResNet-50 Block 8, ViT-B/32 Layer 8
TABLE3 = {
    "resnet50": {10: (0.09, 8.23, 6.52), 100: (0.86, 8.56, 7.24), 47: (0.41, 8.37, 6.82),
                 37: (0.32, 8.33, 6.73)},
    "vit_base_patch32_224": {100: (0.09, 1.00, 8.18), 47: (0.04, 0.94, 8.14),
                             37: (0.03, 0.93, 8.13)},
}


def _table3_row(model: nn.Module, K: int, copy: bool = True) -> list[float]:
    return [FT.trainable_percent(FT.prepare(model, meth, block=8, num_classes=K, copy=copy))
            for meth in ("linear", "mlp", "layer", "scl", "full")]


@pytest.mark.parametrize("arch", list(TABLE3))
def test_table3_percentages(arch):
    # parameter counts depend on shapes only: timm models on the meta device (no memory, no init)
    # give the same counts as random-init ones (checked below) in a fraction of the time
    with torch.device("meta"):
        model = timm.create_model(arch, pretrained=False)  # with its 1000-way classifier
    for K, (lin, mlp, layer) in TABLE3[arch].items():
        got = _table3_row(model, K)
        for g, want in zip(got, (lin, mlp, layer, layer, 100.0)):
            assert abs(g - want) <= 0.02, (arch, K, got)
    assert isinstance(model.get_classifier(), nn.Linear)  # the caller's model is untouched


def test_table3_counts_on_random_init_models():
    torch.manual_seed(0)
    r50_timm = timm.create_model("resnet50", pretrained=False)
    r50_tv = M.load_backbone("resnet50", pretrained=False)  # our registry: the same counts
    with torch.device("meta"):
        r50_meta = timm.create_model("resnet50", pretrained=False)
    want = _table3_row(r50_meta, 100)
    assert _table3_row(r50_tv, 100, copy=False) == want
    assert _table3_row(r50_timm, 100, copy=False) == want
    vit = timm.create_model("vit_base_patch32_224", pretrained=False)
    got = FT.trainable_percent(FT.prepare(vit, "layer", block=8, num_classes=100, copy=False))
    assert abs(got - 8.18) <= 0.02


def test_trainable_percent_counts_by_hand():
    tv = torchvision.models.resnet18()  # a plain classification model: its fc is replaced
    n_backbone = sum(p.numel() for n, p in tv.named_parameters() if not n.startswith("fc."))
    m = FT.prepare(tv, "linear", num_classes=10)
    head = 512 * 10 + 10
    assert FT.trainable_percent(m) == pytest.approx(100 * head / (n_backbone + head))
    assert isinstance(m.backbone.fc, nn.Identity) and isinstance(tv.fc, nn.Linear)
    lora = FT.prepare(tv, "layer_lora", num_classes=10, lora_rank=2)
    n_lora = sum(p.numel() for n, p in lora.named_parameters() if "lora_" in n)
    # layer3.0 of ResNet-18: conv1 128->256 3x3, conv2 256->256 3x3, downsample 128->256 1x1
    # peft's conv LoRA: A = Conv(in -> r, same kernel), B = Conv(r -> out, 1x1)
    assert n_lora == 2 * (128 * 9 + 256) + 2 * (256 * 9 + 256) + 2 * (128 + 256)
    assert FT.trainable_percent(lora) == pytest.approx(
        100 * (head + n_lora) / (n_backbone + head + n_lora))


def test_describe_table(zoo):
    backbone, k = zoo["resnet"]
    m = FT.prepare(backbone, "layer", block=k, num_classes=10)
    df = FT.describe(m)
    assert list(df.columns) == ["module", "params", "trainable_params", "trainable", "percent",
                                "trainable_percent"]
    total = df[df.module == "total"].iloc[0]
    assert total.params == sum(p.numel() for p in m.parameters())
    assert df[df.module != "total"].params.sum() == total.params
    tuned = df[df.module.str.contains("tuned")]
    assert list(tuned.module) == ["Block 5: layer3.0 (tuned)"] and tuned.iloc[0].trainable == "yes"
    assert df[df.module == "head"].iloc[0].trainable == "yes"
    assert total.trainable_percent == round(FT.trainable_percent(m), 2)
    lora = FT.describe(FT.prepare(backbone, "layer_lora", block=k, num_classes=10, lora_rank=2))
    assert lora[lora.module.str.contains("tuned")].iloc[0].trainable == "partly"


def test_norm_layers_follow_train_mode_and_freeze_norm(zoo):
    backbone, _ = zoo["resnet"]
    x, _ = _batch(3)
    m = FT.prepare(backbone, "linear", num_classes=3)
    m.train()
    assert m.backbone.bn1.training  # train() is not overridden: BN updates on downstream data
    m.eval()
    assert not any(mod.training for mod in m.modules())
    f = FT.prepare(backbone, "layer", num_classes=3, freeze_norm=True)
    f.train()
    assert f.training and f.head.training
    assert not any(mod.training for mod in f.modules() if isinstance(mod, nn.BatchNorm2d))
    stats = f.backbone.layer3[0].bn1.running_mean.clone()
    f(x)
    assert torch.equal(stats, f.backbone.layer3[0].bn1.running_mean)
    assert f.backbone.layer3[0].bn1.weight.requires_grad  # affine params still follow the method


@pytest.mark.filterwarnings("ignore:layer_lora")
@pytest.mark.parametrize("name", ["resnet18", "resnet_s", "convnet_s", "densenet121",
                                  "mobilenet_v2", "googlenet", "vit_b32", "clip_vit_b32"])
def test_split_is_exact(zoo, name):
    if name == "vit_b32":  # the small members of the ViT families (same classes)
        backbone = zoo["vit"][0]
    elif name == "clip_vit_b32":
        backbone = zoo["clip"][0]
    elif name == "resnet18":
        backbone = zoo["resnet"][0]
    elif name in ("densenet121", "mobilenet_v2"):
        backbone = zoo["densenet" if name.startswith("dense") else name][0]
    else:
        backbone = M.load_backbone(name, pretrained=False)
    size = SIZE
    x = torch.randn(2, 3, size, size)
    if name == "googlenet":
        x = torch.randn(2, 3, 64, 64)
    n_units = len(M.blocks(backbone))
    for method, k in [("scl", n_units - 1), ("layer", 2), ("linear", None), ("layer_lora", 1)]:
        m = FT.prepare(backbone, method, block=k, num_classes=4, lora_rank=2).eval()
        prefix, suffix = FT.split(m)
        assert not any(p.requires_grad for p in prefix.parameters())
        trainable = {id(p) for p in m.parameters() if p.requires_grad}
        assert trainable == {id(p) for p in suffix.parameters() if p.requires_grad}
        with torch.no_grad():
            assert torch.equal(suffix(prefix(x)), m(x)), (name, method)
    with pytest.raises(ValueError, match="no frozen prefix"):
        FT.split(FT.prepare(backbone, "full", num_classes=4))


def test_split_freeze_norm_suffix_keeps_bn_in_eval(zoo):
    m = FT.prepare(zoo["resnet"][0], "scl", num_classes=3, freeze_norm=True)
    prefix, suffix = FT.split(m)
    suffix.train()
    assert suffix.training and not any(
        mod.training for mod in suffix.modules() if isinstance(mod, nn.BatchNorm2d))


def test_bad_input(zoo):
    backbone, _ = zoo["resnet"]
    with pytest.raises(ValueError, match=r"1\.\.8"):
        FT.prepare(backbone, "layer", block=9, num_classes=3)
    with pytest.raises(ValueError, match=r"1\.\.8"):
        FT.prepare(backbone, "scl", block=0, num_classes=3)
    with pytest.raises(ValueError, match="valid methods: linear, mlp, layer, scl, full, layer_lora"):
        FT.prepare(backbone, "lora", num_classes=3)
    with pytest.raises(ValueError, match="num_classes"):
        FT.prepare(backbone, "linear")
    with pytest.raises(ValueError, match="pool="):
        FT.prepare(backbone, "scl", num_classes=3, pool="cls")
    with pytest.raises(ValueError, match="block="):
        FT.prepare(zoo["densenet"][0], "layer", num_classes=3)  # no paper default for DenseNet
    with pytest.raises(TypeError, match="Supported"):
        FT.prepare(nn.Sequential(nn.Conv2d(3, 4, 3)), "linear", num_classes=3)
    m = FT.prepare(backbone, "linear", num_classes=3)
    with pytest.raises(ValueError, match="already prepared"):
        FT.prepare(m, "layer", num_classes=3)


def test_scl_wider_block_than_penultimate_is_refused(zoo):
    # a CLIP tower that keeps its projection (load_backbone(..., projection=True)): every layer
    # (64 wide here, 768 for ViT-B/32) is wider than the projected feature (32 here, 512)
    clip = copy.deepcopy(zoo["clip"][0])
    clip.proj = nn.Parameter(torch.randn(64, 32) / 8)
    clip.num_features = clip.output_dim = 32
    with pytest.raises(ValueError, match=r"64 output features.*32 features.*zero-pad"):
        FT.prepare(clip, "scl", block=3, num_classes=3, copy=False)
    FT.prepare(clip, "layer", block=3, num_classes=3)  # fine without the skip
    FT.prepare(zoo["clip"][0], "scl", block=3, num_classes=3)  # ... and without the projection


def test_head_follows_the_backbone_dtype_and_is_a_fresh_copy():
    small = M.load_backbone("resnet_s", pretrained=False, width=4).double()
    m = FT.prepare(small, "scl", num_classes=3)
    assert m.head.weight.dtype == torch.float64
    assert m(torch.randn(2, 3, 32, 32, dtype=torch.float64)).shape == (2, 3)
    assert M.blocks(m)[0][0] == "backbone.layer1.0"  # units of a prepared model, by its names
    assert m.backbone.conv1.weight is not small.conv1.weight


def test_truncated_lives_in_finetune_and_is_reexported_by_train() -> None:
    """Issue 23: Truncated is defined in nclab.finetune; nclab.train only re-exports it."""
    import inspect

    import nclab.finetune as ft
    import nclab.train as tr

    assert tr.Truncated is ft.Truncated
    assert ft.Truncated.__module__ == "nclab.finetune"
    assert "import Truncated" not in inspect.getsource(ft)
