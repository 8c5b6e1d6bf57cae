"""The CIFAR-10 model zoo: nineteen networks trained on CIFAR-10 by others, written from their keys.

Each architecture here is written from the layer-by-layer description of the mirror's model-zoo
README (key names and shapes as the published files hold them), so that
``load_state_dict(strict=True)`` of the file's state dict (classifier keys included) fits the
architecture plus its classifier. A zoo network is a :class:`ZooNet`: a backbone whose ``forward``
returns the **penultimate features** (the input of the last ``nn.Linear``), with

- ``units``: its ordered fine-tuning units, Block 1 ... (every conv layer and hidden linear layer
  of the plain CNNs; the residual blocks and the hidden linear layer of ResNet-2B/4B);
- ``steps()``: its forward as an ordered list of modules (for cached-prefix fine-tuning);
- ``head_key``: the key prefix of the classifier in the published file (``"7"``, ``"fc3"``, ...).

:data:`ZOO` lists each network's recipe, normalisation, where its state dict sits in the file, the
accuracy measured on the 1000 real CIFAR-10 test images and its parameter count (classifier
included). Use the networks through :func:`nclab.models.load_backbone`; the weight files (SHA-256,
origin, licence) are in :data:`nclab.mirror.MIRROR`. The BatchNorm ResNet-20 of PyHessian is
:class:`nclab.models.ResNetS` with option-B shortcuts and is built there.
"""

from __future__ import annotations

import abc
import os
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

__all__ = ["ARCHITECTURES", "ZOO", "ZooNet", "ZooSpec", "build", "read_state_dict", "recipe_family"]


class ZooNet(nn.Module, abc.ABC):
    """Base of the zoo backbones (see the module docstring for ``units``, ``steps``, ``head_key``).
    ``image_size`` is 32; ``num_features`` the penultimate width ``d``."""

    units: tuple[str, ...] = ()
    head_key: str = ""
    image_size: int = 32
    num_features: int = 0

    @abc.abstractmethod
    def steps(self) -> list[nn.Module]:
        """The forward pass as a list of modules (see the module docstring)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for step in self.steps():
            x = step(x)
        return x


class SeqNet(ZooNet):
    """A plain feed-forward net whose layers are children named by their index in the published
    ``nn.Sequential`` (``"0"``, ``"1"``, ...); the classifier index is left out (``head_key``)."""

    def __init__(self, layers: list[nn.Module], head_index: int) -> None:
        super().__init__()
        for i, layer in enumerate(layers):
            self.add_module(str(i), layer)
        self.head_key = str(head_index)
        self.units = tuple(str(i) for i, m in enumerate(layers)
                           if isinstance(m, (nn.Conv2d, nn.Linear)))
        self.num_features = [m for m in layers if isinstance(m, nn.Linear)][-1].out_features

    def steps(self) -> list[nn.Module]:
        return list(self.children())


def _act(kind: str) -> nn.Module:
    return nn.Sigmoid() if kind == "sigmoid" else nn.ReLU()


def _two_conv(c1: int, c2: int, pad: int, hidden: tuple[int, ...], act: str = "relu") -> SeqNet:
    """conv 3->c1 (4x4, s2, pad), act, conv c1->c2 (4x4, s2, pad), act, flatten, then linear
    layers of widths ``hidden`` each followed by ``act`` (keys 0/2/5/7/...)."""
    side = 32
    for _ in range(2):
        side = (side + 2 * pad - 4) // 2 + 1
    layers: list[nn.Module] = [nn.Conv2d(3, c1, 4, 2, pad), _act(act), nn.Conv2d(c1, c2, 4, 2, pad),
                               _act(act), nn.Flatten(1)]
    width = c2 * side * side
    for h in hidden:
        layers += [nn.Linear(width, h), _act(act)]
        width = h
    return SeqNet(layers, head_index=len(layers))


def _cnn_deep() -> SeqNet:
    """keys 0/2/4/6/9: conv 3->8 (4x4, s2, p1), conv 8->8 (3x3), conv 8->8 (3x3), conv 8->8
    (4x4, s2, p1), flatten (512), linear 100; classifier 11."""
    layers: list[nn.Module] = [nn.Conv2d(3, 8, 4, 2, 1), nn.ReLU(), nn.Conv2d(8, 8, 3, 1, 1),
                               nn.ReLU(), nn.Conv2d(8, 8, 3, 1, 1), nn.ReLU(),
                               nn.Conv2d(8, 8, 4, 2, 1), nn.ReLU(), nn.Flatten(1),
                               nn.Linear(512, 100), nn.ReLU()]
    return SeqNet(layers, head_index=11)


class LeNet(ZooNet):
    """The PyTorch CIFAR-10 tutorial's LeNet: conv1 3->6 (5x5), relu, max-pool 2, conv2 6->16
    (5x5), relu, max-pool 2, flatten (400), fc1 120, relu, fc2 84, relu; classifier ``fc3``."""

    head_key = "fc3"
    units = ("conv1", "conv2", "fc1", "fc2")
    num_features = 84

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 5)
        self.conv2 = nn.Conv2d(6, 16, 5)
        self.fc1 = nn.Linear(400, 120)
        self.fc2 = nn.Linear(120, 84)
        self.relu = nn.ReLU()
        self.pool = nn.MaxPool2d(2)
        self.flatten = nn.Flatten(1)

    def steps(self) -> list[nn.Module]:
        r, p = self.relu, self.pool
        return [self.conv1, r, p, self.conv2, r, p, self.flatten, self.fc1, r, self.fc2, r]


class PlainBlock(nn.Module):
    """A residual block without BatchNorm, every conv with a bias:
    ``relu(conv2(relu(conv1(x))) + shortcut(x))``; ``shortcut`` is a 1x1 conv (``shortcut.0``)
    where the shape changes, else the identity (an empty ``nn.Sequential``)."""

    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1)
        self.shortcut = nn.Sequential()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv2(torch.relu(self.conv1(x)))
        return torch.relu(out + self.shortcut(x))


class VerifResNet(ZooNet):
    """ResNet-2B / ResNet-4B of the verification benchmarks: ``conv1`` (3x3, s2, p1), relu, stages
    ``layer1`` ... of two :class:`PlainBlock` each (the first with stride 2 and a 1x1 shortcut),
    flatten, ``linear1`` 100, relu; classifier ``linear2``."""

    head_key = "linear2"

    def __init__(self, stem: int, stages: tuple[int, ...]) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, stem, 3, 2, 1)
        self.relu = nn.ReLU()
        c, side = stem, 16
        for s, width in enumerate(stages, start=1):
            setattr(self, f"layer{s}", nn.Sequential(PlainBlock(c, width, 2),
                                                     PlainBlock(width, width, 1)))
            c, side = width, side // 2
        self.num_stages = len(stages)
        self.flatten = nn.Flatten(1)
        self.linear1 = nn.Linear(c * side * side, 100)
        self.num_features = 100
        self.units = tuple(f"layer{s}.{i}" for s in range(1, len(stages) + 1) for i in (0, 1)
                           ) + ("linear1",)

    def steps(self) -> list[nn.Module]:
        blocks = [b for s in range(1, self.num_stages + 1) for b in getattr(self, f"layer{s}")]
        return [self.conv1, self.relu, *blocks, self.flatten, self.linear1, self.relu]


#: Builders of the zoo architectures by the README's names (``resnet20 bn`` is built by
#: :mod:`nclab.models` as ``ResNetS(16, (3, 3, 3), shortcut="B")``).
ARCHITECTURES: dict[str, Callable[[], ZooNet]] = {
    "lenet": LeNet,
    "cnn wide": lambda: _two_conv(16, 32, 1, (100,)),
    "cnn base": lambda: _two_conv(8, 16, 1, (100,)),
    "cnn deep": _cnn_deep,
    "cnn small": lambda: _two_conv(16, 32, 0, (100,)),
    "cnn small sigmoid": lambda: _two_conv(16, 32, 0, (100,), act="sigmoid"),
    "marabou small": lambda: _two_conv(8, 16, 0, (128, 64)),
    "marabou medium": lambda: _two_conv(16, 32, 0, (128, 64)),
    "marabou large": lambda: _two_conv(32, 64, 0, (128, 64)),
    "resnet2b": lambda: VerifResNet(8, (16,)),
    "resnet4b": lambda: VerifResNet(16, (32, 32)),
}


def build(arch: str) -> ZooNet:
    """A randomly initialised zoo backbone of architecture ``arch`` (a key of
    :data:`ARCHITECTURES`)."""
    if arch not in ARCHITECTURES:
        raise ValueError(f"unknown zoo architecture {arch!r}; known: {', '.join(ARCHITECTURES)}")
    return ARCHITECTURES[arch]()


@dataclass(frozen=True)
class ZooSpec:
    """One zoo network: ``arch`` (README name), ``recipe`` (how it was trained),
    ``family`` (recipe family for plots), ``mean``/``std`` (input normalisation after scaling
    pixels to [0, 1]), ``state_at`` (``""`` plain state dict, ``"state_dict"``, or
    ``"state_dict[0]"`` for the first net of a cascade), ``acc`` (% on the 1000 real CIFAR-10 test
    images, README), ``params`` (classifier included, README)."""

    arch: str
    recipe: str
    family: str
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    state_at: str
    acc: float
    params: int


_IMNET_225 = ((0.485, 0.456, 0.406), (0.225, 0.225, 0.225))
_CIFAR_SDP = ((0.4914, 0.4824, 0.4467), (0.2471, 0.2435, 0.2616))
_CIFAR_ALT = ((0.4914, 0.4822, 0.4465), (0.2471, 0.2435, 0.2616))
_CIFAR_ERAN = ((0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.201))
_NONE = ((0.0, 0.0, 0.0), (1.0, 1.0, 1.0))

#: The nineteen zoo networks by registry name (the file stem before ``-<sha8>``).
ZOO: dict[str, ZooSpec] = {
    "pyhessian_resnet20": ZooSpec("resnet20 bn", "SGD, 180 epochs (PyHessian)", "standard",
                                  *_CIFAR_ERAN, "", 92.1, 272_474),
    "captum_lenet": ZooSpec("lenet", "PyTorch CIFAR-10 tutorial", "standard",
                            (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), "", 59.0, 62_006),
    "convex_small_linf8": ZooSpec("cnn wide", "provably robust, L-inf 8/255 (convex_adversarial)",
                                  "provably robust", *_IMNET_225, "state_dict[0]", 31.2, 214_918),
    "convex_small_l2_36": ZooSpec("cnn wide", "provably robust, L2 36/255 (convex_adversarial)",
                                  "provably robust", *_IMNET_225, "state_dict[0]", 55.3, 214_918),
    "oval_base": ZooSpec("cnn base", "provably robust (OVAL)", "provably robust", *_IMNET_225,
                         "state_dict[0]", 61.1, 105_966),
    "oval_wide": ZooSpec("cnn wide", "provably robust (OVAL)", "provably robust", *_IMNET_225,
                         "state_dict[0]", 63.6, 214_918),
    "oval_deep": ZooSpec("cnn deep", "provably robust (OVAL)", "provably robust", *_IMNET_225,
                         "state_dict[0]", 56.5, 54_902),
    "sdp_cnn_a_adv": ZooSpec("cnn wide", "PGD adversarial (SDP-FO)", "PGD adversarial",
                             *_CIFAR_SDP, "", 66.4, 214_918),
    "sdp_cnn_a_adv4": ZooSpec("cnn wide", "PGD adversarial, larger eps (SDP-FO)",
                              "PGD adversarial", *_CIFAR_SDP, "", 57.4, 214_918),
    "sdp_cnn_a_adv_alt": ZooSpec("cnn wide", "PGD adversarial, other run (SDP-FO)",
                                 "PGD adversarial", *_CIFAR_ALT, "", 69.7, 214_918),
    "sdp_cnn_a_mix": ZooSpec("cnn wide", "mixed clean + PGD (SDP-FO)", "mixed clean + PGD",
                             *_CIFAR_SDP, "", 76.0, 214_918),
    "sdp_cnn_a_mix4": ZooSpec("cnn wide", "mixed clean + PGD, larger eps (SDP-FO)",
                              "mixed clean + PGD", *_CIFAR_SDP, "", 69.3, 214_918),
    "eran_conv_small_pgd": ZooSpec("cnn small", "PGD adversarial (ERAN)", "PGD adversarial",
                                   *_CIFAR_ERAN, "state_dict[0]", 63.0, 125_318),
    "eran_conv_small_sigmoid": ZooSpec("cnn small sigmoid", "sigmoid activations (ERAN)",
                                       "standard", *_CIFAR_ERAN, "state_dict", 65.8, 125_318),
    "marabou_small": ZooSpec("marabou small", "Marabou benchmark", "standard", *_NONE, "",
                             63.0, 85_218),
    "marabou_medium": ZooSpec("marabou medium", "Marabou benchmark", "standard", *_NONE, "",
                              70.6, 165_498),
    "marabou_large": ZooSpec("marabou large", "Marabou benchmark", "standard", *_NONE, "",
                             75.5, 338_346),
    "abcrown_resnet2b": ZooSpec("resnet2b", "PGD adversarial, eps 2/255 (alpha-beta-CROWN)",
                                "PGD adversarial", *_CIFAR_ALT, "state_dict", 70.3, 112_006),
    "abcrown_resnet4b": ZooSpec("resnet4b", "PGD adversarial, eps 2/255 (alpha-beta-CROWN)",
                                "PGD adversarial", *_CIFAR_ALT, "state_dict", 77.1, 123_734),
}


def recipe_family(name: str) -> str:
    """The recipe family of a CIFAR-10 network (``standard``, ``PGD adversarial``,
    ``mixed clean + PGD``, ``provably robust``): a :data:`ZOO` entry's, ``standard`` for the
    akamaster ResNets ``resnet20`` ... ``resnet56``."""
    if name in ZOO:
        return ZOO[name].family
    if name in ("resnet20", "resnet32", "resnet44", "resnet56"):
        return "standard"
    raise ValueError(f"{name!r} is not a CIFAR-10 zoo network; zoo: {', '.join(ZOO)}")


def read_state_dict(path: str | os.PathLike, state_at: str) -> dict[str, torch.Tensor]:
    """The state dict of a zoo file, read with ``torch.load(weights_only=True)`` onto the CPU and
    taken from where :class:`ZooSpec` ``state_at`` says; ``module.`` prefixes are stripped."""
    obj = torch.load(path, map_location="cpu", weights_only=True)
    if state_at:
        obj = obj["state_dict"]
        if state_at == "state_dict[0]":
            obj = obj[0]
    if not isinstance(obj, dict):
        raise ValueError(f"{os.fspath(path)!r}: expected a state dict at {state_at or 'top level'}, "
                         f"got {type(obj).__name__}")
    return {k.removeprefix("module."): v for k, v in obj.items()}
