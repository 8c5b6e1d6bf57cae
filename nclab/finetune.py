"""The paper's fine-tuning methods (Sec. 4, App. E-F): what trains, and what the forward computes.

``prepare(model, method, block=k, num_classes=K)`` turns a backbone (from
:func:`nclab.models.load_backbone`, or a plain timm/torchvision/open_clip model of a supported
family, whose classifier is replaced) into a :class:`FineTuned` module
``x -> head(features(x))`` whose trainable parameters are exactly the method's:

- ``linear``: a new linear head ``W h + b`` on frozen penultimate features ``h``;
- ``mlp``: a new 2-layer MLP head (hidden width 1024, the paper's footnote 6);
- ``layer``: Layer FT, Block k (1-based, ``nclab.models.blocks(model)[k-1]``) + a new head;
- ``scl``: SCL FT, as ``layer``, and the penultimate feature becomes ``h + pad(pool(z_k))``, with
  ``z_k`` the output of Block k pooled (CNN: adaptive average per channel; ViT: the token pooling
  of the penultimate feature) and zero-padded to the penultimate width: a parameter-free skip
  connection;
- ``full``: every parameter + a new head;
- ``layer_lora``: LoRA (rank 96 as in Table 5, via HF ``peft``) on Block k's linear/conv layers
  only, + a new head.

Normalisation layers follow the module's mode: in ``train()`` BatchNorm uses batch statistics and
updates its running mean/variance on the downstream data for *every* method, frozen or not (the
paper, App. E). ``freeze_norm=True`` keeps every BatchNorm in eval mode (running statistics fixed);
which affine parameters train still follows the method.

:func:`trainable_percent` counts as Table 3 does (old classifier removed, new head counted);
:func:`describe` tabulates what trains; :func:`split` cuts a prepared model into a frozen prefix and
a trainable suffix for caching the prefix's output.
"""

from __future__ import annotations

import abc
import copy as _copy
import re
import warnings
from typing import Any

import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from nclab.features import pool_tap
from nclab.models import (
    _block_width,
    _input_size,
    _norm_stats,
    _resolve_block,
    _steps,
    blocks,
    family,
    feature_dim,
    strip_classifier,
)
from nclab.recompute import recompute_activations

__all__ = [
    "BLOCK_METHODS",
    "METHODS",
    "FineTuned",
    "SkipPool",
    "Truncated",
    "adapt_norm_stats",
    "describe",
    "features_nc1",
    "lora_modules",
    "prepare",
    "split",
    "trainable_percent",
]

#: The fine-tuning methods :func:`prepare` knows.
METHODS: tuple[str, ...] = ("linear", "mlp", "layer", "scl", "full", "layer_lora")
#: The methods that tune one block (they need ``block=``).
BLOCK_METHODS: tuple[str, ...] = ("layer", "scl", "layer_lora")
_CNN = ("resnet", "timm_resnet", "densenet", "timm_densenet", "mobilenet_v2", "googlenet",
        "convnet_s", "resnet_s", "zoo")


class SkipPool(nn.Module):
    """The SCL skip: ``pad(pool(z))`` for a block output ``z``, no parameters.

    ``mode``: ``"avg2d"`` (CNN maps ``(B, C, H, W)`` -> adaptive average per channel), ``"cls"``
    (tokens ``(B, N, D)`` -> ``z[:, 0]``) or ``"avg"`` (mean of the tokens after the
    ``num_prefix_tokens`` class/register tokens). ``seq_first``: tokens come as ``(N, B, D)``.
    The pooled vector is zero-padded on the right to ``width``; a wider one is an error."""

    def __init__(self, mode: str, width: int, num_prefix_tokens: int = 1,
                 seq_first: bool = False) -> None:
        super().__init__()
        self.mode, self.width = mode, width
        self.num_prefix_tokens, self.seq_first = num_prefix_tokens, seq_first

    def extra_repr(self) -> str:
        return f"mode={self.mode!r}, width={self.width}"

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        if self.mode == "avg2d":
            if z.dim() not in (2, 4):
                raise ValueError(f"avg2d pooling expects (B, C, H, W), got shape {tuple(z.shape)}")
            # a linear unit (a zoo CNN's hidden layer) outputs (B, C): nothing to pool
            pooled = z if z.dim() == 2 else F.adaptive_avg_pool2d(z, 1).flatten(1)
        else:
            if z.dim() != 3:
                raise ValueError(f"token pooling expects (B, N, D), got shape {tuple(z.shape)}")
            if self.seq_first:
                z = z.transpose(0, 1)
            pooled = z[:, 0] if self.mode == "cls" else z[:, self.num_prefix_tokens:].mean(1)
        c = pooled.shape[1]
        if c > self.width:
            raise ValueError(f"the tuned block outputs {c} features but the penultimate feature "
                             f"has {self.width}: the SCL skip can only zero-pad, not shrink")
        return F.pad(pooled, (0, self.width - c)) if c < self.width else pooled


class _Prepared(nn.Module, abc.ABC):
    """What a prepared model and its cached-prefix suffix share: BatchNorm layers stay in eval mode
    under ``train()`` when ``freeze_norm``; with ``recompute_frozen``, ``features`` recomputes the
    frozen blocks after the tuned one (``frozen_after()``) in the backward pass."""

    freeze_norm: bool = False
    recompute_frozen: bool = False

    def train(self, mode: bool = True):
        super().train(mode)
        if self.freeze_norm:
            _norms_eval(self)
        return self

    @abc.abstractmethod
    def frozen_after(self) -> list[nn.Module]:
        """The frozen blocks after the tuned one, in forward order."""

    @abc.abstractmethod
    def _features(self, x: torch.Tensor) -> torch.Tensor:
        """The penultimate features of ``x`` (without recomputation)."""

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate features (see the subclass's ``_features``)."""
        if self.recompute_frozen and torch.is_grad_enabled():
            with recompute_activations(self.frozen_after()):
                return self._features(x)
        return self._features(x)


class _Cut(Exception):
    """Raised by a hook to stop a forward pass after the block it watches."""


class Truncated(nn.Module):
    """``backbone`` cut after Block k: ``forward(x)`` runs the backbone up to Block k only and
    returns its output pooled to (B, C) (CNN: channel average; ViT: token average), so the layers
    after Block k are dropped (they stay attached but never run). ``num_features`` = that width."""

    def __init__(self, backbone: nn.Module, block: int) -> None:
        super().__init__()
        units = blocks(backbone)
        if not 1 <= block <= len(units):
            raise ValueError(f"block {block} out of range: this backbone has blocks 1..{len(units)}")
        self.backbone = backbone
        self.block = block
        self.block_name, self._unit = units[block - 1]
        self.num_features = _block_width(family(backbone), self._unit)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        store: list[Any] = []

        def hook(_m: nn.Module, _i: Any, out: Any) -> None:
            store.append(out)
            raise _Cut

        handle = self._unit.register_forward_hook(hook)
        try:
            self.backbone(x)
        except _Cut:
            pass
        finally:
            handle.remove()
        if not store:
            raise RuntimeError(f"Block {self.block} ({self.block_name}) did not run in forward")
        return pool_tap(store[0], "avg", batch_size=len(x))


class FineTuned(_Prepared):
    """A backbone with a new head, prepared for one fine-tuning method (see :func:`prepare`).

    Attributes: ``backbone``, ``head``, ``method``, ``block`` (1-based, or None), ``block_name``
    (qualified name inside ``backbone``), ``skip`` (:class:`SkipPool` for ``scl``, else None),
    ``num_features`` (penultimate width d), ``num_classes``, ``freeze_norm``, ``lora_targets``,
    ``recompute_frozen`` (settable: see :func:`prepare`)."""

    def __init__(self, backbone: nn.Module, head: nn.Module, method: str, *,
                 block: int | None = None, block_name: str | None = None,
                 skip: SkipPool | None = None, freeze_norm: bool = False,
                 num_classes: int | None = None, lora_targets: tuple[str, ...] = (),
                 recompute_frozen: bool = False) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.method = method
        self.block = block
        self.block_name = block_name
        self.skip = skip
        self.freeze_norm = freeze_norm
        self.num_features = feature_dim(backbone)
        self.num_classes = num_classes
        self.lora_targets = lora_targets
        self.recompute_frozen = recompute_frozen

    def block_module(self) -> nn.Module | None:
        """The tuned block (None for methods without one)."""
        if self.block_name is None:
            return None
        return dict(self.backbone.named_modules())[self.block_name]

    def frozen_after(self) -> list[nn.Module]:
        """The blocks after the tuned one (frozen; the gradient passes through them)."""
        if self.block is None:
            return []
        return [m for _, m in blocks(self.backbone)[self.block:]]

    def _features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate features ``h`` (B, d); for ``scl`` ``h + pad(pool(z_k))``."""
        if self.skip is None:
            return self.backbone(x)
        store: list[torch.Tensor] = []
        hook = self.block_module().register_forward_hook(lambda _m, _i, out: store.append(out))
        try:
            h = self.backbone(x)
        finally:
            hook.remove()
        return h + self.skip(store[-1])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))

    def extra_repr(self) -> str:
        where = f", block={self.block} ({self.block_name})" if self.block else ""
        return f"method={self.method!r}{where}"


def _norms_eval(module: nn.Module) -> None:
    for m in module.modules():
        if isinstance(m, _BatchNorm):
            m.eval()


def _skip_pool(model: nn.Module, fam: str, pool: str, width: int) -> SkipPool:
    if pool not in ("auto", "avg", "cls"):
        raise ValueError(f"pool must be 'auto', 'avg' or 'cls', got {pool!r}")
    if fam in _CNN:
        if pool == "cls":
            raise ValueError(f"pool='cls' needs tokens; a {fam} block outputs feature maps: use "
                             "pool='auto' (adaptive average per channel)")
        return SkipPool("avg2d", width)
    if fam == "vit":
        n_prefix = int(getattr(model, "num_prefix_tokens", 1))
        if pool == "auto":
            if getattr(model, "attn_pool", None) is not None or model.global_pool not in (
                    "token", "avg"):
                raise ValueError(f"this ViT pools its penultimate feature with "
                                 f"{model.global_pool!r}; pass pool='cls' or pool='avg'")
            pool = "cls" if model.global_pool == "token" else "avg"
        return SkipPool(pool, width, num_prefix_tokens=n_prefix)
    # clip_vit
    if pool == "auto":
        if model.pool_type not in ("tok", "avg") or getattr(model, "attn_pool", None) is not None:
            raise ValueError(f"this CLIP tower pools with {model.pool_type!r}; pass pool='cls' or "
                             "pool='avg'")
        pool = "cls" if model.pool_type == "tok" else "avg"
    seq_first = not getattr(model.transformer, "batch_first", True)
    return SkipPool(pool, width, num_prefix_tokens=1, seq_first=seq_first)


def _make_head(d: int, num_classes: int, method: str, hidden: int) -> nn.Module:
    if method == "mlp":
        return nn.Sequential(nn.Linear(d, hidden), nn.ReLU(inplace=True),
                             nn.Linear(hidden, num_classes))
    return nn.Linear(d, num_classes)


def _lora_targets(block_name: str, block: nn.Module) -> tuple[list[str], list[str]]:
    """Names (inside the backbone) of the block's layers LoRA adapts: every ``nn.Linear`` and
    ungrouped ``nn.Conv2d`` whose own ``forward`` runs. Skipped, with a warning:

    - ``nn.MultiheadAttention`` (open_clip's attention): its in-projection is a bare parameter and
      its ``out_proj`` is applied functionally, so a LoRA on ``out_proj`` would do nothing, and
      peft's MultiheadAttention adapter merges the update into the frozen weights and unmerges it
      at every forward, which makes the frozen weights drift by rounding. Only the block's MLP is
      adapted in such blocks (timm ViTs are unaffected: their ``qkv`` is an ``nn.Linear``).
    - grouped (depthwise) convolutions: peft needs the rank divisible by the groups.

    Returns ``(targets, expected_lora_module_names)`` (the same list here)."""
    skipped_attn = []
    functional = set()
    for n, m in block.named_modules():
        if isinstance(m, nn.MultiheadAttention):
            functional.add(id(m.out_proj))
            skipped_attn.append(n)
    targets = []
    for n, m in block.named_modules():
        full = f"{block_name}.{n}" if n else block_name
        if isinstance(m, nn.Linear) and id(m) not in functional:
            targets.append(full)
        elif isinstance(m, nn.Conv2d) and m.groups == 1:
            targets.append(full)
    if skipped_attn:
        warnings.warn(
            f"layer_lora: nn.MultiheadAttention in {block_name!r} ({', '.join(skipped_attn)}) gets "
            "no LoRA (peft's adapter for it rewrites the frozen weights at every forward); only "
            "its Linear layers are adapted", stacklevel=4)
    return targets, list(targets)


def lora_modules(model: nn.Module) -> list[str]:
    """Qualified names of the LoRA-adapted modules (peft ``LoraLayer``) inside ``model``."""
    try:
        from peft.tuners.lora import LoraLayer
    except ImportError:  # pragma: no cover - peft is a dependency
        return []
    return [n for n, m in model.named_modules() if isinstance(m, LoraLayer)]


def _inject_lora(backbone: nn.Module, block_name: str, block: nn.Module, rank: int,
                 alpha: float | None) -> tuple[str, ...]:
    from peft import LoraConfig, inject_adapter_in_model

    targets, expected = _lora_targets(block_name, block)
    if not targets:
        raise ValueError(f"block {block_name!r} has no nn.Linear/nn.Conv2d layer for LoRA")
    # a regex matched against full module names (peft uses re.fullmatch for a string), so exactly
    # these modules are adapted: no suffix matching, no layers_to_transform guessing
    pattern = "|".join(re.escape(t) for t in targets)
    cfg = LoraConfig(r=rank, lora_alpha=rank if alpha is None else alpha,
                     target_modules=pattern, lora_dropout=0.0, bias="none")
    inject_adapter_in_model(cfg, backbone)
    inserted = set(lora_modules(backbone))
    if inserted != set(expected):
        raise RuntimeError(
            f"peft inserted LoRA into {sorted(inserted - set(expected))[:5]} (unexpected) and "
            f"missed {sorted(set(expected) - inserted)[:5]}; asked for {targets}"
        )
    return tuple(targets)


def prepare(
    model: nn.Module,
    method: str,
    block: int | None = None,
    num_classes: int | None = None,
    *,
    hidden: int = 1024,
    lora_rank: int = 96,
    lora_alpha: float | None = None,
    freeze_norm: bool = False,
    pool: str = "auto",
    copy: bool = True,
    recompute_frozen: bool = False,
) -> FineTuned:
    """Prepare ``model`` for fine-tuning with ``method`` (one of :data:`METHODS`).

    - ``block``: Block k (1-based) for ``layer``/``scl``/``layer_lora``; default the paper's
      choice (:func:`nclab.models.default_block`: ResNet ``layer3.0``, ViT/CLIP Layer 8). Ignored
      by ``linear``/``mlp``/``full``.
    - ``num_classes``: K, the width of the new head (required).
    - ``hidden``: MLP head width (paper: 1024). ``lora_rank``/``lora_alpha``: LoRA rank (paper:
      96) and scale numerator (default = rank, i.e. scale 1).
    - ``freeze_norm``: keep BatchNorm layers in eval mode (running statistics fixed); default:
      they follow ``train()``/``eval()`` and update on the downstream data, as in the paper.
    - ``pool``: SCL skip pooling — ``"auto"`` (CNN: adaptive average; ViT: as its penultimate
      feature), ``"avg"`` or ``"cls"``.
    - ``copy``: work on a deep copy (default), leaving ``model`` untouched; ``False`` modifies it
      in place (saves memory).
    - ``recompute_frozen``: for ``layer``/``scl``/``layer_lora``, keep no activations of the frozen
      blocks after Block k for the backward pass and recompute them there instead
      (:func:`nclab.recompute.recompute_activations`): same gradients and BatchNorm statistics,
      much less activation memory when Block k is early, one extra forward of those blocks per
      step. Settable later as ``model.recompute_frozen``.

    The model's classifier is replaced (torchvision ``fc``/``classifier``, timm
    ``reset_classifier(0)``, open_clip's projection dropped) before the new head is added. Returns
    a :class:`FineTuned` in train mode.
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; valid methods: {', '.join(METHODS)}")
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive int (the downstream K), got "
                         f"{num_classes!r}")
    if isinstance(model, FineTuned):
        raise ValueError("model is already prepared (a FineTuned); pass its .backbone, or the "
                         "original backbone, to prepare it for another method")
    if recompute_frozen and method not in BLOCK_METHODS:
        raise ValueError(f"recompute_frozen=True applies to {', '.join(BLOCK_METHODS)} (frozen "
                         f"blocks after the tuned one); method {method!r} has none")
    if method == "layer_lora" and (not isinstance(lora_rank, int) or lora_rank < 1):
        raise ValueError(f"lora_rank must be a positive int, got {lora_rank!r}")
    fam = family(model)  # TypeError listing the supported families
    if copy:
        model = _copy.deepcopy(model)
    strip_classifier(model)
    d = feature_dim(model)
    k = name = None
    block_mod = None
    if method in BLOCK_METHODS:
        k, name, block_mod = _resolve_block(model, block)
    for p in model.parameters():
        p.requires_grad_(method == "full")
    skip = None
    if method in ("layer", "scl"):
        for p in block_mod.parameters():
            p.requires_grad_(True)
    if method == "scl":
        width = _block_width(fam, block_mod)
        if width > d:
            raise ValueError(
                f"SCL FT adds Block {k} ({name!r}, {width} output features) to the penultimate "
                f"feature ({d} features), but the skip can only zero-pad a narrower output. Pick "
                f"a block whose output is at most {d} wide, or use method='layer'"
                + (" (or load the CLIP tower without its projection, projection=False)"
                   if fam == "clip_vit" else "")
            )
        skip = _skip_pool(model, fam, pool, d)
    targets: tuple[str, ...] = ()
    if method == "layer_lora":
        targets = _inject_lora(model, name, block_mod, lora_rank, lora_alpha)
        for n, p in model.named_parameters():
            p.requires_grad_("lora_" in n)
    head = _make_head(d, num_classes, method, hidden)
    ref = next(model.parameters(), None)
    if ref is not None and ref.device.type != "meta":
        head.to(device=ref.device, dtype=ref.dtype if ref.is_floating_point() else None)
    ft = FineTuned(model, head, method, block=k, block_name=name, skip=skip,
                   freeze_norm=freeze_norm, num_classes=num_classes, lora_targets=targets,
                   recompute_frozen=recompute_frozen)
    return ft.train()


# --------------------------------------------------------------------------- inspection


def _counts(model: nn.Module) -> tuple[int, int]:
    total = trainable = 0
    for p in model.parameters():
        total += p.numel()
        trainable += p.numel() if p.requires_grad else 0
    return trainable, total


def trainable_percent(model: nn.Module) -> float:
    """100 * (trainable parameters) / (all parameters) of a prepared model — Table 3's count:
    the old classifier is gone, the new head (and any LoRA factor) is counted."""
    trainable, total = _counts(model)
    if total == 0:
        raise ValueError("the model has no parameters")
    return 100.0 * trainable / total


def describe(model: FineTuned) -> pd.DataFrame:
    """What trains: one row per fine-tuning unit, one for the rest of the backbone (stem,
    transitions, final norm...), one for the head and a total. Columns: ``module``, ``params``,
    ``trainable_params``, ``trainable`` (yes / no / partly), ``percent`` (share of all
    parameters), ``trainable_percent`` (share of all parameters that trains here)."""
    if not isinstance(model, FineTuned):
        raise TypeError(f"describe() takes a prepared model (nclab.finetune.prepare), got "
                        f"{type(model).__name__}")
    try:
        word = "Layer" if family(model.backbone) in ("vit", "clip_vit") else "Block"
        units = [n for n, _ in blocks(model.backbone)]
    except TypeError:  # a backbone of another architecture: no per-unit rows
        word, units = "Block", []
    groups: dict[str, list[int]] = {"backbone (outside the units)": [0, 0]}
    labels = {}
    for k, n in enumerate(units, start=1):
        label = f"{word} {k}: {n}" + (" (tuned)" if n == model.block_name else "")
        labels[n] = label
        groups[label] = [0, 0]
    groups["head"] = [0, 0]
    seen = set()
    for pname, p in model.named_parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        if pname.startswith("head."):
            g = "head"
        else:
            inner = pname[len("backbone."):]
            g = next((labels[n] for n in units if inner.startswith(n + ".")),
                     "backbone (outside the units)")
        groups[g][0] += p.numel()
        groups[g][1] += p.numel() if p.requires_grad else 0
    total = sum(v[0] for v in groups.values())
    rows = []
    for g, (n, t) in [*groups.items(), ("total", [total, sum(v[1] for v in groups.values())])]:
        if n == 0 and g != "total":
            continue
        rows.append({"module": g, "params": n, "trainable_params": t,
                     "trainable": "yes" if t == n and n else ("no" if t == 0 else "partly"),
                     "percent": round(100.0 * n / total, 2),
                     "trainable_percent": round(100.0 * t / total, 2)})
    return pd.DataFrame(rows)


# --------------------------------------------------------------------------- cached prefix


class Suffix(_Prepared):
    """The trainable end of a prepared model: Block k onwards, the SCL skip, the head.
    ``forward(z)`` takes the prefix's output ``z`` (the input of Block k). Shares its modules with
    the prepared model, so training it trains that model."""

    def __init__(self, block: nn.Module, rest: nn.Sequential, skip: SkipPool | None,
                 head: nn.Module, freeze_norm: bool = False,
                 frozen_after: list[nn.Module] | None = None, recompute_frozen: bool = False) -> None:
        super().__init__()
        self.block, self.rest, self.skip, self.head = block, rest, skip, head
        self.freeze_norm = freeze_norm
        self._frozen_after = list(frozen_after or [])  # a plain list: already registered in rest
        self.recompute_frozen = recompute_frozen

    def frozen_after(self) -> list[nn.Module]:
        """The frozen blocks after the tuned one (inside ``rest``)."""
        return self._frozen_after

    def _features(self, z: torch.Tensor) -> torch.Tensor:
        out = self.block(z)
        h = self.rest(out)
        return h if self.skip is None else h + self.skip(out)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(z))


class _PoolTap(nn.Module):
    """Layer LP's pooling of Block k's output, exactly as :class:`Truncated` pools it
    (:func:`nclab.features.pool_tap`, ``"avg"``)."""

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return pool_tap(z, "avg", batch_size=len(z))


def split(model: FineTuned) -> tuple[nn.Module, nn.Module]:
    """``(prefix, suffix)`` with ``suffix(prefix(x)) == model(x)`` (exactly, in eval mode), for
    computing the frozen prefix's output once and training only the suffix.

    ``linear``/``mlp``: prefix = the whole backbone, suffix = the head. ``layer``/``scl``/
    ``layer_lora``: prefix = everything before Block k (no trainable parameter), suffix =
    a ``Suffix`` module (Block k, the rest of the backbone, the SCL skip, the head). Several tuned
    blocks (:func:`nclab.train.tune_blocks`): the cut is before the first of them. Layer LP
    (:func:`nclab.train.layer_lp`, CNN backbones): suffix = Block k, its channel mean, the head.
    ``full`` has no frozen prefix: ``ValueError``. Every supported family splits (ResNet,
    DenseNet, MobileNetV2, GoogLeNet, timm ViT, open_clip ViT, the small nets).

    Caching is exact only while the prefix runs in eval mode: with the paper's default, the frozen
    prefix's BatchNorm layers would use batch statistics during training (and update running
    statistics), which a cache cannot reproduce; ``freeze_norm=True`` models match it exactly.
    The modules are shared with ``model`` (not copies)."""
    if not isinstance(model, FineTuned):
        raise TypeError(f"split() takes a prepared model, got {type(model).__name__}")
    if model.method == "full":
        raise ValueError("method 'full' trains every parameter, so there is no frozen prefix to "
                         "cache; split() applies to linear, mlp, layer, scl and layer_lora")
    tuned = tuple(getattr(model, "tuned_blocks", None) or ())
    if model.method in ("linear", "mlp") and not tuned:
        return model.backbone, model.head

    truncated = isinstance(model.backbone, Truncated)  # Layer LP: the layers after Block k dropped
    net = model.backbone.backbone if truncated else model.backbone
    if truncated and family(net) not in _CNN:
        raise ValueError(f"split() of a Layer LP model supports CNN backbones, not {family(net)}")
    cut = blocks(net)[min(tuned) - 1][0] if tuned else model.block_name
    try:
        steps = _steps(net)
    except TypeError as err:  # pragma: no cover - every family prepare() accepts has steps
        raise ValueError(f"split() does not support this backbone: {err}") from err
    names = [n for n, _ in steps]
    if cut is None or cut not in names:
        raise ValueError(f"split() cannot find the tuned block {cut!r} in this "
                         f"{family(net)} backbone's forward")
    i = names.index(cut)
    prefix = nn.Sequential(*[s for _, s in steps[:i]])
    if any(p.requires_grad for p in prefix.parameters()):
        raise ValueError("the prefix before the tuned block has trainable parameters; split() "
                         "needs them frozen")
    after = [] if truncated else steps[i + 1:]
    rest = nn.Sequential(_PoolTap()) if truncated else nn.Sequential(*[s for _, s in after])
    suffix = Suffix(steps[i][1], rest, model.skip,
                    model.head, freeze_norm=model.freeze_norm,
                    frozen_after=[s for n, s in after if n is not None
                                  and not any(p.requires_grad for p in s.parameters())],
                    recompute_frozen=model.recompute_frozen)
    suffix.train(model.training)
    prefix.train(model.training)
    if model.freeze_norm:
        _norms_eval(prefix)
    return prefix, suffix


# --------------------------------------------------------------------------- BatchNorm protocol


def _norm_layers(model: nn.Module) -> list[_BatchNorm]:
    return [m for m in model.modules() if isinstance(m, _BatchNorm) and m.track_running_stats]


@torch.no_grad()
def adapt_norm_stats(model: nn.Module, data, *, batch_size: int = 256, image_size: int | None = None,
                     device: torch.device | str | None = None, copy: bool = True) -> nn.Module:
    """``model`` with every BatchNorm's running mean/variance re-estimated on ``data``.

    The paper (App. E) lets the normalisation layers of every method update their running
    statistics on the downstream data. A frozen prefix trained from a cache (``fit(...,
    cache_prefix=True)``) runs in eval mode and would keep the source statistics; calling this on
    the backbone first gives it the downstream ones instead. Each BatchNorm is reset and set to a
    cumulative average (``momentum=None``), the model runs once over ``data`` (an
    :class:`nclab.data.TensorDataset`, fixed order) in train mode without gradients, so layer
    ``l`` ends with ``mu_l = mean_b mean(z_l)`` and ``sigma^2_l = mean_b var_unbiased(z_l)`` over
    the batches ``b``, each layer normalising with batch statistics as in training. No parameter
    changes; momenta and the train/eval mode are restored. ``copy=False`` works in place."""
    from nclab.data import batches

    if copy:
        model = _copy.deepcopy(model)
    norms = _norm_layers(model)
    if not norms:
        return model
    ref = next(model.parameters(), None)
    dev = torch.device(device) if device is not None else (
        ref.device if ref is not None else torch.device("cpu"))
    mean, std = _norm_stats(model)
    size = image_size if image_size is not None else _input_size(model)
    momenta = [m.momentum for m in norms]
    was_training = model.training
    for m in norms:
        m.reset_running_stats()
        m.momentum = None
    model.train()
    try:
        for x, _ in batches(data, batch_size, device=dev, size=size, mean=mean, std=std):
            model(x)
    finally:
        for m, mom in zip(norms, momenta):
            m.momentum = mom
        model.train(was_training)
    return model


@torch.no_grad()
def features_nc1(model: nn.Module, data, *, batch_size: int = 256,
                 image_size: int | None = None) -> float:
    """NC1 ``= (1/K) tr(Sigma_W Sigma_B^+)`` of the features the classifier sees,
    ``model.features(x)`` (a prepared model, eval mode), on ``data`` (a TensorDataset): e.g. the
    downstream *training* set, where Table 3 measures it, or the test set."""
    from nclab.data import batches
    from nclab.metrics import ClassStats, nc1

    if not hasattr(model, "features"):
        raise TypeError(f"features_nc1() takes a prepared model, got {type(model).__name__}")
    ref = next(model.parameters())
    mean, std = _norm_stats(model)
    size = image_size if image_size is not None else _input_size(model)
    was_training = model.training
    model.eval()
    try:
        k = getattr(model, "num_classes", None) or int(data.num_classes)
        stats = ClassStats(int(k), device=ref.device)
        for x, y in batches(data, batch_size, device=ref.device, size=size, mean=mean, std=std):
            stats.update(model.features(x).float(), y)
    finally:
        model.train(was_training)
    return float(nc1(stats))
