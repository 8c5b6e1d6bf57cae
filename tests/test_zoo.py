"""The CIFAR-10 model zoo (nclab.zoo): architectures against the README's parameter counts and key
layout (always), the published files loaded strictly and reproducing the README's accuracy on the
1000 real CIFAR-10 test images (when the mirror is on this machine, found via NCLAB_WEIGHTS)."""

from __future__ import annotations

import time

import pytest
import torch
from torch import nn

from nclab import data, finetune, mirror, models, zoo

pytestmark = pytest.mark.usefixtures("one_thread")

NAMES = list(zoo.ZOO)


def test_nineteen_networks_registered_with_mirror_files():
    assert len(NAMES) == 19
    for name in NAMES:
        assert models.BACKBONES[name].source == "zoo"
        spec = mirror.MIRROR[name]
        assert spec.kind == "weights" and len(spec.sha256) == 64
        assert spec.path.split("/")[-1].startswith(f"{name}-{spec.sha256[:8]}.")
        (url,) = spec.origins
        commit = url.split("/")[5]
        assert url.startswith("https://raw.githubusercontent.com/") and len(commit) == 40
        assert spec.licence in ("MIT", "BSD-3-Clause")


@pytest.mark.parametrize("name", NAMES)
def test_parameter_count_is_the_readme_one(name):
    """Backbone + its 10-way classifier (d x 10 + 10) has the README's parameter count."""
    net = models.load_backbone(name, pretrained=False)
    d = models.feature_dim(net)
    count = sum(p.numel() for p in net.parameters()) + d * 10 + 10
    assert count == zoo.ZOO[name].params
    with torch.no_grad():
        assert net(torch.zeros(2, 3, 32, 32)).shape == (2, d)
    assert models.normalization(name) == (zoo.ZOO[name].mean, zoo.ZOO[name].std)


def test_penultimate_widths_and_units():
    """The input width of the last nn.Linear: 100 for the verification CNNs and ResNet-2B/4B,
    84 for LeNet, 64 for Marabou and ResNet-20; fine-tuning units in forward order."""
    widths = {n: models.feature_dim(models.load_backbone(n, pretrained=False)) for n in NAMES}
    assert widths["captum_lenet"] == 84 and widths["pyhessian_resnet20"] == 64
    assert {widths[n] for n in NAMES if n.startswith("marabou")} == {64}
    assert {widths[n] for n in NAMES if n.startswith(("sdp", "oval", "convex", "eran", "abcrown"))
            } == {100}
    lenet = models.load_backbone("captum_lenet", pretrained=False)
    assert [n for n, _ in models.blocks(lenet)] == ["conv1", "conv2", "fc1", "fc2"]
    with pytest.raises(ValueError, match="block="):
        models.default_block(lenet)
    r20 = models.load_backbone("pyhessian_resnet20", pretrained=False)
    assert models.default_block(r20) == 7  # layer3.0, as for every CIFAR ResNet


@pytest.mark.parametrize("name", ["sdp_cnn_a_adv", "abcrown_resnet4b", "captum_lenet"])
@pytest.mark.parametrize("method", ["layer", "scl", "layer_lora"])
def test_fine_tuning_methods_run_on_zoo_units(name, method):
    torch.manual_seed(0)
    net = models.load_backbone(name, pretrained=False)
    for k in range(1, len(models.blocks(net)) + 1):
        try:
            ft = finetune.prepare(net, method, num_classes=3, block=k)
        except ValueError as err:  # SCL only zero-pads: a unit wider than d is refused
            assert method == "scl" and "zero-pad" in str(err)
            continue
        x = torch.randn(2, 3, 32, 32)
        ft.eval()
        prefix, suffix = finetune.split(ft)  # the cached-prefix decomposition is exact
        with torch.no_grad():
            assert torch.allclose(suffix(prefix(x)), ft(x), atol=1e-6)
        out = ft.train()(x)
        assert out.shape == (2, 3)
        out.sum().backward()
        tuned = [n for n, p in ft.backbone.named_parameters() if p.requires_grad]
        assert tuned, (name, method, k)


def test_missing_file_fails_fast_naming_its_origin(monkeypatch, tmp_path):
    monkeypatch.setenv("NCLAB_WEIGHTS", str(tmp_path))
    monkeypatch.setenv("NCLAB_OFFLINE", "1")
    for name in ("marabou_large", "pyhessian_resnet20"):
        t0 = time.perf_counter()
        with pytest.raises(mirror.MirrorFileMissing) as err:
            models.load_backbone(name)
        assert time.perf_counter() - t0 < 5
        assert mirror.MIRROR[name].origins[0] in str(err.value)
        with pytest.raises(mirror.MirrorFileMissing):
            models.source_classifier(name)


def _have_mirror() -> bool:
    return mirror.is_available("cifar10_2k") and all(mirror.is_available(n) for n in NAMES)


needs_mirror = pytest.mark.skipif(
    not _have_mirror(),
    reason="the zoo's weight files or the real CIFAR-10 are not in the local mirror "
           "(NCLAB_WEIGHTS / NCLAB_DATA; see book/mirror.md)")


@pytest.fixture(scope="module")
def cifar_test() -> tuple[torch.Tensor, torch.Tensor]:
    test = data.load("cifar10_2k", "test")
    return test.x.float() / 255.0, test.y


@needs_mirror
@pytest.mark.parametrize("name", NAMES)
def test_published_file_loads_strictly_and_reproduces_readme_accuracy(name, cifar_test):
    spec = zoo.ZOO[name]
    path = mirror.fetch(name)
    sd = zoo.read_state_dict(path, spec.state_at)  # torch.load(weights_only=True) inside
    backbone, head = models.load_backbone(name), models.source_classifier(name)
    # the architecture + classifier is exactly the file's state dict (strict, same shapes)
    full = nn.Module()
    full.add_module("backbone", models.load_backbone(name, pretrained=False))
    full.add_module("head", head)
    key = next(k for k in sd if k.endswith(".weight") and torch.equal(sd[k], head.weight))
    prefix = key.removesuffix("weight")
    remapped = {(f"head.{k.removeprefix(prefix)}" if k.startswith(prefix) else f"backbone.{k}"): v
                for k, v in sd.items()}
    full.load_state_dict(remapped, strict=True)
    x, y = cifar_test
    with torch.no_grad():
        logits = head(backbone(data.normalize(x, *models.normalization(name))))
    acc = 100 * float((logits.argmax(1) == y).float().mean())
    assert abs(acc - spec.acc) <= 1, f"{name}: {acc:.1f} % vs README {spec.acc} %"
