"""One forward pass, many layer taps: pooled features of any ``nn.Module``, streamed into NC statistics.

:func:`extract` hooks the modules named in ``layers`` (qualified names, as ``model.named_modules()``
gives them, e.g. ``layer3.0`` or ``blocks.7``), runs the data through the model once, pools each
tap's output to one vector per image as the paper does, and either accumulates per-class statistics
(:class:`nclab.metrics.ClassStats`, nothing stored) or returns the feature matrices.

Pooling rules (:func:`pool_tap`):

* a tuple/list output → its first element (e.g. modules returning ``(x, attn)``);
* 4-D CNN maps ``(B, C, H, W)`` → adaptive average pool per channel → ``(B, C)``
  (any ``ndim >= 4``: mean over every dimension after the channel one);
* 3-D token tensors ``(B, T, D)`` → ``"avg"``: mean over the ``T`` tokens; ``"cls"``: token 0
  (timm and open_clip ViTs put the class token first);
* 2-D ``(B, D)`` → unchanged.

Sequence-first transformers (older open_clip, ``nn.Transformer*`` with ``batch_first=False``) emit
``(T, B, D)``. For each tap the nearest ``batch_first`` attribute on the module or one of its
ancestors decides; without one, a 3-D output whose first dimension is not the batch size but whose
second is, is read as ``(T, B, D)``.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import nn

__all__ = ["extract", "pool_tap", "OUTPUT"]

OUTPUT = "output"
"""The special layer name for the model's own output (penultimate features of a backbone)."""

_POOLS = ("avg", "cls")


def pool_tap(
    out: Any, pool: str = "avg", batch_size: int | None = None, seq_first: bool | None = None
) -> torch.Tensor:
    """Pool one tap's output to ``(B, d)`` float32 (rules in the module docstring).

    ``batch_size`` resolves the ``(T, B, D)`` vs ``(B, T, D)`` layout when ``seq_first`` is None.
    """
    if pool not in _POOLS:
        raise ValueError(f"pool must be one of {_POOLS}, got {pool!r}")
    while isinstance(out, (tuple, list)):
        if not out:
            raise ValueError("a tapped module returned an empty tuple; tap another module")
        out = out[0]
    if not isinstance(out, torch.Tensor):
        raise ValueError(f"a tapped module returned {type(out).__name__}, not a tensor; tap a "
                         "module whose output is a tensor (or a tuple starting with one)")
    if out.ndim == 2:
        return out.float()
    if out.ndim == 3:
        if seq_first is None:
            seq_first = (batch_size is not None and out.shape[0] != batch_size
                         and out.shape[1] == batch_size)
        if seq_first:
            out = out.transpose(0, 1)
        if pool == "cls":
            return out[:, 0].float()
        return out.mean(dim=1, dtype=torch.float32)
    if out.ndim >= 4:
        if pool == "cls":
            raise ValueError(f"pool='cls' needs token outputs (B, T, D); this tap gave a "
                             f"{out.ndim}-D map {tuple(out.shape)}: use pool='avg' for CNN layers")
        return out.mean(dim=tuple(range(2, out.ndim)), dtype=torch.float32)
    raise ValueError(f"cannot pool a {out.ndim}-D output of shape {tuple(out.shape)}; "
                     "tap a module whose output has a batch dimension")


def _resolve_layers(model: nn.Module, layers: str | Sequence[str]) -> list[str]:
    names = [layers] if isinstance(layers, str) else list(layers)
    if not names:
        raise ValueError("layers is empty; give module names (see model.named_modules()) or "
                         f"{OUTPUT!r}")
    if len(set(names)) != len(names):
        raise ValueError(f"layers has duplicates: {names}")
    valid = {n for n, _ in model.named_modules() if n}
    for name in names:
        if name != OUTPUT and name not in valid:
            close = difflib.get_close_matches(name, sorted(valid), n=5, cutoff=0.5)
            hint = f"; did you mean {close}?" if close else ""
            listing = sorted(valid)
            shown = ", ".join(listing[:40]) + (" ..." if len(listing) > 40 else "")
            raise ValueError(f"model {type(model).__name__} has no module {name!r}{hint} "
                             f"Valid names ({len(listing)}, or {OUTPUT!r} for the model output): "
                             f"{shown}")
    return names


def _seq_first_flag(model: nn.Module, name: str) -> bool | None:
    """``not batch_first`` from the nearest module on the path ``name`` → root that defines it."""
    modules = dict(model.named_modules())
    parts = name.split(".")
    for i in range(len(parts), -1, -1):
        mod = modules.get(".".join(parts[:i]), None) if i else model
        flag = getattr(mod, "batch_first", None)
        if isinstance(flag, bool):
            return not flag
    return None


def _infer_num_classes(data: Iterable) -> int | None:
    """K = max label + 1 from labels a loader exposes (nclab ``batches`` or a DataLoader over a
    dataset with ``.y``/``.targets``), without running the loader; None when none are exposed."""
    for ds in (getattr(data, "data", None), getattr(data, "dataset", None), data):
        if ds is None:
            continue
        for attr in ("y", "targets", "labels"):
            labels = getattr(ds, attr, None)
            if labels is not None and not callable(labels):
                try:
                    t = torch.as_tensor(labels)
                except (TypeError, ValueError, RuntimeError):
                    continue
                if t.ndim == 1 and t.numel() and not t.is_floating_point():
                    return int(t.max()) + 1
    return None


def _labels_pass(data: Iterable) -> int:
    """K = max label + 1 from one pass over the labels (the model is not run)."""
    k = 0
    for batch in data:
        y = torch.as_tensor(batch[1])
        if y.numel():
            k = max(k, int(y.max()) + 1)
    return k


def extract(
    model: nn.Module,
    data: Iterable,
    layers: str | Sequence[str],
    pool: str = "avg",
    num_classes: int | None = None,
    return_features: bool = False,
    device: torch.device | str | None = None,
    amp: bool = True,
    progress: bool = True,
) -> dict[str, Any] | tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Pooled features of the modules named in ``layers`` over ``data``, in one forward pass per batch.

    - ``model``: any ``nn.Module``; it runs in eval mode (its train/eval state is restored afterwards).
    - ``data``: any iterable of ``(x, y)`` batches (a ``DataLoader``, :class:`nclab.data.batches`, a list).
    - ``layers``: qualified module names (``dict(model.named_modules())`` keys) and/or ``"output"`` for
      the model's own output. An unknown name raises ``ValueError`` listing close and valid names.
    - ``pool``: ``"avg"`` (channel average for CNN maps, token average for ViTs) or ``"cls"`` (class
      token of token outputs); see :func:`pool_tap`.
    - ``num_classes``: K for the statistics. When None it is inferred from the labels: read from the
      loader's dataset (``.y``/``.targets``) if it exposes them, else by one labels-only pass over
      ``data`` when ``data`` is re-iterable (a one-shot iterator raises ``ValueError``: pass K).
    - ``return_features``: return ``({layer: H (N, d) float32}, y (N,))`` on ``device`` instead of stats.
    - ``device``: where the model and batches run; default the model's parameter device (the model is
      moved when ``device`` is given).
    - ``amp``: bf16 autocast on CUDA (ignored on other devices); statistics accumulate in float64.
    - ``progress``: show a tqdm progress bar.

    Returns ``{layer: ClassStats}`` (nothing stored per sample) or the features as above.
    Every hook is removed when the call ends, also on error.
    """
    if pool not in _POOLS:
        raise ValueError(f"pool must be one of {_POOLS}, got {pool!r}")
    names = _resolve_layers(model, layers)
    if device is not None:
        dev = torch.device(device)
        model.to(dev)
    else:
        param = next(iter(model.parameters()), None)
        dev = param.device if param is not None else torch.device("cpu")

    if not return_features:
        if num_classes is None:
            num_classes = _infer_num_classes(data)
        if num_classes is None:
            if iter(data) is data:
                raise ValueError("cannot infer num_classes from a one-shot iterator without "
                                 "consuming it; pass num_classes=K (or a re-iterable loader)")
            num_classes = _labels_pass(data)
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes} (empty data?)")
        from .accumulators import ClassStatsGroup

        group = ClassStatsGroup(num_classes, device=dev, check="auto", names=names)
    feats: dict[str, list[torch.Tensor]] = {n: [] for n in names}
    labels: list[torch.Tensor] = []

    modules = dict(model.named_modules())
    current: dict[str, torch.Tensor] = {}
    batch_size = [0]

    def make_hook(name: str, seq_first: bool | None):
        def hook(_module: nn.Module, _inputs: Any, output: Any) -> None:
            if name in current:
                raise ValueError(f"module {name!r} ran more than once in one forward pass (a "
                                 "shared module such as a reused ReLU); tap a module that runs "
                                 "once, e.g. the block that contains it")
            current[name] = pool_tap(output, pool, batch_size[0], seq_first)
        return hook

    handles = []
    was_training = model.training
    use_amp = amp and dev.type == "cuda"
    try:
        for name in names:
            if name != OUTPUT:
                handles.append(modules[name].register_forward_hook(
                    make_hook(name, _seq_first_flag(model, name))))
        model.eval()
        iterator = data
        if progress:
            from tqdm.auto import tqdm

            iterator = tqdm(data, desc="extract", total=_len_or_none(data), leave=False)
        for batch in iterator:
            x, y = batch[0], batch[1]
            x = x.to(dev, non_blocking=True)
            y = torch.as_tensor(y).to(dev, non_blocking=True).long()
            batch_size[0] = x.shape[0]
            current.clear()
            with torch.inference_mode(), torch.autocast(dev.type, dtype=torch.bfloat16,
                                                        enabled=use_amp):
                out = model(x)
                if OUTPUT in names:
                    current[OUTPUT] = pool_tap(out, pool, x.shape[0], None)
            missing = [n for n in names if n not in current]
            if missing:
                raise ValueError(f"modules {missing} did not run in the forward pass; tap "
                                 "modules that forward() uses")
            for n in names:
                h = current[n]
                if h.shape[0] != x.shape[0]:
                    raise ValueError(f"tap {n!r} pooled to {tuple(h.shape)}, but the batch has "
                                     f"{x.shape[0]} images; is its output sequence-first?")
                if return_features:
                    feats[n].append(h)
            if return_features:
                labels.append(y)
            else:  # every tap in one fused update (a fixed number of kernels, whatever the taps);
                # outside inference mode, so the statistics stay ordinary tensors (merge/sync)
                group.update({n: current[n] for n in names}, y)
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    if return_features:
        if not labels:
            raise ValueError("data yielded no batches")
        # torch.cat outside inference mode gives ordinary tensors, usable with autograd later
        return {n: torch.cat(v) for n, v in feats.items()}, torch.cat(labels)
    return group.stats()


def _len_or_none(data: Iterable) -> int | None:
    try:
        return len(data)  # type: ignore[arg-type]
    except TypeError:
        return None
