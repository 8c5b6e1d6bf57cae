"""Activation recomputation for frozen modules that gradients must still pass through.

In Layer FT (and SCL FT, Layer LoRA) only Block k trains, but the loss gradient reaches it through
every block after it. Autograd keeps those frozen blocks' activations (GELU inputs, normalisation
statistics, attention outputs) for the backward pass, so a ViT-B/32 tuned at Layer 8 stores the
activations of 5 of its 12 layers. :func:`recompute_activations` runs each listed module under
non-reentrant activation checkpointing (:func:`torch.utils.checkpoint.checkpoint`): the forward
keeps only the module's input, and the backward recomputes the module's activations, one module at
a time, just before it needs them. The gradient is unchanged; the cost is one extra forward of those
modules per step.

Details that keep the recomputation exact:

- random ops (dropout, drop-path) replay the same random numbers (``preserve_rng_state``);
- autocast state is replayed by ``torch.utils.checkpoint`` itself;
- BatchNorm layers in training mode would update their running mean/variance a second time during
  the recomputation: their buffers are saved before it and restored after it, so the running
  statistics end exactly as without recomputation.

Usage on any model::

    with recompute_activations([model.layer4[0], model.layer4[1]]):
        loss = criterion(model(x), y)
    loss.backward()

:class:`nclab.finetune.FineTuned` does this itself with ``prepare(..., recompute_frozen=True)``.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.utils.checkpoint import checkpoint

__all__ = ["activation_bytes", "recompute_activations"]


class _KeepNormBuffers:
    """Context manager: the running statistics of training-mode BatchNorm layers in ``module``
    are the same on exit as on entry (used around a checkpoint's recomputation)."""

    def __init__(self, module: nn.Module) -> None:
        self.norms = [m for m in module.modules()
                      if isinstance(m, _BatchNorm) and m.training and m.track_running_stats]
        self.saved: list[list[torch.Tensor]] = []

    def __enter__(self) -> _KeepNormBuffers:
        self.saved = [[b.clone() for b in _norm_buffers(m)] for m in self.norms]
        return self

    def __exit__(self, *exc: Any) -> None:
        with torch.no_grad():
            for m, saved in zip(self.norms, self.saved):
                for b, s in zip(_norm_buffers(m), saved):
                    b.copy_(s)


def _norm_buffers(m: _BatchNorm) -> list[torch.Tensor]:
    return [b for b in (m.running_mean, m.running_var, m.num_batches_tracked) if b is not None]


def _contexts(module: nn.Module) -> tuple[contextlib.AbstractContextManager,
                                          contextlib.AbstractContextManager]:
    """(forward context, recomputation context) for ``torch.utils.checkpoint``'s ``context_fn``."""
    return contextlib.nullcontext(), _KeepNormBuffers(module)


def _checkpointed(module: nn.Module, forward: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    if not torch.is_grad_enabled():  # nothing is stored for backward anyway
        return forward(*args, **kwargs)
    return checkpoint(forward, *args, use_reentrant=False, preserve_rng_state=True,
                      context_fn=functools.partial(_contexts, module), **kwargs)


@contextlib.contextmanager
def recompute_activations(modules: Iterable[nn.Module]) -> Iterator[None]:
    """While active, each module in ``modules`` runs under activation checkpointing: its forward
    stores only its inputs, and the backward recomputes its activations module by module.

    ``loss.backward()`` may run after the ``with`` block: the recomputation is bound to the graph.
    Hooks on the modules still fire (also during the recomputation), and parameter names,
    ``state_dict`` keys and outputs are unchanged. Modules with trainable parameters work too, but
    the saving is for frozen modules between a trained one and the loss. A module listed twice is
    an error (it would be checkpointed inside itself)."""
    mods = list(modules)
    if len({id(m) for m in mods}) != len(mods):
        raise ValueError("recompute_activations: a module is listed more than once")
    for m in mods:
        if not isinstance(m, nn.Module):
            raise TypeError(f"recompute_activations takes nn.Module objects, got {type(m).__name__}")
        if "forward" in m.__dict__:
            raise ValueError(f"{type(m).__name__} already has a patched forward (nested "
                             "recompute_activations on the same module?)")
    for m in mods:
        m.forward = functools.partial(_checkpointed, m, m.forward)
    try:
        yield
    finally:
        for m in mods:
            m.__dict__.pop("forward", None)


def activation_bytes(model: nn.Module, x: torch.Tensor, y: torch.Tensor,
                     loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None
                     ) -> int:
    """Bytes autograd keeps for the backward pass during one forward of ``loss_fn(model(x), y)``
    (default cross-entropy): every saved tensor's storage counted once, parameters excluded. The
    activation memory of a training step, device-independent (run it on a CPU with a small batch;
    it scales linearly with the batch). Nothing is back-propagated; the model's mode is kept."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    loss_fn = loss_fn or nn.functional.cross_entropy
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss_fn(model(x), y)
    return sum(seen.values())
