"""Source pre-training: augmentation levels, PGD adversarial training, CE / MSE / SupCon losses and
projection heads, with a cache keyed by the full configuration.

The paper's second story (Sec. 5, App. B) is about collapse *on the source data*: how much
within-class diversity a pre-training recipe keeps, and how that relates to transfer. This module
trains the models that story needs:

* :class:`Augment` -- the paper's five augmentation levels, vectorised on batches on the device:
  1 normalisation only; 2 + random crop (pad 4); 3 + horizontal flip; 4 + colour jitter;
  5 + random grayscale.
* :func:`pgd_attack` -- l_inf projected gradient descent (Madry et al.) in pixel space [0, 1].
* :func:`supcon_loss`, :func:`mse_loss` -- the supervised contrastive loss (Khosla et al.) and the
  square loss on one-hot targets.
* :func:`projection_head` -- none, a linear layer or an MLP, placed between the encoder and the loss
  and discarded after training.
* :func:`pretrain` -- trains a backbone on a source :class:`~nclab.data.TensorDataset` and returns
  the encoder (eval mode, head and classifier dropped). The result is cached under
  :func:`nclab.runtime.cache_dir` by a hash of the architecture, the initial weights, the data and
  every hyper-parameter, so a second call with the same arguments loads instead of training.

Inputs of the returned backbone are normalised as :func:`nclab.data.batches` does by default
(``IMAGENET_MEAN`` / ``IMAGENET_STD``), so ``nclab.data.batches(ds)`` feeds it directly.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from .data import IMAGENET_MEAN, IMAGENET_STD, TensorDataset, batches
from .runtime import Profile, cache_dir

if TYPE_CHECKING:  # pragma: no cover
    import pandas as pd

__all__ = [
    "AUG_LEVELS",
    "LOSSES",
    "Augment",
    "augment",
    "pgd_attack",
    "supcon_loss",
    "mse_loss",
    "projection_head",
    "config_hash",
    "cache_path",
    "pretrain",
    "STUDY_COLUMNS",
    "run_study",
    "SourceStudy",
    "source_study",
    "cifar_resnet18",
    "QuadraticFit",
    "quadratic_fit",
    "SOURCE_CLAIMS",
]

#: The transforms each augmentation level applies, cumulative as in the paper (App. E.1).
AUG_LEVELS: dict[int, tuple[str, ...]] = {
    1: (),
    2: ("crop",),
    3: ("crop", "flip"),
    4: ("crop", "flip", "jitter"),
    5: ("crop", "flip", "jitter", "grayscale"),
}

#: Pre-training losses :func:`pretrain` knows.
LOSSES = ("ce", "mse", "supcon")

_CACHE_VERSION = "pretrain-v2"  # bump when the training procedure changes what a key produces
# Bump when Augment's random stream or arithmetic changes: part of the key for aug_level > 1 only,
# so level-1 models stay cached (v2: one (B, 9) uniform per call, fused crop/flip and colour map).
_AUGMENT_VERSION = 2

# ITU-R 601 luma weights (as torchvision's rgb_to_grayscale) and the YIQ colour space.
_LUMA = (0.299, 0.587, 0.114)
_RGB2YIQ = ((0.299, 0.587, 0.114), (0.596, -0.274, -0.322), (0.211, -0.523, 0.312))
_YIQ2RGB = tuple(map(tuple, torch.linalg.inv(torch.tensor(_RGB2YIQ, dtype=torch.float64)).tolist()))


# --------------------------------------------------------------------------- augmentation
def _colour_basis() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(P0, I - P0, P2), float64, with the YIQ hue rotation by ``theta`` equal to
    ``P0 + cos(theta) (I - P0) + sin(theta) P2`` and ``P0 = 1 w^T`` the grayscale map.

    The luma weights ``w`` are rounded to multiples of 2**-24 (an error below 3e-8), so ``P0`` and
    ``I - P0`` are exact in float32 (and float64) and ``1 * P0 + 1 * (I - P0)`` sums to exactly
    ``I``: samples that are neither jittered nor grayscaled pass through the colour map bit for bit.
    """
    w = torch.round(torch.tensor(_LUMA, dtype=torch.float64) * 2**24) / 2**24
    a = torch.tensor(_YIQ2RGB, dtype=torch.float64)  # first column is (1, 1, 1)
    b = torch.tensor(_RGB2YIQ, dtype=torch.float64)
    p0 = torch.outer(torch.ones(3, dtype=torch.float64), w)
    p2 = torch.outer(a[:, 2], b[1]) - torch.outer(a[:, 1], b[2])
    return p0, torch.eye(3, dtype=torch.float64) - p0, p2


# Columns of the one uniform draw (B, _NRAND) per call.
_R_OY, _R_OX, _R_FLIP, _R_JIT, _R_KEEP, _R_BRI, _R_CON, _R_SAT, _R_HUE = range(9)
_NRAND = 9
# Columns of L = affine(r) in the colour map: 1, b, c, 1 - c, s, theta + pi/2, theta.
_NL = 7
# Factor columns (in cat([L, sin(L), F, m])) whose products are the 4 colour coefficients
# b c | b c s k cos | b c s k sin | b (1 - c) m, with k = 1 - grayscale.
_SIN0, _F0, _M = _NL, 2 * _NL, 2 * _NL + _NRAND
_FACTORS = ((1, 2, 0, 0, 0),
            (1, 2, 4, _F0 + _R_KEEP, _SIN0 + 5),
            (1, 2, 4, _F0 + _R_KEEP, _SIN0 + 6),
            (1, 3, _M, 0, 0))


@dataclass
class _Plan:
    """Constants of one Augment for one (device, dtype, C, H, W), built once."""

    pad: int
    scale: torch.Tensor  # (_NRAND,) F = clamp(floor(shift + scale * r), max=top)
    shift: torch.Tensor
    top: torch.Tensor
    geometry: bool
    cst: torch.Tensor | None = None  # (C*H*W,) flat index = cst + F @ mg
    mg: torch.Tensor | None = None  # (_NRAND, C*H*W)
    colour: bool = False
    t0: torch.Tensor | None = None  # (_NL,) L = t0 + r @ mp
    mp: torch.Tensor | None = None  # (_NRAND, _NL)
    lid: torch.Tensor | None = None  # (_NL,) L of a sample that is not jittered
    factors: torch.Tensor | None = None  # (4, 5) long
    basis: torch.Tensor | None = None  # (4, C * (C + 1)): coefficients -> [A | t]
    wv: torch.Tensor | None = None  # (C*H*W, 1): image -> mean luma


class Augment:
    """The paper's augmentation level ``level`` (1-5) on a batch of float images in [0, 1].

    ``Augment(level)(x)`` with ``x`` (B, C, H, W) on any device returns a tensor of the same shape,
    with independent random parameters per sample (vectorised, no Python loop over samples):

    * ``crop``: zero-pad by ``padding`` pixels (default ``round(W / 8)``: 4 at 32 px, as for
      CIFAR) and crop back to H x W at a random offset (torchvision's ``RandomCrop(H, padding)``);
    * ``flip``: mirror left-right with probability ``flip_p``;
    * ``jitter``: with probability ``jitter_p``, scale brightness by ``b ~ U[1-B, 1+B]``, contrast
      ``x <- c x + (1-c) mean(gray(x))`` with ``c ~ U[1-C, 1+C]``, saturation
      ``x <- s x + (1-s) gray(x)`` with ``s ~ U[1-S, 1+S]`` and rotate hue by ``h ~ U[-H, H]``
      turns (in YIQ space), in this order, with ``jitter = (B, C, S, H)``;
    * ``grayscale``: with probability ``gray_p`` replace every channel by the luma
      ``gray = 0.299 R + 0.587 G + 0.114 B``.

    Level 1 (normalisation only) is the identity here: normalisation happens afterwards, in
    :func:`nclab.data.batches` or :func:`pretrain`. Randomness comes from ``seed`` through a
    generator on the batch's device (one uniform draw of shape (B, 9) per call), so a run is
    reproducible. Use it as ``nclab.data.batches(ds, augment=Augment(3))``.

    At 32 px every transform is bound by kernel launches, not arithmetic, so the implementation
    fuses them: crop and flip are one gather from the padded batch, and jitter plus grayscale are
    one per-sample affine colour map ``clamp(A x + t, 0, 1)`` (``A`` 3 x 3, ``t`` 3) composed from
    the drawn parameters (about 10 aten ops for levels 2-3 and 25 for levels 4-5). Deviations from
    torchvision's ``ColorJitter`` / ``RandomGrayscale``, which clamp to [0, 1] after every step:

    * values are clamped to [0, 1] **once, at the end**; a pixel that leaves [0, 1] midway (e.g.
      brightness 1.3 on a 0.9 pixel, then contrast 0.7) keeps its unclamped value for the later
      steps. Without that clipping every step is exactly the affine map written above;
    * the hue is rotated in YIQ space (a linear map that keeps the luma), not in HSV;
    * brightness, contrast, saturation and hue are applied in this fixed order (torchvision shuffles
      the order per call); the contrast mean is taken over the cropped image, padding included;
      the factors are not floored at 0 (torchvision draws from ``[max(0, 1-B), 1+B]``), which
      only matters for strengths above 1.

    At levels 4-5 every output pixel is clamped to [0, 1]; samples that draw no jitter and no
    grayscale otherwise keep their cropped/flipped pixels bit for bit (float32 matmuls at full
    precision, PyTorch's default; with TF32 enabled the colour map rounds like any TF32 matmul).
    The call runs with autocast disabled, so the output has ``x``'s dtype. For images with
    ``C != 3`` channels jitter applies brightness and contrast (the mean is then over all channels)
    and skips saturation and hue; grayscale needs 3 channels.
    """

    def __init__(
        self,
        level: int,
        padding: int | None = None,
        flip_p: float = 0.5,
        jitter: tuple[float, float, float, float] = (0.4, 0.4, 0.4, 0.1),
        jitter_p: float = 0.8,
        gray_p: float = 0.2,
        seed: int = 0,
    ) -> None:
        if level not in AUG_LEVELS:
            raise ValueError(f"aug_level must be one of {sorted(AUG_LEVELS)}, got {level!r}")
        for name, p in (("flip_p", flip_p), ("jitter_p", jitter_p), ("gray_p", gray_p)):
            if not 0.0 <= p <= 1.0:
                raise ValueError(f"{name} must be a probability in [0, 1], got {p}")
        if padding is not None and padding < 0:
            raise ValueError(f"padding must be >= 0, got {padding}")
        if len(jitter) != 4 or min(jitter) < 0 or jitter[3] > 0.5:
            raise ValueError(f"jitter must be (brightness, contrast, saturation, hue) >= 0 with "
                             f"hue <= 0.5, got {jitter}")
        self.level = level
        self.ops = AUG_LEVELS[level]
        self.padding = padding
        self.flip_p = flip_p
        self.jitter = tuple(float(j) for j in jitter)
        self.jitter_p = jitter_p
        self.gray_p = gray_p
        self.seed = seed
        self._gens: dict[str, torch.Generator] = {}
        self._plans: dict[tuple, _Plan | None] = {}

    def __repr__(self) -> str:
        return f"Augment(level={self.level}, ops={self.ops})"

    def _gen(self, device: torch.device) -> torch.Generator:
        key = str(device)
        if key not in self._gens:
            self._gens[key] = torch.Generator(device=device).manual_seed(self.seed)
        return self._gens[key]

    def _draw(self, x: torch.Tensor) -> torch.Tensor:
        """The call's uniform draw r (B, 9), columns ``_R_*``. float64, like all the per-sample
        parameter arithmetic: the flat gather index must be exact, and float64 is never lowered by
        autocast or TF32."""
        return torch.rand(len(x), _NRAND, device=x.device, dtype=torch.float64,
                          generator=self._gen(x.device))

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4:
            raise ValueError(f"Augment expects a batch (B, C, H, W), got shape {tuple(x.shape)}")
        if not x.is_floating_point():
            raise ValueError("Augment expects float images in [0, 1]; convert uint8 with x / 255")
        if not self.ops or len(x) == 0:
            return x
        if "grayscale" in self.ops and x.shape[1] != 3:
            raise ValueError(f"grayscale needs 3 channels, got {x.shape[1]}")
        plan = self._plan(x)
        if plan is None:
            return x
        if torch.is_autocast_enabled(x.device.type):  # keep x's dtype and the colour map's precision
            with torch.autocast(x.device.type, enabled=False):
                return self._apply(x, self._draw(x), plan)
        return self._apply(x, self._draw(x), plan)

    def _apply(self, x: torch.Tensor, r: torch.Tensor, plan: _Plan) -> torch.Tensor:
        """Augment ``x`` with the uniform draw ``r`` (B, 9) float64; every op below is one launch.

        ``F = clamp(floor(shift + scale * r), max=top)`` turns r into integers: the crop offsets
        ``floor((2p + 1) u)`` and the indicators ``[u + q >= 1]`` (probability q) of flip, jitter
        and not-grayscale.
        """
        b, c, h, w = x.shape
        f = torch.addcmul(plan.shift, r, plan.scale).floor_().clamp_(max=plan.top)
        if plan.geometry:
            # crop + flip as one gather through a flat index into the padded images (B, C*Hp*Wp),
            # exact in float64; the index is 16 bytes per output pixel, small at the usual 32-84 px
            idx = torch.addmm(plan.cst, f, plan.mg).long()
            xp = F.pad(x, (plan.pad,) * 4) if plan.pad else x
            out = torch.gather(xp.reshape(b, -1), 1, idx)
        else:
            out = x.reshape(b, -1)
        if not plan.colour:
            return out.view(b, c, h, w)
        # per-sample parameters L = (1, b, c, 1-c, s, theta + pi/2, theta); identity where not jittered
        lin = torch.lerp(plan.lid, torch.addmm(plan.t0, r, plan.mp), f[:, _R_JIT:_R_JIT + 1])
        mean_luma = out @ plan.wv  # (B, 1)
        v = torch.cat([lin, lin.sin(), f, mean_luma], 1)
        coef = v[:, plan.factors].prod(2)  # (B, 4): bc, bc s k cos, bc s k sin, b (1-c) m
        a, t = (coef @ plan.basis).to(x.dtype).view(b, c, c + 1).split([c, 1], 2)
        return torch.baddbmm(t, a, out.view(b, c, h * w)).clamp_(0, 1).view(b, c, h, w)

    def _plan(self, x: torch.Tensor) -> _Plan | None:
        key = (x.device, x.dtype, *x.shape[1:], self.ops, self.padding, self.flip_p, self.jitter,
               self.jitter_p, self.gray_p)
        if key not in self._plans:
            self._plans[key] = self._build_plan(x)
        return self._plans[key]

    def _build_plan(self, x: torch.Tensor) -> _Plan | None:
        """The constants of :meth:`_apply` for ``x``'s device, dtype and (C, H, W); None when the
        call is the identity (no padding, no flip and no colour op)."""
        _, c, h, w = x.shape
        dev, f64 = x.device, torch.float64
        p = round(w / 8) if self.padding is None else self.padding
        flip = self.flip_p if "flip" in self.ops else 0.0
        colour = "jitter" in self.ops
        geometry = p > 0 or flip > 0
        if not (geometry or colour):
            return None
        scale, shift, top = (torch.zeros(_NRAND, dtype=f64) for _ in range(3))
        scale[[_R_OY, _R_OX]], top[[_R_OY, _R_OX]] = 2 * p + 1, 2 * p
        for col, q in ((_R_FLIP, flip), (_R_JIT, self.jitter_p if colour else 0.0),
                       (_R_KEEP, 1 - self.gray_p if "grayscale" in self.ops else 1.0)):
            scale[col], shift[col], top[col] = 1.0, q, 1.0
        plan = _Plan(pad=p, scale=scale.to(dev), shift=shift.to(dev), top=top.to(dev),
                     geometry=geometry, colour=colour)
        if geometry:
            hp, wp = h + 2 * p, w + 2 * p
            ci, i, j = torch.meshgrid(*(torch.arange(n, dtype=f64) for n in (c, h, w)),
                                      indexing="ij")
            mg = torch.zeros(_NRAND, c, h, w, dtype=f64)
            mg[_R_OY], mg[_R_OX], mg[_R_FLIP] = wp, 1.0, w - 1 - 2 * j
            plan.cst = (ci * hp * wp + i * wp + j).flatten().to(dev)
            plan.mg = mg.flatten(1).to(dev)
        if colour:
            bri, con, sat, hue = self.jitter
            t0 = torch.tensor([1, 1 - bri, 1 - con, con, 1 - sat, math.pi / 2 - 2 * math.pi * hue,
                               -2 * math.pi * hue], dtype=f64)
            mp = torch.zeros(_NRAND, _NL, dtype=f64)
            mp[_R_BRI, 1], mp[_R_CON, 2], mp[_R_CON, 3], mp[_R_SAT, 4] = 2 * bri, 2 * con, -2 * con, 2 * sat
            mp[_R_HUE, 5] = mp[_R_HUE, 6] = 4 * math.pi * hue
            plan.t0, plan.mp = t0.to(dev), mp.to(dev)
            plan.lid = torch.tensor([1, 1, 1, 0, 1, math.pi / 2, 0], dtype=f64, device=dev)
            plan.factors = torch.tensor(_FACTORS, device=dev)
            basis = torch.zeros(4, c, c + 1, dtype=f64)
            if c == 3:
                p0, p1, p2 = _colour_basis()
                basis[0, :, :3], basis[1, :, :3], basis[2, :, :3] = p0, p1, p2
                wv = p0[0].repeat_interleave(h * w) / (h * w)
            else:
                basis[0, :, :c] = torch.eye(c, dtype=f64)
                wv = torch.full((c * h * w,), 1 / (c * h * w), dtype=f64)
            basis[3, :, c] = 1.0
            plan.basis = basis.flatten(1).to(dev)
            plan.wv = wv.view(-1, 1).to(dev, x.dtype)
        return plan


def augment(x: torch.Tensor, level: int, seed: int = 0) -> torch.Tensor:
    """Functional form of :class:`Augment`: ``Augment(level, seed=seed)(x)`` (one fresh draw)."""
    return Augment(level, seed=seed)(x)


# --------------------------------------------------------------------------- adversarial training
def pgd_attack(
    model: Callable[[torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    y: torch.Tensor,
    eps: float,
    step_size: float | None = None,
    steps: int = 7,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    random_start: bool = True,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """l_inf projected gradient ascent (Madry et al., 2018) on ``loss_fn(model(x + delta), y)``.

    ``x`` is in pixel space [0, 1] (the model normalises inside) and ``eps`` is absolute in the same
    units (``8/255`` for the usual CIFAR budget). Starting from ``delta ~ U[-eps, eps]`` when
    ``random_start``, each of ``steps`` steps sets
    ``delta <- Proj(delta + step_size * sign(grad_delta loss))`` where ``Proj`` clips to the
    eps-ball and keeps ``x + delta`` in [0, 1]. ``step_size`` defaults to ``2.5 * eps / steps``.
    Returns the detached adversarial images; model parameters get no gradient.
    """
    if eps < 0:
        raise ValueError(f"eps must be >= 0 (absolute, pixel units in [0, 1]), got {eps}")
    if eps > 1:
        raise ValueError(f"eps={eps} exceeds the pixel range [0, 1]; pass e.g. 8/255, not 8")
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if x.min() < 0 or x.max() > 1:
        raise ValueError("pgd_attack expects pixel-space inputs in [0, 1] (normalise inside model)")
    x = x.detach()
    if eps == 0:
        return x
    loss_fn = loss_fn or F.cross_entropy
    step_size = 2.5 * eps / steps if step_size is None else step_size
    if random_start:
        u = torch.rand(x.shape, device=x.device, dtype=x.dtype, generator=generator)
        delta = (2 * u - 1) * eps
    else:
        delta = torch.zeros_like(x)
    delta = ((x + delta).clamp(0, 1) - x).detach()
    for _ in range(steps):
        delta.requires_grad_(True)
        loss = loss_fn(model(x + delta), y)
        (grad,) = torch.autograd.grad(loss, delta)
        delta = (delta.detach() + step_size * grad.sign()).clamp(-eps, eps)
        delta = ((x + delta).clamp(0, 1) - x).detach()
    return (x + delta).detach()


# --------------------------------------------------------------------------- losses
def supcon_loss(z: torch.Tensor, y: torch.Tensor, temperature: float = 0.1) -> torch.Tensor:
    """Supervised contrastive loss (Khosla et al., 2020, L_out) of embeddings ``z`` (N, d).

    With ``u_i = z_i / ||z_i||``, positives ``P(i) = {p != i : y_p = y_i}`` and ``A(i) = {a != i}``:

    ``L = mean_{i : P(i) nonempty} -1/|P(i)| sum_{p in P(i)}
    log( exp(u_i . u_p / tau) / sum_{a in A(i)} exp(u_i . u_a / tau) )``.

    Several views of one image are simply several rows with the same label (stack them).
    """
    if z.ndim != 2 or y.ndim != 1 or len(z) != len(y):
        raise ValueError(f"z must be (N, d) and y (N,), got {tuple(z.shape)} and {tuple(y.shape)}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    u = F.normalize(z.float(), dim=1)
    logits = u @ u.T / temperature
    n = len(u)
    self_mask = torch.eye(n, dtype=torch.bool, device=u.device)
    logits = logits.masked_fill(self_mask, float("-inf"))
    log_prob = logits - torch.logsumexp(logits, dim=1, keepdim=True)
    pos = (y[:, None] == y[None, :]) & ~self_mask
    n_pos = pos.sum(1)
    has = n_pos > 0
    if not bool(has.any()):
        raise ValueError("supcon_loss needs at least one pair of rows with the same label")
    mean_log_prob_pos = log_prob.masked_fill(~pos, 0.0).sum(1)[has] / n_pos[has]
    return -mean_log_prob_pos.mean()


def mse_loss(outputs: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Square loss on one-hot targets: ``mean_i ||f(x_i) - e_{y_i}||^2 / 2`` with ``outputs`` (N, K)."""
    if outputs.ndim != 2 or y.ndim != 1 or len(outputs) != len(y):
        raise ValueError(f"outputs must be (N, K) and y (N,), got {tuple(outputs.shape)} and "
                         f"{tuple(y.shape)}")
    target = F.one_hot(y, outputs.shape[1]).to(outputs.dtype)
    return 0.5 * (outputs.float() - target.float()).pow(2).sum(1).mean()


# --------------------------------------------------------------------------- heads
def projection_head(dim: int, layers: int, out_dim: int | None = None) -> nn.Module:
    """A projection head on ``dim``-d features: ``layers`` = 0 none (identity), 1 a linear map,
    2 or 3 an MLP of that many linear layers with ReLU between them (hidden width ``dim``).
    ``out_dim`` defaults to ``dim``. Khosla et al.'s SupCon head is ``layers=2, out_dim=128``."""
    if layers not in (0, 1, 2, 3):
        raise ValueError(f"proj_head_layers must be 0, 1, 2 or 3, got {layers!r}")
    out_dim = dim if out_dim is None else out_dim
    if layers == 0:
        return nn.Identity()
    mods: list[nn.Module] = []
    for i in range(layers):
        last = i == layers - 1
        mods.append(nn.Linear(dim, out_dim if last else dim))
        if not last:
            mods.append(nn.ReLU(inplace=True))
    return nn.Sequential(*mods)


class _Trainer(nn.Module):
    """Pixel-space wrapper used while pre-training: normalise, encode, project, classify."""

    def __init__(self, backbone: nn.Module, head: nn.Module, classifier: nn.Module | None,
                 mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.classifier = classifier
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1), persistent=False)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone((x - self.mean) / self.std))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.embed(x)
        return self.classifier(z) if self.classifier is not None else z


# --------------------------------------------------------------------------- cache
def _update_tensor(h: hashlib._Hash, name: str, t: torch.Tensor) -> None:
    t = t.detach().cpu().contiguous()
    h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
    h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())


def config_hash(backbone: nn.Module, source: TensorDataset, **hparams: object) -> str:
    """SHA-256 (hex, 24 chars) of the backbone's class, its current ``state_dict`` bytes, the source
    images and labels, and ``hparams`` (JSON, sorted keys)."""
    h = hashlib.sha256()
    cls = type(backbone)
    h.update(f"{_CACHE_VERSION}|{cls.__module__}.{cls.__qualname__}|".encode())
    if hparams.get("aug_level", 1) != 1:
        h.update(f"augment-v{_AUGMENT_VERSION}|".encode())
    for name, t in backbone.state_dict().items():
        _update_tensor(h, name, t)
    _update_tensor(h, "source.x", source.x)
    _update_tensor(h, "source.y", source.y)
    h.update(json.dumps(hparams, sort_keys=True, default=str).encode())
    return h.hexdigest()[:24]


def cache_path(key: str) -> Path:
    """Where the weights for cache ``key`` live: ``cache_dir() / f"pretrain-{key}.pt"``."""
    return cache_dir() / f"pretrain-{key}.pt"


def _atomic_save(obj: object, path: Path) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    os.close(fd)
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


# --------------------------------------------------------------------------- pretrain
def _validate(backbone: nn.Module, source: TensorDataset, epochs: int, lr: float,
              batch_size: int, weight_decay: float, aug_level: int,
              adversarial_eps: float | None, loss: str, proj_head_layers: int,
              temperature: float, pgd_steps: int, pgd_step_size: float | None,
              proj_dim: int | None) -> None:
    if not isinstance(backbone, nn.Module):
        raise ValueError(f"backbone must be an nn.Module, got {type(backbone).__name__}")
    if not isinstance(getattr(backbone, "num_features", None), int):
        raise ValueError(f"backbone {type(backbone).__name__} needs an integer .num_features "
                         "(its penultimate feature width)")
    if not isinstance(source, TensorDataset):
        raise ValueError(f"source must be an nclab.data.TensorDataset, got {type(source).__name__}"
                         " (materialize a torchvision dataset with nclab.data.materialize)")
    if len(source) == 0 or source.num_classes < 2:
        raise ValueError(f"source needs samples of at least 2 classes, got {source!r}")
    if not isinstance(epochs, int) or epochs < 1:
        raise ValueError(f"epochs must be a positive int, got {epochs!r}")
    if lr <= 0 or weight_decay < 0 or batch_size < 2:
        raise ValueError(f"need lr > 0, weight_decay >= 0, batch_size >= 2; got lr={lr}, "
                         f"weight_decay={weight_decay}, batch_size={batch_size}")
    if aug_level not in AUG_LEVELS:
        raise ValueError(f"aug_level must be one of {sorted(AUG_LEVELS)}, got {aug_level!r}")
    if adversarial_eps is not None and not 0 < adversarial_eps <= 255:
        raise ValueError(f"adversarial_eps is in units of 1/255 (the paper uses 1, 2, 3, 5, 8); "
                         f"got {adversarial_eps!r}")
    if loss not in LOSSES:
        raise ValueError(f"loss must be one of {LOSSES}, got {loss!r}")
    if loss == "supcon" and adversarial_eps is not None:
        raise ValueError("adversarial training is defined here for the classification losses "
                         "('ce', 'mse'), not for 'supcon'")
    if proj_head_layers not in (0, 1, 2, 3):
        raise ValueError(f"proj_head_layers must be 0, 1, 2 or 3, got {proj_head_layers!r}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if not isinstance(pgd_steps, int) or pgd_steps < 1:
        raise ValueError(f"pgd_steps must be a positive int, got {pgd_steps!r}")
    if pgd_step_size is not None and pgd_step_size <= 0:
        raise ValueError(f"pgd_step_size must be > 0 (absolute, pixel units), got {pgd_step_size}")
    if proj_dim is not None and (not isinstance(proj_dim, int) or proj_dim < 1):
        raise ValueError(f"proj_dim must be a positive int, got {proj_dim!r}")


def pretrain(
    backbone: nn.Module,
    source: TensorDataset,
    *,
    epochs: int,
    lr: float = 0.05,
    batch_size: int = 128,
    weight_decay: float = 5e-4,
    aug_level: int = 1,
    adversarial_eps: float | None = None,
    loss: str = "ce",
    proj_head_layers: int = 0,
    temperature: float = 0.1,
    seed: int = 0,
    device: torch.device | str | None = None,
    cache: bool = True,
    progress: bool = True,
    pgd_steps: int = 7,
    pgd_step_size: float | None = None,
    proj_dim: int | None = None,
    momentum: float = 0.9,
    amp: bool | None = None,
) -> nn.Module:
    """Pre-train ``backbone`` on ``source`` and return it (eval mode, head and classifier dropped).

    Training: SGD (``momentum``, ``weight_decay``) with a cosine learning-rate schedule from ``lr``
    to 0 over ``epochs`` epochs of shuffled mini-batches of ``batch_size`` (last partial batch
    dropped when the set is larger than a batch), augmentation level ``aug_level``
    (:class:`Augment`), then

    * ``loss="ce"``: cross-entropy of ``W g(f(x)) + b``, ``f`` the backbone, ``g`` the projection
      head (:func:`projection_head`, ``proj_head_layers`` layers) and a linear classifier;
    * ``loss="mse"``: :func:`mse_loss` of the same outputs against one-hot targets;
    * ``loss="supcon"``: :func:`supcon_loss` of ``g(f(x))`` over two augmented views of every
      image, temperature ``temperature`` (``proj_dim`` defaults to 128 here when there is a head).

    ``adversarial_eps`` (units of 1/255, the paper uses 1, 2, 3, 5, 8) trains on l_inf PGD examples
    (:func:`pgd_attack`, ``pgd_steps`` steps of ``pgd_step_size``, absolute, default
    ``2.5 * eps / steps``) crafted against the current model in pixel space, after augmentation;
    the model stays in train mode during the attack, as in Madry et al.'s reference code.

    The backbone is trained in place. With ``cache`` the result is stored under
    :func:`cache_path` keyed by :func:`config_hash` of the architecture, initial weights, data and
    all hyper-parameters (not ``device``, ``progress`` or ``amp``), and a later identical call loads
    it (``torch.load(weights_only=True)``) without training. ``amp`` (default: on with CUDA) runs
    the forward pass in bfloat16 autocast. Inputs are normalised with ImageNet statistics, as
    :func:`nclab.data.batches` does by default.
    """
    _validate(backbone, source, epochs, lr, batch_size, weight_decay, aug_level, adversarial_eps,
              loss, proj_head_layers, temperature, pgd_steps, pgd_step_size, proj_dim)
    dev = _resolve_device(device)
    hparams = dict(epochs=epochs, lr=lr, batch_size=batch_size, weight_decay=weight_decay,
                   aug_level=aug_level, adversarial_eps=adversarial_eps, loss=loss,
                   proj_head_layers=proj_head_layers, temperature=temperature, seed=seed,
                   pgd_steps=pgd_steps, pgd_step_size=pgd_step_size, proj_dim=proj_dim,
                   momentum=momentum, mean=list(IMAGENET_MEAN), std=list(IMAGENET_STD))
    path = None
    if cache:
        path = cache_path(config_hash(backbone, source, **hparams))
        if path.exists():
            state = torch.load(path, map_location="cpu", weights_only=True)
            backbone.load_state_dict(state)
            return backbone.to(dev).eval()

    _train(backbone, source, dev, hparams, amp=dev.type == "cuda" if amp is None else amp,
           progress=progress)
    backbone.eval()
    if path is not None:
        _atomic_save({k: v.detach().cpu() for k, v in backbone.state_dict().items()}, path)
        meta = {**hparams, "backbone": type(backbone).__name__, "source": repr(source)}
        path.with_suffix(".json").write_text(json.dumps(meta, indent=1, default=str))
    return backbone


def _resolve_device(device: torch.device | str | None) -> torch.device:
    """``device`` (default: :func:`nclab.runtime.device`) with an explicit index for CUDA, so
    tensors and statistics built from it compare equal to ``tensor.device`` (``cuda:0``)."""
    from .runtime import device as best_device

    dev = torch.device(device) if device is not None else best_device()
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())
    return dev


def _train(backbone: nn.Module, source: TensorDataset, dev: torch.device, hp: dict, amp: bool,
           progress: bool) -> None:
    from tqdm.auto import tqdm

    seed, loss_name = hp["seed"], hp["loss"]
    d = backbone.num_features
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        out_dim = hp["proj_dim"]
        if out_dim is None and loss_name == "supcon" and hp["proj_head_layers"] > 0:
            out_dim = 128
        head = projection_head(d, hp["proj_head_layers"], out_dim)
        z_dim = d if hp["proj_head_layers"] == 0 else (out_dim or d)
        classifier = None if loss_name == "supcon" else nn.Linear(z_dim, source.num_classes)
    model = _Trainer(backbone, head, classifier, hp["mean"], hp["std"]).to(dev)
    if dev.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    model.train()

    data = source.to(dev)
    drop_last = len(data) > hp["batch_size"]
    loader = batches(data, hp["batch_size"], shuffle=True, device=dev, mean=(0.0, 0.0, 0.0),
                     std=(1.0, 1.0, 1.0), drop_last=drop_last, seed=seed)
    aug = Augment(hp["aug_level"], seed=seed)
    pgd_gen = torch.Generator(device=dev).manual_seed(seed + 1)
    eps = None if hp["adversarial_eps"] is None else hp["adversarial_eps"] / 255.0
    crit = mse_loss if loss_name == "mse" else F.cross_entropy

    opt = torch.optim.SGD(model.parameters(), lr=hp["lr"], momentum=hp["momentum"],
                          weight_decay=hp["weight_decay"])
    total = hp["epochs"] * len(loader)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda step: 0.5 * (1 + math.cos(math.pi * min(step, total) / total)))
    autocast = torch.autocast(dev.type, dtype=torch.bfloat16, enabled=amp)

    bar = tqdm(range(hp["epochs"]), desc=f"pretrain {loss_name}", disable=not progress,
               leave=False)
    for epoch in bar:
        run_loss = torch.zeros((), device=dev)
        for x, y in loader:
            if loss_name == "supcon":
                views = torch.cat([aug(x), aug(x)])
                if dev.type == "cuda":
                    views = views.contiguous(memory_format=torch.channels_last)
                with autocast:
                    z = model.embed(views)
                batch_loss = supcon_loss(z.float(), torch.cat([y, y]), hp["temperature"])
            else:
                xa = aug(x)
                if dev.type == "cuda":
                    xa = xa.contiguous(memory_format=torch.channels_last)
                if eps is not None:
                    def attack_model(v: torch.Tensor) -> torch.Tensor:
                        with autocast:
                            return model(v).float()

                    xa = pgd_attack(attack_model, xa, y, eps, hp["pgd_step_size"],
                                    hp["pgd_steps"], loss_fn=crit, generator=pgd_gen)
                with autocast:
                    out = model(xa)
                batch_loss = crit(out.float(), y)
            opt.zero_grad(set_to_none=True)
            batch_loss.backward()
            opt.step()
            sched.step()
            run_loss += batch_loss.detach()
        mean_loss = float(run_loss) / len(loader)  # one sync per epoch
        if not math.isfinite(mean_loss):
            raise ValueError(f"pre-training diverged: the {loss_name} loss is {mean_loss} in epoch "
                             f"{epoch + 1}; lower lr (now {hp['lr']}) or check the inputs. "
                             "Nothing was cached.")
        bar.set_postfix(loss=f"{mean_loss:.3f}")


# --------------------------------------------------------------------------- study runner
#: Result columns :func:`run_study` adds to each configuration's own keys.
STUDY_COLUMNS = ("source_nc1", "downstream_nc1", "transfer_acc", "probe_train_acc")

_META_KEYS = ("label", "group")


def _features(model: nn.Module, data: TensorDataset, batch_size: int, dev: torch.device,
              stats_only: bool) -> object:
    from .features import extract

    loader = batches(data, batch_size, device=dev)
    out = extract(model, loader, ["output"], num_classes=data.num_classes,
                  return_features=not stats_only, device=dev, progress=False)
    return out["output"] if stats_only else (out[0]["output"], out[1])


def run_study(
    configs: Sequence[Mapping[str, object]],
    source: TensorDataset,
    downstream_train: TensorDataset,
    downstream_test: TensorDataset,
    *,
    backbone: Callable[[], nn.Module],
    epochs: int,
    eval_batch_size: int = 512,
    probe_weight_decay: float = 1e-4,
    probe_max_iter: int = 300,
    extra_transfer: Mapping[str, tuple[TensorDataset, TensorDataset]] | None = None,
    device: torch.device | str | None = None,
    cache: bool = True,
    progress: bool = True,
    **defaults: object,
) -> pd.DataFrame:
    """Pre-train one backbone per configuration and measure collapse and transfer: a tidy table.

    Each configuration is a mapping of :func:`pretrain` keyword arguments (``aug_level``,
    ``adversarial_eps``, ``loss``, ``proj_head_layers``, ``seed``, ...) plus the optional labels
    ``label`` and ``group``; ``defaults`` (e.g. ``lr``, ``batch_size``) apply where a configuration
    does not say. For each, ``backbone()`` is called under ``torch.manual_seed(seed)`` (so the
    initial weights follow the seed), trained with :func:`pretrain` (cached), and then, on
    un-augmented images with the trained encoder frozen:

    * ``source_nc1``: NC1 of the penultimate features on ``source`` (the source *training* set);
    * ``downstream_nc1``: NC1 on ``downstream_train``;
    * ``transfer_acc`` / ``probe_train_acc``: accuracy of a linear probe
      (:func:`nclab.probe.linear_probe`, ``probe_weight_decay``, at most ``probe_max_iter``
      L-BFGS iterations) fitted on ``downstream_train`` features, on
      ``downstream_test`` / on its own training set;
    * ``transfer_acc_<name>`` for every ``name: (train, test)`` in ``extra_transfer``: the same
      linear-probe test accuracy on further downstream tasks (the paper's Fig. 1 measures NC1 on
      CIFAR-10 and transfer on four datasets).

    Returns one row per configuration: ``label``, ``group``, every pre-training argument that any
    configuration sets (missing ones filled with :func:`pretrain`'s defaults) and
    :data:`STUDY_COLUMNS`.
    """
    import pandas as pd
    from tqdm.auto import tqdm

    from .metrics import nc1
    from .probe import linear_probe

    if not configs:
        raise ValueError("run_study needs at least one configuration")
    known = set(_PRETRAIN_DEFAULTS) | set(_META_KEYS)
    for cfg in configs:
        unknown = set(cfg) - known
        if unknown:
            raise ValueError(f"unknown configuration keys {sorted(unknown)}; valid keys: "
                             f"{sorted(known)}")
    bad = set(defaults) - set(_PRETRAIN_DEFAULTS)
    if bad:
        raise ValueError(f"unknown pretrain arguments {sorted(bad)}")
    dev = _resolve_device(device)
    keys = [k for k in _PRETRAIN_DEFAULTS if any(k in c for c in configs)]
    rows = []
    for cfg in tqdm(configs, desc="study", disable=not progress):
        kw = {**defaults, **{k: v for k, v in cfg.items() if k not in _META_KEYS}}
        seed = int(kw.get("seed", 0))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            net = backbone()
        net = pretrain(net, source, epochs=epochs, device=dev, cache=cache, progress=progress,
                       **kw)
        src_stats = _features(net, source, eval_batch_size, dev, stats_only=True)
        h_tr, y_tr = _features(net, downstream_train, eval_batch_size, dev, stats_only=False)
        h_te, y_te = _features(net, downstream_test, eval_batch_size, dev, stats_only=False)
        probe = linear_probe(h_tr, y_tr, h_te, y_te, weight_decay=probe_weight_decay,
                             max_iter=probe_max_iter, num_classes=downstream_train.num_classes)
        row = {"label": cfg.get("label", _label(kw)), "group": cfg.get("group", "")}
        row.update({k: kw.get(k, _PRETRAIN_DEFAULTS[k]) for k in keys})
        row.update(source_nc1=nc1(src_stats),
                   downstream_nc1=nc1(h_tr, y_tr, num_classes=downstream_train.num_classes),
                   transfer_acc=probe.test_acc, probe_train_acc=probe.train_acc)
        for name, (train_ds, test_ds) in (extra_transfer or {}).items():
            h_a, y_a = _features(net, train_ds, eval_batch_size, dev, stats_only=False)
            h_b, y_b = _features(net, test_ds, eval_batch_size, dev, stats_only=False)
            row[f"transfer_acc_{name}"] = linear_probe(
                h_a, y_a, h_b, y_b, weight_decay=probe_weight_decay, max_iter=probe_max_iter,
                num_classes=train_ds.num_classes).test_acc
        rows.append(row)
    return pd.DataFrame(rows)


def _label(kw: Mapping[str, object]) -> str:
    loss = str(kw.get("loss", "ce"))
    parts = [{"ce": "CE", "mse": "MSE", "supcon": "SupCon"}.get(loss, loss)]
    if kw.get("aug_level", 1) != 1:
        parts.append(f"aug {kw['aug_level']}")
    if kw.get("adversarial_eps") is not None:
        parts.append(f"adv {kw['adversarial_eps']}/255")
    if kw.get("proj_head_layers", 0):
        parts.append(f"head {kw['proj_head_layers']}")
    return ", ".join(parts)


# pretrain's keyword arguments a configuration may set, with their defaults
_PRETRAIN_DEFAULTS: dict[str, object] = dict(
    lr=0.05, batch_size=128, weight_decay=5e-4, aug_level=1, adversarial_eps=None, loss="ce",
    proj_head_layers=0, temperature=0.1, seed=0, pgd_steps=7, pgd_step_size=None, proj_dim=None,
    momentum=0.9)


# --------------------------------------------------------------------------- chapter setup
def cifar_resnet18() -> nn.Module:
    """The CIFAR variant of ResNet-18 (3x3 stem, no max-pool, stages of 2 basic blocks with widths
    64-128-256-512, strides 1-2-2-2): :class:`nclab.models.ResNetS` ``(64, (2, 2, 2, 2))``."""
    from .models import ResNetS

    return ResNetS(width=64, depths=(2, 2, 2, 2))


def _tiny_convnet() -> nn.Module:
    from .models import ConvNetS

    return ConvNetS(width=16, depth=3)


def _small_convnet() -> nn.Module:
    from .models import ConvNetS

    return ConvNetS(width=16, depth=4)


@dataclass
class SourceStudy:
    """Everything the chapter "Source collapse" runs, sized by a profile (see :func:`source_study`).

    ``augmentation`` holds the Fig. 1 configurations (augmentation levels 1-5 for every seed in
    ``seeds``); ``sweep`` the Fig. 10 one-knob sweep (PGD attack sizes, 0 = clean, at one
    augmentation level, trained ``sweep_epochs`` epochs, for the first seeds);
    ``losses`` the Fig. 11 / App. B ones (CE and MSE with 0-3 head layers, SupCon with 1-3; ``smoke``
    and ``real`` trim MSE to 0 and 3) for every seed, all at augmentation level 3. ``run(configs)`` calls
    :func:`run_study` with this study's data and sizes. ``checked`` names the claims of
    :data:`SOURCE_CLAIMS` the chapter asserts in this profile.
    """

    profile: str
    source: TensorDataset
    downstream_train: TensorDataset
    downstream_test: TensorDataset
    backbone: Callable[[], nn.Module]
    backbone_name: str
    epochs: int
    seeds: tuple[int, ...]
    pretrain_kwargs: dict = field(default_factory=dict)
    probe_max_iter: int = 300
    extra_transfer: dict = field(default_factory=dict)
    augmentation: list[dict] = field(default_factory=list)
    losses: list[dict] = field(default_factory=list)
    sweep: list[dict] = field(default_factory=list)
    sweep_epochs: int = 0
    checked: frozenset[str] = field(default_factory=frozenset)

    def setup(self) -> None:
        """On a CPU, one intra-op thread (:func:`nclab.runtime.cpu_threads`)."""
        from .runtime import cpu_threads

        cpu_threads(1)

    def run(self, configs: Sequence[Mapping[str, object]], *, epochs: int | None = None,
            device: torch.device | str | None = None, cache: bool = True,
            progress: bool = True, extra: bool = True) -> pd.DataFrame:
        """:func:`run_study` on this study's data, backbone and sizes (``epochs`` overrides;
        ``extra=False`` skips the further downstream tasks of ``extra_transfer``)."""
        return run_study(configs, self.source, self.downstream_train, self.downstream_test,
                         backbone=self.backbone, epochs=epochs or self.epochs, device=device,
                         cache=cache, progress=progress, probe_max_iter=self.probe_max_iter,
                         extra_transfer=self.extra_transfer if extra else None,
                         **self.pretrain_kwargs)

    def run_sweep(self, *, device: torch.device | str | None = None, cache: bool = True,
                  progress: bool = True) -> pd.DataFrame:
        """The one-knob adversarial sweep (``sweep``, ``sweep_epochs`` epochs, no extra tasks)."""
        return self.run(self.sweep, epochs=self.sweep_epochs, device=device, cache=cache,
                        progress=progress, extra=False)

    def describe(self) -> str:
        """One line per ingredient, for the chapter to print."""
        return "\n".join([
            f"profile {self.profile}: backbone {self.backbone_name}, {self.epochs} epochs, "
            f"seeds {list(self.seeds)}, {self.pretrain_kwargs}",
            f"source            {self.source!r}",
            f"downstream train  {self.downstream_train!r}",
            f"downstream test   {self.downstream_test!r}",
            *(f"also transfer to  {name}: {tr!r}" for name, (tr, _) in self.extra_transfer.items()),
            f"configurations    {len(self.augmentation)} augmentation, {len(self.losses)} "
            f"loss/head, {len(self.sweep)} adversarial sweep ({self.sweep_epochs} epochs)",
        ])


# projection-head depths per loss in the loss study (Fig. 11: CE/MSE without and with 1-3 layers,
# SupCon with a linear or MLP head)
_HEADS = {"ce": (0, 1, 2, 3), "mse": (0, 1, 2, 3), "supcon": (1, 2, 3)}

#: Sizes per profile that the profile itself does not carry (``smoke`` and ``real`` trim the grid
#: to fit CPU minutes: MSE heads 0 and 3 only). ``real`` splits the classes of its source (real
#: CIFAR-10, 32 px) into a source half and a downstream half (``split_source``), trains for
#: ``epochs`` instead of the profile's ``pretrain_epochs`` and probes the datasets ``extra`` as
#: further downstream tasks (Fashion-MNIST only). The one-knob adversarial sweep trains
#: ``sweep_seeds`` seeds per attack size in ``sweep_eps`` (0 = clean) at ``sweep_aug_level`` for
#: ``sweep_epochs`` epochs with ``sweep_pgd_steps`` PGD steps; the CPU profiles train without
#: augmentation and with one PGD step so that the clean models reach a source NC1 below 1 in CPU
#: minutes.
_SWEEP_EPS = (0, 0.5, 1, 2, 3, 5, 8)

#: The claims chapter 03 can assert, by name; a profile's ``checked`` (in ``_STUDY_SIZES``) names
#: those that held on every seed when the chapter was run in that profile.
SOURCE_CLAIMS: dict[str, str] = {
    "level1_least_collapsed": "augmentation level 1 has the smallest source NC1 among levels "
                              "1, 3, 4, 5 on every seed",
    "pgd_raises_source_nc1": "the largest PGD attack size leaves a larger source NC1 than clean "
                             "training on every seed of the sweep",
    "sweep_r_negative": "over the sweep, r(source NC1, transfer) < 0 on every seed",
    "head_raises_source_nc1": "a 3-layer head raises the seed-mean source NC1 for every loss",
    "mse_below_ce": "MSE leaves a smaller source NC1 than CE (no head) on every seed",
    "loss_r_negative": "over the loss study, r(source NC1, transfer) < 0 on every seed",
    "recipes_source_r_negative": "over the one-architecture recipes, r(log source NC1, transfer) "
                                 "< 0 on every task and seed (its interval is not required)",
    "recipes_larger_eps_more_collapsed": "in both larger-eps pairs of recipes the larger "
                                             "attack leaves the larger source NC1",
}
# measured with seeds 0, 1, 2 (``course`` and ``paper`` were never run: nothing asserted there)
_SMOKE_CHECKED = frozenset({"level1_least_collapsed", "pgd_raises_source_nc1",
                            "head_raises_source_nc1"})
_REAL_CHECKED = frozenset(SOURCE_CLAIMS)
_STUDY_SIZES: dict[str, dict] = {
    "smoke": dict(backbone=_tiny_convnet, backbone_name="ConvNetS(width=16, depth=3)",
                  image_size=16, lr=0.05, weight_decay=5e-4, batch_size=64, pgd_steps=2,
                  probe_max_iter=100, heads={"ce": (0, 1, 2, 3), "mse": (0, 3), "supcon": (1, 2, 3)},
                  sweep_eps=(0, 1, 3, 8), sweep_seeds=1, sweep_epochs=4, sweep_aug_level=1,
                  sweep_pgd_steps=1, checked=_SMOKE_CHECKED),
    "real": dict(backbone=_small_convnet, backbone_name="ConvNetS(width=16, depth=4)",
                 split_source=True, extra=("fashion_mnist_2k",), epochs=10, lr=0.05,
                 weight_decay=5e-4, batch_size=64, pgd_steps=2, probe_max_iter=100,
                 heads={"ce": (0, 1, 2, 3), "mse": (0, 3), "supcon": (1, 2, 3)},
                 sweep_eps=_SWEEP_EPS, sweep_seeds=3, sweep_epochs=20,
                 sweep_aug_level=1, sweep_pgd_steps=1, checked=_REAL_CHECKED),
    "course": dict(backbone=cifar_resnet18, backbone_name="CIFAR ResNet-18",
                   lr=0.1, weight_decay=5e-4, batch_size=256, pgd_steps=3,
                   sweep_eps=_SWEEP_EPS, sweep_seeds=3, sweep_aug_level=3, sweep_pgd_steps=3),
    "paper": dict(backbone=cifar_resnet18, backbone_name="CIFAR ResNet-18",
                  lr=0.1, weight_decay=1e-4, batch_size=256, pgd_steps=7,
                  sweep_eps=_SWEEP_EPS, sweep_seeds=3, sweep_aug_level=3, sweep_pgd_steps=7),
}


#: What a rehearsal (:func:`nclab.runtime.rehearsal`) changes in its profile's study: sizes only
#: (2 source images per class at 16 px, as ``smoke`` trains, four attack sizes in the sweep: the
#: fewest its quadratic fit takes, short probes); every configuration group, loss and head of the
#: profile still runs. In CI the 32-px rehearsal trained ~23 s per model, 20 models.
_REHEARSAL_SIZES = dict(source_per_class=2, sweep_eps=(0, 1, 3, 8), sweep_seeds=1,
                        probe_max_iter=20, image_size=16)


def _cap_per_class(ds: TensorDataset, n: int | None, seed: int = 0) -> TensorDataset:
    from .data import subset_per_class

    if n is None:
        return ds
    counts = torch.bincount(ds.y.cpu(), minlength=ds.num_classes)
    return ds if int(counts.min()) <= n else subset_per_class(ds, n, seed=seed)


def _extra_transfer(names: Sequence[str], root: str | os.PathLike | None, size: int,
                    cap: int | None) -> dict[str, tuple[TensorDataset, TensorDataset]]:
    """Train/test pairs of further downstream datasets at ``size`` px; unavailable ones are skipped
    with a warning that says how to get them."""
    import warnings

    from .data import DatasetUnavailableError, load, materialize

    out = {}
    for name in names:
        try:
            pair = []
            for split in ("train", "test"):
                ds = load(name, split, root=root, image_size=size)
                pair.append(ds if isinstance(ds, TensorDataset) else materialize(ds))
        except DatasetUnavailableError as err:
            warnings.warn(f"source study: skipping downstream dataset {name!r}: {err}",
                          stacklevel=3)
            continue
        out[name] = (_cap_per_class(pair[0], cap), pair[1])
    return out


def source_study(profile: Profile | str | None = None, root: str | os.PathLike | None = None
                 ) -> SourceStudy:
    """The chapter's study for ``profile`` (default: the active one).

    Source = ``profile.source``, downstream = ``profile.downstream[0]``; when they are the same
    dataset (``smoke``: digits) its classes are split, the first half the source task and the
    second half the downstream task. ``smoke`` trains a small ConvNet on digits 0-4 (at 16 px, to
    fit CPU time) and transfers to 5-9; ``real`` always splits its source the same way: a ConvNet
    (:class:`nclab.models.ConvNetS` ``(16, 4)``) is pre-trained for a few epochs on the real
    CIFAR-10 images (``cifar10_2k``, 32 px) of classes 0-4 (airplane, automobile, bird, cat,
    deer) and transferred to classes 5-9 (dog, frog, horse, ship, truck), with linear transfer
    also measured on Fashion-MNIST (``fashion_mnist_2k`` at 32 px, the first dataset of
    ``profile.downstream``) in ``extra_transfer``; ``course``/``paper`` train a CIFAR ResNet-18 on CIFAR-100
    and transfer to CIFAR-10 (training images per class capped at ``profile.max_train_per_class``);
    they also probe the other ``profile.downstream`` datasets at the source resolution
    (``extra_transfer``; any that cannot be loaded are skipped with a warning).
    """
    from .data import class_subset, load
    from .runtime import profile as active_profile

    prof = active_profile(profile)
    sizes = _STUDY_SIZES.get(prof.name, _STUDY_SIZES["course"])
    if prof.rehearsal:
        sizes = {**sizes, **_REHEARSAL_SIZES}
    down_name = prof.downstream[0]
    size = sizes.get("image_size")
    src_train = load(prof.source, "train", root=root, image_size=size)
    split = sizes.get("split_source", False)
    if split or down_name == prof.source:
        k = src_train.num_classes
        first, second = list(range(k // 2)), list(range(k // 2, k))
        source = class_subset(src_train, first)
        d_train = class_subset(src_train, second)
        d_test = class_subset(load(prof.source, "test", root=root, image_size=size), second)
    else:
        source = src_train
        d_train = load(down_name, "train", root=root, image_size=size)
        d_test = load(down_name, "test", root=root, image_size=size)
    for ds in (source, d_train, d_test):
        if not isinstance(ds, TensorDataset):
            raise ValueError(f"the source study needs fixed-size image datasets; got {ds!r}")
    d_train = _cap_per_class(d_train, prof.max_train_per_class)
    source = _cap_per_class(source, sizes.get("source_per_class"))
    if split:  # the downstream task is the source's other half; further datasets are extra
        extra_names: Sequence[str] = [n for n in sizes.get("extra", prof.downstream)
                                      if n != prof.source]
    else:
        extra_names = [] if down_name == prof.source else prof.downstream[1:]
    extra = _extra_transfer(extra_names, root, size or source.x.shape[-1],
                            prof.max_train_per_class) if extra_names else {}
    seeds = tuple(prof.seeds)
    aug = [dict(group="augmentation", aug_level=lvl, seed=s) for s in seeds for lvl in AUG_LEVELS]
    sweep = [dict(group="sweep", aug_level=sizes["sweep_aug_level"], seed=s,
                  pgd_steps=sizes["sweep_pgd_steps"], adversarial_eps=e or None)
             for s in seeds[: sizes["sweep_seeds"]] for e in sizes["sweep_eps"]]
    heads = sizes.get("heads", _HEADS)
    losses = [dict(group="loss", loss=loss, proj_head_layers=n, aug_level=3, seed=s)
              for s in seeds for loss in LOSSES for n in heads[loss]]
    return SourceStudy(
        profile=prof.name, source=source, downstream_train=d_train, downstream_test=d_test,
        backbone=sizes["backbone"], backbone_name=sizes["backbone_name"],
        epochs=sizes.get("epochs", prof.pretrain_epochs), seeds=seeds,
        probe_max_iter=sizes.get("probe_max_iter", 300),
        pretrain_kwargs=dict(lr=sizes["lr"], weight_decay=sizes["weight_decay"],
                             batch_size=sizes["batch_size"], pgd_steps=sizes["pgd_steps"]),
        extra_transfer=extra, augmentation=aug, losses=losses, sweep=sweep,
        sweep_epochs=sizes.get("sweep_epochs", sizes.get("epochs", prof.pretrain_epochs)),
        checked=sizes.get("checked", frozenset()))


# --------------------------------------------------------------------------- turning-point fit
@dataclass(frozen=True)
class QuadraticFit:
    """Least-squares fit ``y = b0 + b1 x + b2 x^2`` with t-intervals (see :func:`quadratic_fit`).

    ``coef`` = (b0, b1, b2); ``cov`` their covariance ``s^2 (X^T X)^-1`` with
    ``s^2 = RSS / (n - 3)``; ``low``/``high`` the two-sided ``level`` t-intervals of the coefficients;
    ``x_range`` the smallest and largest x fitted.
    """

    coef: tuple[float, float, float]
    cov: tuple[tuple[float, ...], ...]
    low: tuple[float, float, float]
    high: tuple[float, float, float]
    level: float
    n: int
    x_range: tuple[float, float]

    @property
    def vertex(self) -> float:
        """x of the parabola's extremum, ``-b1 / (2 b2)`` (``nan`` when ``b2 = 0``)."""
        b2 = self.coef[2]
        return float("nan") if b2 == 0 else -self.coef[1] / (2 * b2)

    @property
    def turn(self) -> bool:
        """Whether the data show a maximum inside them (the interval of ``b2`` lies below 0 and
        the vertex lies within ``x_range``)."""
        lo, hi = self.x_range
        return self.high[2] < 0 and lo <= self.vertex <= hi

    def band(self, x) -> tuple:
        """Fitted mean and its pointwise ``level`` t-interval at ``x``: three float64 arrays
        ``(fit, low, high)``, ``fit +- t * sqrt(v^T cov v)`` with ``v = (1, x, x^2)``."""
        import numpy as np
        import scipy.stats

        x = np.asarray(x, dtype=np.float64)
        v = np.stack([np.ones_like(x), x, x * x], axis=-1)
        fit = v @ np.asarray(self.coef)
        se = np.sqrt(np.einsum("...i,ij,...j->...", v, np.asarray(self.cov), v))
        t = scipy.stats.t.ppf(0.5 + self.level / 2, self.n - 3)
        return fit, fit - t * se, fit + t * se


def quadratic_fit(x, y, level: float = 0.95) -> QuadraticFit:
    """Ordinary least squares of ``y`` on ``(1, x, x^2)`` in float64 with ``level`` t-intervals
    (``n - 3`` degrees of freedom): the per-seed fit of transfer accuracy on source NC1 that the
    paper's Fig. 10 turning point calls for. Needs at least 4 points with 3 distinct x."""
    import numpy as np
    import scipy.stats

    xa = np.asarray(x, dtype=np.float64).ravel()
    ya = np.asarray(y, dtype=np.float64).ravel()
    if xa.shape != ya.shape:
        raise ValueError(f"x and y need the same length, got {xa.size} and {ya.size}")
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    if not (np.isfinite(xa).all() and np.isfinite(ya).all()):
        raise ValueError("x and y must be finite")
    if xa.size < 4 or np.unique(xa).size < 3:
        raise ValueError(f"a quadratic fit with an interval needs >= 4 points and 3 distinct x; "
                         f"got {xa.size} points, {np.unique(xa).size} distinct")
    X = np.stack([np.ones_like(xa), xa, xa * xa], axis=1)
    q, r = np.linalg.qr(X)
    coef = np.linalg.solve(r, q.T @ ya)
    resid = ya - X @ coef
    s2 = float(resid @ resid) / (xa.size - 3)
    r_inv = np.linalg.inv(r)
    cov = s2 * (r_inv @ r_inv.T)
    t = scipy.stats.t.ppf(0.5 + level / 2, xa.size - 3)
    se = np.sqrt(np.diag(cov))
    return QuadraticFit(coef=tuple(float(c) for c in coef),
                        cov=tuple(tuple(float(v) for v in row) for row in cov),
                        low=tuple(float(c) for c in coef - t * se),
                        high=tuple(float(c) for c in coef + t * se),
                        level=level, n=int(xa.size), x_range=(float(xa.min()), float(xa.max())))
