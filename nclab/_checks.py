"""Input checks shared by the modules that take a labelled feature matrix (accumulators, probe,
transfer)."""

from __future__ import annotations

import operator

import torch


def positive_int(value, name: str = "num_classes") -> int:
    """``value`` as a Python int >= 1. NumPy and torch integers are accepted; bool, floats, strings
    and other non-integers raise ``TypeError``, values < 1 ``ValueError``; both name ``name``."""
    if isinstance(value, bool) or (isinstance(value, torch.Tensor) and value.dtype == torch.bool):
        raise TypeError(f"{name} must be an integer, got bool {value!r}")
    try:
        k = operator.index(value)
    except TypeError:
        raise TypeError(f"{name} must be an integer, got {type(value).__name__} {value!r}") from None
    if k < 1:
        raise ValueError(f"{name} must be >= 1, got {k}")
    return k


def features_labels(feats, y, what: str = "") -> tuple[torch.Tensor, torch.Tensor]:
    """``(features (N, d), labels (N,) int64)`` as tensors, or a ``ValueError`` naming the problem:
    wrong shapes, float or negative labels, NaN/inf feature rows (how many)."""
    prefix = f"{what} " if what else ""
    feats = torch.as_tensor(feats)
    y = torch.as_tensor(y, device=feats.device)
    if feats.ndim != 2:
        raise ValueError(f"{prefix}features must be (N, d), got shape {tuple(feats.shape)}")
    if y.ndim != 1 or len(y) != len(feats):
        raise ValueError(f"{prefix}labels must be (N,) with N={len(feats)}, got shape {tuple(y.shape)}")
    if y.is_floating_point():
        raise ValueError(f"{prefix}labels must be integers, got {y.dtype}")
    if len(y) and int(y.min()) < 0:
        raise ValueError(f"{prefix}labels must be >= 0, got {sorted(set(y[y < 0].tolist()))[:5]}")
    bad = (~torch.isfinite(feats)).any(1).sum().item() if feats.is_floating_point() else 0
    if bad:
        raise ValueError(f"{prefix}features: {bad} rows contain NaN/inf; drop or fix them first")
    return feats, y.long()
