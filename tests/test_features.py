"""nclab.features.extract: closed-form taps, pooling rules, hooks removed, custom modules."""

import pytest
import torch
from torch import nn

from nclab.features import extract, pool_tap


class Fn(nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, x):
        return self.fn(x)


class Toy(nn.Module):
    """Taps with closed forms: scale -> 2x (4-D), tokens -> (B, HW, C), pair -> a tuple."""

    def __init__(self):
        super().__init__()
        self.scale = Fn(lambda x: 2 * x)
        self.tokens = Fn(lambda x: x.flatten(2).transpose(1, 2))
        self.pair = Fn(lambda t: (t.sum(1), t))
        self.lin = nn.Linear(3, 3)  # gives the model a parameter (device inference)

    def forward(self, x):
        first, _ = self.pair(self.tokens(self.scale(x)))
        return first + 1


def _data(n=12, bs=5, k=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, 4, 4, generator=g)
    y = torch.arange(n) % k
    return [(x[i:i + bs], y[i:i + bs]) for i in range(0, n, bs)], x, y


def test_closed_form_taps():
    data, x, y = _data()
    feats, labels = extract(Toy(), data, ["scale", "tokens", "pair", "output"],
                            return_features=True, progress=False)
    assert torch.equal(labels, y)
    torch.testing.assert_close(feats["scale"], 2 * x.mean((2, 3)))
    torch.testing.assert_close(feats["tokens"], 2 * x.mean((2, 3)))
    torch.testing.assert_close(feats["pair"], 2 * x.sum((2, 3)))
    torch.testing.assert_close(feats["output"], 2 * x.sum((2, 3)) + 1)
    cls, _ = extract(Toy(), data, ["tokens"], pool="cls", return_features=True, progress=False)
    torch.testing.assert_close(cls["tokens"], 2 * x[:, :, 0, 0])
    assert all(f.dtype == torch.float32 and not f.is_inference() for f in feats.values())


def test_hooks_removed_and_mode_restored():
    model = Toy().train()
    data, _, _ = _data()
    extract(model, data, ["scale", "tokens"], return_features=True, progress=False)
    assert all(not m._forward_hooks for m in model.modules())
    assert model.training
    # also after an error inside the pass
    with pytest.raises(ValueError, match="cls"):
        extract(model, data, ["scale"], pool="cls", return_features=True, progress=False)
    assert all(not m._forward_hooks for m in model.modules())
    # a second call sees only its own taps
    f, _ = extract(model, data, ["pair"], return_features=True, progress=False)
    assert list(f) == ["pair"]


def test_bad_names_and_arguments():
    data, _, _ = _data()
    with pytest.raises(ValueError, match=r"no module 'sclae'.*did you mean \['scale'\]"):
        extract(Toy(), data, ["sclae"], return_features=True, progress=False)
    with pytest.raises(ValueError, match="pool must be"):
        extract(Toy(), data, ["scale"], pool="max", return_features=True, progress=False)
    with pytest.raises(ValueError, match="duplicates"):
        extract(Toy(), data, ["scale", "scale"], return_features=True, progress=False)
    shared = nn.Sequential(nn.Conv2d(3, 3, 1), nn.ReLU())
    twice = nn.Module()
    twice.block = shared
    twice.forward = lambda x: shared(shared(x)).mean((2, 3))
    with pytest.raises(ValueError, match="more than once"):
        extract(twice, data, ["block"], return_features=True, progress=False)


class SeqFirst(nn.Module):
    """A transformer stage that works on (T, B, D) and says so, as older open_clip did."""

    batch_first = False

    def __init__(self, d=6):
        super().__init__()
        self.embed = nn.Linear(3, d)
        self.block = Fn(lambda t: t * 3)

    def forward(self, x):  # x (B, 3, H, W) -> tokens (T = H*W, B, d)
        t = self.embed(x.flatten(2).permute(2, 0, 1))
        return self.block(t).mean(0)


def test_sequence_first_layout():
    # T == B == 4 makes the shape alone ambiguous: the batch_first flag decides
    x = torch.randn(4, 3, 2, 2)
    y = torch.arange(4)
    model = SeqFirst()
    feats, _ = extract(model, [(x, y)], ["block"], return_features=True, progress=False)
    with torch.no_grad():
        t = 3 * model.embed(x.flatten(2).permute(2, 0, 1))  # (T, B, d)
    torch.testing.assert_close(feats["block"], t.mean(0))
    cls, _ = extract(model, [(x, y)], ["block"], pool="cls", return_features=True,
                     progress=False)
    torch.testing.assert_close(cls["block"], t[0])
    # without a flag, (T, B, D) with T != B is recognised from the shape
    out = torch.randn(7, 4, 5)
    torch.testing.assert_close(pool_tap(out, "avg", batch_size=4), out.mean(0))


def test_open_clip_vision_tower_tokens():
    from open_clip.transformer import VisionTransformer

    torch.manual_seed(0)
    vit = VisionTransformer(image_size=32, patch_size=16, width=32, layers=2, heads=2,
                            mlp_ratio=2.0, output_dim=8)
    x = torch.randn(3, 3, 32, 32)
    raw = {}
    h = vit.transformer.resblocks[1].register_forward_hook(lambda m, i, o: raw.update(o=o))
    with torch.no_grad():
        vit(x)
    h.remove()
    tokens = raw["o"]
    assert tokens.shape == (3, 5, 32)  # batch first in this open_clip: 4 patches + CLS
    data = [(x, torch.tensor([0, 1, 0]))]
    avg, _ = extract(vit, data, ["transformer.resblocks.1", "output"], return_features=True,
                     progress=False)
    cls, _ = extract(vit, data, ["transformer.resblocks.1"], pool="cls", return_features=True,
                     progress=False)
    torch.testing.assert_close(avg["transformer.resblocks.1"], tokens.mean(1))
    torch.testing.assert_close(cls["transformer.resblocks.1"], tokens[:, 0])
    assert avg["output"].shape == (3, 8)


def test_custom_module_with_loader_and_stats_equal_update():
    from torch.utils.data import DataLoader
    from torch.utils.data import TensorDataset as TorchTD

    from nclab.metrics import ClassStats, nc1

    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(),
                        nn.Sequential(nn.Conv2d(8, 16, 3, padding=1), nn.ReLU()),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten())
    x = torch.randn(40, 3, 8, 8)
    y = torch.arange(40) % 4
    loader = DataLoader(TorchTD(x, y), batch_size=16)
    stats = extract(net, loader, ["1", "2.1", "output"], progress=False)  # K from the labels
    feats, labels = extract(net, loader, ["1", "2.1", "output"], return_features=True,
                            progress=False)
    torch.testing.assert_close(feats["2.1"], feats["output"])
    for name, st in stats.items():
        ref = ClassStats(4)
        ref.update(feats[name], labels)
        assert nc1(st) == pytest.approx(nc1(ref), rel=1e-9)
        assert nc1(st) == pytest.approx(nc1(feats[name].double(), labels), rel=1e-9)
    # a one-shot generator without num_classes cannot be inferred without consuming it
    with pytest.raises(ValueError, match="num_classes"):
        extract(net, iter(list(loader)), ["1"], progress=False)
    one_shot = extract(net, iter(list(loader)), ["1"], num_classes=4, progress=False)
    assert nc1(one_shot["1"]) == pytest.approx(nc1(stats["1"]), rel=1e-9)


def _registry_names():
    from nclab.models import BACKBONES

    return list(BACKBONES)


@pytest.mark.parametrize("name", _registry_names())
def test_registry_course_path_through_extract_and_probe(name):
    """The branch students use: every registry backbone (random init; 224 px for the ImageNet
    ones, 32 px for the small nets), all its blocks plus the output, streamed and as features,
    then a linear probe on the output features."""
    from nclab.data import batches, synthetic_images
    from nclab.metrics import nc1
    from nclab.models import blocks, feature_dim, load_backbone
    from nclab.probe import linear_probe

    torch.manual_seed(0)
    model = load_backbone(name, pretrained=False)
    small = name.endswith("_s") or getattr(model, "image_size", None) == 32  # zoo: 32 px only
    data = batches(synthetic_images(2, 1, size=32, seed=0), batch_size=1,
                   size=32 if small else 224)  # two batches of one image
    taps = [n for n, _ in blocks(model)] + ["output"]
    stats = extract(model, data, taps, progress=False)
    feats, labels = extract(model, data, taps, return_features=True, progress=False)
    assert list(stats) == taps and labels.tolist() == [0, 1]
    assert feats["output"].shape == (2, feature_dim(model))
    for n in taps:
        assert feats[n].shape[0] == 2 and torch.isfinite(feats[n]).all(), n
        assert stats[n].num_samples == 2
        assert torch.allclose(stats[n].sums.sum(0), feats[n].double().sum(0), rtol=1e-4,
                              atol=1e-4), n
    assert nc1(stats["output"]) >= 0
    res = linear_probe(feats["output"], labels, feats["output"], labels, max_iter=20)
    assert res.train_acc == 1.0
    assert all(not m._forward_hooks for m in model.modules())
