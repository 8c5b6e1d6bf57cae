"""Runtime context: the compute device, seeding, and the active profile.

The profile sets every size a chapter uses (epochs, data, model names), so that the same notebook runs
in seconds on a laptop CPU (``smoke``: bundled digits, nets trained in the chapter), in minutes on a
CPU with real images and really pre-trained networks (``real``: the local mirror of
:mod:`nclab.mirror`, 23 CIFAR-10-trained networks), in minutes on one GPU (``course``) and as
in the paper (``paper``). It is chosen by the environment variable ``NCLAB_PROFILE``.

``NCLAB_REHEARSAL=1`` rehearses ``course`` (or ``paper``) on a CPU in minutes: the same profile,
the same chapter code, with three substitutions only (see :func:`rehearsal`): tiny sizes, stand-in
data (:func:`nclab.data.load`) and random-init weights written into the torch hub / Hugging Face
cache layout (:func:`nclab.models.load_backbone`).
"""

from __future__ import annotations

import os
import random
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

__all__ = ["device", "seed_everything", "cpu_threads", "profile", "Profile", "PROFILES", "cache_dir",
           "data_dir", "rehearsing", "rehearsal", "REHEARSAL_SIZES"]


def device() -> torch.device:
    """The best available device: CUDA, then Apple MPS, then CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda")
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def cpu_threads(n: int = 1) -> None:
    """On a CPU (:func:`device`), use ``n`` intra-op threads; on a GPU do nothing. The chapters'
    small models and tensors run faster on one thread than with several threads synchronising on
    a small, often shared CPU."""
    if device().type == "cpu":
        torch.set_num_threads(n)


def seed_everything(seed: int, deterministic: bool = True) -> None:
    """Seed Python, NumPy and torch (CPU and all GPUs); set cuDNN's deterministic flag."""
    if not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be a non-negative int, got {seed!r}")
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)
    torch.backends.cudnn.deterministic = deterministic
    torch.backends.cudnn.benchmark = not deterministic


@dataclass(frozen=True)
class Profile:
    """Every size a chapter reads. Chapters never hard-code an epoch count: they read it here.

    Fields
    ------
    name: ``smoke`` | ``real`` | ``course`` | ``paper``.
    seeds: seeds for studies that report error bars.
    pretrain_epochs: epochs of source pre-training for models a chapter trains itself.
    finetune_epochs: epochs of downstream fine-tuning (Table 3 uses 200 in ``paper``).
    batch_size: training batch size.
    image_size: input resolution for pretrained ImageNet backbones (224) or small nets (32).
    downstream: downstream datasets (registry names of :mod:`nclab.data`).
    source: the source dataset for the chapters that pre-train.
    models: backbone names for the across-model study.
    shots_per_class: images per class for the data-scarcity study (Fig. 8).
    episodes: few-shot episodes per evaluation.
    max_train_per_class: cap on downstream training images per class (None = all).
    fewshot_dataset: few-shot split family for the few-shot chapter (``nclab.fewshot.load_split``).
    fewshot_scale: width multiplier of the few-shot backbones (1.0 = the paper's widths).
    fewshot_epochs: epochs of few-shot pre-training on the meta-train classes (paper: 90).
    rehearsal: True for a rehearsal of this profile (:func:`rehearsal`): tiny sizes, stand-in
    data, random-init weights; its results are never results.
    """

    name: str
    seeds: tuple[int, ...]
    pretrain_epochs: int
    finetune_epochs: int
    batch_size: int
    image_size: int
    downstream: tuple[str, ...]
    source: str
    models: tuple[str, ...]
    shots_per_class: tuple[int, ...]
    episodes: int
    max_train_per_class: int | None = None
    fewshot_dataset: str = "cifar_fs"
    fewshot_scale: float = 1.0
    fewshot_epochs: int = 90
    rehearsal: bool = False
    extra: dict = field(default_factory=dict, compare=False, hash=False)


PROFILES: dict[str, Profile] = {
    "smoke": Profile(
        name="smoke",
        seeds=(0, 1, 2),
        pretrain_epochs=8,
        finetune_epochs=15,
        batch_size=64,
        image_size=32,
        downstream=("digits",),
        source="digits",
        models=("convnet_s", "resnet_s"),
        shots_per_class=(3, 10, 32, 100),
        episodes=100,
        fewshot_dataset="digits_fs",
        fewshot_scale=0.125,
        fewshot_epochs=5,
    ),
    "real": Profile(
        name="real",
        seeds=(0, 1, 2),
        pretrain_epochs=15,
        finetune_epochs=10,
        batch_size=128,
        image_size=32,
        downstream=("fashion_mnist_2k", "digits"),
        source="cifar10_2k",
        models=("resnet20", "resnet32", "resnet44", "resnet56"),
        shots_per_class=(3, 10, 32, 100),
        episodes=200,
        fewshot_dataset="cifar10_fs",
        fewshot_scale=0.25,
        fewshot_epochs=15,
    ),
    "course": Profile(
        name="course",
        seeds=(0, 1, 2),
        pretrain_epochs=30,
        finetune_epochs=10,
        batch_size=256,
        image_size=224,
        downstream=("cifar10", "dtd", "oxford_pets", "fgvc_aircraft"),
        source="cifar100",
        models=("resnet18", "resnet34", "resnet50", "densenet121", "densenet169", "densenet201",
                "mobilenet_v2", "googlenet", "vit_b32"),
        shots_per_class=(3, 10, 32, 100, 316),
        episodes=600,
        max_train_per_class=1000,
        fewshot_dataset="cifar_fs",
        fewshot_scale=1.0,
        fewshot_epochs=20,
    ),
    "paper": Profile(
        name="paper",
        seeds=(0, 1, 2),
        pretrain_epochs=200,
        finetune_epochs=200,
        batch_size=256,
        image_size=224,
        downstream=("cifar10", "cifar100", "fgvc_aircraft", "dtd", "oxford_pets"),
        source="cifar100",
        models=("resnet18", "resnet34", "resnet50", "densenet121", "densenet169", "densenet201",
                "mobilenet_v2", "googlenet", "vit_b32"),
        shots_per_class=(3, 10, 32, 100, 316),
        episodes=600,
        fewshot_dataset="cifar_fs",
        fewshot_scale=1.0,
        fewshot_epochs=90,
    ),
}


#: What a rehearsal (:func:`rehearsal`) shrinks; every other field stays the profile's own.
#: ``downstream`` keeps the profile's first two datasets (course: CIFAR-10 and DTD, one of each
#: kind of stand-in), so that the nine ImageNet backbones at 224 px fit CPU minutes.
REHEARSAL_SIZES: dict = dict(seeds=(0,), pretrain_epochs=1, finetune_epochs=1, batch_size=16,
                             shots_per_class=(1, 2), episodes=8, max_train_per_class=2,
                             fewshot_epochs=1)
_REHEARSAL_DATASETS = 2
#: Models a rehearsal leaves out: the two deeper DenseNets (3.4 and 4.3 GFLOPs per 224-px image),
#: whose code DenseNet-121 already runs.
_REHEARSAL_SKIPS = ("densenet169", "densenet201")
_REHEARSABLE = ("course", "paper")
_announced: set[str] = set()


def rehearsing() -> bool:
    """True when ``$NCLAB_REHEARSAL`` is set to 1/true/yes: :func:`profile` then returns the
    rehearsal of the active profile, :func:`nclab.data.load` serves stand-in data and
    :func:`nclab.models.load_backbone` random-init weights."""
    return os.environ.get("NCLAB_REHEARSAL", "").strip().lower() in ("1", "true", "yes")


def rehearsal(p: Profile) -> Profile:
    """The rehearsal of ``course`` or ``paper``: the same profile (name, image size, source,
    few-shot split) with the sizes of :data:`REHEARSAL_SIZES`, its first two downstream datasets
    and its models but DenseNet-169/201 (one of every family and every model a study names). Run it with
    ``NCLAB_REHEARSAL=1`` (``make rehearse``): the chapters then also get (2) stand-in data where
    the real download is impossible and (3) random-init ImageNet/CLIP weights, loaded from files
    written into the torch hub / Hugging Face cache layout. Another profile raises ``ValueError``."""
    if p.name not in _REHEARSABLE:
        raise ValueError(f"a rehearsal runs the {' or '.join(_REHEARSABLE)} profile's code at tiny "
                         f"sizes; {p.name!r} needs none (set NCLAB_PROFILE=course)")
    models = tuple(m for m in p.models if m not in _REHEARSAL_SKIPS)
    return replace(p, rehearsal=True, downstream=p.downstream[:_REHEARSAL_DATASETS], models=models,
                   **REHEARSAL_SIZES)


def _announce(p: Profile) -> None:
    """Print once per process what a rehearsal substitutes (the chapter's first profile call)."""
    if p.name in _announced:
        return
    _announced.add(p.name)
    sizes = ", ".join(f"{k}={v}" for k, v in {**REHEARSAL_SIZES, "downstream": p.downstream}.items())
    print(f"REHEARSAL of the {p.name!r} profile: its code with three substitutions, no results.\n"
          f"  1. tiny sizes: {sizes}\n"
          "  2. stand-in data: the mirror's real CIFAR-10 images for CIFAR-10/100-shaped sets; "
          "synthetic images\n     with the real class counts and image sizes for the others "
          "(not real data)\n"
          "  3. random-init weights for the ImageNet/CLIP backbones, written into the torch hub / "
          "Hugging Face\n     cache layout and loaded through the usual code")


def profile(name: str | Profile | None = None) -> Profile:
    """The active profile: ``name`` if given (a :class:`Profile` is returned as it is), else
    ``$NCLAB_PROFILE``, else ``course`` with CUDA and ``smoke`` without; with ``$NCLAB_REHEARSAL``
    set, a name is returned as its :func:`rehearsal`. An unknown name raises ``ValueError``
    listing the valid ones."""
    if isinstance(name, Profile):
        return name
    if name is None:
        name = os.environ.get("NCLAB_PROFILE", "").strip().lower() or None
    if name is None:
        name = "course" if torch.cuda.is_available() else "smoke"
    if name not in PROFILES:
        raise ValueError(
            f"unknown profile {name!r} (from NCLAB_PROFILE); valid profiles: {', '.join(PROFILES)}"
        )
    if rehearsing() and name in _REHEARSABLE:
        p = rehearsal(PROFILES[name])
        _announce(p)
        return p
    return PROFILES[name]


def cache_dir() -> Path:
    """Where trained models are cached: ``$NCLAB_CACHE`` (default ``~/.cache/nclab/models``)."""
    path = Path(os.environ.get("NCLAB_CACHE", Path.home() / ".cache" / "nclab" / "models"))
    path.mkdir(parents=True, exist_ok=True)
    return path


def data_dir(root: str | os.PathLike | None = None) -> Path:
    """Dataset root: ``root`` if given, else ``$NCLAB_DATA`` (default ``~/.cache/nclab/data``)."""
    if root is None:
        root = os.environ.get("NCLAB_DATA", Path.home() / ".cache" / "nclab" / "data")
    return Path(root).expanduser()
