"""Backbone registry, fine-tuning units and weight loading (random init, offline)."""

from __future__ import annotations

import time

import pytest
import torch
import torchvision
from torch import nn

from nclab import models as M

# name -> (input size, expected number of units, expected unit names (first, last), num_features)
EXPECTED = {
    "resnet18": (64, 8, ("layer1.0", "layer4.1"), 512),
    "resnet34": (64, 16, ("layer1.0", "layer4.2"), 512),
    "resnet50": (64, 16, ("layer1.0", "layer4.2"), 2048),
    "densenet121": (64, 4, ("features.denseblock1", "features.denseblock4"), 1024),
    "densenet169": (64, 4, ("features.denseblock1", "features.denseblock4"), 1664),
    "densenet201": (64, 4, ("features.denseblock1", "features.denseblock4"), 1920),
    "mobilenet_v2": (64, 17, ("features.1", "features.17"), 1280),
    "googlenet": (64, 9, ("inception3a", "inception5b"), 1024),
    "vit_b32": (64, 12, ("blocks.0", "blocks.11"), 768),
    "clip_vit_b32": (64, 12, ("transformer.resblocks.0", "transformer.resblocks.11"), 768),
    "convnet_s": (32, 4, ("features.0", "features.3"), 32),
    "resnet_s": (32, 3, ("layer1.0", "layer3.0"), 64),
    "resnet20": (32, 9, ("layer1.0", "layer3.2"), 64),
    "resnet32": (32, 15, ("layer1.0", "layer3.4"), 64),
    "resnet44": (32, 21, ("layer1.0", "layer3.6"), 64),
    "resnet56": (32, 27, ("layer1.0", "layer3.8"), 64),
    # the CIFAR-10 zoo (nclab.zoo): every conv / hidden linear layer of the plain CNNs, the
    # residual blocks (+ linear1) of the ResNets
    "pyhessian_resnet20": (32, 9, ("layer1.0", "layer3.2"), 64),
    "captum_lenet": (32, 4, ("conv1", "fc2"), 84),
    "oval_base": (32, 3, ("0", "5"), 100),
    "oval_deep": (32, 5, ("0", "9"), 100),
    "marabou_large": (32, 4, ("0", "7"), 64),
    "abcrown_resnet2b": (32, 3, ("layer1.0", "linear1"), 100),
    "abcrown_resnet4b": (32, 5, ("layer1.0", "linear1"), 100),
    **{n: (32, 3, ("0", "5"), 100) for n in (
        "convex_small_linf8", "convex_small_l2_36", "oval_wide", "sdp_cnn_a_adv", "sdp_cnn_a_adv4",
        "sdp_cnn_a_adv_alt", "sdp_cnn_a_mix", "sdp_cnn_a_mix4", "eran_conv_small_pgd",
        "eran_conv_small_sigmoid")},
    **{n: (32, 4, ("0", "7"), 64) for n in ("marabou_small", "marabou_medium")},
}


pytestmark = pytest.mark.usefixtures("one_thread")


# the ViTs are built for 64-px inputs (4 patches) to keep CPU tests fast; units do not change
SMALL = {"vit_b32": {"img_size": 64}, "clip_vit_b32": {"force_image_size": 64}}


@pytest.fixture(scope="module")
def zoo() -> dict[str, nn.Module]:
    torch.manual_seed(0)
    return {name: M.load_backbone(name, pretrained=False, **SMALL.get(name, {}))
            for name in EXPECTED}


@pytest.mark.parametrize("depth,params", [(20, 0.27), (32, 0.46), (44, 0.66), (56, 0.85)])
def test_cifar_resnets_are_he_et_al(zoo, depth, params):
    """He et al. (2016, Table 6): 0.27M / 0.46M / 0.66M / 0.85M parameters (with the 650-weight
    classifier); option-A shortcuts have no parameters; the paper's block is the first of stage 3."""
    model = zoo[f"resnet{depth}"]
    n = (depth - 2) // 6
    count = sum(p.numel() for p in model.parameters()) + 64 * 10 + 10
    assert round(count / 1e6, 2) == params
    shortcuts = [m for m in model.modules() if isinstance(m, M.PadShortcut)]
    assert len(shortcuts) == 2 and all(not list(s.parameters()) for s in shortcuts)
    assert M.blocks(model)[M.default_block(model) - 1][0] == "layer3.0"
    assert M.default_block(model) == 2 * n + 1
    x = torch.randn(2, 16, 32, 32)
    out = shortcuts[0](x)  # option A: stride-2 subsample, 8 zero channels on each side
    assert out.shape == (2, 32, 16, 16)
    assert torch.equal(out[:, 8:24], x[:, :, ::2, ::2]) and not out[:, :8].any()
    assert not out[:, 24:].any()
    with pytest.raises(ValueError, match="6n\\+2"):
        M.cifar_resnet(21)
    with pytest.raises(ValueError, match="takes no constructor options"):
        M.load_backbone("resnet20", pretrained=False, width=8)


def test_registry_is_covered():
    assert set(EXPECTED) == set(M.BACKBONES)


@pytest.mark.parametrize("name", list(EXPECTED))
def test_backbone_forward_blocks_and_steps(zoo, name):
    model = zoo[name]
    size, n_units, (first, last), d = EXPECTED[name]
    assert not model.training, "load_backbone returns eval mode"
    assert M.feature_dim(model) == d
    units = M.blocks(model)
    assert len(units) == n_units
    assert units[0][0] == first and units[-1][0] == last
    named = dict(model.named_modules())
    for k, (qual, mod) in enumerate(units, start=1):
        assert named[qual] is mod, f"Block {k} name {qual} is not the module it maps to"
    assert len({id(m) for _, m in units}) == n_units
    x = torch.randn(1, 3, size, size)
    with torch.no_grad():
        y = model(x)
        z = x
        for _, step in M._steps(model):
            z = step(z)
    assert y.shape == (1, d)
    # the step decomposition (used by finetune.split) is the model's own forward, bit for bit
    assert torch.equal(y, z)
    step_names = [n for n, _ in M._steps(model) if n is not None]
    assert step_names == [n for n, _ in units]
    # the static width of every unit equals its real output width
    outs = {}
    hooks = [mod.register_forward_hook(lambda _m, _i, o, q=q: outs.__setitem__(q, o))
             for q, mod in units]
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    fam = M.family(model)
    for q, mod in units:
        width = outs[q].shape[1] if outs[q].dim() == 4 else outs[q].shape[-1]
        assert M._block_width(fam, mod) == width, q


def test_paper_block_numbers(zoo):
    r18, r50, r34 = zoo["resnet18"], zoo["resnet50"], zoo["resnet34"]
    assert M.blocks(r18)[5 - 1] == ("layer3.0", r18.layer3[0])
    assert M.blocks(r50)[8 - 1] == ("layer3.0", r50.layer3[0])
    assert M.blocks(r34)[8 - 1] == ("layer3.0", r34.layer3[0])
    assert M.default_block(r18) == 5 and M.default_block(r50) == 8 and M.default_block(r34) == 8
    vit, clip = zoo["vit_b32"], zoo["clip_vit_b32"]
    assert M.blocks(vit)[8 - 1][1] is vit.blocks[7]
    assert M.blocks(clip)[8 - 1][1] is clip.transformer.resblocks[7]
    assert M.default_block(vit) == 8 and M.default_block(clip) == 8
    mbv2 = zoo["mobilenet_v2"]
    assert all(M.blocks(mbv2)[k - 1][1] is mbv2.features[k] for k in range(1, 18))
    dn = zoo["densenet121"]
    assert [len(b) for _, b in M.blocks(dn)] == [6, 12, 24, 16]  # DenseNet-121's dense layers
    assert [n for n, _ in M.blocks(zoo["googlenet"])] == [
        "inception3a", "inception3b", "inception4a", "inception4b", "inception4c",
        "inception4d", "inception4e", "inception5a", "inception5b"]
    with pytest.raises(ValueError, match="block="):
        M.default_block(dn)


def test_plain_timm_and_torchvision_models():
    import timm

    tv = torchvision.models.resnet18()
    assert [n for n, _ in M.blocks(tv)][4] == "layer3.0"
    M.strip_classifier(tv)
    assert isinstance(tv.fc, nn.Identity) and tv.num_features == 512
    t50 = timm.create_model("resnet50", pretrained=False)
    assert M.family(t50) == "timm_resnet" and M.blocks(t50)[7][1] is t50.layer3[0]
    M.strip_classifier(t50).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        z = x
        for _, step in M._steps(t50):
            z = step(z)
        assert torch.equal(t50(x), z) and z.shape == (1, 2048)
    dn = timm.create_model("densenet121", pretrained=False)
    assert M.family(dn) == "timm_densenet" and len(M.blocks(dn)) == 4


def test_unknown_names_and_families():
    with pytest.raises(ValueError, match="registered: resnet18"):
        M.load_backbone("resnet9000", pretrained=False)
    with pytest.raises(TypeError, match="Supported: torchvision ResNet"):
        M.blocks(nn.Sequential(nn.Linear(2, 2)))
    with pytest.raises(ValueError, match="nclab.pretrain"):
        M.load_backbone("convnet_s")  # small nets have no downloadable weights
    m = M.load_backbone("resnet_s", pretrained=False, width=8, depths=(2, 1, 1))
    assert [n for n, _ in M.blocks(m)] == ["layer1.0", "layer1.1", "layer2.0", "layer3.0"]


def test_weights_file_with_and_without_classifier(tmp_path):
    torch.manual_seed(1)
    full = torchvision.models.resnet18()
    torch.save(full.state_dict(), tmp_path / "with_fc.pth")
    m = M.load_backbone("resnet18", weights=tmp_path / "with_fc.pth")
    assert torch.equal(m.layer3[0].conv1.weight, full.layer3[0].conv1.weight)
    sd = {k: v for k, v in full.state_dict().items() if not k.startswith("fc.")}
    torch.save({"state_dict": {f"module.{k}": v for k, v in sd.items()}}, tmp_path / "bare.pth")
    m2 = M.load_backbone("resnet18", weights=str(tmp_path / "bare.pth"))
    assert torch.equal(m2.layer4[1].bn2.running_var, full.layer4[1].bn2.running_var)
    with pytest.raises(ValueError, match="missing keys"):
        M.load_backbone("resnet34", weights=tmp_path / "with_fc.pth")
    with pytest.raises(FileNotFoundError):
        M.load_backbone("resnet18", weights=tmp_path / "nope.pth")
    # a pickled module is refused (weights_only=True)
    torch.save(full, tmp_path / "pickled.pth")
    with pytest.raises(ValueError, match="weights_only"):
        M.load_backbone("resnet18", weights=tmp_path / "pickled.pth")


def test_weights_densenet_old_keys_and_googlenet_aux(tmp_path):
    dn = torchvision.models.densenet121()
    sd = dn.state_dict()
    old = {k.replace("norm1.", "norm.1.").replace("conv1.", "conv.1.")
           if "denselayer" in k else k: v for k, v in sd.items()}
    assert old.keys() != sd.keys()
    torch.save(old, tmp_path / "dn.pth")
    m = M.load_backbone("densenet121", weights=tmp_path / "dn.pth")
    layer = m.features.denseblock2.denselayer3
    assert torch.equal(layer.conv1.weight, dn.features.denseblock2.denselayer3.conv1.weight)
    g = torchvision.models.googlenet(aux_logits=True, init_weights=True)
    torch.save(g.state_dict(), tmp_path / "g.pth")
    mg = M.load_backbone("googlenet", weights=tmp_path / "g.pth")
    assert torch.equal(mg.inception4a.branch1.conv.weight, g.inception4a.branch1.conv.weight)
    assert mg.aux1 is None and isinstance(mg.fc, nn.Identity)


def test_weights_clip_full_model_state_dict(tmp_path):
    import open_clip

    clip = open_clip.create_model("ViT-B-32", pretrained=None, force_quick_gelu=True)
    torch.save(clip.state_dict(), tmp_path / "clip.bin")  # text tower too, keys visual.*
    m = M.load_backbone("clip_vit_b32", weights=tmp_path / "clip.bin")
    assert m.proj is None and m.num_features == 768
    assert torch.equal(m.transformer.resblocks[3].mlp.c_fc.weight,
                       clip.visual.transformer.resblocks[3].mlp.c_fc.weight)
    mp = M.load_backbone("clip_vit_b32", weights=tmp_path / "clip.bin", projection=True)
    assert mp.num_features == 512 and torch.equal(mp.proj, clip.visual.proj)


def test_offline_pretrained_fails_fast_with_instructions(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    hub_dir = torch.hub.get_dir()
    torch.hub.set_dir(str(tmp_path / "hub"))
    try:
        for name, needle in [("resnet50", "download.pytorch.org/models/resnet50"),
                             ("vit_b32", "timm/vit_base_patch32_224"),
                             ("clip_vit_b32", "timm/vit_base_patch32_clip_224.openai")]:
            t0 = time.perf_counter()
            with pytest.raises(M.WeightsUnavailableError) as err:
                M.load_backbone(name)
            assert time.perf_counter() - t0 < 10
            msg = str(err.value)
            assert needle in msg and "weights=" in msg and "pretrained=False" in msg
        # without HF_HUB_OFFLINE, an unreachable host also fails fast (probe patched)
        monkeypatch.delenv("HF_HUB_OFFLINE")
        monkeypatch.setattr(M, "_reachable", lambda *a, **k: False)
        with pytest.raises(M.WeightsUnavailableError, match="unreachable"):
            M.load_backbone("resnet18")
        # a checkpoint already in the torch hub cache loads offline
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
        url, cached = M._tv_source("resnet18", "IMAGENET1K_V1")
        cached.parent.mkdir(parents=True, exist_ok=True)
        ref = torchvision.models.resnet18()
        torch.save(ref.state_dict(), cached)
        m = M.load_backbone("resnet18")
        assert torch.equal(m.conv1.weight, ref.conv1.weight) and url.endswith(cached.name)
    finally:
        torch.hub.set_dir(hub_dir)


def test_normalization_of_every_registry_backbone():
    """(mean, std) after scaling pixels to [0, 1]: ImageNet's for torchvision, akamaster's CIFAR
    ResNets and the small nets; timm's / open_clip's own configs; each zoo net's own."""
    from nclab.data import IMAGENET_MEAN, IMAGENET_STD

    for name in M.BACKBONES:
        mean, std = M.normalization(name)
        assert len(mean) == len(std) == 3 and min(std) > 0, name
    for name in ("resnet50", "densenet121", "googlenet", "resnet20", "resnet56", "convnet_s"):
        assert M.normalization(name) == (IMAGENET_MEAN, IMAGENET_STD)
    assert M.normalization("vit_b32") == ((0.5,) * 3, (0.5,) * 3)  # timm augreg weights
    assert M.normalization("clip_vit_b32")[0][0] == pytest.approx(0.4815, abs=1e-4)
    assert M.normalization("marabou_large") == ((0.0,) * 3, (1.0,) * 3)  # raw pixels
    assert M.normalization("pyhessian_resnet20")[1] == (0.2023, 0.1994, 0.201)
    with pytest.raises(ValueError, match="unknown backbone"):
        M.normalization("resnet9000")
