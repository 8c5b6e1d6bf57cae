"""Backbones by name and their ordered fine-tuning units ("Block k", "Layer k").

A *backbone* here is an ``nn.Module`` whose ``forward`` maps images ``(B, C, H, W)`` to penultimate
features ``(B, d)`` (its classifier removed), with ``d`` in ``model.num_features``.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["ConvNetS", "ResNetS", "blocks", "feature_dim"]


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


class _BasicBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = None
        if stride != 1 or c_in != c_out:
            self.downsample = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False),
                                            nn.BatchNorm2d(c_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(out)) + identity)


class ResNetS(nn.Module):
    """A small CIFAR-style ResNet: 3x3 stem, three stages of basic residual blocks with widths
    ``width, 2*width, 4*width`` (strides 1, 2, 2), global average pool. Its fine-tuning units are
    the residual blocks ``layer1.0`` ... in order, as torchvision's ResNets."""

    def __init__(self, width: int = 16, depths: tuple[int, ...] = (1, 1, 1),
                 in_channels: int = 3) -> None:
        super().__init__()
        if width < 1 or not depths or min(depths) < 1:
            raise ValueError(f"width and every depth must be >= 1, got {width}, {depths}")
        self.conv1 = nn.Conv2d(in_channels, width, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        c_in = width
        for s, depth in enumerate(depths):
            c_out = width * 2**s
            stage = [_BasicBlock(c_in if i == 0 else c_out, c_out, 1 if s == 0 or i else 2)
                     for i in range(depth)]
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


def blocks(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The ordered fine-tuning units of ``model`` as ``(qualified_name, module)``; Block k (1-based,
    as in the paper) is ``blocks(model)[k - 1]``."""
    if isinstance(model, ConvNetS):
        return [(f"features.{i}", m) for i, m in enumerate(model.features)]
    if isinstance(model, ResNetS):
        return [(f"layer{s + 1}.{i}", m) for s in range(model.num_stages)
                for i, m in enumerate(getattr(model, f"layer{s + 1}"))]
    raise TypeError(f"blocks() does not know {type(model).__name__}")


def feature_dim(model: nn.Module) -> int:
    """The penultimate feature width ``d`` of a backbone."""
    d = getattr(model, "num_features", None)
    if not isinstance(d, int):
        raise TypeError(f"{type(model).__name__} has no integer num_features")
    return d
