"""Backbones by name and their ordered fine-tuning units ("Block k", "Layer k").

A *backbone* here is an ``nn.Module`` whose ``forward`` maps images ``(B, C, H, W)`` to penultimate
features ``(B, d)`` (its classifier removed), with ``d`` in ``model.num_features``.

:func:`load_backbone` builds one by name (torchvision, timm, open_clip or the small nets below);
:func:`blocks` lists the units the paper fine-tunes one at a time, numbered from 1:

- ResNet (torchvision, timm, ``ResNetS``): the residual blocks ``layer1.0`` ... in order; the
  paper's choice is the first block of the third stage (ResNet-18 Block 5, ResNet-50 Block 8, both
  ``layer3.0``).
- DenseNet: the dense blocks ``features.denseblock1`` ... ``features.denseblock4`` (see below).
- MobileNetV2: the inverted residual blocks ``features.1`` ... ``features.17`` (Block k is
  ``features.k``).
- GoogLeNet (Inception v1): the inception modules ``inception3a`` ... ``inception5b``.
- ViT (timm): the encoder layers ``blocks.0`` ... ``blocks.11``; the paper tunes Layer 8.
- CLIP image tower (open_clip): the encoder layers ``transformer.resblocks.0`` ...; Layer 8.
- ``ConvNetS``: its conv blocks ``features.0`` ...

The paper (App. E) names the unit only for ResNets ("each residual block") and ViTs ("each encoder
layer"). For DenseNet we take the *dense block* as the unit — the analogue of a ResNet stage
element whose output is a full representation (the concatenation the next transition sees); a
single dense layer only outputs ``growth_rate`` (32) new channels, which is not a representation
of the image on its own. Transition layers stay frozen. MobileNetV2's unit is the inverted
residual block (its residual unit, so ``Block k`` is ``features.k``) and GoogLeNet's the inception
module.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .data import IMAGENET_MEAN, IMAGENET_STD
from .net import offline as _offline_env
from .net import reachable as _reachable
from .zoo import ZOO, ZooNet, read_state_dict

__all__ = [
    "BACKBONES",
    "CIFAR_RESNETS",
    "FAMILIES",
    "ConvNetS",
    "PadShortcut",
    "ResNetS",
    "WeightsUnavailableError",
    "blocks",
    "cifar_resnet",
    "default_block",
    "family",
    "feature_dim",
    "load_backbone",
    "load_weights",
    "normalization",
    "source_classifier",
    "strip_classifier",
]


class ConvNetS(nn.Module):
    """A small plain ConvNet for 32x32 inputs: ``depth`` conv blocks (conv3x3-BN-ReLU, 2x2 max-pool
    after each of the first three), global average pool. Width ``width`` doubles every two blocks.
    Its fine-tuning units are ``features.0`` ... ``features.{depth-1}``."""

    def __init__(self, width: int = 16, depth: int = 4, in_channels: int = 3) -> None:
        super().__init__()
        if depth < 1 or width < 1:
            raise ValueError(f"depth and width must be >= 1, got depth={depth}, width={width}")
        layers, c_in = [], in_channels
        for i in range(depth):
            c_out = width * 2 ** min(i // 2, 3)
            block = [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out),
                     nn.ReLU(inplace=True)]
            if i < 3:
                block.append(nn.MaxPool2d(2))
            layers.append(nn.Sequential(*block))
            c_in = c_out
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.num_features = c_in

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(self.features(x)).flatten(1)


class PadShortcut(nn.Module):
    """The parameter-free "option A" shortcut of He et al. (2016) for CIFAR ResNets: subsample by
    ``stride`` and zero-pad the new channels equally on both sides."""

    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        if c_out < c_in or (c_out - c_in) % 2:
            raise ValueError(f"option-A shortcut needs an even channel increase, got {c_in}->{c_out}")
        self.stride = stride
        self.pad = (c_out - c_in) // 2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x[:, :, :: self.stride, :: self.stride]
        return nn.functional.pad(x, (0, 0, 0, 0, self.pad, self.pad))

    def extra_repr(self) -> str:
        return f"stride={self.stride}, pad={self.pad}"


class _BasicBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int, shortcut: str = "B") -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.relu = nn.ReLU(inplace=True)
        self.downsample: nn.Module | None = None
        if stride == 1 and c_in == c_out:
            pass  # identity shortcut
        elif shortcut == "A":
            self.downsample = PadShortcut(c_in, c_out, stride)
        else:
            self.downsample = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False),
                                            nn.BatchNorm2d(c_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(out)) + identity)


class ResNetS(nn.Module):
    """A small CIFAR-style ResNet: 3x3 stem, three stages of basic residual blocks with widths
    ``width, 2*width, 4*width`` (strides 1, 2, 2), global average pool. Its fine-tuning units are
    the residual blocks ``layer1.0`` ... in order, as torchvision's ResNets.

    ``shortcut="B"`` (default) projects with a 1x1 conv + BN where the shape changes;
    ``shortcut="A"`` uses the parameter-free :class:`PadShortcut`, which with ``width=16`` and
    ``depths=(n, n, n)`` is exactly the ResNet-(6n+2) of He et al. (2016, Sec. 4.2) for CIFAR-10
    (see :func:`cifar_resnet`)."""

    def __init__(self, width: int = 16, depths: tuple[int, ...] = (1, 1, 1),
                 in_channels: int = 3, shortcut: str = "B") -> None:
        super().__init__()
        if width < 1 or not depths or min(depths) < 1:
            raise ValueError(f"width and every depth must be >= 1, got {width}, {depths}")
        if shortcut not in ("A", "B"):
            raise ValueError(f"shortcut must be 'A' (zero-pad) or 'B' (1x1 conv), got {shortcut!r}")
        self.conv1 = nn.Conv2d(in_channels, width, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        c_in = width
        for s, depth in enumerate(depths):
            c_out = width * 2**s
            stage = [_BasicBlock(c_in if i == 0 else c_out, c_out, 1 if s == 0 or i else 2,
                                 shortcut) for i in range(depth)]
            setattr(self, f"layer{s + 1}", nn.Sequential(*stage))
            c_in = c_out
        self.num_stages = len(depths)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.num_features = c_in

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        for s in range(self.num_stages):
            x = getattr(self, f"layer{s + 1}")(x)
        return self.pool(x).flatten(1)


#: Depths of the CIFAR ResNets of He et al. (2016) with real CIFAR-10 checkpoints in the mirror.
CIFAR_RESNETS = (20, 32, 44, 56)


def cifar_resnet(depth: int) -> ResNetS:
    """The CIFAR-10 ResNet-``depth`` of He et al. (2016): ``depth = 6n + 2`` layers, three stages of
    ``n`` basic blocks with 16/32/64 channels and option-A shortcuts (0.27M parameters for
    ResNet-20). Random initialisation; ``load_backbone(f"resnet{depth}")`` loads the real
    checkpoint. Its fine-tuning units are the ``3n`` blocks ``layer1.0`` ... ``layer3.{n-1}``."""
    if depth < 8 or (depth - 2) % 6:
        raise ValueError(f"a CIFAR ResNet has depth 6n+2 (20, 32, 44, 56, 110, ...), got {depth}")
    n = (depth - 2) // 6
    return ResNetS(width=16, depths=(n, n, n), shortcut="A")


# --------------------------------------------------------------------------- families

#: The backbone families :func:`blocks` and :mod:`nclab.finetune` understand.
FAMILIES = ("resnet", "timm_resnet", "densenet", "timm_densenet", "mobilenet_v2", "googlenet",
            "vit", "clip_vit", "convnet_s", "resnet_s", "zoo")


def _is_tv(model: nn.Module, cls_name: str) -> bool:
    import torchvision.models as tvm

    cls = getattr(tvm, cls_name, None)
    return cls is not None and isinstance(model, cls)


def family(model: nn.Module) -> str:
    """The architecture family of ``model`` (one of :data:`FAMILIES`), which fixes its fine-tuning
    units, its classifier and its pooling. Raises ``TypeError`` for other architectures."""
    if isinstance(model, ConvNetS):
        return "convnet_s"
    if isinstance(model, ResNetS):
        return "resnet_s"
    if isinstance(model, ZooNet):
        return "zoo"
    if _is_tv(model, "ResNet"):
        return "resnet"
    if _is_tv(model, "DenseNet"):
        return "densenet"
    if _is_tv(model, "MobileNetV2"):
        return "mobilenet_v2"
    if _is_tv(model, "GoogLeNet"):
        return "googlenet"
    mod = type(model).__module__
    name = type(model).__name__
    if mod.startswith("timm.") and name == "ResNet":
        return "timm_resnet"
    if mod.startswith("timm.") and name == "DenseNet":
        return "timm_densenet"
    if mod.startswith("timm.") and name == "VisionTransformer":
        return "vit"
    if mod.startswith("open_clip.") and name == "VisionTransformer":
        return "clip_vit"
    raise TypeError(
        f"nclab does not know the architecture {mod}.{name}. Supported: torchvision ResNet, "
        "DenseNet, MobileNetV2, GoogLeNet; timm ResNet, DenseNet, VisionTransformer; open_clip "
        "VisionTransformer (a CLIP model's .visual); nclab ConvNetS, ResNetS. Use "
        "nclab.models.load_backbone(name) for a registry model "
        f"({', '.join(BACKBONES)})."
    )


def _unwrap(model: nn.Module) -> tuple[str, nn.Module]:
    """``("backbone.", model.backbone)`` for a fine-tuned wrapper, else ``("", model)``."""
    inner = getattr(model, "backbone", None)
    if isinstance(inner, nn.Module) and isinstance(getattr(model, "head", None), nn.Module):
        return "backbone.", inner
    return "", model


def blocks(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The ordered fine-tuning units of ``model`` as ``(qualified_name, module)``; Block k (1-based,
    as in the paper) is ``blocks(model)[k - 1]``. Names are those of ``model.named_modules()``
    (for a :class:`nclab.finetune.FineTuned` they start with ``backbone.``). See the module
    docstring for the unit of each family."""
    prefix, model = _unwrap(model)
    fam = family(model)
    out: list[tuple[str, nn.Module]]
    if fam == "convnet_s":
        out = [(f"features.{i}", m) for i, m in enumerate(model.features)]
    elif fam == "zoo":
        out = [(n, model.get_submodule(n)) for n in model.units]
    elif fam == "resnet_s":
        out = [(f"layer{s + 1}.{i}", m) for s in range(model.num_stages)
               for i, m in enumerate(getattr(model, f"layer{s + 1}"))]
    elif fam in ("resnet", "timm_resnet"):
        out = [(f"layer{s}.{i}", m) for s in range(1, 5) if hasattr(model, f"layer{s}")
               for i, m in enumerate(getattr(model, f"layer{s}"))]
    elif fam in ("densenet", "timm_densenet"):
        out = [(f"features.{n}", m) for n, m in model.features.named_children()
               if n.startswith("denseblock")]
    elif fam == "mobilenet_v2":
        from torchvision.models.mobilenetv2 import InvertedResidual

        out = [(f"features.{n}", m) for n, m in model.features.named_children()
               if isinstance(m, InvertedResidual)]
    elif fam == "googlenet":
        from torchvision.models.googlenet import Inception

        out = [(n, m) for n, m in model.named_children() if isinstance(m, Inception)]
    elif fam == "vit":
        out = [(f"blocks.{i}", m) for i, m in enumerate(model.blocks)]
    else:  # clip_vit
        out = [(f"transformer.resblocks.{i}", m) for i, m in enumerate(model.transformer.resblocks)]
    return [(prefix + n, m) for n, m in out]


def default_block(model: nn.Module) -> int:
    """The block the paper fine-tunes (1-based): for ResNets the first residual block of the third
    stage (ResNet-18 Block 5, ResNet-34/50 Block 8 = ``layer3.0``), for ViT/CLIP Layer 8. Other
    families have no stated choice: ``ValueError`` asking for ``block=``."""
    _, inner = _unwrap(model)
    fam = family(inner)
    units = blocks(inner)
    if fam in ("resnet", "timm_resnet", "resnet_s"):
        names = [n for n, _ in units]
        if "layer3.0" in names:
            return names.index("layer3.0") + 1
    if fam in ("vit", "clip_vit") and len(units) >= 8:
        return 8
    raise ValueError(
        f"the paper states no block to fine-tune for this {fam} model: pass block= "
        f"(1..{len(units)}; see nclab.models.blocks(model))"
    )


def feature_dim(model: nn.Module) -> int:
    """The penultimate feature width ``d`` of a backbone."""
    d = getattr(model, "num_features", None)
    if not isinstance(d, int):
        raise TypeError(f"{type(model).__name__} has no integer num_features")
    return d


# --------------------------------------------------------------------------- classifiers

# state-dict key prefixes that belong to the classifier (dropped when loading into a backbone)
_HEAD_KEYS: dict[str, tuple[str, ...]] = {
    "resnet": ("fc.",),
    "timm_resnet": ("fc.",),
    "densenet": ("classifier.",),
    "timm_densenet": ("classifier.",),
    "mobilenet_v2": ("classifier.",),
    "googlenet": ("fc.", "aux1.", "aux2."),
    "vit": ("head.",),
    "clip_vit": ("proj",),
    "convnet_s": ("fc.", "classifier.", "head."),
    "resnet_s": ("fc.", "classifier.", "head.", "linear."),
    "zoo": (),  # per model: ZooNet.head_key
}


def strip_classifier(model: nn.Module) -> nn.Module:
    """Turn a classification model of a supported family into a backbone in place: its classifier
    becomes ``nn.Identity`` (timm: ``reset_classifier(0)``; open_clip: the projection is dropped),
    so that ``forward`` returns the penultimate features; sets ``model.num_features``. A model that
    is already a backbone is returned unchanged."""
    fam = family(model)
    if fam in ("convnet_s", "resnet_s", "zoo"):
        return model
    if fam in ("resnet", "googlenet"):
        if isinstance(model.fc, nn.Linear):
            model.num_features = model.fc.in_features
            model.fc = nn.Identity()
        if fam == "googlenet":
            model.dropout = nn.Identity()  # the dropout belongs to the classifier
            model.aux1 = model.aux2 = None
            model.aux_logits = False
        if not isinstance(getattr(model, "num_features", None), int):
            model.num_features = _probe_width(model, fam)
        return model
    if fam in ("densenet", "mobilenet_v2"):
        lin = [m for m in model.classifier.modules() if isinstance(m, nn.Linear)]
        if lin:
            model.num_features = lin[0].in_features
            model.classifier = nn.Identity()
        if not isinstance(getattr(model, "num_features", None), int):
            model.num_features = _probe_width(model, fam)
        return model
    if fam in ("timm_resnet", "timm_densenet", "vit"):
        if getattr(model, "num_classes", 0):
            model.reset_classifier(0)
        return model
    # clip_vit: the projection into the joint image-text space plays the classifier's role
    # (zero-shot logits); a backbone loaded with projection=True (num_features == output_dim)
    # keeps it on purpose
    if model.proj is not None and getattr(model, "num_features", None) != model.output_dim:
        model.proj = None
    if model.proj is None:
        model.num_features = model.transformer.width
    return model


def _probe_width(model: nn.Module, fam: str) -> int:
    """Penultimate width of a torchvision model whose classifier was already removed."""
    if fam == "resnet":
        return _block_width(fam, blocks(model)[-1][1])
    if fam == "densenet":
        return model.features[-1].num_features
    if fam == "mobilenet_v2":
        return model.features[-1][0].out_channels
    return 1024  # googlenet


# --------------------------------------------------------------------------- weights


class WeightsUnavailableError(FileNotFoundError):
    """Pretrained weights are not cached locally and cannot be downloaded (offline)."""


_DENSENET_OLD_KEY = re.compile(
    r"^(.*denselayer\d+\.(?:norm|relu|conv))\.((?:[12])\.(?:weight|bias|running_mean|running_var|num_batches_tracked))$"
)


def _read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"weights file {str(path)!r} does not exist")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        sd: Any = load_file(str(path))
    else:
        try:
            sd = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # noqa: BLE001 - re-raised with advice
            raise ValueError(
                f"could not read {str(path)!r} as a plain state dict with "
                f"torch.load(weights_only=True) ({type(err).__name__}: {err}). Save the weights "
                "with torch.save(model.state_dict(), path); pickled models and TorchScript "
                "archives (e.g. OpenAI's original CLIP .pt) are not accepted."
            ) from err
    for key in ("state_dict", "model", "model_state_dict", "module"):
        if isinstance(sd, dict) and isinstance(sd.get(key), dict):
            sd = sd[key]
    if not isinstance(sd, dict):
        raise ValueError(f"{str(path)!r} does not hold a state dict (got {type(sd).__name__})")
    return sd


def load_weights(model: nn.Module, weights: str | os.PathLike | dict[str, torch.Tensor]) -> nn.Module:
    """Load a state dict into the backbone ``model``: a dict, or a path (``.safetensors``, or
    ``.pth``/``.pt``/``.bin`` read by ``torch.load`` with ``weights_only=True``).

    The file may hold the full classification model: classifier keys (``fc.*``, ``classifier.*``,
    ``head.*``, GoogLeNet's ``aux*``, CLIP's ``proj``) are ignored; ``module.`` (DDP) prefixes and
    a full CLIP model's ``visual.`` prefix are stripped; old-style DenseNet keys are renamed. Any
    other missing or unexpected key raises ``ValueError`` naming them."""
    fam = family(model)
    sd = dict(_read_state_dict(weights) if not isinstance(weights, dict) else weights)
    if all(k.startswith("module.") for k in sd):
        sd = {k[len("module."):]: v for k, v in sd.items()}
    if fam == "clip_vit" and any(k.startswith("visual.") for k in sd):
        sd = {k[len("visual."):]: v for k, v in sd.items() if k.startswith("visual.")}
    if fam == "densenet":
        for key in list(sd):
            res = _DENSENET_OLD_KEY.match(key)
            if res:
                sd[res.group(1) + res.group(2)] = sd.pop(key)
    if fam == "vit":
        from timm.models.vision_transformer import checkpoint_filter_fn

        sd = checkpoint_filter_fn(sd, model)
    head = (model.head_key + ".",) if fam == "zoo" else _HEAD_KEYS[fam]
    own = model.state_dict()
    if fam == "clip_vit" and model.proj is not None:
        head = ()
    sd = {k: v for k, v in sd.items() if k in own or not k.startswith(head)}
    for k in own:  # old checkpoints have no BatchNorm step counters
        if k.endswith("num_batches_tracked") and k not in sd:
            sd[k] = own[k]
    missing = sorted(set(own) - set(sd))
    unexpected = sorted(set(sd) - set(own))
    if missing or unexpected:
        raise ValueError(
            f"the weights do not fit this {fam} backbone: {len(missing)} missing keys "
            f"{missing[:5]}, {len(unexpected)} unexpected keys {unexpected[:5]}. Check that the "
            "file is for the same architecture (and, for small nets, the same width/depth)."
        )
    model.load_state_dict(sd, strict=True)
    return model


@dataclass(frozen=True)
class _Spec:
    source: str  # torchvision | timm | open_clip | small
    arch: str
    about: str


#: The registry of :func:`load_backbone`: name -> (source, architecture, description).
BACKBONES: dict[str, _Spec] = {
    "resnet18": _Spec("torchvision", "resnet18", "torchvision ResNet-18 (ImageNet-1k)"),
    "resnet34": _Spec("torchvision", "resnet34", "torchvision ResNet-34 (ImageNet-1k)"),
    "resnet50": _Spec("torchvision", "resnet50", "torchvision ResNet-50 (ImageNet-1k)"),
    "densenet121": _Spec("torchvision", "densenet121", "torchvision DenseNet-121 (ImageNet-1k)"),
    "densenet169": _Spec("torchvision", "densenet169", "torchvision DenseNet-169 (ImageNet-1k)"),
    "densenet201": _Spec("torchvision", "densenet201", "torchvision DenseNet-201 (ImageNet-1k)"),
    "mobilenet_v2": _Spec("torchvision", "mobilenet_v2", "torchvision MobileNetV2 (ImageNet-1k)"),
    "googlenet": _Spec("torchvision", "googlenet", "torchvision GoogLeNet / Inception v1"),
    "vit_b32": _Spec("timm", "vit_base_patch32_224", "timm ViT-B/32, 224 px"),
    "clip_vit_b32": _Spec("open_clip", "ViT-B-32", "open_clip CLIP ViT-B/32 image encoder"),
    "convnet_s": _Spec("small", "ConvNetS", "small ConvNet for 32 px (train it: nclab.pretrain)"),
    "resnet_s": _Spec("small", "ResNetS", "small ResNet for 32 px (train it: nclab.pretrain)"),
    **{f"resnet{n}": _Spec("mirror", f"resnet{n}", f"CIFAR-10 ResNet-{n}, option A (He et al. "
                           "2016; weights: akamaster/pytorch_resnet_cifar10)")
       for n in CIFAR_RESNETS},
    **{name: _Spec("zoo", z.arch, f"CIFAR-10 {z.arch}, {z.recipe} (nclab.zoo)")
       for name, z in ZOO.items()},
}


def _tv_source(arch: str, tag: str) -> tuple[str, Path]:
    from torchvision.models import get_model_weights

    enum = get_model_weights(arch)
    try:
        w = enum[tag]
    except KeyError:
        raise ValueError(f"torchvision has no weights {tag!r} for {arch}; "
                         f"valid: {', '.join(e.name for e in enum)}") from None
    cached = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(w.url)
    return w.url, cached


def _hf_files(spec: _Spec, tag: str) -> tuple[str, tuple[str, ...]]:
    if spec.source == "timm":
        import timm

        cfg = timm.models.get_pretrained_cfg(f"{spec.arch}.{tag}" if tag else spec.arch)
        if cfg is None or not cfg.hf_hub_id:
            raise ValueError(f"timm has no pretrained tag {tag!r} for {spec.arch}")
        return cfg.hf_hub_id, ("model.safetensors", "pytorch_model.bin")
    import open_clip

    cfg = open_clip.get_pretrained_cfg(spec.arch, tag)
    if not cfg or not cfg.get("hf_hub"):
        valid = ", ".join(open_clip.list_pretrained_tags_by_model(spec.arch))
        raise ValueError(f"open_clip has no Hugging Face weights {tag!r} for {spec.arch}; "
                         f"valid tags: {valid}")
    repo = cfg["hf_hub"].rstrip("/")
    return repo, ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")


def _fetch_pretrained(name: str, spec: _Spec, tag: str) -> str:
    """A local path to the pretrained weights of ``name`` (cached, or downloaded when online).
    Offline and not cached: :class:`WeightsUnavailableError` within ~3 s, saying what to fetch."""
    offline = _offline_env()
    if spec.source == "torchvision":
        url, cached = _tv_source(spec.arch, tag)
        if cached.is_file():
            return str(cached)
        if not offline and _reachable("download.pytorch.org"):
            # downloads into the torch hub cache, checking the hash in the file name
            torch.hub.load_state_dict_from_url(url, progress=True, check_hash=True,
                                               weights_only=True)
            return str(cached)
        how = (f"download {url}\n  and either put it at {cached}\n  or pass "
               f"load_backbone({name!r}, weights='/path/to/{os.path.basename(url)}')")
    else:
        from huggingface_hub import hf_hub_download, try_to_load_from_cache

        repo, files = _hf_files(spec, tag)
        for f in files:
            hit = try_to_load_from_cache(repo, f)
            if isinstance(hit, str):
                return hit
        if not offline and _reachable("huggingface.co"):
            last: Exception | None = None
            for f in files:
                try:
                    return hf_hub_download(repo, f)
                except Exception as err:  # noqa: BLE001 - try the next file name
                    last = err
            raise WeightsUnavailableError(f"could not download {repo} ({last})")
        how = (f"on a machine with internet run\n  huggingface-cli download {repo} {files[0]}\n"
               f"  (or fetch https://huggingface.co/{repo}/resolve/main/{files[0]}),\n  then "
               "copy the Hugging Face cache (~/.cache/huggingface/hub) here or pass "
               f"load_backbone({name!r}, weights='/path/to/{files[0]}')")
    why = "HF_HUB_OFFLINE/NCLAB_OFFLINE is set" if offline else "the download host is unreachable"
    raise WeightsUnavailableError(
        f"pretrained weights for {name!r} ({spec.about}, {tag or 'default tag'}) are not cached "
        f"here and cannot be downloaded ({why}). To use them offline,\n  {how}.\n"
        "For random initialisation pass pretrained=False."
    )


def load_backbone(name: str, pretrained: bool | str = True,
                  weights: str | os.PathLike | None = None, **kwargs: Any) -> nn.Module:
    """A backbone by registry name (:data:`BACKBONES`), in eval mode, classifier removed:
    ``forward(x)`` returns penultimate features ``(B, num_features)``.

    - ``pretrained``: ``True`` for the standard weights (torchvision ``IMAGENET1K_V1``; timm's
      default tag; open_clip ``openai``), a string for another tag/enum name, ``False`` for random
      initialisation. Weights come from the local cache (torch hub / Hugging Face) or are
      downloaded; offline and not cached, :class:`WeightsUnavailableError` (within seconds) says
      what to fetch and where to put it.
    - ``weights``: a local state-dict file (see :func:`load_weights`; classifier keys optional);
      it overrides ``pretrained``.
    - ``kwargs`` go to the constructor: ``width``/``depth``/``depths``/``in_channels`` for the
      small nets; timm ``create_model`` options (e.g. ``img_size``, ``global_pool``) for
      ``vit_b32``; for ``clip_vit_b32``, ``projection=False`` (default: drop CLIP's 768→512
      projection so the features are the 768-d encoder output, as for ViT-B/32 — set ``True`` for
      the 512-d joint embedding) and ``quick_gelu`` (default: as the weights' tag; ``openai``
      uses QuickGELU).
    - ``resnet20``/``32``/``44``/``56``: the CIFAR-10 ResNets of He et al. (2016) with real
      CIFAR-10-trained weights from the local mirror (:mod:`nclab.mirror`, verified by SHA-256,
      downloaded from akamaster/pytorch_resnet_cifar10 when online); inputs 32 px, normalised
      with ``nclab.data.IMAGENET_MEAN``/``IMAGENET_STD`` as :func:`nclab.data.batches` does.
    - ``convnet_s``/``resnet_s`` have no downloadable weights: pre-train them with
      :func:`nclab.pretrain.pretrain`, or pass ``weights=``.
    """
    if name not in BACKBONES:
        raise ValueError(f"unknown backbone {name!r}; registered: {', '.join(BACKBONES)}")
    spec = BACKBONES[name]
    if weights is not None:
        pretrained = False
    if spec.source == "small":
        if pretrained:
            raise ValueError(
                f"{name!r} has no downloadable weights: build it with pretrained=False and train "
                "it with nclab.pretrain.pretrain(backbone, source, epochs=...) (cached under "
                "nclab.cache_dir()), or pass weights='/path/to/state_dict.pt'."
            )
        model: nn.Module = (ConvNetS if spec.arch == "ConvNetS" else ResNetS)(**kwargs)
    elif spec.source == "mirror":
        if kwargs:
            raise ValueError(f"{name!r} takes no constructor options, got {sorted(kwargs)}")
        if isinstance(pretrained, str):
            raise ValueError(f"{name!r} has one set of weights: pass pretrained=True or False")
        model = cifar_resnet(int(spec.arch[len("resnet"):]))
        if pretrained:
            from .mirror import fetch

            load_weights(model, fetch(name))
    elif spec.source == "zoo":
        if kwargs:
            raise ValueError(f"{name!r} takes no constructor options, got {sorted(kwargs)}")
        if isinstance(pretrained, str):
            raise ValueError(f"{name!r} has one set of weights: pass pretrained=True or False")
        model = _build_zoo(name)
        if pretrained:
            from .mirror import fetch

            load_weights(model, read_state_dict(fetch(name), ZOO[name].state_at))
    elif spec.source == "torchvision":
        import torchvision.models as tvm

        tag = pretrained if isinstance(pretrained, str) else "IMAGENET1K_V1"
        path = _fetch_pretrained(name, spec, tag) if pretrained else None
        if spec.arch == "googlenet":
            kwargs = {"aux_logits": False, "transform_input": True,
                      "init_weights": not (path or weights), **kwargs}
        model = getattr(tvm, spec.arch)(weights=None, **kwargs)
        strip_classifier(model)
        if path:
            load_weights(model, path)
    elif spec.source == "timm":
        import timm

        tag = pretrained if isinstance(pretrained, str) else ""
        path = _fetch_pretrained(name, spec, tag) if pretrained else None
        model = timm.create_model(spec.arch, pretrained=False, num_classes=0, **kwargs)
        if path:
            load_weights(model, path)
    else:  # open_clip
        import open_clip

        tag = pretrained if isinstance(pretrained, str) else "openai"
        projection = kwargs.pop("projection", False)
        cfg = open_clip.get_pretrained_cfg(spec.arch, tag) or {}
        kwargs["force_quick_gelu"] = bool(kwargs.pop("quick_gelu", cfg.get("quick_gelu", False)))
        path = _fetch_pretrained(name, spec, tag) if pretrained else None
        import logging

        logger = logging.getLogger()
        level = logger.level
        logger.setLevel(logging.ERROR)  # silence "No pretrained weights loaded" for random init
        try:
            model = open_clip.create_model(spec.arch, pretrained=None, **kwargs).visual
        finally:
            logger.setLevel(level)
        if path:
            load_weights(model, path)  # full CLIP state dict: the visual.* part is used
        if not projection:
            strip_classifier(model)
        else:
            model.num_features = model.output_dim
    if weights is not None:
        load_weights(model, weights)
    return model.eval()


def _build_zoo(name: str) -> nn.Module:
    """A randomly initialised zoo backbone, carrying its input size and normalisation
    (``image_size``, ``image_mean``, ``image_std``, read by :mod:`nclab.train`)."""
    from .zoo import build

    z = ZOO[name]
    model: nn.Module = (ResNetS(16, (3, 3, 3), shortcut="B") if z.arch == "resnet20 bn"
                        else build(z.arch))
    model.image_size = 32
    model.image_mean, model.image_std = z.mean, z.std
    return model


def _source_state_dict(name: str) -> tuple[dict[str, torch.Tensor], str]:
    """The published state dict of a mirrored CIFAR-10 network and its classifier's key prefix."""
    from .mirror import fetch

    spec = BACKBONES[name]
    if spec.source == "zoo":
        sd = read_state_dict(fetch(name), ZOO[name].state_at)
        from .zoo import build

        return sd, "fc" if spec.arch == "resnet20 bn" else build(spec.arch).head_key
    sd = {k.removeprefix("module."): v for k, v in _read_state_dict(fetch(name)).items()}
    return sd, "linear"


def source_classifier(name: str) -> nn.Linear:
    """The CIFAR-10 classifier that came with a mirrored checkpoint (``resnet20`` ..., and every
    :data:`nclab.zoo.ZOO` network): the last ``nn.Linear`` of the published model, which maps
    :func:`load_backbone`'s penultimate features to CIFAR-10 logits, so that
    ``source_classifier(n)(load_backbone(n)(normalize(x, *normalization(n))))`` is the published
    model's output."""
    spec = BACKBONES.get(name)
    if spec is None or spec.source not in ("mirror", "zoo"):
        mirrored = [n for n, s in BACKBONES.items() if s.source in ("mirror", "zoo")]
        raise ValueError(f"{name!r} has no mirrored classifier; mirrored models: {mirrored}")
    sd, key = _source_state_dict(name)
    w, b = sd[f"{key}.weight"], sd[f"{key}.bias"]
    head = nn.Linear(w.shape[1], w.shape[0])
    head.load_state_dict({"weight": w, "bias": b})
    return head.eval()


def normalization(name: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """``(mean, std)`` per RGB channel that registry backbone ``name`` expects after its pixels
    are scaled to [0, 1]: ``x_in = (x - mean) / std``.

    torchvision models, akamaster's CIFAR ResNets (``resnet20`` ...) and the small nets (as
    :mod:`nclab.pretrain` trains them): ImageNet's ``nclab.data.IMAGENET_MEAN``/``IMAGENET_STD``;
    timm: its pretrained config (ViT-B/32 augreg: 0.5, 0.5); open_clip: OpenAI's CLIP statistics;
    zoo networks: the normalisation each was trained with (:data:`nclab.zoo.ZOO`; the Marabou nets
    take raw pixels, returned as mean 0, std 1)."""
    if name not in BACKBONES:
        raise ValueError(f"unknown backbone {name!r}; registered: {', '.join(BACKBONES)}")
    spec = BACKBONES[name]
    if spec.source == "zoo":
        return tuple(ZOO[name].mean), tuple(ZOO[name].std)
    if spec.source == "timm":
        import timm

        cfg = timm.models.get_pretrained_cfg(spec.arch)
        return tuple(cfg.mean), tuple(cfg.std)
    if spec.source == "open_clip":
        from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD

        return tuple(OPENAI_DATASET_MEAN), tuple(OPENAI_DATASET_STD)
    return tuple(IMAGENET_MEAN), tuple(IMAGENET_STD)


# torchvision's ImageNet families carry no input size: they were trained at 224 px
_TORCHVISION_224 = ("resnet", "densenet", "mobilenet_v2", "googlenet")


def _input_size(model: nn.Module) -> int | None:
    """The input resolution a model expects (``model.image_size``, timm's ``pretrained_cfg``, open_clip's
    ``visual.image_size``; 224 for torchvision's ImageNet families), or None to keep the data's own
    size. Read by :mod:`nclab.train` and :mod:`nclab.finetune` when they resize a batch."""
    for m in (model, getattr(model, "backbone", None)):
        if m is None:
            continue
        size = getattr(m, "image_size", None)
        if size is None:
            cfg = getattr(m, "pretrained_cfg", None) or getattr(m, "default_cfg", None)
            if isinstance(cfg, dict) and "input_size" in cfg:
                size = cfg["input_size"][-1]
        if size is None and hasattr(m, "visual"):
            size = getattr(m.visual, "image_size", None)
        if size is not None:
            return int(size[-1] if isinstance(size, (tuple, list)) else size)
    try:
        if family(getattr(model, "backbone", model)) in _TORCHVISION_224:
            return 224
    except TypeError:
        pass
    return None


def _norm_stats(model: nn.Module) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """``(mean, std)`` of a model object's input normalisation ``x_in = (x - mean) / std``: timm's
    ``pretrained_cfg``, open_clip's ``preprocess_cfg`` / ``image_mean``, else ImageNet's (the
    object-level counterpart of :func:`normalization`, which reads the registry by name)."""
    for m in (model, getattr(model, "backbone", None)):
        if m is None:
            continue
        for cfg in (getattr(m, "pretrained_cfg", None), getattr(m, "preprocess_cfg", None)):
            if isinstance(cfg, dict) and cfg.get("mean") and cfg.get("std"):
                return tuple(cfg["mean"]), tuple(cfg["std"])
        if getattr(m, "image_mean", None) and getattr(m, "image_std", None):
            return tuple(m.image_mean), tuple(m.image_std)
    return tuple(IMAGENET_MEAN), tuple(IMAGENET_STD)


def _resolve_block(model: nn.Module, block: int | None) -> tuple[int, str, nn.Module]:
    """``(k, name, module)`` for 1-based ``block`` (default: :func:`default_block`)."""
    units = blocks(model)
    if block is None:
        block = default_block(model)
    if isinstance(block, bool) or not isinstance(block, int) or not 1 <= block <= len(units):
        raise ValueError(
            f"block must be an int in 1..{len(units)} (this model has {len(units)} fine-tuning "
            f"units: 1 = {units[0][0]!r} ... {len(units)} = {units[-1][0]!r}), got {block!r}"
        )
    name, mod = units[block - 1]
    return block, name, mod


def _block_width(fam: str, block: nn.Module) -> int:
    """Output channels / width of a fine-tuning unit (for the SCL skip)."""
    if fam == "convnet_s":
        return block[0].out_channels
    if fam == "zoo":  # a conv or linear layer, or a residual block ending in conv2
        last = getattr(block, "conv2", block)
        return last.out_channels if isinstance(last, nn.Conv2d) else last.out_features
    if fam in ("resnet", "timm_resnet", "resnet_s"):
        last = block.conv3 if hasattr(block, "conv3") else block.conv2
        return last.out_channels
    if fam in ("densenet", "timm_densenet"):
        layers = list(block.children())
        first = layers[0]
        c_in = first.norm1.num_features
        return c_in + sum(_last_conv(layer).out_channels for layer in layers)
    if fam == "mobilenet_v2":
        return block.out_channels
    if fam == "googlenet":
        return sum(_last_conv(b).out_channels
                   for b in (block.branch1, block.branch2, block.branch3, block.branch4))
    if fam == "vit":
        return block.norm1.normalized_shape[0]
    return block.ln_1.normalized_shape[0]  # clip_vit


def _last_conv(module: nn.Module) -> nn.Conv2d:
    convs = [m for m in module.modules() if isinstance(m, nn.Conv2d)]
    return convs[-1]


class _Step(nn.Module):
    """One step of a backbone's forward: ``fn(x)``, registering the modules it uses."""

    def __init__(self, fn: Callable[[torch.Tensor], torch.Tensor], name: str,
                 **modules: nn.Module | None) -> None:
        super().__init__()
        self.fn = fn
        self.step_name = name
        for k, m in modules.items():
            if m is not None:
                self.add_module(k, m)

    def extra_repr(self) -> str:
        return self.step_name

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(x)


def _steps(model: nn.Module) -> list[tuple[str | None, nn.Module]]:
    """The backbone's forward as an ordered list of ``(unit_name or None, module)`` such that
    applying the modules in turn gives ``model(x)`` exactly; fine-tuning units appear under their
    :func:`blocks` name. Used by :func:`nclab.finetune.split`."""
    fam = family(model)
    units = dict((id(m), n) for n, m in blocks(model))

    def tag(mods: list[nn.Module]) -> list[tuple[str | None, nn.Module]]:
        return [(units.get(id(m)), m) for m in mods]

    flat = nn.Flatten(1)
    if fam == "convnet_s":
        return tag([*model.features, model.pool, flat])
    if fam == "zoo":
        return tag(model.steps())
    if fam == "resnet_s":
        stages = [b for s in range(model.num_stages) for b in getattr(model, f"layer{s + 1}")]
        return tag([model.conv1, model.bn1, model.relu, *stages, model.pool, flat])
    if fam == "resnet":
        stages = [b for _, b in blocks(model)]
        return tag([model.conv1, model.bn1, model.relu, model.maxpool, *stages, model.avgpool,
                    flat, model.fc])
    if fam == "timm_resnet":
        stages = [b for _, b in blocks(model)]
        head = _Step(lambda x: model.forward_head(x), "forward_head",
                     global_pool=model.global_pool, fc=model.fc)
        return tag([model.conv1, model.bn1, model.act1, model.maxpool, *stages, head])
    if fam == "densenet":
        post = _Step(lambda x: torch.flatten(
            nn.functional.adaptive_avg_pool2d(nn.functional.relu(x), (1, 1)), 1),
            "relu, adaptive_avg_pool2d, flatten")
        return tag([*model.features, post, model.classifier])
    if fam == "timm_densenet":
        head = _Step(lambda x: model.forward_head(x), "forward_head",
                     global_pool=model.global_pool, classifier=model.classifier)
        return tag([*model.features, head])
    if fam == "mobilenet_v2":
        post = _Step(lambda x: torch.flatten(nn.functional.adaptive_avg_pool2d(x, (1, 1)), 1),
                     "adaptive_avg_pool2d, flatten")
        return tag([*model.features, post, model.classifier])
    if fam == "googlenet":
        pre = _Step(model._transform_input, "transform_input")
        names = ["conv1", "maxpool1", "conv2", "conv3", "maxpool2", "inception3a", "inception3b",
                 "maxpool3", "inception4a", "inception4b", "inception4c", "inception4d",
                 "inception4e", "maxpool4", "inception5a", "inception5b", "avgpool"]
        return tag([pre, *(getattr(model, n) for n in names), flat, model.dropout, model.fc])
    if fam == "vit":
        def embed(x: torch.Tensor) -> torch.Tensor:
            return model.norm_pre(model.patch_drop(model._pos_embed(model.patch_embed(x))))

        pre = _Step(embed, "patch_embed, _pos_embed, patch_drop, norm_pre",
                    patch_embed=model.patch_embed, pos_drop=model.pos_drop,
                    norm_pre=model.norm_pre)
        for pname, p in model.named_parameters(recurse=False):
            pre.register_parameter(pname, p)
        post = _Step(lambda x: model.forward_head(model.norm(x)), "norm, forward_head",
                     norm=model.norm, fc_norm=model.fc_norm, head=model.head)
        return tag([pre, *model.blocks, post])
    # clip_vit
    batch_first = getattr(model.transformer, "batch_first", True)

    def clip_embed(x: torch.Tensor) -> torch.Tensor:
        x = model._embeds(x)
        return x if batch_first else x.transpose(0, 1).contiguous()

    def clip_post(x: torch.Tensor) -> torch.Tensor:
        x = x if batch_first else x.transpose(0, 1)
        pooled, _ = model._pool(x)
        return pooled if model.proj is None else pooled @ model.proj

    pre = _Step(clip_embed, "_embeds", conv1=model.conv1, ln_pre=model.ln_pre)
    for pname, p in model.named_parameters(recurse=False):
        if pname != "proj":
            pre.register_parameter(pname, p)
    post = _Step(clip_post, "_pool, proj", ln_post=model.ln_post)
    if model.proj is not None:
        post.register_parameter("proj", model.proj)
    return tag([pre, *model.transformer.resblocks, post])
