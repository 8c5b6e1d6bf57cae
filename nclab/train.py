"""One trainer for every fine-tuning method: fast on a GPU, resumable, and distributed.

:func:`fit` trains a model prepared by :func:`nclab.finetune.prepare` (anything with ``.features``,
``.head`` and ``.method``; ``forward(x) = head(features(x))``) with the paper's recipe (App. E):
SGD with momentum 0.9, weight decay, and a cosine-annealed learning rate

    lr(s) = min_lr + (lr - min_lr) * (1 + cos(pi * s / S)) / 2,   s = 0, ..., S - 1 optimiser steps,

annealed per step from the starting rate of Table 4 towards the floor ``min_lr = 1e-4`` that App. E
states (the floor is lowered to ``lr`` when the starting rate is smaller). Every ``eval_every``
epochs it measures test accuracy and the penultimate NC1 = (1/K) tr(Sigma_W Sigma_B^+) (streamed
into :class:`nclab.metrics.ClassStats`), and on request the NC1 of chosen blocks (Fig. 7).

Speed: CIFAR-scale :class:`nclab.data.TensorDataset` data stay on the device as uint8 and are
augmented, resized and normalised there batch by batch (the conventions of :func:`nclab.data.batches`);
on CUDA the step runs under bf16 autocast with channels_last. For ``layer``/``scl`` without
augmentation, ``cache_prefix=True`` runs the frozen part before the tuned block once and trains
from its cached output (deviation: the prefix's normalisation statistics stay frozen, see :func:`fit`).

Robustness: ``checkpoint=path`` writes a checkpoint after every epoch atomically (write to a
temporary file, then ``os.replace``), loadable with ``torch.load(weights_only=True)``;
``resume=True`` continues from it to the same result as an uninterrupted run. A non-finite loss
stops with the epoch and step; CUDA out of memory names a batch size to try.

Several GPUs: launch the same script with ``torchrun --nproc_per_node=4 script.py``. :func:`fit`
sees the process group (or the ``torchrun`` environment variables), wraps the model in
DistributedDataParallel, splits every global batch of ``batch_size`` images across the ranks, and
syncs accuracy and class statistics across them; only rank 0 shows progress and writes checkpoints.
"""

from __future__ import annotations

import hashlib
import io
import math
import os
import random
import time
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .data import IMAGENET_MEAN, IMAGENET_STD, TensorDataset, batches, normalize  # noqa: F401 (re-exported)
from .finetune import Truncated  # defined there (beside the other prepared forms), re-exported here
from .models import _input_size, _norm_stats  # the model's input size and normalisation
from .runtime import profile, seed_everything

__all__ = [
    "TABLE4",
    "MIN_LR",
    "default_hparams",
    "model_family",
    "cosine_lr",
    "fit",
    "History",
    "NonFiniteLossError",
    "CheckpointError",
    "load_checkpoint",
    "layer_lp",
    "tune_blocks",
    "run_method",
]

MIN_LR = 1e-4
"""The floor of the cosine schedule; App. E lets the rate decay from its start towards 1e-4."""

# Table 4 of the paper: (learning rate, weight decay) per backbone family and method.
# Layer LoRA is not in Table 4; it uses Layer FT's values.
TABLE4: dict[tuple[str, str], tuple[float, float]] = {
    ("cnn", "linear"): (5e-2, 1e-4),
    ("cnn", "mlp"): (5e-2, 5e-4),
    ("cnn", "layer"): (5e-2, 1e-4),
    ("cnn", "scl"): (5e-2, 1e-4),
    ("cnn", "full"): (5e-2, 5e-4),
    ("cnn", "layer_lora"): (5e-2, 1e-4),
    ("vit", "linear"): (1e-2, 0.0),
    ("vit", "mlp"): (1e-2, 0.0),
    ("vit", "layer"): (1e-2, 0.0),
    ("vit", "scl"): (1e-2, 0.0),
    ("vit", "full"): (1e-3, 0.0),
    ("vit", "layer_lora"): (1e-2, 0.0),
    ("cnn", "layer_lp"): (5e-2, 1e-4),
    ("vit", "layer_lp"): (1e-2, 0.0),
}
_FAMILY_ALIASES = {"cnn": "cnn", "resnet": "cnn", "convnet": "cnn", "densenet": "cnn",
                   "mobilenet": "cnn", "vit": "vit", "transformer": "vit"}


_OOM = getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)


class NonFiniteLossError(FloatingPointError):
    """The training loss became NaN or infinite."""


# --------------------------------------------------------------------------- hyper-parameters
def default_hparams(method: str, family: str) -> dict[str, float]:
    """Table 4's starting learning rate and weight decay for ``method`` on a backbone ``family``
    (``"cnn"``/``"resnet"`` or ``"vit"``): ``{"lr": ..., "weight_decay": ...}``.

    ResNet: lr 5e-2 for every method, weight decay 1e-4 (linear, Layer, SCL) or 5e-4 (MLP, Full).
    ViT: lr 1e-2 (1e-3 for Full FT), weight decay 0. Layer LoRA and Layer LP (:func:`layer_lp`)
    take Layer FT's values."""
    fam = _FAMILY_ALIASES.get(str(family).lower())
    if fam is None:
        raise ValueError(f"unknown backbone family {family!r}; valid: {', '.join(_FAMILY_ALIASES)}")
    if (fam, method) not in TABLE4:
        valid = sorted({m for _, m in TABLE4})
        raise ValueError(f"unknown method {method!r}; valid methods: {', '.join(valid)}")
    lr, wd = TABLE4[(fam, method)]
    return {"lr": lr, "weight_decay": wd}


def model_family(model: nn.Module) -> str:
    """``"vit"`` if ``model`` contains a vision transformer (timm, torchvision or open_clip), else
    ``"cnn"``."""
    for m in model.modules():
        name = type(m).__name__.lower()
        if "visiontransformer" in name or name in {"vit", "vitb32"}:
            return "vit"
    return "cnn"


def cosine_lr(step: int, total_steps: int, lr: float, min_lr: float = MIN_LR) -> float:
    """The cosine-annealed rate at optimiser step ``step`` of ``total_steps``:
    ``min_lr + (lr - min_lr) * (1 + cos(pi * step / total_steps)) / 2`` (``lr`` at step 0, approaching
    ``min_lr`` at the end)."""
    if total_steps < 1:
        raise ValueError(f"total_steps must be >= 1, got {total_steps}")
    t = min(max(step, 0), total_steps) / total_steps
    return min_lr + (lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * t))


# --------------------------------------------------------------------------- history
@dataclass
class History:
    """Per-epoch records of :func:`fit` (``epoch`` 1-based, ``lr`` at the epoch's first step,
    ``train_loss``, ``train_acc``, and on evaluated epochs ``test_loss``, ``test_acc``, ``nc1`` and
    ``layer_nc1`` = {layer: NC1}); accuracies are fractions. ``config`` holds the settings used."""

    records: list[dict[str, Any]] = field(default_factory=list)
    config: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.records)

    @property
    def final(self) -> dict[str, Any]:
        """The last record that was evaluated on the test set."""
        evaluated = [r for r in self.records if r.get("test_acc") is not None]
        if not evaluated:
            raise ValueError("no evaluated epoch in this history")
        return evaluated[-1]

    def to_frame(self):
        """A pandas DataFrame, one row per epoch; layer-wise NC1 as columns ``nc1[<layer>]``."""
        import pandas as pd

        rows = []
        for r in self.records:
            row = {k: v for k, v in r.items() if k != "layer_nc1"}
            for name, v in (r.get("layer_nc1") or {}).items():
                row[f"nc1[{name}]"] = v
            rows.append(row)
        return pd.DataFrame(rows).set_index("epoch")

    def plot(self, axes=None):
        """Loss, accuracy and NC1 (log scale) against the epoch; returns the figure."""
        import matplotlib.pyplot as plt

        df = self.to_frame()
        if axes is None:
            fig, axes = plt.subplots(1, 3, figsize=(12, 3.2))
        else:
            fig = axes[0].figure
        axes[0].plot(df.index, df["train_loss"], label="train")
        if "test_loss" in df:
            axes[0].plot(df["test_loss"].dropna(), "o-", label="test")
        axes[0].set(xlabel="epoch", ylabel="cross-entropy", title="loss")
        axes[1].plot(df.index, df["train_acc"], label="train")
        if "test_acc" in df:
            axes[1].plot(df["test_acc"].dropna(), "o-", label="test")
        axes[1].set(xlabel="epoch", ylabel="accuracy", title="accuracy")
        nc1_cols = [c for c in df.columns if c.startswith("nc1")]
        for c in nc1_cols:
            axes[2].plot(df[c].dropna(), "o-", label="penultimate" if c == "nc1" else c[4:-1])
        axes[2].set(xlabel="epoch", ylabel="NC1", title="NC1 (test)", yscale="log")
        for ax in axes:
            ax.legend(fontsize=8)
        method = self.config.get("method")
        if method:
            fig.suptitle(f"fit: {method}")
        fig.tight_layout()
        return fig


# --------------------------------------------------------------------------- distributed
@dataclass
class _Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def active(self) -> bool:
        return self.world > 1

    @property
    def main(self) -> bool:
        return self.rank == 0


def _init_distributed(dev: torch.device | None) -> _Dist:
    """The process group if ``fit`` runs under ``torchrun`` (initialised here from the environment
    variables when the script has not done it), else a single process."""
    import torch.distributed as dist

    if not dist.is_available():
        return _Dist()
    if not dist.is_initialized():
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world <= 1 or "RANK" not in os.environ or "MASTER_ADDR" not in os.environ:
            return _Dist()
        use_cuda = torch.cuda.is_available() and (dev is None or dev.type == "cuda")
        dist.init_process_group("nccl" if use_cuda else "gloo")
    world = dist.get_world_size()
    local = int(os.environ.get("LOCAL_RANK", dist.get_rank() % max(torch.cuda.device_count(), 1)))
    return _Dist(dist.get_rank(), world, local)


def _all_reduce(t: torch.Tensor, d: _Dist) -> torch.Tensor:
    if d.active:
        import torch.distributed as dist

        dist.all_reduce(t)
    return t


def _barrier(d: _Dist) -> None:
    if d.active:
        import torch.distributed as dist

        dist.barrier()


# --------------------------------------------------------------------------- data
def _epoch_seed(seed: int, epoch: int) -> int:
    return seed * 1_000_003 + epoch


def _plan(n: int, batch_size: int, shuffle: bool, seed: int, epoch: int, d: _Dist,
          drop_last: bool) -> list[torch.Tensor]:
    """This rank's index batches for one epoch: the global order (a permutation drawn from the seed
    and the epoch, the same on every rank) cut into global batches of ``batch_size``; rank r takes
    elements r, r + world, ... of each global batch."""
    if shuffle:
        order = torch.randperm(n, generator=torch.Generator().manual_seed(_epoch_seed(seed, epoch)))
    else:
        order = torch.arange(n)
    n_batches = n // batch_size if drop_last else -(-n // batch_size)
    out = []
    for i in range(n_batches):
        idx = order[i * batch_size:(i + 1) * batch_size]
        if d.active:
            if len(idx) < d.world:
                continue
            idx = idx[d.rank::d.world]
        out.append(idx)
    return out


def _tensor_batch(ds: TensorDataset, idx: torch.Tensor, dev: torch.device, size: int | None,
                  augment: Callable | None, mean, std) -> tuple[torch.Tensor, torch.Tensor]:
    """One batch as :func:`nclab.data.batches` builds it: gather uint8 on the data's device, move,
    scale to [0, 1], augment, resize (bilinear, antialiased when shrinking), normalise."""
    x = ds.x[idx.to(ds.x.device)].to(dev, non_blocking=True)
    y = ds.y[idx.to(ds.y.device)].to(dev, non_blocking=True)
    x = x.float() / 255.0 if x.dtype == torch.uint8 else x.float()
    if augment is not None:
        x = augment(x)
    if size is not None and x.shape[-1] != size:
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False,
                          antialias=x.shape[-1] > size)
    return normalize(x, mean, std), y


def _num_classes(model: nn.Module, data: Any) -> int:
    head = getattr(model, "head", None)
    if head is not None:
        linears = [m for m in head.modules() if isinstance(m, nn.Linear)]
        if linears:
            return linears[-1].out_features
    k = getattr(data, "num_classes", None) or len(getattr(getattr(data, "dataset", None),
                                                          "classes", []) or [])
    if not k:
        raise ValueError("cannot tell the number of classes: give the model a `.head` ending in an "
                         "nn.Linear (nclab.finetune.prepare does) or data with .num_classes")
    return int(k)


def _check_label_range(y: torch.Tensor, num_classes: int, what: str) -> None:
    """``ValueError`` naming the label range and the head width when a label lies outside [0, K)."""
    lo, hi = int(y.min()), int(y.max())
    if lo < 0 or hi >= num_classes:
        raise ValueError(f"{what} labels span [{lo}, {hi}] but the model's head has {num_classes} "
                         f"outputs (labels must lie in [0, {num_classes})): prepare the model with "
                         f"num_classes={max(hi + 1, num_classes)} or remap the labels")


def _to_device(x: torch.Tensor, y: torch.Tensor, dev: torch.device, channels_last: bool):
    x = x.to(dev, non_blocking=True)
    y = torch.as_tensor(y).to(dev, non_blocking=True)
    if channels_last and x.ndim == 4:
        x = x.contiguous(memory_format=torch.channels_last)
    return x, y


def _sharded(iterable: Iterable, d: _Dist, drop_uneven: bool) -> Iterable:
    """Round-robin batches of a generic loader across ranks (rank r takes batches r, r + world...);
    with ``drop_uneven`` the trailing batches that not every rank would get are skipped."""
    if not d.active:
        yield from iterable
        return
    n = len(iterable) if drop_uneven else None
    stop = (n // d.world) * d.world if n is not None else None
    for i, batch in enumerate(iterable):
        if stop is not None and i >= stop:
            break
        if i % d.world == d.rank:
            yield batch


# --------------------------------------------------------------------------- checkpoints
def _rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy_keys": torch.from_numpy(np.asarray(np_state[1], dtype=np.int64)),
        "numpy_rest": [int(np_state[2]), int(np_state[3]), float(np_state[4])],
        "python": _to_lists(random.getstate()),
    }
    if torch.cuda.is_available():
        state["cuda"] = [s for s in torch.cuda.get_rng_state_all()]
    return state


def _to_lists(obj: Any) -> Any:
    return [_to_lists(o) for o in obj] if isinstance(obj, (tuple, list)) else obj


def _to_tuples(obj: Any) -> Any:
    return tuple(_to_tuples(o) for o in obj) if isinstance(obj, list) else obj


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    rest = state["numpy_rest"]
    np.random.set_state(("MT19937", state["numpy_keys"].numpy().astype(np.uint32), int(rest[0]),
                         int(rest[1]), float(rest[2])))
    random.setstate(_to_tuples(state["python"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class CheckpointError(RuntimeError):
    """A checkpoint file that cannot be used: unreadable, truncated, empty, not a checkpoint, or
    its SHA-256 does not match its payload. The message names the file and what to do."""


def _previous(path: Path) -> Path:
    return path.with_name(path.name + ".prev")


def _atomic_save(obj: dict[str, Any], path: Path) -> None:
    """Write ``obj`` to ``path`` so that a crash leaves a usable checkpoint: the payload (``torch.save``
    bytes) is stored with its SHA-256 in a temporary file in the same folder, flushed to disk, read
    back and verified; only then the current file becomes ``<path>.prev`` and the new one ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    buf = io.BytesIO()
    torch.save(obj, buf)
    payload = buf.getvalue()
    try:
        with open(tmp, "wb") as f:
            torch.save({"format": "nclab-checkpoint-1", "sha256": hashlib.sha256(payload).hexdigest(),
                        "payload": torch.frombuffer(bytearray(payload), dtype=torch.uint8)}, f)
            f.flush()
            os.fsync(f.fileno())
        _read_verified(tmp)  # raises CheckpointError if what reached the disk is not what we wrote
        if path.exists():
            os.replace(path, _previous(path))
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def _pid_alive(pid: int) -> bool:
    """Whether process ``pid`` exists (``os.kill(pid, 0)``; one owned by another user counts)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove_stale_tmp(path: Path) -> None:
    """Delete ``<path>.tmp<pid>`` files left by a killed run: only those whose ``pid`` is not a live
    process (a live one, e.g. a chapter running beside this one, may be writing it right now)."""
    for old in path.parent.glob(path.name + ".tmp*"):
        pid = old.name[len(path.name) + 4:]
        if pid.isdigit() and int(pid) != os.getpid() and not _pid_alive(int(pid)):
            old.unlink(missing_ok=True)


def _read_verified(path: Path) -> dict[str, Any]:
    what_to_do = ("delete it (and resume from its .prev file, if any) or start without resume=True")
    try:
        size = path.stat().st_size
    except OSError as err:
        raise CheckpointError(f"checkpoint {path} cannot be read ({err})") from err
    if size == 0:
        raise CheckpointError(f"checkpoint {path} is empty (a write was interrupted?): {what_to_do}")
    try:
        outer = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # truncated zip, random bytes, pickle refused by weights_only...
        raise CheckpointError(f"checkpoint {path} is not a readable checkpoint (truncated or "
                              f"damaged: {type(err).__name__}: {str(err)[:200]}): {what_to_do}") from err
    if not (isinstance(outer, dict) and outer.get("format") == "nclab-checkpoint-1"
            and isinstance(outer.get("payload"), torch.Tensor) and isinstance(outer.get("sha256"), str)):
        raise CheckpointError(f"checkpoint {path} was not written by nclab.train.fit (no SHA-256 "
                              f"payload): {what_to_do}")
    payload = outer["payload"].numpy().tobytes()
    digest = hashlib.sha256(payload).hexdigest()
    if digest != outer["sha256"]:
        raise CheckpointError(f"checkpoint {path} is damaged: SHA-256 of its payload is {digest[:12]}..., "
                              f"stored {outer['sha256'][:12]}...: {what_to_do}")
    try:
        return torch.load(io.BytesIO(payload), map_location="cpu", weights_only=True)
    except Exception as err:
        raise CheckpointError(f"checkpoint {path} holds an unreadable payload ({type(err).__name__}): "
                              f"{what_to_do}") from err


def load_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """A checkpoint written by :func:`fit`, its SHA-256 verified, loaded with
    ``torch.load(weights_only=True)``: keys ``model``, ``optimizer`` (state dicts), ``epoch`` (epochs
    done), ``step``, ``rng``, ``history`` (list of records), ``config``. Any unreadable, truncated,
    empty or mismatched file raises :class:`CheckpointError` naming it."""
    return _read_verified(Path(path))


# --------------------------------------------------------------------------- evaluation
def _resolve_layers(model: nn.Module, layerwise: bool | Sequence[int | str]) -> dict[str, nn.Module]:
    """``True``: every block of ``model.backbone``; ints: those blocks (1-based); strings: qualified
    module names in ``model``."""
    if layerwise is False or layerwise is None:
        return {}
    from .models import blocks

    named = dict(model.named_modules())
    backbone = getattr(model, "backbone", model)
    prefix = "backbone." if backbone is not model else ""
    try:
        units = [(prefix + name, m) for name, m in blocks(backbone)]
    except TypeError:
        units = []
    if layerwise is True:
        if not units:
            raise ValueError(f"nclab.models.blocks does not know {type(backbone).__name__}: pass "
                             "layerwise=[qualified module names] instead of True")
        return dict(units)
    out = {}
    for item in layerwise:
        if isinstance(item, int):
            if not 1 <= item <= len(units):
                raise ValueError(f"block {item} out of range: this backbone has blocks 1..{len(units)}")
            name, m = units[item - 1]
            out[f"block{item}"] = m
        elif item in named:
            out[item] = named[item]
        else:
            raise ValueError(f"no module {item!r} in the model; block names: "
                             f"{', '.join(n for n, _ in units) or '(none known)'}")
    return out


@torch.no_grad()
def _evaluate(model: nn.Module, test: Any, dev: torch.device, d: _Dist, num_classes: int,
              layers: dict[str, nn.Module], batch_size: int, size: int | None, mean, std,
              amp: bool, channels_last: bool) -> dict[str, Any]:
    from .features import pool_tap
    from .metrics import ClassStats, ClassStatsGroup, nc1

    was_training = model.training
    model.eval()
    pen = ClassStats(num_classes, device=dev, check="auto")  # no host sync per batch on GPUs
    group = ClassStatsGroup(num_classes, device=dev, check="auto", names=layers) if layers else None
    current: dict[str, torch.Tensor] = {}

    def tap(name: str) -> Callable:
        def hook(_module: nn.Module, _inputs: Any, out: Any) -> None:  # returns None: output kept
            current[name] = pool_tap(out, "avg", batch_size=len(current["y"]))
        return hook

    hooks = [m.register_forward_hook(tap(name)) for name, m in layers.items()]
    loss_sum = torch.zeros((), dtype=torch.float64, device=dev)
    correct = torch.zeros((), dtype=torch.float64, device=dev)
    count = torch.zeros((), dtype=torch.float64, device=dev)
    try:
        if isinstance(test, TensorDataset) and not d.active:
            loader = batches(test, batch_size, shuffle=False, device=dev, size=size, mean=mean,
                             std=std)
        elif isinstance(test, TensorDataset):
            idx_all = torch.arange(len(test))[d.rank::d.world] if d.active else torch.arange(len(test))
            loader = (_tensor_batch(test, idx_all[i:i + batch_size], dev, size, None, mean, std)
                      for i in range(0, len(idx_all), batch_size))
        else:
            loader = _sharded(test, d, drop_uneven=False)
        for x, y in loader:
            x, y = _to_device(x, y, dev, channels_last)
            current["y"] = y
            with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=amp):
                h = model.features(x)
                logits = model.head(h)
            pen.update(h.float(), y)
            if group is not None:  # every tap in one update
                group.update({name: current[name] for name in layers}, y)
            logits = logits.float()
            loss_sum += F.cross_entropy(logits, y, reduction="sum").double()
            correct += (logits.argmax(1) == y).sum()
            count += len(y)
    finally:
        for hk in hooks:
            hk.remove()
        model.train(was_training)
    totals = _all_reduce(torch.stack([loss_sum, correct, count]), d)
    layer_stats = group.stats() if group is not None else {}
    if d.active:
        pen.sync()
        for s in layer_stats.values():
            s.sync()
    n = float(totals[2])
    undefined: list[str] = []

    def nc1_or_nan(stats: Any, what: str) -> float:
        try:
            return float(nc1(stats))
        except ValueError as err:  # degenerate evaluation: a class absent, coinciding means...
            undefined.append(f"{what}: {err}")
            return math.nan

    record = {
        "test_loss": float(totals[0]) / n,
        "test_acc": float(totals[1]) / n,
        "nc1": nc1_or_nan(pen, "penultimate"),
        "layer_nc1": {name: nc1_or_nan(s, name) for name, s in layer_stats.items()} if layers else None,
    }
    if undefined and d.main:
        warnings.warn("NC1 is undefined on this evaluation, recorded as NaN; training goes on ("
                      + "; ".join(undefined) + ")", UserWarning, stacklevel=3)
    return record


# --------------------------------------------------------------------------- cached prefix
@torch.no_grad()
def _cache_prefix(prefix: nn.Module, train: TensorDataset, dev: torch.device, size: int | None,
                  mean, std, batch_size: int, amp: bool, channels_last: bool
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Run the frozen prefix (eval mode) over the training set once. The outputs stay on the device
    when they take under half its free memory, else in (pinned) host memory."""
    prefix.eval()
    outs, ys = [], []
    store: torch.device | None = None
    n = len(train)
    for i in range(0, n, batch_size):
        idx = torch.arange(i, min(i + batch_size, n))
        x, y = _tensor_batch(train, idx, dev, size, None, mean, std)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=amp):
            z = prefix(x)
        if store is None:
            need = z[0].numel() * z.element_size() * n
            store = dev
            if dev.type == "cuda" and need > 0.5 * torch.cuda.mem_get_info(dev)[0]:
                store = torch.device("cpu")
        outs.append(z.to(store))
        ys.append(y.to(store))
    z_all, y_all = torch.cat(outs), torch.cat(ys)
    if store is not None and store.type == "cpu" and dev.type == "cuda":
        z_all = z_all.pin_memory()
    return z_all, y_all


# --------------------------------------------------------------------------- fit
def fit(
    model: nn.Module,
    train: TensorDataset | Iterable,
    test: TensorDataset | Iterable | None,
    epochs: int,
    lr: float | None = None,
    weight_decay: float | None = None,
    batch_size: int | None = None,
    eval_every: int = 1,
    layerwise: bool | Sequence[int | str] = False,
    augment: Callable[[torch.Tensor], torch.Tensor] | None = None,
    cache_prefix: bool = False,
    checkpoint: str | os.PathLike | None = None,
    resume: bool = False,
    device: torch.device | str | None = None,
    seed: int = 0,
    progress: bool = True,
    min_lr: float = MIN_LR,
    momentum: float = 0.9,
    image_size: int | None = None,
    frozen_prefix_stats: bool | None = None,
    callback: Callable[[dict[str, Any]], None] | None = None,
) -> History:
    """Train ``model`` (from :func:`nclab.finetune.prepare`) on ``train`` and evaluate on ``test``.

    Recipe (App. E): SGD(momentum 0.9, ``weight_decay``) with the rate cosine-annealed per step from
    ``lr`` to ``min_lr`` (:func:`cosine_lr`; App. E's floor 1e-4); cross-entropy loss. ``lr`` and
    ``weight_decay`` default to Table 4 for ``model.method`` and the backbone family
    (:func:`default_hparams`); ``batch_size`` to ``profile().batch_size`` (the *global* batch when
    distributed). Returns a :class:`History`.

    Data: a :class:`nclab.data.TensorDataset` (uint8) is kept on the device and batched there, with
    ``augment(x)`` applied to [0, 1] float batches, resized to ``image_size`` (default: the model's
    input size, e.g. 224 for timm ImageNet models, else the data's own) and normalised with the
    model's mean/std (ImageNet's by default). Any other iterable of ``(x, y)`` batches (a DataLoader
    with workers for large datasets) is used as it comes; if its sampler has ``set_epoch`` it is called.

    Evaluation every ``eval_every`` epochs (and after the last): test loss, accuracy and the
    penultimate NC1 of ``model.features(x)``; ``layerwise=True`` adds the NC1 of every backbone block
    (channel-averaged CNN maps, token-averaged ViT outputs: :func:`nclab.features.pool_tap`),
    ``layerwise=[1, 3, 5]`` of those blocks (1-based, recorded as ``block1``...) or of named modules.

    ``cache_prefix=True`` (``layer``/``scl``/``layer_lora``, TensorDataset, no ``augment``): splits the
    model with :func:`nclab.finetune.split`, runs the frozen prefix once over the training set and
    trains the suffix from the cached tensors. Deviation from the paper: the prefix runs in eval mode,
    so its normalisation layers keep their source statistics instead of adapting to the downstream
    data. ``frozen_prefix_stats=True`` applies the same freeze without the cache (for a fair speed or
    accuracy comparison); it defaults to ``cache_prefix``.

    ``checkpoint``: a file written atomically after every epoch's training steps and before its
    evaluation (a failing evaluation loses no epoch: ``resume=True`` evaluates that epoch's model
    first and goes on), with a SHA-256 of its payload that
    is verified on disk before the previous one moves to ``<checkpoint>.prev``; stale
    ``<checkpoint>.tmp<pid>`` files of killed runs are removed on start. ``resume=True`` continues
    from it (if it exists) with the same result as an uninterrupted run; a damaged latest file falls
    back to ``.prev`` with a warning, and an unusable one raises :class:`CheckpointError`.
    A degenerate evaluation (a class absent from ``test``, coinciding class means) records NaN for
    the undefined NC1 with one warning per evaluation, and training goes on. Labels outside
    ``[0, head width)`` raise ``ValueError`` before the first step. ``callback(record)`` runs after each
    epoch's checkpoint. ``seed`` seeds torch/NumPy/Python and the batch order.

    Memory: a model prepared with ``recompute_frozen=True`` (or with ``model.recompute_frozen = True``)
    recomputes the frozen blocks after Block k in the backward pass instead of storing their
    activations (:mod:`nclab.recompute`): the same result for less memory and some extra compute.

    On CUDA the step uses bf16 autocast and channels_last. Distributed: run the script with
    ``torchrun --nproc_per_node=N script.py``; nothing else changes (see the module docstring).
    """
    if not all(hasattr(model, a) for a in ("features", "head")):
        raise ValueError(f"{type(model).__name__} needs .features(x) and .head: prepare it with "
                         "nclab.finetune.prepare(backbone, method, num_classes=K)")
    if not isinstance(epochs, int) or epochs < 1:
        raise ValueError(f"epochs must be a positive int, got {epochs!r}")
    if eval_every < 1:
        raise ValueError(f"eval_every must be >= 1, got {eval_every}")
    method = getattr(model, "method", None)
    family = model_family(model)
    if lr is None or weight_decay is None:
        if method is None:
            raise ValueError("model has no .method, so Table 4 defaults are unknown: pass lr= and "
                             "weight_decay=")
        hp = default_hparams(method, family)
        lr = hp["lr"] if lr is None else lr
        weight_decay = hp["weight_decay"] if weight_decay is None else weight_decay
    floor = min(min_lr, lr)
    batch_size = batch_size or profile().batch_size
    frozen_prefix_stats = cache_prefix if frozen_prefix_stats is None else frozen_prefix_stats
    if cache_prefix:
        if augment is not None:
            raise ValueError("cache_prefix=True needs fixed inputs: drop augment= or cache_prefix")
        if not isinstance(train, TensorDataset):
            raise ValueError("cache_prefix=True needs the training data as an nclab.data.TensorDataset")
        if method == "full":
            raise ValueError("cache_prefix=True has nothing to cache for method 'full'")

    dev = torch.device(device) if device is not None else None
    d = _init_distributed(dev)
    if dev is None:
        dev = torch.device(f"cuda:{d.local_rank}") if torch.cuda.is_available() else torch.device("cpu")
    elif dev.type == "cuda" and dev.index is None and d.active:
        dev = torch.device(f"cuda:{d.local_rank}")
    if batch_size % d.world:
        raise ValueError(f"batch_size={batch_size} must be divisible by the number of processes "
                         f"({d.world}): it is the global batch, split across them")
    on_cuda = dev.type == "cuda"
    amp, channels_last = on_cuda, on_cuda
    seed_everything(seed, deterministic=not on_cuda)

    size = image_size if image_size is not None else _input_size(model)
    mean, std = _norm_stats(model)
    num_classes = _num_classes(model, test if test is not None else train)
    for what, data in (("train", train), ("test", test)):
        if isinstance(data, TensorDataset) and len(data.y):
            _check_label_range(data.y, num_classes, what)
    model.to(dev)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no trainable parameters (requires_grad=False everywhere)")
    optimizer = torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    layers = _resolve_layers(model, layerwise)

    prefix = suffix = None
    if cache_prefix or frozen_prefix_stats:
        from .finetune import split

        prefix, suffix = split(model)
    cached = None
    if cache_prefix:
        cached = _cache_prefix(prefix, train, dev, size, mean, std, batch_size, amp, channels_last)
    module = suffix if cache_prefix else model
    ddp_module = module
    if d.active:
        from torch.nn.parallel import DistributedDataParallel as DDP

        ddp_module = DDP(module, device_ids=[dev.index] if on_cuda else None)

    n_train = len(train) if isinstance(train, TensorDataset) else None
    if n_train is not None:
        steps_per_epoch = len(_plan(n_train, batch_size, False, seed, 0, d, drop_last=d.active))
    else:
        try:
            steps_per_epoch = len(train) // d.world if d.active else len(train)
        except TypeError as err:
            raise ValueError("train must be a TensorDataset or an iterable with len()") from err
    if steps_per_epoch < 1:
        raise ValueError(f"no full step: {n_train} training samples with batch_size={batch_size}")
    total_steps = epochs * steps_per_epoch

    config = {"method": method, "family": family, "epochs": epochs, "lr": lr,
              "weight_decay": weight_decay, "min_lr": floor, "momentum": momentum,
              "batch_size": batch_size, "seed": seed, "world_size": d.world,
              "cache_prefix": cache_prefix, "frozen_prefix_stats": frozen_prefix_stats,
              "recompute_frozen": bool(getattr(model, "recompute_frozen", False)),
              "device": str(dev), "image_size": size}
    history = History(config=config)
    start_epoch, step = 0, 0
    ckpt_path = Path(checkpoint) if checkpoint is not None else None
    if ckpt_path is not None and d.main and ckpt_path.parent.exists():
        _remove_stale_tmp(ckpt_path)
    if resume:
        if ckpt_path is None:
            raise ValueError("resume=True needs checkpoint=<path>")
        prev = _previous(ckpt_path)
        state = None
        if ckpt_path.exists():
            try:
                state = load_checkpoint(ckpt_path)
            except CheckpointError as err:
                if not prev.exists():
                    raise
                state = load_checkpoint(prev)  # raises CheckpointError naming .prev if it is bad too
                warnings.warn(f"{err}; resuming from the previous checkpoint {prev} (epoch "
                              f"{state['epoch']}) instead", UserWarning, stacklevel=2)
        elif prev.exists():
            state = load_checkpoint(prev)
        if state is not None:
            keys = ("method", "epochs", "lr", "weight_decay", "batch_size", "seed", "cache_prefix")
            diff = {k: (state["config"].get(k), config[k]) for k in keys
                    if state["config"].get(k) != config[k]}
            if diff:
                raise ValueError(f"checkpoint {ckpt_path} was written with other settings "
                                 f"(saved, now): {diff}; use another checkpoint path or resume=False")
            model.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
            _set_rng_state(state["rng"])
            start_epoch, step = int(state["epoch"]), int(state["step"])
            history.records = [dict(r) for r in state["history"]]

    bar = None
    if progress and d.main:
        from tqdm.auto import tqdm

        bar = tqdm(total=epochs, initial=start_epoch, desc=f"fit {method or ''}".strip(), unit="ep")
    t_start = time.perf_counter()

    def due(epoch_no: int) -> bool:
        return test is not None and (epoch_no % eval_every == 0 or epoch_no == epochs)

    def evaluate() -> dict[str, Any]:
        return _evaluate(model, test, dev, d, num_classes, layers, batch_size, size, mean, std, amp,
                         channels_last)

    try:
        if history.records and due(start_epoch) and history.records[-1].get("test_acc") is None:
            # the checkpoint of epoch start_epoch was written before its evaluation, which did not
            # finish (it raised, or the run was killed): evaluate that model now, as the run would
            # have (same weights, same random state), and report the record as usual
            history.records[-1].update(evaluate())
            if callback is not None:
                callback(history.records[-1])
        for epoch in range(start_epoch, epochs):
            t0 = time.perf_counter()
            ddp_module.train()
            model.train()
            if frozen_prefix_stats and prefix is not None:
                prefix.eval()
            epoch_lr = cosine_lr(step, total_steps, lr, floor)
            loss_sum = torch.zeros((), dtype=torch.float64, device=dev)
            correct = torch.zeros((), dtype=torch.float64, device=dev)
            count = torch.zeros((), dtype=torch.float64, device=dev)
            bad_step = torch.full((), -1, dtype=torch.long, device=dev)
            if cached is not None:
                z_all, y_all = cached
                plan = _plan(len(y_all), batch_size, True, seed, epoch, d, drop_last=d.active)
                loader = ((z_all[i.to(z_all.device)], y_all[i.to(y_all.device)]) for i in plan)
            elif isinstance(train, TensorDataset):
                plan = _plan(len(train), batch_size, True, seed, epoch, d, drop_last=d.active)
                loader = (_tensor_batch(train, i, dev, size, augment, mean, std) for i in plan)
            else:
                sampler = getattr(train, "sampler", None)
                if hasattr(sampler, "set_epoch"):
                    sampler.set_epoch(epoch)
                loader = _sharded(train, d, drop_uneven=True)
            for i, (x, y) in enumerate(loader):
                if i >= steps_per_epoch:
                    break
                if not isinstance(train, TensorDataset) and not torch.as_tensor(y).is_cuda:
                    _check_label_range(torch.as_tensor(y), num_classes, "train")  # host: no sync
                x, y = _to_device(x, y, dev, channels_last)
                for g in optimizer.param_groups:
                    g["lr"] = cosine_lr(step, total_steps, lr, floor)
                with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=amp):
                    logits = ddp_module(x)
                loss = F.cross_entropy(logits.float(), y)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                step += 1
                with torch.no_grad():
                    finite = torch.isfinite(loss)
                    bad_step = torch.where((bad_step < 0) & ~finite, torch.full_like(bad_step, i),
                                           bad_step)
                    loss_sum += loss.detach().double() * len(y)
                    correct += (logits.detach().argmax(1) == y).sum()
                    count += len(y)
                if i % 50 == 49:
                    _check_finite(bad_step, epoch, d)
            _check_finite(bad_step, epoch, d)
            totals = _all_reduce(torch.stack([loss_sum, correct, count]), d)
            record: dict[str, Any] = {
                "epoch": epoch + 1, "lr": epoch_lr,
                "train_loss": float(totals[0] / totals[2]), "train_acc": float(totals[1] / totals[2]),
                "test_loss": None, "test_acc": None, "nc1": None, "layer_nc1": None,
            }
            record["seconds"] = time.perf_counter() - t0
            history.records.append(record)
            if ckpt_path is not None:  # before the evaluation: a failing one loses no epoch
                if d.main:
                    _atomic_save({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                                  "epoch": epoch + 1, "step": step, "rng": _rng_state(),
                                  "history": history.records, "config": config}, ckpt_path)
                _barrier(d)
            if due(epoch + 1):
                record.update(evaluate())
                record["seconds"] = time.perf_counter() - t0
            if bar is not None:
                bar.update(1)
                shown = {"loss": record["train_loss"]}
                if record["test_acc"] is not None:
                    shown.update(acc=record["test_acc"], nc1=record["nc1"])
                bar.set_postfix({k: f"{v:.3g}" for k, v in shown.items()})
            if callback is not None:
                callback(record)
    except _OOM as err:
        if on_cuda:
            torch.cuda.empty_cache()
        raise RuntimeError(
            f"CUDA out of memory at batch_size={batch_size} on {dev}: try batch_size="
            f"{max(batch_size // 2 // d.world * d.world, d.world)} (or cache_prefix=True for "
            "layer/scl without augmentation, or a smaller image_size)") from err
    finally:
        if bar is not None:
            bar.close()
    history.config["seconds"] = time.perf_counter() - t_start
    model.eval()
    return history


def _check_finite(bad_step: torch.Tensor, epoch: int, d: _Dist) -> None:
    """Raise if any rank saw a non-finite loss (every rank calls this at the same steps)."""
    if d.active:
        import torch.distributed as dist

        flag = torch.where(bad_step >= 0, bad_step, torch.full_like(bad_step, 2**40)).clone()
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        bad = int(flag) if int(flag) < 2**40 else -1
    else:
        bad = int(bad_step)
    if bad >= 0:
        rank = " (first seen across the ranks)" if d.active else ""
        raise NonFiniteLossError(
            f"the training loss became NaN/inf at epoch {epoch + 1}, step {bad + 1} of the epoch"
            f"{rank}: lower lr, check the inputs for NaN, or resume from the last checkpoint")


# --------------------------------------------------------------------------- ablations (Fig. 9)
def layer_lp(backbone: nn.Module, block: int, num_classes: int):
    """Layer LP (the paper's Fig. 9a): drop every layer after Block k, pool Block k's output and
    train Block k and a new linear head on it. Returns a :class:`nclab.finetune.FineTuned` with
    ``method = "layer_lp"`` (a deep copy; ``backbone`` is untouched)."""
    import copy

    from .finetune import FineTuned

    cut = Truncated(copy.deepcopy(backbone), block)
    for p in cut.parameters():
        p.requires_grad_(False)
    for p in cut._unit.parameters():
        p.requires_grad_(True)
    head = nn.Linear(cut.num_features, num_classes)
    return FineTuned(cut, head, "layer_lp", block=block, block_name=cut.block_name,
                     num_classes=num_classes).train()


def tune_blocks(backbone: nn.Module, blocks_to_tune: Sequence[int], num_classes: int):
    """Fine-tune several blocks at once (Fig. 9b): a new linear head plus Blocks ``blocks_to_tune``
    (1-based), everything else frozen; ``[]`` is linear probing. ``method`` is ``"layer"`` (Table 4
    gives no separate rate), and ``tuned_blocks`` lists the blocks."""
    from .finetune import prepare
    from .models import blocks

    model = prepare(backbone, "linear", num_classes=num_classes)
    units = blocks(model.backbone)
    for k in blocks_to_tune:
        if not 1 <= k <= len(units):
            raise ValueError(f"block {k} out of range: this backbone has blocks 1..{len(units)}")
        for p in units[k - 1][1].parameters():
            p.requires_grad_(True)
    if blocks_to_tune:
        model.method = "layer"
    model.tuned_blocks = tuple(blocks_to_tune)
    return model


def run_method(
    backbone: nn.Module,
    method: str,
    train: TensorDataset | Iterable,
    test: TensorDataset | Iterable,
    epochs: int,
    *,
    num_classes: int,
    block: int | Sequence[int] | None = None,
    seed: int = 0,
    prepare_kwargs: dict[str, Any] | None = None,
    **fit_kwargs: Any,
) -> dict[str, Any]:
    """One fine-tuning experiment: seed, prepare a copy of ``backbone`` for ``method`` (any of
    ``nclab.finetune.METHODS``, ``"layer_lp"`` for :func:`layer_lp`, or ``"blocks"`` with a list
    ``block=[...]`` for :func:`tune_blocks`), :func:`fit` it, and return one row: ``method``,
    ``block``, ``seed``, ``test_acc``, ``nc1`` (penultimate), ``train_acc``, ``params_percent``
    (:func:`nclab.finetune.trainable_percent`), ``layer_nc1``, ``seconds``, the ``history`` and
    the trained ``model``."""
    from .finetune import prepare, trainable_percent

    seed_everything(seed)
    if method == "layer_lp":
        model = layer_lp(backbone, block, num_classes)
    elif method == "blocks":
        model = tune_blocks(backbone, list(block or []), num_classes)
    else:
        model = prepare(backbone, method, block=block, num_classes=num_classes,
                        **(prepare_kwargs or {}))
    hist = fit(model, train, test, epochs, seed=seed, **fit_kwargs)
    final = hist.final
    return {"method": method, "block": block, "seed": seed, "test_acc": final["test_acc"],
            "nc1": final["nc1"], "train_acc": hist.records[-1]["train_acc"],
            "params_percent": trainable_percent(model), "layer_nc1": final.get("layer_nc1"),
            "seconds": hist.config["seconds"], "history": hist, "model": model}
