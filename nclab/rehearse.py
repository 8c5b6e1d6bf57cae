"""The rehearsal's weights: random-init files where torchvision, timm and open_clip cache real ones.

A rehearsal (``NCLAB_REHEARSAL=1``, :func:`nclab.runtime.rehearsal`) runs the ``course`` chapters
on a CPU with random-init ImageNet / CLIP backbones. So that the weight-loading code is the one a
class runs, :func:`write_weights` writes, for every weights file of the profile's
:func:`nclab.fetch.plan`, a state dict of the same architecture, freshly initialised, at the very
path the real file would have: ``<torch hub>/checkpoints/<name>-<hash>.pth`` for torchvision and
``<HF cache>/models--<org>--<repo>/snapshots/<rev>/<file>`` (with ``refs/main``) for timm and
open_clip. :func:`nclab.models.load_backbone` and ``timm.create_model(..., pretrained=True)`` then
load them as they would load the real ones.

Random weights must never sit where real ones are expected: both caches must be scratch folders
named by ``TORCH_HOME`` and ``HF_HOME`` (or ``HF_HUB_CACHE``), as ``make rehearse`` sets them, and
each gets a marker file; a cache without the marker that already holds files is refused.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from pathlib import Path

import torch

from .fetch import FetchItem, plan
from .models import BACKBONES
from .runtime import Profile
from .runtime import profile as active_profile

__all__ = ["MARKER", "write_weights"]

#: The file that marks a cache folder as holding the rehearsal's random weights.
MARKER = "NCLAB_REHEARSAL_RANDOM_WEIGHTS.txt"
_REVISION = hashlib.sha1(b"nclab rehearsal: random-init weights").hexdigest()


def _scratch(folder: Path, env: str) -> Path:
    """``folder`` after checking that it is a scratch cache for random weights (marked here)."""
    marker = folder / MARKER
    if not marker.is_file():
        if folder.is_dir() and any(folder.iterdir()):
            raise RuntimeError(
                f"{folder} already holds files and is not a rehearsal cache (no {MARKER}); the "
                f"rehearsal writes random-init weights, so point {env} at an empty scratch folder "
                "(make rehearse uses .rehearsal/ in the repository)")
        folder.mkdir(parents=True, exist_ok=True)
        marker.write_text("Random-init weights written by nclab's rehearsal (nclab.rehearse); "
                          "not pre-trained weights. Delete this folder after rehearsing.\n")
    return folder


def _state_dict(name: str) -> dict[str, torch.Tensor]:
    """A freshly initialised full state dict (classifier included, as the published file) of the
    architecture whose weights file ``name`` is."""
    spec = BACKBONES.get(name)
    if spec is not None and spec.source == "torchvision":
        import torchvision.models as tvm

        extra = {"aux_logits": True, "init_weights": True} if spec.arch == "googlenet" else {}
        return getattr(tvm, spec.arch)(weights=None, **extra).state_dict()
    if spec is not None and spec.source == "open_clip":
        import open_clip

        return open_clip.create_model(spec.arch, pretrained=None).state_dict()
    import timm

    return timm.create_model(spec.arch if spec is not None else name, pretrained=False).state_dict()


def _target(it: FetchItem) -> Path:
    """The file a plan item's weights are read from: the torch hub file, or the file of the
    rehearsal's snapshot in the Hugging Face repository folder."""
    return it.dest if it.kind == "torchvision" else it.dest / "snapshots" / _REVISION / str(it.hf_file)


def _write_hf(it: FetchItem, sd: dict[str, torch.Tensor]) -> Path:
    from safetensors.torch import save_file

    path = _target(it)
    path.parent.mkdir(parents=True, exist_ok=True)
    (it.dest / "refs").mkdir(exist_ok=True)
    (it.dest / "refs" / "main").write_text(_REVISION)
    tensors = {k: v.detach().contiguous().clone() for k, v in sd.items()}
    if path.suffix == ".safetensors":
        save_file(tensors, str(path))
    else:
        torch.save(tensors, path)
    return path


def write_weights(profile: str | Profile | None = None, names: Sequence[str] | None = None,
                  seed: int = 0, progress: bool = True) -> list[Path]:
    """Write random-init weights (drawn with ``seed``) for every torchvision / Hugging Face weights
    file of the rehearsal ``profile``'s :func:`nclab.fetch.plan` (or only those of ``names``), into
    the scratch caches named by ``TORCH_HOME`` and ``HF_HOME``/``HF_HUB_CACHE``; files already
    there are kept. Returns the paths written. Outside a rehearsal, without those variables, or
    for a name the plan does not hold, raises ``RuntimeError``."""
    prof = active_profile(profile)
    if not prof.rehearsal:
        raise RuntimeError(f"profile {prof.name!r} is not a rehearsal: random weights are written "
                           "only for one (set NCLAB_REHEARSAL=1, or pass runtime.rehearsal(p))")
    hub = os.environ.get("HF_HUB_CACHE") or os.environ.get("HF_HOME")
    if not os.environ.get("TORCH_HOME") or not hub:
        raise RuntimeError("set TORCH_HOME and HF_HOME (or HF_HUB_CACHE) to scratch folders before "
                           "writing random weights, so that no real cache receives them")
    items = [it for it in plan(prof) if it.kind in ("torchvision", "hf")]
    if names is not None:
        unknown = set(names) - {it.name for it in items}
        if unknown:
            raise RuntimeError(f"the {prof.name} plan loads no weights named {sorted(unknown)}; "
                               f"it loads {', '.join(it.name for it in items)}")
        items = [it for it in items if it.name in names]
    from huggingface_hub import constants

    _scratch(Path(torch.hub.get_dir()), "TORCH_HOME")
    _scratch(Path(constants.HF_HUB_CACHE), "HF_HOME")
    torch.manual_seed(seed)
    written = []
    for it in items:
        if _target(it).is_file():
            continue
        if progress:
            print(f"rehearsal: random-init weights for {it.name} -> {it.dest}", flush=True)
        sd = _state_dict(it.name)
        if it.kind == "torchvision":
            it.dest.parent.mkdir(parents=True, exist_ok=True)
            torch.save(sd, it.dest)
            written.append(it.dest)
        else:
            written.append(_write_hf(it, sd))
    return written
