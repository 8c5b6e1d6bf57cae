"""Tests for nclab.pretrain: augmentation levels, PGD, losses, heads, the cache and the study."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from nclab import pretrain as P
from nclab.data import TensorDataset, class_subset, digits, synthetic_images
from nclab.models import ConvNetS


@pytest.fixture(autouse=True)
def _tmp_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("NCLAB_CACHE", str(tmp_path / "cache"))


pytestmark = pytest.mark.usefixtures("one_thread")


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


def test_config_hash_tracks_the_augmentation_version_only_when_augmenting(monkeypatch):
    src = _tiny_source()
    k1, k3 = (P.config_hash(_net(), src, aug_level=lvl) for lvl in (1, 3))
    monkeypatch.setattr(P, "_AUGMENT_VERSION", P._AUGMENT_VERSION + 1)
    assert P.config_hash(_net(), src, aug_level=1) == k1
    assert P.config_hash(_net(), src, aug_level=3) != k3


def test_pretrain_ce_learns_digits():
    src = class_subset(digits("train"), range(5))
    torch.manual_seed(0)
    net = P.pretrain(ConvNetS(8, 3), src, epochs=4, batch_size=64, lr=0.1, device="cpu",
                     cache=False, progress=False)
    # features are discriminative: a nearest-class-mean classifier on them beats chance by far
    from nclab.data import batches

    with torch.no_grad():
        h = torch.cat([net(x) for x, _ in batches(src, 256)])
    mu = torch.stack([h[src.y == k].mean(0) for k in range(5)])
    acc = (torch.cdist(h, mu).argmin(1) == src.y).float().mean().item()
    assert acc > 0.8, acc


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
        (dict(epochs=1, adversarial_eps=2, pgd_steps=0), "pgd_steps"),
        (dict(epochs=1, proj_dim=0), "proj_dim"),
    ],
)
def test_pretrain_rejects_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        P.pretrain(_net(), _tiny_source(), device="cpu", progress=False, **kwargs)


def test_pretrain_raises_on_divergence_and_caches_nothing():
    with pytest.raises(ValueError, match="diverged"):
        P.pretrain(_net(), _tiny_source(), epochs=2, batch_size=16, lr=1e12, momentum=0.0,
                   weight_decay=0.0, loss="mse", device="cpu", progress=False)
    assert not list(P.cache_path("x").parent.glob("pretrain-*.pt"))


def test_pretrain_rejects_non_tensor_dataset():
    with pytest.raises(ValueError, match="TensorDataset"):
        P.pretrain(_net(), [(torch.zeros(3, 8, 8), 0)], epochs=1, progress=False)


# --------------------------------------------------------------------------- augmentation
def _imgs(n: int = 6, size: int = 12, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, size, size, generator=g)


def test_aug_levels_are_cumulative_as_in_the_paper():
    assert P.AUG_LEVELS[1] == ()
    for lvl in range(2, 6):
        assert P.AUG_LEVELS[lvl][:-1] == P.AUG_LEVELS[lvl - 1]
    assert P.AUG_LEVELS[5] == ("crop", "flip", "jitter", "grayscale")
    with pytest.raises(ValueError, match="aug_level"):
        P.Augment(0)


def test_level1_is_identity():
    x = _imgs()
    assert torch.equal(P.Augment(1, flip_p=1, jitter_p=1, gray_p=1)(x), x)


def test_level2_only_translates_with_zero_padding():
    x = _imgs(n=16)
    out = P.Augment(2, padding=4, flip_p=1, jitter_p=1, gray_p=1, seed=1)(x)
    xp = F.pad(x, (4, 4, 4, 4))
    offsets = []
    for i in range(len(x)):
        hits = [(dy, dx) for dy in range(9) for dx in range(9)
                if torch.equal(out[i], xp[i, :, dy:dy + 12, dx:dx + 12])]
        assert len(hits) == 1, f"sample {i} is not a pure translation"
        offsets.append(hits[0])
    assert len(set(offsets)) > 3, "offsets should be drawn per sample"


def test_level3_adds_only_a_flip():
    x = _imgs()
    assert torch.equal(P.Augment(3, padding=0, flip_p=1, jitter_p=1, gray_p=1)(x), x.flip(-1))
    assert torch.equal(P.Augment(3, padding=0, flip_p=0, jitter_p=1, gray_p=1)(x), x)
    out = P.Augment(3, padding=0, flip_p=0.5, seed=0)(_imgs(n=64))
    x64 = _imgs(n=64)
    flipped = torch.tensor([torch.equal(o, xi.flip(-1)) for o, xi in zip(out, x64)])
    kept = torch.tensor([torch.equal(o, xi) for o, xi in zip(out, x64)])
    assert bool((flipped | kept).all()) and 10 < int(flipped.sum()) < 54


def test_level4_adds_colour_jitter_and_nothing_else():
    x = _imgs()
    # no jitter strength -> identity; level 4 never grayscales
    assert torch.allclose(P.Augment(4, padding=0, flip_p=0, jitter=(0, 0, 0, 0), jitter_p=1,
                                    gray_p=1)(x), x, atol=1e-6)
    assert torch.equal(P.Augment(4, padding=0, flip_p=0, jitter_p=0, gray_p=1)(x), x)
    # brightness only: each sample is b_i * x_i for one scalar b_i (no clipping below 0.5 * 1.5)
    x = 0.5 * _imgs(n=32)
    out = P.Augment(4, padding=0, flip_p=0, jitter=(0.5, 0, 0, 0), jitter_p=1)(x)
    xf, of = x.flatten(1), out.flatten(1)
    b = (xf * of).sum(1) / (xf * xf).sum(1)  # least-squares scale per sample
    assert torch.allclose(of, b[:, None] * xf, atol=1e-6)
    assert 0.5 - 1e-6 <= b.min() and b.max() <= 1.5 + 1e-6 and b.std() > 0.05
    # saturation only: blend of the image with its own gray level
    x = 0.4 + 0.2 * _imgs(n=32)
    out = P.Augment(4, padding=0, flip_p=0, jitter=(0, 0, 0.5, 0), jitter_p=1)(x)
    gray = (x * torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)).sum(1, keepdim=True)
    d, e = (x - gray).flatten(1), (out - gray).flatten(1)
    s = (d * e).sum(1) / (d * d).sum(1)  # least-squares blend factor per sample
    assert torch.allclose(e, s[:, None] * d, atol=1e-5) and s.std() > 0.05
    # hue only: the luma of every pixel is kept (no clipping at mid-grey levels)
    x = 0.4 + 0.2 * _imgs(n=8)
    out = P.Augment(4, padding=0, flip_p=0, jitter=(0, 0, 0, 0.1), jitter_p=1)(x)
    luma = lambda t: (t * torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)).sum(1)  # noqa: E731
    assert torch.allclose(luma(out), luma(x), atol=1e-5) and not torch.allclose(out, x)


def test_level5_adds_grayscale():
    x = _imgs()
    out = P.Augment(5, padding=0, flip_p=0, jitter_p=0, gray_p=1)(x)
    gray = (x * torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)).sum(1)
    for c in range(3):
        assert torch.allclose(out[:, c], gray, atol=1e-6)
    assert torch.equal(P.Augment(5, padding=0, flip_p=0, jitter_p=0, gray_p=0)(x), x)


def test_augment_is_seeded_range_preserving_and_plugs_into_batches():
    from nclab.data import batches

    x = _imgs(n=32)
    a = P.Augment(5, seed=3)(x)
    assert torch.equal(a, P.Augment(5, seed=3)(x)) and not torch.equal(a, P.Augment(5, seed=4)(x))
    assert a.min() >= 0 and a.max() <= 1 and a.shape == x.shape
    assert torch.equal(P.augment(x, 5, seed=3), a)
    ds = _tiny_source()
    xb, yb = next(iter(batches(ds, 8, augment=P.Augment(3))))
    assert xb.shape == (8, 3, 16, 16) and yb.shape == (8,)
    with pytest.raises(ValueError, match="float"):
        P.Augment(2)(ds.x[:2])


# The fused implementation draws r = rand(B, 9) per call from the seeded generator, with columns
# (crop row, crop column, flip, jitter applied, not grayscale, brightness, contrast, saturation, hue).
# The references below decode the same draw and apply every transform the slow, obvious way.
_BELOW_1 = 1 - 2**-53  # the largest float64 below 1 (the largest value rand can return)


def _draw(seed: int, n: int) -> torch.Tensor:
    return torch.rand(n, 9, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))


def _hit(u: torch.Tensor, p: float) -> torch.Tensor:
    """The implementation's Bernoulli(p) indicator of a uniform u: u + p >= 1 (float64)."""
    return u + p >= 1


def _crop_flip_reference(x: torch.Tensor, r: torch.Tensor, pad: int, flip_p: float) -> torch.Tensor:
    """torchvision-style RandomCrop(padding=pad) then horizontal flip, one sample at a time."""
    _, _, h, w = x.shape
    xp = F.pad(x, (pad, pad, pad, pad))
    n = 2 * pad + 1
    out = []
    for i in range(len(x)):
        oy, ox = int(math.floor(float(r[i, 0]) * n)), int(math.floor(float(r[i, 1]) * n))
        crop = xp[i, :, oy:oy + h, ox:ox + w]
        out.append(crop.flip(-1) if bool(_hit(r[i, 2], flip_p)) else crop)
    return torch.stack(out)


def _colour_reference(x: torch.Tensor, r: torch.Tensor, jitter, jitter_p: float,
                      gray_p: float | None) -> tuple[torch.Tensor, bool]:
    """Brightness -> contrast -> saturation -> hue (YIQ) -> grayscale in float64 with one clamp at
    the end; also says whether any intermediate value left [0, 1]."""
    bri, con, sat, hue = jitter
    luma = torch.tensor([0.299, 0.587, 0.114], dtype=torch.float64)
    rgb2yiq = torch.tensor(P._RGB2YIQ, dtype=torch.float64)
    out, left = [], False
    for i in range(len(x)):
        y = x[i].double()
        c3 = y.shape[0] == 3
        gray = (lambda t: torch.einsum("c,chw->hw", luma, t)) if c3 else (lambda t: t)  # noqa: E731
        if bool(_hit(r[i, 3], jitter_p)):
            b, c, s = (1 + a * (2 * float(r[i, k]) - 1) for a, k in ((bri, 5), (con, 6), (sat, 7)))
            theta = 2 * math.pi * hue * (2 * float(r[i, 8]) - 1)
            y = b * y
            left |= bool((y > 1).any())
            y = c * y + (1 - c) * gray(y).mean()
            if c3:
                y = s * y + (1 - s) * gray(y)
                rot = torch.tensor([[1, 0, 0], [0, math.cos(theta), -math.sin(theta)],
                                    [0, math.sin(theta), math.cos(theta)]], dtype=torch.float64)
                y = torch.einsum("ij,jhw->ihw", torch.linalg.inv(rgb2yiq) @ rot @ rgb2yiq, y)
            left |= bool((y < 0).any() or (y > 1).any())
        if gray_p is not None and not bool(_hit(r[i, 4], 1 - gray_p)):
            y = gray(y).expand_as(y)
        out.append(y.clamp(0, 1))
    return torch.stack(out), left


def test_crop_and_flip_gather_equals_a_per_sample_loop():
    g = torch.Generator().manual_seed(5)
    for c, h, w, pad, flip_p in ((3, 12, 12, 4, 0.5), (1, 10, 14, 3, 0.3), (3, 9, 7, 0, 0.5),
                                 (2, 8, 8, 2, 0.0)):
        x = torch.rand(40, c, h, w, generator=g)
        for level in (2, 3):
            out = P.Augment(level, padding=pad, flip_p=flip_p, seed=7)(x)
            ref = _crop_flip_reference(x, _draw(7, 40), pad, flip_p if level == 3 else 0.0)
            assert torch.equal(out, ref), (c, h, w, pad, flip_p, level)


def test_fused_colour_map_equals_a_float64_reference_without_intermediate_clamps():
    g = torch.Generator().manual_seed(6)
    x = torch.rand(64, 3, 10, 10, generator=g) ** 2  # skewed colours: saturation and hue matter
    jitter = (0.6, 0.7, 0.8, 0.5)
    for level, gray_p in ((4, None), (5, 0.4)):
        aug = P.Augment(level, padding=2, flip_p=0.5, jitter=jitter, jitter_p=0.7,
                        gray_p=gray_p or 0.2, seed=11)
        r = _draw(11, 64)
        geo = _crop_flip_reference(x, r, 2, 0.5)
        ref, left = _colour_reference(geo, r, jitter, 0.7, gray_p)
        out = aug(x)
        assert left, "the draw should push some intermediate values out of [0, 1]"
        assert torch.allclose(out.double(), ref, atol=2e-6), (out.double() - ref).abs().max()
        jit, keep = _hit(r[:, 3], 0.7), _hit(r[:, 4], 1 - (gray_p or 0.0))
        assert jit.any() and (~jit).any() and (level == 4 or ((~keep).any() and keep.any()))
        # samples without jitter and grayscale are the crop + flip output bit for bit
        same = ~jit & keep
        assert same.any() and torch.equal(out[same], geo[same])
        assert torch.equal(out[same], P.Augment(3, padding=2, seed=11)(x)[same])


def test_colour_map_on_non_rgb_images_applies_brightness_and_contrast_only():
    x = torch.rand(32, 1, 8, 8, generator=torch.Generator().manual_seed(2))
    jitter = (0.5, 0.5, 0.5, 0.5)
    out = P.Augment(4, padding=0, flip_p=0, jitter=jitter, jitter_p=0.5, seed=4)(x)
    ref, _ = _colour_reference(x, _draw(4, 32), jitter, 0.5, None)
    assert torch.allclose(out.double(), ref, atol=2e-6) and not torch.equal(out, x)
    with pytest.raises(ValueError, match="grayscale needs 3 channels"):
        P.Augment(5)(x)


def test_extreme_draws_stay_in_range_and_respect_probabilities_0_and_1():
    x = _imgs(n=4, size=8)
    for u in (0.0, _BELOW_1):
        r = torch.full((4, 9), u, dtype=torch.float64)
        for flip_p in (0.0, 1.0):
            aug = P.Augment(5, padding=3, flip_p=flip_p, jitter_p=1.0, gray_p=0.0)
            out = aug._apply(x, r, aug._plan(x))
            crop = F.pad(x, (3, 3, 3, 3))[..., :8, :8] if u == 0 else F.pad(x, (3, 3, 3, 3))[..., 6:, 6:]
            crop = crop.flip(-1) if flip_p == 1 else crop
            jit, _ = _colour_reference(crop, r, aug.jitter, 1.0, 0.0)
            assert torch.allclose(out.double(), jit, atol=2e-6)
        aug = P.Augment(5, padding=3, flip_p=0.0, jitter_p=0.0, gray_p=1.0)
        out = aug._apply(x, r, aug._plan(x))
        gray = (out.new_tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1) * out).sum(1, keepdim=True)
        assert torch.allclose(out, gray.expand_as(out), atol=1e-6)


def test_augment_works_in_low_and_double_precision():
    x = _imgs(n=16)
    ref = P.Augment(5, seed=3)(x)
    for dtype, tol in ((torch.float64, 1e-6), (torch.bfloat16, 3e-2), (torch.float16, 4e-3)):
        out = P.Augment(5, seed=3)(x.to(dtype))
        assert out.dtype == dtype and out.shape == x.shape
        assert torch.equal(out, P.Augment(5, seed=3)(x.to(dtype)))
        assert (out.float() - ref).abs().max() <= tol, dtype
    # autocast around the call changes nothing: same dtype, same pixels
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(P.Augment(5, seed=3)(x), ref)


def _top_level_aten_ops(fn, x) -> int:
    from torch.profiler import ProfilerActivity, profile

    fn(x)  # build the cached constants first
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn(x)
    return sum(1 for e in prof.events() if e.name.startswith("aten::")
               and (e.cpu_parent is None or not e.cpu_parent.name.startswith("aten::")))


def test_augmentation_stays_a_handful_of_launches():
    # At 32 px every op is one kernel launch and launches dominate the cost: levels 2-3 took 16-21
    # top-level aten ops and levels 4-5 63-70 before the crop/flip gather and the fused colour map.
    x = _imgs(n=8, size=32)
    counts = {lvl: _top_level_aten_ops(P.Augment(lvl), x) for lvl in range(1, 6)}
    assert counts[1] == 0
    assert counts[2] <= 12 and counts[3] <= 12, counts
    assert counts[4] <= 28 and counts[5] <= 28, counts


# --------------------------------------------------------------------------- PGD
class _PixelLinear(nn.Module):
    def __init__(self, d: int, k: int) -> None:
        super().__init__()
        self.fc = nn.Linear(d, k)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x.flatten(1) - 0.5)


def _trained_toy() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    src = _tiny_source(n_per_class=20, k=3)
    x, y = src.x.float() / 255, src.y
    torch.manual_seed(0)
    model = _PixelLinear(x[0].numel(), 3)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    for _ in range(60):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    model.zero_grad(set_to_none=True)
    return model, x, y


def test_pgd_stays_in_ball_and_pixel_range_and_raises_loss():
    model, x, y = _trained_toy()
    clean = F.cross_entropy(model(x), y).item()
    assert (model(x).argmax(1) == y).float().mean() > 0.9
    for eps in (1 / 255, 3 / 255, 8 / 255):
        gen = torch.Generator().manual_seed(0)
        adv = P.pgd_attack(model, x, y, eps, steps=5, generator=gen)
        assert (adv - x).abs().max() <= eps + 1e-6
        assert adv.min() >= 0 and adv.max() <= 1
        assert F.cross_entropy(model(adv), y).item() > clean
    gen = torch.Generator().manual_seed(0)
    weak = F.cross_entropy(model(P.pgd_attack(model, x, y, 1 / 255, generator=gen)), y).item()
    strong = F.cross_entropy(model(P.pgd_attack(model, x, y, 8 / 255, generator=gen)), y).item()
    assert strong > weak > clean
    assert all(p.grad is None for p in model.parameters())


def test_pgd_one_step_matches_the_analytic_gradient_sign():
    model, x, y = _trained_toy()
    eps = 4 / 255
    adv = P.pgd_attack(model, x, y, eps, step_size=eps, steps=1, random_start=False)
    # d CE / d x = W^T (softmax - onehot) / N for the linear model on flattened pixels
    w = model.fc.weight.detach().double()
    p = torch.softmax(model(x).detach().double(), 1) - F.one_hot(y, 3).double()
    grad = (p @ w).view_as(x)
    expected = (x.double() + eps * grad.sign()).clamp(0, 1)
    assert torch.allclose(adv.double(), expected, atol=1e-6)


def test_pgd_rejects_bad_inputs():
    model, x, y = _trained_toy()
    assert torch.equal(P.pgd_attack(model, x, y, 0.0), x)
    with pytest.raises(ValueError, match="8/255"):
        P.pgd_attack(model, x, y, 8)
    with pytest.raises(ValueError, match="pixel"):
        P.pgd_attack(model, x * 2 - 1, y, 0.01)


def test_adversarial_pretraining_runs_and_differs_from_clean():
    src = _tiny_source()
    clean = P.pretrain(_net(), src, epochs=1, batch_size=16, device="cpu", progress=False)
    adv = P.pretrain(_net(), src, epochs=1, batch_size=16, adversarial_eps=8, pgd_steps=2,
                     device="cpu", progress=False)
    assert not _state_equal(clean, adv)
    assert len(list(P.cache_path("x").parent.glob("pretrain-*.pt"))) == 2


# --------------------------------------------------------------------------- losses and heads
def test_supcon_matches_hand_computed_value():
    # two tight pairs of orthogonal unit vectors, tau = 1: every anchor has one positive with
    # similarity 1 and two negatives with similarity 0 -> L = -log(e / (e + 2)) = log(1 + 2/e)
    z = torch.tensor([[1.0, 0.0], [2.0, 0.0], [0.0, 1.0], [0.0, 3.0]])
    y = torch.tensor([0, 0, 1, 1])
    assert P.supcon_loss(z, y, temperature=1.0).item() == pytest.approx(math.log(1 + 2 / math.e))
    # tau = 0.5 doubles the logits: log(1 + 2 / e^2)
    assert P.supcon_loss(z, y, 0.5).item() == pytest.approx(math.log(1 + 2 / math.e**2), rel=1e-6)


def _supcon_reference(z, y, tau):
    u = [[float(v) for v in row] for row in F.normalize(z.double(), dim=1)]
    n, total, anchors = len(u), 0.0, 0
    for i in range(n):
        pos = [p for p in range(n) if p != i and y[p] == y[i]]
        if not pos:
            continue
        sims = {a: sum(ui * ua for ui, ua in zip(u[i], u[a])) / tau for a in range(n) if a != i}
        denom = sum(math.exp(s) for s in sims.values())
        total += -sum(math.log(math.exp(sims[p]) / denom) for p in pos) / len(pos)
        anchors += 1
    return total / anchors


def test_supcon_matches_loop_reference_with_uneven_positives():
    g = torch.Generator().manual_seed(0)
    z = torch.randn(9, 5, generator=g)
    y = torch.tensor([0, 0, 0, 1, 1, 2, 2, 2, 3])  # class 3 has no positive: not an anchor
    for tau in (0.1, 0.7):
        assert P.supcon_loss(z, y, tau).item() == pytest.approx(_supcon_reference(z, y, tau),
                                                                rel=1e-5)
    with pytest.raises(ValueError, match="same label"):
        P.supcon_loss(z[:3], torch.tensor([0, 1, 2]))


def test_mse_uses_one_hot_targets():
    out = torch.zeros(4, 3)
    y = torch.tensor([0, 1, 2, 2])
    assert P.mse_loss(out, y).item() == pytest.approx(0.5)
    assert P.mse_loss(F.one_hot(y, 3).float(), y).item() == 0.0
    out = torch.tensor([[2.0, 0.0, 1.0]])
    assert P.mse_loss(out, torch.tensor([0])).item() == pytest.approx(0.5 * (1 + 0 + 1))
    with pytest.raises(ValueError, match="outputs"):
        P.mse_loss(torch.zeros(4), y)


def test_projection_heads():
    assert isinstance(P.projection_head(8, 0), nn.Identity)
    lin = P.projection_head(8, 1, 5)
    assert [type(m) for m in lin] == [nn.Linear] and lin[0].out_features == 5
    for n in (2, 3):
        mlp = P.projection_head(8, n, 4)
        kinds = [type(m) for m in mlp]
        assert kinds.count(nn.Linear) == n and kinds.count(nn.ReLU) == n - 1
        assert mlp(torch.zeros(2, 8)).shape == (2, 4)
    with pytest.raises(ValueError, match="proj_head_layers"):
        P.projection_head(8, 4)


@pytest.mark.parametrize("loss, layers", [("ce", 2), ("mse", 3), ("supcon", 0), ("supcon", 2)])
def test_head_and_classifier_are_dropped(loss, layers):
    net = _net()
    keys = set(net.state_dict())
    out = P.pretrain(net, _tiny_source(), epochs=1, batch_size=16, loss=loss,
                     proj_head_layers=layers, aug_level=3, device="cpu", progress=False)
    assert set(out.state_dict()) == keys
    assert not any(isinstance(m, nn.Linear) for m in out.modules())
    assert out(torch.rand(2, 3, 16, 16)).shape == (2, net.num_features)


def test_supcon_pretraining_separates_digit_classes():
    src = class_subset(digits("train"), range(5))
    torch.manual_seed(0)
    net = P.pretrain(ConvNetS(8, 3), src, epochs=4, batch_size=64, loss="supcon",
                     proj_head_layers=2, aug_level=2, lr=0.1, device="cpu", cache=False,
                     progress=False)
    from nclab.data import batches

    with torch.no_grad():
        h = torch.cat([net(x) for x, _ in batches(src, 256)])
    mu = torch.stack([h[src.y == k].mean(0) for k in range(5)])
    assert (torch.cdist(h, mu).argmin(1) == src.y).float().mean().item() > 0.8


# --------------------------------------------------------------------------- study runner
def _fake_load(name, split="train", root=None, image_size=None, **kwargs):
    """8 random 32-px images standing in for CIFAR-100 (4 classes) / CIFAR-10 (2 classes)."""
    k = 4 if name == "cifar100" else 2
    g = torch.Generator().manual_seed(len(name) * 10 + len(split))
    x = torch.randint(0, 256, (8, 3, 32, 32), dtype=torch.uint8, generator=g)
    return TensorDataset(x, torch.arange(8) % k, [f"{name}-{i}" for i in range(k)])


def test_run_study_table_and_measurements(monkeypatch):
    from nclab.data import normalize
    from nclab.metrics import nc1

    src = _tiny_source(n_per_class=12, k=3)
    down = synthetic_images(num_classes=2, per_class=12, size=16, seed=1)
    down_test = synthetic_images(num_classes=2, per_class=6, size=16, seed=2)
    configs = [dict(label="plain", group="g", seed=0),
               dict(aug_level=2, loss="mse", proj_head_layers=1, seed=1)]
    df = P.run_study(configs, src, down, down_test, backbone=lambda: ConvNetS(4, 2), epochs=1,
                     batch_size=16, device="cpu", progress=False)
    assert list(df["label"]) == ["plain", "MSE, aug 2, head 1"]
    assert {"group", "seed", "aug_level", "loss", "proj_head_layers", *P.STUDY_COLUMNS} <= set(df)
    assert df.loc[0, "loss"] == "ce" and df.loc[0, "aug_level"] == 1  # defaults filled in
    assert df[list(P.STUDY_COLUMNS)].notna().all().all()
    assert ((df["transfer_acc"] >= 0) & (df["transfer_acc"] <= 1)).all()
    # source NC1 is measured on un-augmented source training images with the returned encoder
    torch.manual_seed(0)
    net = P.pretrain(ConvNetS(4, 2), src, epochs=1, batch_size=16, seed=0, device="cpu",
                     progress=False)
    with torch.no_grad():
        h = net(normalize(src.x))
    assert df.loc[0, "source_nc1"] == pytest.approx(nc1(h.double(), src.y), rel=1e-4)
    # the cache makes a rerun train nothing
    monkeypatch.setattr(P, "_train", lambda *a, **k: (_ for _ in ()).throw(AssertionError))
    again = P.run_study(configs, src, down, down_test, backbone=lambda: ConvNetS(4, 2), epochs=1,
                        batch_size=16, device="cpu", progress=False)
    assert again[list(P.STUDY_COLUMNS)].equals(df[list(P.STUDY_COLUMNS)])
    with pytest.raises(ValueError, match="unknown configuration keys"):
        P.run_study([dict(augment=3)], src, down, down_test, backbone=lambda: ConvNetS(4, 2),
                    epochs=1, progress=False)


def test_smoke_source_study_splits_digits():
    st = P.source_study("smoke")
    assert st.profile == "smoke" and st.source.num_classes == 5
    assert st.source.classes == [str(d) for d in range(5)]
    assert st.downstream_train.classes == [str(d) for d in range(5, 10)]
    assert st.downstream_test.classes == st.downstream_train.classes
    assert {c["aug_level"] for c in st.augmentation} == {1, 2, 3, 4, 5}
    assert all("adversarial_eps" not in c for c in st.augmentation)
    assert [c["adversarial_eps"] for c in st.sweep] == [None, 1, 3, 8]
    assert {c["seed"] for c in st.sweep} == {0} and st.sweep_epochs == 4
    pairs = {(c["loss"], c["proj_head_layers"]) for c in st.losses}
    assert pairs == {("ce", n) for n in range(4)} | {("mse", 0), ("mse", 3)} | {
        ("supcon", n) for n in (1, 2, 3)}
    assert {c["seed"] for c in st.losses} == {0, 1, 2}
    assert "source" in st.describe() and "adversarial sweep (4 epochs)" in st.describe()


def test_course_study_skips_unavailable_extra_datasets(monkeypatch):
    import nclab.data
    from nclab.data import DatasetUnavailableError

    def load(name, split="train", root=None, image_size=None, **kwargs):
        if name in ("cifar10", "cifar100"):
            return _fake_load(name, split)
        raise DatasetUnavailableError(f"{name} is not on disk")

    monkeypatch.setattr(nclab.data, "load", load)
    with pytest.warns(UserWarning) as record:
        st = P.source_study("course")
    assert st.extra_transfer == {}
    skipped = " ".join(str(w.message) for w in record)
    assert all(f"skipping downstream dataset {n!r}" in skipped
               for n in ("dtd", "oxford_pets", "fgvc_aircraft"))


def test_course_source_study_runs_on_fake_cifar(monkeypatch):
    import nclab.data

    monkeypatch.setattr(nclab.data, "load", _fake_load)
    st = P.source_study("course")
    assert st.profile == "course" and st.backbone_name == "CIFAR ResNet-18"
    assert st.source.classes[0] == "cifar100-0" and st.downstream_train.classes[0] == "cifar10-0"
    assert st.epochs == 30 and st.seeds == (0, 1, 2)
    assert [c["adversarial_eps"] for c in st.sweep[:7]] == [None, 0.5, 1, 2, 3, 5, 8]
    assert len(st.sweep) == 21 and {c["aug_level"] for c in st.sweep} == {3}
    assert st.sweep_epochs == 30 and {c["pgd_steps"] for c in st.sweep} == {3}
    pairs = {(c["loss"], c["proj_head_layers"]) for c in st.losses}
    assert pairs == {(loss, n) for loss in ("ce", "mse") for n in range(4)} | {
        ("supcon", n) for n in (1, 2, 3)}
    net = st.backbone()
    assert net.num_features == 512 and net(torch.zeros(1, 3, 32, 32)).shape == (1, 512)
    # one configuration of each kind the chapter runs, for one optimiser step each
    picks = [st.augmentation[4], st.sweep[-1],
             next(c for c in st.losses if c["loss"] == "mse" and c["proj_head_layers"] == 3),
             next(c for c in st.losses if c["loss"] == "supcon" and c["proj_head_layers"] == 2)]
    assert set(st.extra_transfer) == {"dtd", "oxford_pets", "fgvc_aircraft"}
    df = st.run(picks, epochs=1, device="cpu", progress=False)
    assert len(df) == 4 and df[list(P.STUDY_COLUMNS)].notna().all().all()
    for name in st.extra_transfer:
        assert df[f"transfer_acc_{name}"].between(0, 1).all()
    assert set(df["group"]) == {"augmentation", "sweep", "loss"}


def _fake_real_load(name, split="train", root=None, image_size=None, **kwargs):
    """Random 32-px stand-ins for the mirror's CIFAR-10 (10 classes) and Fashion-MNIST."""
    n = 40 if name == "cifar10_2k" else 20
    g = torch.Generator().manual_seed(len(name) * 10 + len(split))
    x = torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=g)
    return TensorDataset(x, torch.arange(n) % 10, [f"{name}-{i}" for i in range(10)])


def test_real_source_study_splits_cifar10_classes(monkeypatch):
    import nclab.data

    loaded = []

    def load(name, split="train", **kwargs):
        loaded.append(name)
        return _fake_real_load(name, split, **kwargs)

    monkeypatch.setattr(nclab.data, "load", load)
    st = P.source_study("real")
    assert st.profile == "real" and st.backbone_name == "ConvNetS(width=16, depth=4)"
    assert st.epochs == 10 and st.seeds == (0, 1, 2)
    # classes 0-4 are the source task, 5-9 the downstream task (train and test)
    assert st.source.classes == [f"cifar10_2k-{i}" for i in range(5)]
    assert st.downstream_train.classes == [f"cifar10_2k-{i}" for i in range(5, 10)]
    assert st.downstream_test.classes == st.downstream_train.classes
    assert len(st.downstream_test) == 20  # 40 fake test images, half of them in classes 5-9
    assert set(st.extra_transfer) == {"fashion_mnist_2k"} and "digits" not in loaded
    # the sweep: 7 attack sizes x 3 seeds, no augmentation, one PGD step, longer training
    assert [(c["seed"], c["adversarial_eps"]) for c in st.sweep] == [
        (s, e) for s in (0, 1, 2) for e in (None, 0.5, 1, 2, 3, 5, 8)]
    assert {(c["aug_level"], c["pgd_steps"]) for c in st.sweep} == {(1, 1)}
    assert st.sweep_epochs > st.epochs
    pairs = {(c["loss"], c["proj_head_layers"]) for c in st.losses}
    assert pairs == {("ce", n) for n in range(4)} | {("mse", 0), ("mse", 3)} | {
        ("supcon", n) for n in (1, 2, 3)}
    assert len(st.augmentation) == 15 and len(st.losses) == 27
    net = st.backbone()
    assert net.num_features == 32 and net(torch.zeros(2, 3, 32, 32)).shape == (2, 32)
    df = st.run([st.losses[-1]], epochs=1, device="cpu", progress=False)
    assert df["transfer_acc_fashion_mnist_2k"].between(0, 1).all()
    assert df[list(P.STUDY_COLUMNS)].notna().all().all()
    # the sweep's rows carry no extra tasks; sweep_epochs overrides the study's epochs
    st.sweep, st.sweep_epochs = st.sweep[1:2], 1
    sw = st.run_sweep(device="cpu", progress=False)
    assert len(sw) == 1 and sw["adversarial_eps"].iloc[0] == 0.5
    assert not any(c.startswith("transfer_acc_") for c in sw.columns)


def _mirror_has(*names: str) -> bool:
    from nclab import mirror

    return all(mirror.is_available(n) for n in names)


@pytest.mark.skipif(not _mirror_has("cifar10_2k", "fashion_mnist_2k"),
                    reason="needs the local mirror (NCLAB_DATA) with cifar10_2k and fashion_mnist_2k")
def test_real_source_study_on_the_mirror():
    st = P.source_study("real")
    assert st.source.x.shape[1:] == (3, 32, 32) and st.source.num_classes == 5
    assert len(st.source) + len(st.downstream_train) == 2000
    assert st.source.classes == ["airplane", "automobile", "bird", "cat", "deer"]
    assert st.downstream_train.classes == ["dog", "frog", "horse", "ship", "truck"]
    fm_train, fm_test = st.extra_transfer["fashion_mnist_2k"]
    assert fm_train.x.shape[1:] == (3, 32, 32) and len(fm_train) + len(fm_test) == 2000


# --------------------------------------------------------------------------- quadratic fit
def _numpy_quadratic(x, y, level=0.95):
    """float64 reference: normal equations, residual variance with n - 3 dof, t quantile."""
    import numpy as np
    import scipy.stats

    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    X = np.vander(x, 3, increasing=True)
    coef = np.linalg.solve(X.T @ X, X.T @ y)
    resid = y - X @ coef
    cov = resid @ resid / (len(x) - 3) * np.linalg.inv(X.T @ X)
    t = scipy.stats.t.ppf(0.5 + level / 2, len(x) - 3)
    return coef, cov, t


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_quadratic_fit_matches_numpy_reference(seed):
    import numpy as np

    rng = np.random.default_rng(seed)
    x = rng.uniform(0.2, 6.0, 7)
    y = 60 + 4 * x - 0.9 * x**2 + rng.normal(0, 1.0, 7)
    fit = P.quadratic_fit(x, y, level=0.9)
    coef, cov, t = _numpy_quadratic(x, y, level=0.9)
    np.testing.assert_allclose(fit.coef, coef, rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(fit.cov, cov, rtol=1e-8, atol=1e-12)
    se = np.sqrt(np.diag(cov))
    np.testing.assert_allclose(fit.low, coef - t * se, rtol=1e-8)
    np.testing.assert_allclose(fit.high, coef + t * se, rtol=1e-8)
    np.testing.assert_allclose(np.polyfit(x, y, 2)[::-1], fit.coef, rtol=1e-8)
    grid = np.linspace(0, 6, 5)
    mean, lo, hi = fit.band(grid)
    V = np.vander(grid, 3, increasing=True)
    half = t * np.sqrt(np.einsum("ij,jk,ik->i", V, cov, V))
    np.testing.assert_allclose(mean, V @ coef, rtol=1e-9)
    np.testing.assert_allclose(hi - mean, half, rtol=1e-8)
    np.testing.assert_allclose(mean - lo, half, rtol=1e-8)
    assert fit.vertex == pytest.approx(-coef[1] / (2 * coef[2]))
    assert fit.n == 7 and fit.x_range == (x.min(), x.max())


def test_quadratic_fit_turn_only_for_a_clear_maximum_inside_the_data():
    import numpy as np

    x = np.linspace(0, 4, 9)
    bump = 70 - (x - 2) ** 2 + 0.05 * np.sin(7 * x)  # maximum at 2, inside [0, 4]
    assert P.quadratic_fit(x, bump).turn
    assert P.quadratic_fit(x, bump).vertex == pytest.approx(2, abs=0.05)
    rising = 60 + 3 * x - 0.2 * x**2 + 0.05 * np.sin(7 * x)  # vertex at 7.5, outside the data
    assert not P.quadratic_fit(x, rising).turn
    valley = 60 + (x - 2) ** 2 + 0.05 * np.sin(7 * x)  # a minimum is no turning point
    assert not P.quadratic_fit(x, valley).turn
    noise = np.random.default_rng(0).normal(0, 1, 9)  # no curvature the interval can see
    assert not P.quadratic_fit(x, 70 + noise).turn
    # an exact parabola: zero residuals, the interval collapses to the coefficients
    exact = P.quadratic_fit(x, 1 + 2 * x - 3 * x**2)
    np.testing.assert_allclose(exact.coef, (1, 2, -3), atol=1e-10)
    np.testing.assert_allclose(exact.low, exact.high, atol=1e-8)


@pytest.mark.parametrize("x, y, match", [
    ([0, 1, 2], [1, 2, 3], ">= 4 points"),
    ([0, 0, 1, 1], [1, 2, 3, 4], "3 distinct"),
    ([0, 1, 2, 3], [1, 2, 3], "same length"),
    ([0, 1, 2, float("nan")], [1, 2, 3, 4], "finite"),
])
def test_quadratic_fit_rejects_bad_input(x, y, match):
    with pytest.raises(ValueError, match=match):
        P.quadratic_fit(x, y)


def test_quadratic_fit_rejects_bad_level():
    with pytest.raises(ValueError, match="level"):
        P.quadratic_fit([0, 1, 2, 3], [0, 1, 0, 1], level=1.5)


def test_source_study_checked_claims_are_known_and_smoke_asserts_only_measured_ones():
    assert set(P._REAL_CHECKED) <= set(P.SOURCE_CLAIMS)
    assert P._SMOKE_CHECKED <= P._REAL_CHECKED
    st = P.source_study("smoke")
    assert st.checked == P._SMOKE_CHECKED
    # course and paper were never run: the chapter asserts nothing there
    assert all(not P._STUDY_SIZES[p].get("checked") for p in ("course", "paper"))
