"""Few-shot learning with a frozen embedding: backbones, splits, pre-training and episodic evaluation.

The protocol is the one of Tian et al. (2020) that the paper follows for its Table 2: pre-train a
backbone by ordinary supervised learning on the merged meta-train classes, freeze it, embed the whole
meta-test split once (L2-normalised), then for each episode fit a multinomial logistic regression on
the support embeddings and score it on the query embeddings. Beside accuracy we measure the collapse
of each episode's query embeddings, ``NC1 = (1/K) tr(Sigma_W Sigma_B^+)`` with ``K = ways``.

Backbones
    :class:`ConvNet4` (4 conv blocks, 64 filters), :class:`ResNet12` (widths 64-160-320-640) and
    :class:`SEResNet12` (ResNet12 with squeeze-and-excitation); each maps images ``(B, 3, H, W)``
    (32x32 CIFAR-FS or 84x84 miniImageNet) to embeddings ``(B, d)`` with ``d = model.num_features``.
Splits
    CIFAR-FS (64/16/20 CIFAR-100 classes, all 600 images of a class), miniImageNet (64/16/20 wnids,
    from a local folder), ``cifar10_fs`` (real CIFAR-10 images of the local mirror, meta-train on
    airplane, automobile, bird, cat, deer, meta-test on dog, frog, horse, ship, truck: two vehicle
    and three animal classes on each side; for CPU runs) and a tiny offline split of scikit-learn's
    digits (meta-train 0-4, meta-test 5-9). ``fashion_mnist_fs`` is a cross-domain meta-test
    only (all 10 Fashion-MNIST classes of the mirror) for encoders pre-trained on all of CIFAR-10.
    The CIFAR-FS and miniImageNet class lists ship in ``nclab/resources``.
Evaluation
    :func:`sample_episode`, :func:`evaluate` (images) and :func:`evaluate_embeddings` (features), which
    return a :class:`FewShotReport` (one :class:`FewShotResult` per shot setting).
"""

from __future__ import annotations

import json
import math
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import numpy as np
import torch
from threadpoolctl import threadpool_limits
from torch import nn

from .data import DatasetUnavailableError, TensorDataset, batches, digits
from .runtime import data_dir, rehearsing
from .runtime import device as default_device

__all__ = [
    "ConvNet4",
    "ResNet12",
    "SEResNet12",
    "BACKBONES",
    "make_backbone",
    "SPLITS",
    "FEWSHOT_DATASETS",
    "split_classes",
    "cifar_fs",
    "CIFAR10_FS_CLASSES",
    "cifar10_fs",
    "fashion_mnist_fs",
    "mini_imagenet",
    "digits_fs",
    "load_split",
    "pretrain_fewshot",
    "Episode",
    "sample_episode",
    "confidence_interval",
    "embed",
    "FewShotResult",
    "FewShotReport",
    "evaluate_embeddings",
    "evaluate",
    "summary_table",
    "FewShotStudy",
    "study",
]


# =========================================================================== backbones
class ConvNet4(nn.Module):
    """The classic 4-block ConvNet: ``depth`` x [conv3x3(width) - BN - ReLU - max-pool 2x2], then a
    global average pool, so ``d = width`` for any input size (32x32 gives 2x2 maps, 84x84 5x5).

    The convolutions have no bias (a BatchNorm follows each). Parameters at the default width 64:
    ``3*64*9 + 3*(64*64*9)`` conv weights + ``4*2*64`` BN affine = 112 832.
    """

    def __init__(self, width: int = 64, depth: int = 4, in_channels: int = 3) -> None:
        super().__init__()
        if width < 1 or depth < 1:
            raise ValueError(f"width and depth must be >= 1, got width={width}, depth={depth}")
        layers, c_in = [], in_channels
        for _ in range(depth):
            layers.append(nn.Sequential(
                nn.Conv2d(c_in, width, 3, padding=1, bias=False), nn.BatchNorm2d(width),
                nn.ReLU(inplace=True), nn.MaxPool2d(2)))
            c_in = width
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.num_features = width

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(self.features(x)).flatten(1)


class _SqueezeExcite(nn.Module):
    """Channel gating ``x * sigmoid(W2 relu(W1 avgpool(x)))`` with a bottleneck of ``c // reduction``."""

    def __init__(self, channels: int, reduction: int = 4) -> None:
        super().__init__()
        hidden = max(1, channels // reduction)
        self.fc = nn.Sequential(nn.Linear(channels, hidden), nn.ReLU(inplace=True),
                                nn.Linear(hidden, channels), nn.Sigmoid())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate = self.fc(x.mean(dim=(2, 3)))
        return x * gate[:, :, None, None]


class _Block12(nn.Module):
    """One ResNet12 block: three conv3x3-BN (LeakyReLU 0.1 between), optional SE on the third, a
    1x1 conv-BN shortcut, LeakyReLU after the sum, then an optional 2x2 max-pool."""

    def __init__(self, c_in: int, c_out: int, pool: bool, se_reduction: int | None) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.conv3 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(c_out)
        self.act = nn.LeakyReLU(0.1)
        self.se = _SqueezeExcite(c_out, se_reduction) if se_reduction else None
        self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, bias=False), nn.BatchNorm2d(c_out))
        self.pool = nn.MaxPool2d(2) if pool else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.act(self.bn1(self.conv1(x)))
        out = self.act(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        if self.se is not None:
            out = self.se(out)
        return self.pool(self.act(out + self.shortcut(x)))


class ResNet12(nn.Module):
    """ResNet12: four residual blocks of three 3x3 convolutions with widths ``widths`` (default
    64-160-320-640), a 2x2 max-pool after each block, and a global average pool (``d = widths[-1]``).

    Max-pooling: the paper's App. E.2 text (inherited from Tian et al.'s paper) says "after each of
    the first three blocks", but the released code of Tian et al. (whose protocol and numbers the
    paper follows) pools after all four. We follow the code by default (``pool_last=True``): it is
    what produced the reference numbers, and it keeps the last block 4x cheaper (84 px: 5x5 instead
    of 10x10 maps). ``pool_last=False`` gives the text's variant. Pooling has no parameters, so both
    have the same count: 12 424 320 at the default widths = 12 414 848 conv weights (no conv
    biases; 3x3 convs and 1x1 shortcuts) + 9 472 BatchNorm affine parameters. DropBlock, used by
    Tian et al.'s code as a regulariser, is parameter-free and not implemented here.
    """

    def __init__(
        self,
        widths: Sequence[int] = (64, 160, 320, 640),
        in_channels: int = 3,
        pool_last: bool = True,
        se_reduction: int | None = None,
    ) -> None:
        super().__init__()
        widths = tuple(int(w) for w in widths)
        if len(widths) != 4 or min(widths) < 1:
            raise ValueError(f"widths must be 4 positive ints, got {widths}")
        c_in = in_channels
        for i, w in enumerate(widths):
            pool = i < 3 or pool_last
            setattr(self, f"layer{i + 1}", _Block12(c_in, w, pool, se_reduction))
            c_in = w
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.widths = widths
        self.num_features = widths[-1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i in range(4):
            x = getattr(self, f"layer{i + 1}")(x)
        return self.pool(x).flatten(1)


class SEResNet12(ResNet12):
    """ResNet12 with a squeeze-and-excitation gate (bottleneck ``c // se_reduction``, default 4 as in
    Tian et al.'s code) on the third convolution of every block, before the residual sum. Adds
    ``sum_c (c*c/2 + 5c/4)`` = 272 328 parameters at the default widths (12 696 648 in all)."""

    def __init__(
        self,
        widths: Sequence[int] = (64, 160, 320, 640),
        in_channels: int = 3,
        pool_last: bool = True,
        se_reduction: int = 4,
    ) -> None:
        if se_reduction < 1:
            raise ValueError(f"se_reduction must be >= 1, got {se_reduction}")
        super().__init__(widths, in_channels, pool_last, se_reduction)


BACKBONES: dict[str, type[nn.Module]] = {
    "convnet4": ConvNet4, "resnet12": ResNet12, "seresnet12": SEResNet12,
}


def make_backbone(name: str, scale: float = 1.0, **kwargs) -> nn.Module:
    """A few-shot backbone by name (``convnet4``, ``resnet12``, ``seresnet12``) with every width
    multiplied by ``scale`` (rounded, at least 4), e.g. ``scale=0.125`` for CPU runs; other keyword
    arguments go to the constructor."""
    key = name.lower()
    if key not in BACKBONES:
        raise ValueError(f"unknown few-shot backbone {name!r}; choose one of {', '.join(BACKBONES)}")
    if scale <= 0:
        raise ValueError(f"scale must be > 0, got {scale}")
    if key == "convnet4":
        kwargs.setdefault("width", max(4, round(64 * scale)))
    else:
        kwargs.setdefault("widths", tuple(max(4, round(w * scale)) for w in (64, 160, 320, 640)))
    return BACKBONES[key](**kwargs)


# =========================================================================== splits
SPLITS = ("train", "val", "test")
#: The few-shot datasets :func:`load_split` knows.
FEWSHOT_DATASETS = ("cifar_fs", "miniimagenet", "cifar10_fs", "fashion_mnist_fs", "digits_fs")
#: The fixed class split of ``cifar10_fs``: CIFAR-10 labels 0-4 for meta-train, 5-9 for meta-test,
#: which puts two vehicle and three animal classes on each side (airplane, automobile | ship, truck).
CIFAR10_FS_CLASSES: dict[str, tuple[str, ...]] = {
    "train": ("airplane", "automobile", "bird", "cat", "deer"),
    "test": ("dog", "frog", "horse", "ship", "truck"),
}


def _resource(name: str) -> str:
    return resources.files("nclab").joinpath("resources", name).read_text(encoding="utf-8")


def _check_split(split: str, valid: Sequence[str] = SPLITS) -> None:
    if split not in valid:
        raise ValueError(f"unknown few-shot split {split!r}; valid splits: {', '.join(valid)}")


def split_classes(name: str, split: str) -> list[str]:
    """The class list of a standard split, in its fixed order (label ``k`` = ``classes[k]``).

    ``cifar_fs``: CIFAR-100 fine class names (64 train / 16 val / 20 test, Bertinetto et al. 2019);
    ``miniimagenet``: ImageNet wnids (64 / 16 / 20, Ravi & Larochelle 2017); ``cifar10_fs``:
    CIFAR-10 class names (5 train / 5 test, :data:`CIFAR10_FS_CLASSES`; no ``val``)."""
    _check_split(split)
    if name == "cifar10_fs":
        _check_split(split, tuple(CIFAR10_FS_CLASSES))
        return list(CIFAR10_FS_CLASSES[split])
    if name == "cifar_fs":
        pairs = json.loads(_resource(f"cifar_fs_{split}.json"))
        return [fine for _superclass, fine in pairs]
    if name == "miniimagenet":
        return _resource(f"miniimagenet_{split}_wnids.txt").split()
    raise ValueError(f"no class list for {name!r}; lists exist for cifar_fs, miniimagenet and "
                     "cifar10_fs")


def _select(datasets: Sequence[TensorDataset], names: Sequence[str],
            hint: str = "is it CIFAR-100 (fine labels)?") -> TensorDataset:
    """The images of the classes ``names`` from every dataset, merged, labelled by position in
    ``names``."""
    xs, ys = [], []
    for ds in datasets:
        index = {c: i for i, c in enumerate(ds.classes)}
        missing = [n for n in names if n not in index]
        if missing:
            raise ValueError(f"dataset lacks the classes {missing[:5]}{'...' if len(missing) > 5 else ''}"
                             f" ({len(missing)} of {len(names)}); {hint}")
        lut = torch.full((len(ds.classes),), -1, dtype=torch.long)
        lut[torch.tensor([index[n] for n in names])] = torch.arange(len(names))
        new_y = lut[ds.y.cpu()]
        keep = torch.nonzero(new_y >= 0).flatten()
        xs.append(ds.x.cpu()[keep])
        ys.append(new_y[keep])
    y = torch.cat(ys)
    order = torch.argsort(y, stable=True)
    return TensorDataset(torch.cat(xs)[order], y[order], list(names))


#: Meta-training images per class of CIFAR-FS in a rehearsal (``NCLAB_REHEARSAL=1``); the
#: meta-test classes keep every stand-in image (an episode draws 5 shots + 15 queries per class).
REHEARSAL_META_TRAIN = 4


def cifar_fs(
    split: str,
    root: str | Path | None = None,
    cifar100: Sequence[TensorDataset] | None = None,
) -> TensorDataset:
    """A CIFAR-FS split (Bertinetto et al., 2019) as a :class:`~nclab.data.TensorDataset` of 32x32 images.

    As in the standard protocol, each class keeps all its 600 CIFAR-100 images (the official train
    and test images of that class merged). ``cifar100`` may pass the CIFAR-100 datasets to merge
    (with fine class names); by default ``nclab.data.load("cifar100", "train"/"test", root)``."""
    _check_split(split)
    if cifar100 is None:
        from .data import load

        cifar100 = [load("cifar100", "train", root=root), load("cifar100", "test", root=root)]
    out = _select(list(cifar100), split_classes("cifar_fs", split))
    if rehearsing() and split == "train":  # a rehearsal pre-trains on a few images per class
        from .data import subset_per_class

        out = subset_per_class(out, REHEARSAL_META_TRAIN, seed=0)
    return out


def cifar10_fs(
    split: str,
    cifar10: Sequence[TensorDataset] | None = None,
    download: bool = True,
) -> TensorDataset:
    """A 5/5 few-shot split of the 3000 real CIFAR-10 images of the local mirror, 32x32 uint8.

    The mirror's ``cifar10_2k`` train (2000) and test (1000) images are pooled, as CIFAR-FS pools
    CIFAR-100's parts; ``train`` (meta-train) keeps the classes airplane, automobile, bird, cat,
    deer (1490 images), ``test`` (meta-test) dog, frog, horse, ship, truck (1510 images, 269 to
    319 per class), labelled ``0..4`` in that order (:data:`CIFAR10_FS_CLASSES`). There is no
    ``val``. A 5-way episode on the meta-test split uses all five of its classes. ``cifar10``
    may pass the datasets to pool (CIFAR-10 class names); by default
    ``nclab.data.load("cifar10_2k", "train"/"test")``, which raises
    :class:`nclab.data.DatasetUnavailableError` when the mirror is missing."""
    names = split_classes("cifar10_fs", split)
    if cifar10 is None:
        from .data import load

        cifar10 = [load("cifar10_2k", "train", download=download),
                   load("cifar10_2k", "test", download=download)]
    return _select(list(cifar10), names, hint="is it CIFAR-10 (class names)?")


def fashion_mnist_fs(
    split: str = "test",
    fashion: Sequence[TensorDataset] | None = None,
    image_size: int = 32,
    download: bool = True,
) -> TensorDataset:
    """A cross-domain meta-test split: the 2000 real Fashion-MNIST images of the local mirror (its
    1400 train + 600 test images pooled, 188 to 219 per class), all 10 classes, grey as 3 channels at
    ``image_size`` px. Only ``split="test"`` exists: it is meant for encoders pre-trained on other
    data (e.g. the CIFAR-10 ResNets of :func:`nclab.models.load_backbone`, which saw every CIFAR-10
    class, so no CIFAR-10 class is unseen by them). ``fashion`` may pass the datasets to pool; by
    default ``nclab.data.load("fashion_mnist_2k", "train"/"test", image_size=image_size)``."""
    _check_split(split, ("test",))
    if fashion is None:
        from .data import load

        fashion = [load("fashion_mnist_2k", part, image_size=image_size, download=download)
                   for part in ("train", "test")]
    names = list(fashion[0].classes)
    return _select(list(fashion), names, hint="is it Fashion-MNIST (class names)?")


_IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".JPEG", ".JPG", ".PNG"}


def mini_imagenet(
    split: str,
    root: str | Path | None = None,
    image_size: int = 84,
    progress: bool = True,
) -> TensorDataset:
    """A miniImageNet split (Vinyals et al. 2016; split of Ravi & Larochelle 2017) from a local
    folder, as a :class:`~nclab.data.TensorDataset` of ``image_size`` x ``image_size`` uint8 images.

    Layout: one folder per wnid holding its images, either ``root/<split>/<wnid>/*.jpg`` or
    ``root/<wnid>/*.jpg``; ``root`` defaults to ``$NCLAB_DATA/miniimagenet``. Images are converted
    to RGB and resized (bilinear) to ``image_size`` when they differ. A missing wnid folder raises
    :class:`nclab.data.DatasetUnavailableError` naming the folder and the wnids expected."""
    from PIL import Image
    from tqdm.auto import tqdm

    _check_split(split)
    wnids = split_classes("miniimagenet", split)
    base = Path(root).expanduser() if root is not None else data_dir() / "miniimagenet"
    folder = base / split if (base / split).is_dir() else base
    missing = [w for w in wnids if not (folder / w).is_dir()]
    if missing:
        raise DatasetUnavailableError(
            f"miniImageNet {split} split: {len(missing)} of {len(wnids)} class folders are missing "
            f"in {folder} (first missing: {', '.join(missing[:5])}).\nExpected one folder per wnid, "
            f"{folder}/<wnid>/*.jpg, for the wnids listed in nclab/resources/miniimagenet_{split}"
            f"_wnids.txt (e.g. {', '.join(wnids[:3])}). miniImageNet cannot be downloaded "
            f"automatically: build it from ImageNet and pass root=, or set NCLAB_DATA.")
    xs, ys = [], []
    for k, wnid in enumerate(tqdm(wnids, desc=f"miniImageNet {split}", disable=not progress)):
        files = sorted(p for p in (folder / wnid).iterdir() if p.suffix in _IMAGE_SUFFIXES)
        if not files:
            raise DatasetUnavailableError(f"no images (*.jpg, *.png) in {folder / wnid}")
        for path in files:
            with Image.open(path) as img:
                img = img.convert("RGB")
                if img.size != (image_size, image_size):
                    img = img.resize((image_size, image_size), Image.BILINEAR)
                xs.append(torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1))
        ys.append(torch.full((len(files),), k, dtype=torch.long))
    return TensorDataset(torch.stack(xs), torch.cat(ys), wnids)


def digits_fs(split: str, meta_train: Sequence[int] = (0, 1, 2, 3, 4), size: int = 16) -> TensorDataset:
    """A tiny offline few-shot split of scikit-learn's digits for CPU runs: ``train`` holds the
    classes ``meta_train`` (default 0-4), ``test`` the other digits (5-9), each class with all its
    ~180 images (digits' own train and test parts merged, as CIFAR-FS does). There is no ``val``.
    Images are ``size`` x ``size`` (default 16: the scans are 8x8, so 32 px adds only compute)."""
    _check_split(split, ("train", "test"))
    meta_train = sorted(set(int(c) for c in meta_train))
    if not meta_train or not set(meta_train) <= set(range(10)) or len(meta_train) == 10:
        raise ValueError(f"meta_train must be a proper non-empty subset of 0..9, got {meta_train}")
    chosen = meta_train if split == "train" else [c for c in range(10) if c not in meta_train]
    return _select([digits("train", size=size), digits("test", size=size)], [str(c) for c in chosen])


def load_split(name: str, split: str, root: str | Path | None = None, **kwargs) -> TensorDataset:
    """A few-shot split by dataset name (:data:`FEWSHOT_DATASETS`): ``cifar_fs``, ``miniimagenet``,
    ``cifar10_fs`` or ``digits_fs``; ``split`` is ``train`` (meta-train), ``val`` or ``test``
    (meta-test); ``cifar10_fs`` and ``digits_fs`` have no ``val``, ``fashion_mnist_fs`` only
    ``test``. ``cifar10_fs`` and ``fashion_mnist_fs`` read the local mirror (``root`` does not
    apply to them)."""
    if name == "cifar_fs":
        return cifar_fs(split, root=root, **kwargs)
    if name == "cifar10_fs":
        return cifar10_fs(split, **kwargs)
    if name == "fashion_mnist_fs":
        return fashion_mnist_fs(split, **kwargs)
    if name == "miniimagenet":
        return mini_imagenet(split, root=root, **kwargs)
    if name == "digits_fs":
        return digits_fs(split, **kwargs)
    raise ValueError(f"unknown few-shot dataset {name!r}; choose one of {', '.join(FEWSHOT_DATASETS)}")


# =========================================================================== pre-training
def pretrain_fewshot(
    backbone: nn.Module,
    meta_train: TensorDataset,
    epochs: int = 90,
    *,
    lr: float = 0.05,
    batch_size: int = 64,
    weight_decay: float = 5e-4,
    aug_level: int = 4,
    seed: int = 0,
    device: torch.device | str | None = None,
    cache: bool = True,
    progress: bool = True,
    **kwargs,
) -> nn.Module:
    """Supervised pre-training on the merged meta-train classes with the paper's recipe (App. E.2):
    cross-entropy over all meta-train classes, SGD (momentum 0.9), lr 0.05, weight decay 5e-4,
    batch 64, 90 epochs for CIFAR-FS (100 for miniImageNet), random crop + flip + colour jitter
    (:class:`nclab.pretrain.Augment` level 4).

    Runs :func:`nclab.pretrain.pretrain`, which caches the result and anneals the learning rate with
    a cosine schedule where the paper decays it by 0.1 three times; returns the backbone frozen
    (eval mode, no gradients). Extra keyword arguments go to ``pretrain``."""
    from . import pretrain as _pretrain

    if len(meta_train) == 0:
        raise ValueError("meta_train is empty")
    model = _pretrain.pretrain(
        backbone, meta_train, epochs=epochs, lr=lr, batch_size=batch_size,
        weight_decay=weight_decay, aug_level=aug_level, loss="ce", seed=seed, device=device,
        cache=cache, progress=progress, **kwargs)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


# =========================================================================== episodes
@dataclass(frozen=True)
class Episode:
    """One N-way K-shot task: indices into the split and labels remapped to ``0..ways-1`` (label
    ``j`` is the original class ``classes[j]``)."""

    classes: torch.Tensor
    support: torch.Tensor
    support_y: torch.Tensor
    query: torch.Tensor
    query_y: torch.Tensor


def _class_index(labels: torch.Tensor) -> dict[int, torch.Tensor]:
    labels = torch.as_tensor(labels).cpu()
    if labels.ndim != 1 or labels.dtype in (torch.float16, torch.float32, torch.float64):
        raise ValueError(f"labels must be a 1-D integer tensor, got {labels.dtype} {tuple(labels.shape)}")
    order = torch.argsort(labels, stable=True)
    values, counts = torch.unique_consecutive(labels[order], return_counts=True)
    return dict(zip(values.tolist(), torch.split(order, counts.tolist())))


def _check_episode_args(by_class: Mapping[int, torch.Tensor], ways: int, shots: int,
                        queries: int) -> None:
    if ways < 2 or shots < 1 or queries < 1:
        raise ValueError(f"need ways >= 2, shots >= 1, queries >= 1; got {ways}, {shots}, {queries}")
    if len(by_class) < ways:
        raise ValueError(f"{ways}-way episodes need {ways} classes, the labels have {len(by_class)}")
    need = shots + queries
    short = {k: len(v) for k, v in by_class.items() if len(v) < need}
    if short:
        raise ValueError(f"every class needs shots + queries = {need} samples; these have fewer "
                         f"(class: count): {short}. Lower shots/queries or drop those classes.")


def _sample(by_class: Mapping[int, torch.Tensor], ways: int, shots: int, queries: int,
            generator: torch.Generator) -> Episode:
    keys = list(by_class)
    picked = [keys[i] for i in torch.randperm(len(keys), generator=generator)[:ways].tolist()]
    sup, qry = [], []
    for idx in (by_class[c] for c in picked):
        perm = idx[torch.randperm(len(idx), generator=generator)[: shots + queries]]
        sup.append(perm[:shots])
        qry.append(perm[shots:])
    arange = torch.arange(ways)
    return Episode(torch.tensor(picked), torch.cat(sup), arange.repeat_interleave(shots),
                   torch.cat(qry), arange.repeat_interleave(queries))


def sample_episode(
    labels: torch.Tensor | Sequence[int],
    ways: int = 5,
    shots: int = 1,
    queries: int = 15,
    generator: torch.Generator | None = None,
) -> Episode:
    """Draw one episode: ``ways`` distinct classes uniformly at random, then per class ``shots``
    support and ``queries`` query samples without replacement (support and query disjoint).
    The same ``generator`` state gives the same episode. Every class of ``labels`` must have at
    least ``shots + queries`` samples (``ValueError`` naming those that do not)."""
    by_class = _class_index(torch.as_tensor(labels))
    _check_episode_args(by_class, ways, shots, queries)
    return _sample(by_class, ways, shots, queries, generator or torch.Generator().manual_seed(0))


def confidence_interval(values: Sequence[float] | np.ndarray, z: float = 1.96) -> tuple[float, float]:
    """Mean and half-width of the normal 95 % interval over episodes:
    ``mean ± z * s / sqrt(n)`` with ``s`` the sample standard deviation (``n - 1`` in the
    denominator) and ``z = 1.96``. Needs at least two finite values."""
    v = np.asarray(values, dtype=np.float64).ravel()
    if v.size < 2 or not np.all(np.isfinite(v)):
        raise ValueError(f"need >= 2 finite values for an interval, got {v.size} "
                         f"({int((~np.isfinite(v)).sum())} non-finite)")
    return float(v.mean()), float(z * v.std(ddof=1) / math.sqrt(v.size))


# =========================================================================== evaluation
@torch.no_grad()
def embed(
    encoder: nn.Module,
    data: TensorDataset | tuple[torch.Tensor, torch.Tensor],
    batch_size: int = 256,
    device: torch.device | str | None = None,
    l2_normalize: bool = True,
    progress: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Embeddings ``(N, d)`` (float32, CPU) and labels ``(N,)`` of a whole split under the frozen
    ``encoder`` in eval mode, each row scaled to unit L2 norm when ``l2_normalize``.

    A :class:`~nclab.data.TensorDataset` (or uint8 images) goes through :func:`nclab.data.batches` (the same
    normalisation as training); float images are fed as they are."""
    from tqdm.auto import tqdm

    dev = torch.device(device) if device is not None else default_device()
    if isinstance(data, (tuple, list)) and len(data) == 2:
        x, y = torch.as_tensor(data[0]), torch.as_tensor(data[1])
        data = TensorDataset(x, y) if x.dtype == torch.uint8 else (x, y)
    elif not isinstance(data, TensorDataset):
        raise TypeError(f"data must be a TensorDataset or (images, labels), got {type(data).__name__}"
                        " (use nclab.data.materialize to turn a torchvision dataset into tensors)")
    was_training = encoder.training
    encoder.eval().to(dev)
    if isinstance(data, TensorDataset):
        loader, labels = batches(data, batch_size, shuffle=False, device=dev), data.y.cpu()
    else:
        labels = torch.as_tensor(y).long().cpu()
        if x.ndim != 4 or len(x) != len(labels):
            raise ValueError(f"images must be (N, C, H, W) with N = len(labels) = {len(labels)}, "
                             f"got {tuple(x.shape)}")
        loader = [(x[i:i + batch_size].to(dev).float(), None) for i in range(0, len(x), batch_size)]
    out = []
    for xb, _ in tqdm(loader, desc="embed", disable=not progress, leave=False):
        h = encoder(xb)
        if h.ndim != 2:
            raise ValueError(f"the encoder must return (B, d) embeddings, got {tuple(h.shape)}")
        out.append(h.float().cpu())
    encoder.train(was_training)
    feats = torch.cat(out)
    if not torch.isfinite(feats).all():
        raise ValueError(f"{int((~torch.isfinite(feats)).any(1).sum())} embeddings contain NaN/inf")
    if l2_normalize:
        feats = torch.nn.functional.normalize(feats, dim=1)
    return feats, labels


@dataclass(frozen=True)
class FewShotResult:
    """One shot setting: accuracy (fraction) as mean ± 95 % half-width over episodes, and the mean
    NC1 of the episodes' query embeddings (± its 95 % half-width). Per-episode values are kept."""

    ways: int
    shots: int
    queries: int
    episodes: int
    accuracy: float
    ci95: float
    nc1: float
    nc1_ci95: float
    episode_accuracy: np.ndarray = field(repr=False, compare=False)
    episode_nc1: np.ndarray = field(repr=False, compare=False)

    def __str__(self) -> str:
        return (f"{self.ways}-way {self.shots}-shot: {100 * self.accuracy:.2f} ± "
                f"{100 * self.ci95:.2f} % (query NC1 {self.nc1:.3f}, {self.episodes} episodes)")


@dataclass(frozen=True)
class FewShotReport:
    """The results of :func:`evaluate`, one per shot setting; index by shots (``report[5]``),
    iterate, or turn into a table with :meth:`to_frame` (how it prints)."""

    results: tuple[FewShotResult, ...]
    name: str = ""

    def __getitem__(self, shots: int) -> FewShotResult:
        for r in self.results:
            if r.shots == shots:
                return r
        raise KeyError(f"no {shots}-shot result; have {[r.shots for r in self.results]}")

    def __iter__(self) -> Iterator[FewShotResult]:
        return iter(self.results)

    def __len__(self) -> int:
        return len(self.results)

    @property
    def nc1(self) -> float:
        """Mean query NC1 over every episode of every shot setting (one value per backbone, as in
        the paper's Table 2; the query sets of all settings have the same size)."""
        return float(np.mean(np.concatenate([r.episode_nc1 for r in self.results])))

    def to_frame(self):
        """A pandas DataFrame: one row per shot setting, accuracy and interval in percent."""
        import pandas as pd

        rows = [{"ways": r.ways, "shots": r.shots, "queries": r.queries, "episodes": r.episodes,
                 "accuracy %": 100 * r.accuracy, "± 95% CI": 100 * r.ci95, "query NC1": r.nc1}
                for r in self.results]
        frame = pd.DataFrame(rows)
        if self.name:
            frame.insert(0, "model", self.name)
        return frame

    def __str__(self) -> str:
        return self.to_frame().to_string(index=False, float_format=lambda v: f"{v:.3f}")

    def __repr__(self) -> str:
        return f"FewShotReport({self.name!r})\n{self}"

    def _repr_html_(self) -> str:
        return self.to_frame().to_html(index=False, float_format=lambda v: f"{v:.3f}")


def _fit_predict(xs: np.ndarray, ys: np.ndarray, xq: np.ndarray, C: float, max_iter: int):
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression

    clf = LogisticRegression(C=C, max_iter=max_iter, random_state=0)  # lbfgs: multinomial
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        clf.fit(xs, ys)
    return clf.predict(xq)


def evaluate_embeddings(
    features: torch.Tensor | np.ndarray,
    labels: torch.Tensor | Sequence[int],
    ways: int = 5,
    shots: int | Sequence[int] = (1, 5),
    queries: int = 15,
    episodes: int = 600,
    seed: int = 0,
    C: float = 1.0,
    max_iter: int = 1000,
    progress: bool = True,
    name: str = "",
) -> FewShotReport:
    """Episodic evaluation on precomputed embeddings (used as given: normalise them first).

    For each shot setting ``s`` and each of ``episodes`` episodes (drawn by :func:`sample_episode`
    from a generator seeded with ``seed``, so every setting sees the same classes in the same
    order): fit scikit-learn's multinomial ``LogisticRegression(C, lbfgs)`` on the ``ways * s``
    support embeddings, score it on the ``ways * queries`` query embeddings, and compute
    ``nclab.metrics.nc1`` of the query embeddings with their episode labels (``K = ways``)."""
    h = torch.as_tensor(np.asarray(features) if not torch.is_tensor(features) else features)
    if h.ndim != 2:
        raise ValueError(f"features must be (N, d), got shape {tuple(h.shape)}")
    y = torch.as_tensor(labels).long().cpu()
    if len(y) != len(h):
        raise ValueError(f"features have {len(h)} rows but labels {len(y)}")
    if episodes < 2:
        raise ValueError(f"episodes must be >= 2 for a confidence interval, got {episodes}")
    shot_list = [shots] if isinstance(shots, int) else list(shots)
    by_class = _class_index(y)
    for s in shot_list:
        _check_episode_args(by_class, ways, s, queries)
    h64 = h.detach().double().cpu()
    h_np = h64.numpy()
    # Episodes are tiny problems: BLAS/torch thread pools only add overhead (4x measured on 2 cores).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with threadpool_limits(1):
            results = [_run_setting(h64, h_np, by_class, ways, s, queries, episodes, seed, C,
                                    max_iter, progress) for s in shot_list]
    finally:
        torch.set_num_threads(threads)
    return FewShotReport(tuple(results), name)


def _run_setting(h64: torch.Tensor, h_np: np.ndarray, by_class: Mapping[int, torch.Tensor],
                 ways: int, s: int, queries: int, episodes: int, seed: int, C: float,
                 max_iter: int, progress: bool) -> FewShotResult:
    from tqdm.auto import tqdm

    from .metrics import nc1 as _nc1

    gen = torch.Generator().manual_seed(seed)
    acc, nc1s = np.empty(episodes), np.empty(episodes)
    for e in tqdm(range(episodes), desc=f"{ways}-way {s}-shot", disable=not progress,
                  leave=False):
        ep = _sample(by_class, ways, s, queries, gen)
        pred = _fit_predict(h_np[ep.support.numpy()], ep.support_y.numpy(),
                            h_np[ep.query.numpy()], C, max_iter)
        acc[e] = float(np.mean(pred == ep.query_y.numpy()))
        nc1s[e] = float(_nc1(h64[ep.query], ep.query_y, num_classes=ways))
    m, ci = confidence_interval(acc)
    n, n_ci = confidence_interval(nc1s)
    return FewShotResult(ways, s, queries, episodes, m, ci, n, n_ci, acc, nc1s)


def evaluate(
    encoder: nn.Module,
    dataset: TensorDataset | tuple[torch.Tensor, torch.Tensor],
    ways: int = 5,
    shots: int | Sequence[int] = (1, 5),
    queries: int = 15,
    episodes: int = 600,
    seed: int = 0,
    device: torch.device | str | None = None,
    progress: bool = True,
    batch_size: int = 256,
    name: str = "",
    **kwargs,
) -> FewShotReport:
    """Few-shot accuracy (mean ± 95 % CI over episodes) and query NC1 of a frozen ``encoder`` on a
    meta-test split (a :class:`~nclab.data.TensorDataset` or ``(images, labels)``): the whole split is
    embedded once (:func:`embed`, L2-normalised as Tian et al.) and reused by every episode
    (:func:`evaluate_embeddings`; keyword arguments ``C``, ``max_iter`` go there)."""
    feats, labels = embed(encoder, dataset, batch_size=batch_size, device=device, progress=progress)
    return evaluate_embeddings(feats, labels, ways=ways, shots=shots, queries=queries,
                               episodes=episodes, seed=seed, progress=progress, name=name, **kwargs)


def summary_table(reports: Mapping[str, FewShotReport]):
    """A Table-2-style DataFrame: one row per backbone, ``s``-shot accuracy ± 95 % CI (percent) for
    every shot setting, and the query NC1 (:attr:`FewShotReport.nc1`)."""
    import pandas as pd

    rows = []
    for name, rep in reports.items():
        row: dict = {"model": name}
        for r in rep:
            row[f"{r.shots}-shot acc %"] = 100 * r.accuracy
            row[f"{r.shots}-shot ± CI"] = 100 * r.ci95
        row["query NC1"] = rep.nc1
        rows.append(row)
    return pd.DataFrame(rows).set_index("model")


# =========================================================================== the chapter's study
@dataclass(frozen=True)
class FewShotStudy:
    """What the few-shot chapter runs in one profile; every profile difference of the chapter is here.

    ``dataset``/``scale``/``epochs``/``episodes``/``seed``: the split family, width multiplier,
    pre-training epochs, episodes per setting and seed, read from the profile. ``gain_checked``: the
    backbones whose gain over an untrained copy (beyond twice the 1-shot interval, with smaller
    query NC1) held on every seed measured for this profile; the chapter asserts it for these only.
    ``below_paper``: whether every backbone is asserted to fall short of the paper's CIFAR-FS
    accuracy. ``cross_domain``: the meta-test split of the really pre-trained ``cross_models`` (None:
    the cross-domain section has nothing to run in this profile). ``episodes_checked``: whether the
    episode claims (both accuracies above chance, 5-shot above 1-shot, the 1-shot interval at
    least 15 % narrower over all episodes than over a quarter of them) held when measured in this
    profile; only then does the chapter assert them.
    """

    profile: str
    dataset: str
    scale: float
    epochs: int
    episodes: int
    seed: int
    gain_checked: tuple[str, ...] = ()
    below_paper: bool = False
    cross_domain: str | None = None
    cross_models: tuple[str, ...] = ()
    episodes_checked: bool = False


def study(profile=None) -> FewShotStudy:
    """The few-shot chapter's :class:`FewShotStudy` for ``profile`` (a name, a
    :class:`~nclab.runtime.Profile`, or None for the active one)."""
    from .runtime import profile as active_profile

    prof = active_profile(profile)
    extra: dict = {
        "smoke": {"gain_checked": ("resnet12", "seresnet12"), "episodes_checked": True},
        "real": {"gain_checked": tuple(BACKBONES), "below_paper": True, "episodes_checked": True,
                 "cross_domain": "fashion_mnist_fs", "cross_models": prof.models},
    }.get(prof.name, {})
    return FewShotStudy(profile=prof.name, dataset=prof.fewshot_dataset, scale=prof.fewshot_scale,
                        epochs=prof.fewshot_epochs, episodes=prof.episodes, seed=prof.seeds[0], **extra)
