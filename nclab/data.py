"""Datasets as tensors: a registry of real datasets, offline digits, synthetic data, subsets, GPU batches.

Every dataset whose images share one size is a :class:`TensorDataset` exposing ``.x`` (N, C, H, W)
uint8, ``.y`` (N,) int64 and ``.classes``. CIFAR-scale sets fit on a GPU as uint8, and
:func:`batches` normalises, resizes and augments them there, batch by batch.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from .net import reachable as _reachable
from .runtime import data_dir, rehearsing

__all__ = [
    "TensorDataset",
    "DatasetUnavailableError",
    "DATASETS",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "load",
    "digits",
    "cifar10_2k",
    "fashion_mnist_2k",
    "synthetic_features",
    "synthetic_images",
    "subset_per_class",
    "class_subset",
    "materialize",
    "load_tensors",
    "stand_in",
    "STAND_IN_SIZES",
    "batches",
    "normalize",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class DatasetUnavailableError(FileNotFoundError):
    """A dataset is not on disk and cannot be downloaded (offline)."""


class TensorDataset(Dataset):
    """Images held as one uint8 tensor ``x`` (N, C, H, W) with labels ``y`` (N,) and ``classes``.

    Indexing returns ``(image, label)`` with the image as float in [0, 1] (or ``transform(image)``
    when a transform is given). For speed, use :func:`batches`, which works on ``.x`` directly.
    """

    def __init__(
        self,
        x: torch.Tensor,
        y: torch.Tensor,
        classes: Sequence[str] | None = None,
        transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> None:
        if x.ndim != 4:
            raise ValueError(f"x must be (N, C, H, W), got shape {tuple(x.shape)}")
        if y.ndim != 1 or len(y) != len(x):
            raise ValueError(f"y must be (N,) with N={len(x)}, got shape {tuple(y.shape)}")
        self.x = x
        self.y = y.long()
        n_cls = int(self.y.max()) + 1 if len(self.y) else 0
        self.classes = list(classes) if classes is not None else [str(i) for i in range(n_cls)]
        self.transform = transform

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        img = self.x[i]
        img = img.float() / 255.0 if img.dtype == torch.uint8 else img
        if self.transform is not None:
            img = self.transform(img)
        return img, int(self.y[i])

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def to(self, device: torch.device | str) -> TensorDataset:
        """A copy whose tensors live on ``device`` (uint8 stays uint8)."""
        return TensorDataset(self.x.to(device), self.y.to(device), self.classes, self.transform)

    def __repr__(self) -> str:
        c, h, w = self.x.shape[1:]
        return (f"TensorDataset(N={len(self)}, image={c}x{h}x{w}, classes={self.num_classes}, "
                f"device={self.x.device})")


# --------------------------------------------------------------------------- offline data
def _stratified_split(y: np.ndarray, split: str, test_fraction: float) -> np.ndarray:
    """Sorted indices of the ``split`` part of a fixed stratified split (seed 0)."""
    from sklearn.model_selection import train_test_split

    _check_split(split, ("train", "test"))
    idx_train, idx_test = train_test_split(np.arange(len(y)), test_size=test_fraction,
                                           stratify=y, random_state=0)
    return np.sort(idx_train if split == "train" else idx_test)


def digits(split: str = "train", size: int = 32, test_fraction: float = 0.3) -> TensorDataset:
    """scikit-learn's handwritten digits (1797 real 8x8 scans, 10 classes) served as 3x``size``x``size``
    uint8 images with a fixed, stratified train/test split (seed 0, 30 % test)."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    imgs = torch.from_numpy(bunch.images).float() / 16.0  # (N, 8, 8) in [0, 1]
    labels = torch.from_numpy(bunch.target).long()
    idx = torch.from_numpy(_stratified_split(bunch.target, split, test_fraction))
    x = imgs[idx, None]
    if size != 8:
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    x = (x.clamp(0, 1) * 255).round().to(torch.uint8).expand(-1, 3, -1, -1).contiguous()
    return TensorDataset(x, labels[idx], classes=[str(d) for d in range(10)])


def cifar10_2k(split: str = "train", download: bool = True) -> TensorDataset:
    """Real CIFAR-10 from the local mirror (:mod:`nclab.mirror`): ``train`` is the first 2000
    training images, ``test`` the first 1000 test images, both 3x32x32 uint8, lossless."""
    from .mirror import fetch

    _check_split(split, ("train", "test"))
    with np.load(fetch("cifar10_2k", download=download), allow_pickle=False) as z:
        x, y, names = z[f"x_{split}"], z[f"y_{split}"], [str(c) for c in z["classes"]]
    return TensorDataset(torch.from_numpy(x).permute(0, 3, 1, 2).contiguous(),
                         torch.from_numpy(y.astype(np.int64)), classes=names)


def fashion_mnist_2k(split: str = "train", size: int = 32, test_fraction: float = 0.3,
                     download: bool = True) -> TensorDataset:
    """Real Fashion-MNIST from the local mirror (:mod:`nclab.mirror`): 2000 test images of the
    original set, split once into a stratified train/test part (seed 0, 30 % test, as
    :func:`digits`), served as 3x``size``x``size`` uint8 (bilinear resize of the 28x28 grey)."""
    from .mirror import fetch

    with np.load(fetch("fashion_mnist_2k", download=download), allow_pickle=False) as z:
        x_all, y_all, names = z["x"], z["y"].astype(np.int64), [str(c) for c in z["classes"]]
    idx = _stratified_split(y_all, split, test_fraction)
    x = torch.from_numpy(x_all[idx]).float()[:, None] / 255.0
    if size != 28:
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False,
                          antialias=size < 28)
    x = (x.clamp(0, 1) * 255).round().to(torch.uint8).expand(-1, 3, -1, -1).contiguous()
    return TensorDataset(x, torch.from_numpy(y_all[idx]), classes=names)


def synthetic_features(
    num_classes: int = 5,
    per_class: int | Sequence[int] = 50,
    dim: int = 16,
    within_std: float = 1.0,
    between_scale: float = 5.0,
    seed: int = 0,
    dtype: torch.dtype = torch.float64,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Class-structured features: ``h = between_scale * m_k + within_std * z`` with random unit class
    directions ``m_k`` and Gaussian noise ``z``. ``per_class`` may be a list for imbalanced classes.
    Returns ``(H, y)`` with ``H`` (N, dim) and ``y`` (N,) sorted by class."""
    gen = torch.Generator().manual_seed(seed)
    counts = [per_class] * num_classes if isinstance(per_class, int) else list(per_class)
    if len(counts) != num_classes or min(counts) < 1:
        raise ValueError("per_class must be a positive int or one positive count per class")
    means = torch.randn(num_classes, dim, generator=gen, dtype=dtype)
    means = between_scale * means / means.norm(dim=1, keepdim=True)
    y = torch.repeat_interleave(torch.arange(num_classes), torch.tensor(counts))
    h = means[y] + within_std * torch.randn(len(y), dim, generator=gen, dtype=dtype)
    return h, y


def synthetic_images(
    num_classes: int = 4,
    per_class: int = 50,
    size: int = 32,
    noise: float = 0.15,
    seed: int = 0,
) -> TensorDataset:
    """Class-structured RGB images: each class is a smooth random colour pattern; samples add
    per-pixel Gaussian noise and a random brightness shift. A fully offline image task."""
    gen = torch.Generator().manual_seed(seed)
    protos = torch.rand(num_classes, 3, 4, 4, generator=gen)
    protos = F.interpolate(protos, size=(size, size), mode="bicubic", align_corners=False)
    y = torch.arange(num_classes).repeat_interleave(per_class)
    x = protos[y] + noise * torch.randn(len(y), 3, size, size, generator=gen)
    x = x + 0.1 * torch.randn(len(y), 1, 1, 1, generator=gen)
    x = (x.clamp(0, 1) * 255).round().to(torch.uint8)
    return TensorDataset(x, y, classes=[f"pattern{k}" for k in range(num_classes)])


# --------------------------------------------------------------------------- subsets
def _labels_of(data: TensorDataset | torch.Tensor | Sequence[int]) -> torch.Tensor:
    if isinstance(data, TensorDataset):
        return data.y.cpu()
    return torch.as_tensor(data).long().cpu()


def subset_per_class(
    data: TensorDataset | torch.Tensor, n: int, seed: int = 0
) -> TensorDataset | torch.Tensor:
    """Exactly ``n`` samples of every class, drawn without replacement with ``seed``.

    Given a :class:`TensorDataset` returns a new one; given labels returns the sorted indices.
    A class with fewer than ``n`` samples raises ``ValueError`` naming it."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    y = _labels_of(data)
    gen = torch.Generator().manual_seed(seed)
    picked = []
    short = {}
    for k in torch.unique(y).tolist():
        idx = torch.nonzero(y == k).flatten()
        if len(idx) < n:
            short[k] = len(idx)
            continue
        picked.append(idx[torch.randperm(len(idx), generator=gen)[:n]])
    if short:
        raise ValueError(f"classes with fewer than {n} samples (class: count): {short}")
    idx = torch.sort(torch.cat(picked)).values
    if isinstance(data, TensorDataset):
        dev_idx = idx.to(data.x.device)
        return TensorDataset(data.x[dev_idx], data.y[dev_idx], data.classes, data.transform)
    return idx


def class_subset(data: TensorDataset, classes: Sequence[int], relabel: bool = True) -> TensorDataset:
    """The samples of ``classes`` only; with ``relabel`` their labels become 0..len(classes)-1 in the
    given order (e.g. digits 5-9 as a 5-class downstream task)."""
    classes = list(classes)
    if len(set(classes)) != len(classes):
        raise ValueError(f"classes must be distinct, got {classes}")
    valid = set(range(data.num_classes))
    bad = [c for c in classes if c not in valid]
    if bad:
        raise ValueError(f"classes {bad} not in [0, {data.num_classes})")
    lut = torch.full((data.num_classes,), -1, dtype=torch.long)
    lut[torch.tensor(classes)] = torch.arange(len(classes))
    y = data.y.cpu()
    keep = torch.nonzero(lut[y] >= 0).flatten().to(data.y.device)
    new_y = lut.to(data.y.device)[data.y[keep]] if relabel else data.y[keep]
    names = [data.classes[c] for c in classes] if relabel else data.classes
    return TensorDataset(data.x[keep], new_y, names, data.transform)


# --------------------------------------------------------------------------- GPU batches
def normalize(
    x: torch.Tensor, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD
) -> torch.Tensor:
    """uint8 or [0, 1] float images -> float32 ``(x/255 - mean) / std`` per channel."""
    x = x.float() / 255.0 if x.dtype == torch.uint8 else x.float()
    m = torch.as_tensor(mean, device=x.device, dtype=x.dtype).view(1, -1, 1, 1)
    s = torch.as_tensor(std, device=x.device, dtype=x.dtype).view(1, -1, 1, 1)
    return (x - m) / s


@dataclass
class batches:  # noqa: N801  (an iterable used like a DataLoader)
    """Re-iterable ``(x, y)`` batches from a :class:`TensorDataset`, built on ``device``.

    Each batch is moved (uint8) to ``device``, optionally augmented by ``augment(x_uint8_or_float)``,
    resized to ``size`` (bilinear) and normalised. With ``shuffle`` the order changes every epoch,
    reproducibly from ``seed``. Use it wherever a ``DataLoader`` would go.
    """

    data: TensorDataset
    batch_size: int = 256
    shuffle: bool = False
    device: torch.device | str | None = None
    size: int | None = None
    mean: Sequence[float] = IMAGENET_MEAN
    std: Sequence[float] = IMAGENET_STD
    augment: Callable[[torch.Tensor], torch.Tensor] | None = None
    drop_last: bool = False
    seed: int = 0

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        self._epoch = 0

    def __len__(self) -> int:
        n = len(self.data)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        dev = torch.device(self.device) if self.device is not None else self.data.x.device
        n = len(self.data)
        if self.shuffle:
            gen = torch.Generator().manual_seed(self.seed * 100003 + self._epoch)
            order = torch.randperm(n, generator=gen)
        else:
            order = torch.arange(n)
        self._epoch += 1
        for i in range(len(self)):
            idx = order[i * self.batch_size : (i + 1) * self.batch_size]
            x = self.data.x[idx.to(self.data.x.device)].to(dev, non_blocking=True)
            y = self.data.y[idx.to(self.data.y.device)].to(dev, non_blocking=True)
            x = x.float() / 255.0 if x.dtype == torch.uint8 else x.float()
            if self.augment is not None:
                x = self.augment(x)
            if self.size is not None and x.shape[-1] != self.size:
                x = F.interpolate(x, size=(self.size, self.size), mode="bilinear",
                                  align_corners=False, antialias=x.shape[-1] > self.size)
            yield normalize(x, self.mean, self.std), y


# --------------------------------------------------------------------------- registry
@dataclass(frozen=True)
class _Remote:
    tv_name: str
    folder: str
    urls: tuple[str, ...]
    splits: dict
    fixed_size: bool


#: The registry of :func:`load`: name -> where the data come from.
DATASETS: dict[str, _Remote | str] = {
    "digits": "offline: scikit-learn's digits (10 classes, 32x32)",
    "cifar10_2k": "local mirror: real CIFAR-10, 2000 train / 1000 test images (nclab.mirror)",
    "fashion_mnist_2k": "local mirror: real Fashion-MNIST, 2000 images split 70/30 (nclab.mirror)",
    "cifar10": _Remote("CIFAR10", "cifar-10-batches-py",
                       ("https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",),
                       {"train": {"train": True}, "test": {"train": False}}, True),
    "cifar100": _Remote("CIFAR100", "cifar-100-python",
                        ("https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",),
                        {"train": {"train": True}, "test": {"train": False}}, True),
    "fgvc_aircraft": _Remote("FGVCAircraft", "fgvc-aircraft-2013b",
                             ("https://www.robots.ox.ac.uk/~vgg/data/fgvc-aircraft/archives/"
                              "fgvc-aircraft-2013b.tar.gz",),
                             {"train": {"split": "trainval"}, "test": {"split": "test"}}, False),
    "dtd": _Remote("DTD", "dtd/dtd",
                   ("https://www.robots.ox.ac.uk/~vgg/data/dtd/download/dtd-r1.0.1.tar.gz",),
                   {"train": {"split": "train"}, "val": {"split": "val"}, "test": {"split": "test"}},
                   False),
    "oxford_pets": _Remote("OxfordIIITPet", "oxford-iiit-pet",
                           ("https://www.robots.ox.ac.uk/~vgg/data/pets/data/images.tar.gz",
                            "https://www.robots.ox.ac.uk/~vgg/data/pets/data/annotations.tar.gz"),
                           {"train": {"split": "trainval"}, "test": {"split": "test"}}, False),
    "flowers102": _Remote("Flowers102", "flowers-102",
                          ("https://www.robots.ox.ac.uk/~vgg/data/flowers/102/102flowers.tgz",
                           "https://www.robots.ox.ac.uk/~vgg/data/flowers/102/imagelabels.mat",
                           "https://www.robots.ox.ac.uk/~vgg/data/flowers/102/setid.mat"),
                          {"train": {"split": "train"}, "val": {"split": "val"},
                           "test": {"split": "test"}}, False),
    "sun397": _Remote("SUN397", "SUN397",
                      ("http://vision.princeton.edu/projects/2010/SUN/SUN397.tar.gz",),
                      {"train": {}, "test": {}}, False),
}


def _check_split(split: str, valid: Sequence[str]) -> None:
    if split not in valid:
        raise ValueError(f"unknown split {split!r}; valid splits: {', '.join(valid)}")


def _default_transform(size: int | None):
    from torchvision import transforms as T

    steps = [T.Resize(size), T.CenterCrop(size)] if size else []
    return T.Compose([*steps, T.PILToTensor()])


# --------------------------------------------------------------------------- rehearsal stand-ins
#: For each remote dataset, the (classes, images per class in train, in test, width x height) of
#: its rehearsal stand-in (:func:`stand_in`). The class counts are the real ones; the sizes are
#: tiny. CIFAR-shaped sets reuse the mirror's real CIFAR-10 images (32 x 32).
STAND_IN_SIZES: dict[str, tuple[int, int, int, tuple[int, int]]] = {
    "cifar10": (10, 20, 3, (32, 32)),
    "cifar100": (100, 18, 8, (32, 32)),
    "fgvc_aircraft": (100, 3, 1, (800, 533)),
    "dtd": (47, 3, 1, (640, 480)),
    "oxford_pets": (37, 3, 1, (500, 375)),
    "flowers102": (102, 3, 1, (500, 667)),
    "sun397": (397, 3, 1, (640, 480)),
}


class _SyntheticImages(Dataset):
    """Stand-in for a dataset of mixed-size photos: PIL images of ``size`` (every other one turned
    to portrait, so the sizes are mixed), a per-class colour layout plus noise, made on demand
    from ``(seed, index)``; ``transform`` as torchvision's datasets apply it."""

    def __init__(self, num_classes: int, per_class: int, size: tuple[int, int], seed: int,
                 transform: Callable | None, name: str) -> None:
        self.classes = [f"{name} stand-in class {k}" for k in range(num_classes)]
        self.targets = [k for k in range(num_classes) for _ in range(per_class)]
        self.size, self.seed, self.transform, self.name = size, seed, transform, name
        # per class: a layout shared by all classes plus a faint one of its own (with the strong
        # noise of __getitem__ not separable at a glance, so that accuracies differ between models)
        shared = np.random.default_rng(num_classes).uniform(0, 255, (4, 4, 3))
        self.layouts = [np.kron(shared + np.random.default_rng(k).uniform(-60, 60, (4, 4, 3)),
                                np.ones((8, 8, 1))) for k in range(num_classes)]

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i: int):
        from PIL import Image

        k = self.targets[i]
        noise = np.random.default_rng((self.seed, i)).normal(0, 70, (32, 32, 3))
        small = np.clip(self.layouts[k] + noise, 0, 255).astype(np.uint8)
        w, h = self.size if i % 2 == 0 else self.size[::-1]
        img = Image.fromarray(small).resize((w, h), Image.BILINEAR)
        return (self.transform(img) if self.transform else img), k

    def __repr__(self) -> str:
        return (f"stand-in for {self.name!r} (synthetic, NOT real data): {len(self)} images, "
                f"{len(self.classes)} classes, {self.size[0]}x{self.size[1]} px")


def _cifar_stand_in(name: str, split: str) -> TensorDataset:
    """The mirror's real CIFAR-10 images (:func:`cifar10_2k`) under ``name``'s classes: for
    CIFAR-10 the first images of each class; for CIFAR-100 each CIFAR-10 class's images dealt
    to 10 of the 100 class labels (real pictures, made-up labels)."""
    num_classes, n_train, n_test, _ = STAND_IN_SIZES[name]
    per_class = n_train if split == "train" else n_test
    src = cifar10_2k("train" if split == "train" else "test")
    share = num_classes // src.num_classes
    idx, labels = [], []
    for c in range(src.num_classes):
        mine = torch.nonzero(src.y == c).flatten()[: per_class * share]
        if len(mine) < per_class * share:
            raise ValueError(f"the mirror's CIFAR-10 {split} split has {len(mine)} images of class "
                             f"{c}; the {name} stand-in needs {per_class * share}")
        idx.append(mine)
        labels.append(c * share + torch.arange(len(mine)) % share)
    idx_t, y = torch.cat(idx), torch.cat(labels)
    return TensorDataset(src.x[idx_t], y,
                         classes=_cifar100_classes() if name == "cifar100" else src.classes)


def _cifar100_classes() -> list[str]:
    """CIFAR-100's 100 fine class names in label order (alphabetical, as torchvision's CIFAR100
    lists them), read from the CIFAR-FS split files this package ships."""
    import json
    from importlib import resources

    folder = resources.files("nclab").joinpath("resources")
    names = [fine for split in ("train", "val", "test")
             for _, fine in json.loads(folder.joinpath(f"cifar_fs_{split}.json").read_text("utf-8"))]
    return sorted(names)


def stand_in(name: str, split: str = "train", image_size: int | None = None,
             transform: Callable | None = None) -> Dataset:
    """The rehearsal's stand-in for registry dataset ``name`` (what :func:`load` returns while
    :func:`nclab.runtime.rehearsing`): CIFAR-10/100 as the mirror's real CIFAR-10 images
    (a :class:`TensorDataset`, resized to ``image_size`` as :func:`load` does), every other set as
    synthetic mixed-size images with the real class count (:data:`STAND_IN_SIZES`), ``transform``
    (default: resize + centre crop to ``image_size``, uint8) applied as torchvision's datasets do.
    Never results: the sizes are tiny and the synthetic sets are not real data."""
    if name not in STAND_IN_SIZES:
        raise ValueError(f"no rehearsal stand-in for {name!r}; stand-ins: {', '.join(STAND_IN_SIZES)}")
    spec = DATASETS[name]
    _check_split(split, tuple(spec.splits))
    if spec.fixed_size:
        return _resized(_cifar_stand_in(name, split), image_size)
    num_classes, n_train, n_test, size = STAND_IN_SIZES[name]
    return _SyntheticImages(num_classes, n_train if split == "train" else n_test, size,
                            seed=sorted(spec.splits).index(split),
                            transform=transform or _default_transform(image_size), name=name)


def _resized(ds: TensorDataset, image_size: int | None) -> TensorDataset:
    """``ds`` resized to ``image_size`` px (bilinear, antialiased, uint8); itself when no size is
    asked or it already has it."""
    if not image_size or image_size == ds.x.shape[-1]:
        return ds
    x = F.interpolate(ds.x.float(), size=(image_size, image_size), mode="bilinear", antialias=True)
    return TensorDataset(x.round().clamp(0, 255).to(torch.uint8), ds.y, ds.classes)


def load(
    name: str,
    split: str = "train",
    root: str | Path | None = None,
    download: bool = True,
    image_size: int | None = None,
    transform: Callable | None = None,
) -> Dataset:
    """A dataset from the registry (:data:`DATASETS`).

    ``digits`` is offline; ``cifar10_2k`` and ``fashion_mnist_2k`` come from the local mirror
    (:mod:`nclab.mirror`, verified by SHA-256; ``image_size`` resizes Fashion-MNIST).
    The others come through torchvision into ``root`` (default
    ``$NCLAB_DATA``, else ``~/.cache/nclab/data``), downloaded with torchvision's checksums when
    missing. Offline, a missing dataset raises :class:`DatasetUnavailableError` within seconds,
    naming the files to fetch and the folder to put them in.

    CIFAR-10/100 return a :class:`TensorDataset`. Datasets of mixed image sizes return torchvision's
    dataset with ``transform`` applied (default: ``image_size`` resize + centre crop to a uint8
    tensor); pass ``image_size`` and call :func:`materialize` to get tensors.

    In a rehearsal (``NCLAB_REHEARSAL=1``, :func:`nclab.runtime.rehearsing`) the torchvision sets
    are replaced by their :func:`stand_in`.
    """
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; registered: {', '.join(DATASETS)}")
    if name == "digits":
        return digits(split, size=image_size or 32)
    if name == "cifar10_2k":
        return cifar10_2k(split, download=download)
    if name == "fashion_mnist_2k":
        return fashion_mnist_2k(split, size=image_size or 32, download=download)
    spec = DATASETS[name]
    _check_split(split, tuple(spec.splits))
    if rehearsing():
        return stand_in(name, split, image_size=image_size, transform=transform)
    root = data_dir(root)
    import torchvision.datasets as tvd

    cls = getattr(tvd, spec.tv_name)
    kwargs = dict(spec.splits[split])
    if not spec.fixed_size:
        kwargs["transform"] = transform or _default_transform(image_size)
    try:
        ds = cls(str(root), download=False, **kwargs)
    except (RuntimeError, FileNotFoundError) as err:
        if not download or not _reachable(spec.urls[0]):
            files = "\n  ".join(spec.urls)
            raise DatasetUnavailableError(
                f"dataset {name!r} is not in {root / spec.folder} and cannot be downloaded "
                f"(offline{'' if download else ', download=False'}).\nFetch these files:\n  {files}\n"
                f"and extract them under {root} (torchvision's layout: {root / spec.folder}), "
                f"or set NCLAB_DATA to the folder that holds them."
            ) from err
        t0 = time.perf_counter()
        ds = cls(str(root), download=True, **kwargs)
        print(f"downloaded {name} into {root} in {time.perf_counter() - t0:.0f} s")
    if spec.fixed_size:
        x = torch.from_numpy(np.asarray(ds.data)).permute(0, 3, 1, 2).contiguous()
        y = torch.as_tensor(ds.targets).long()
        out = TensorDataset(x, y, classes=list(ds.classes))
        return _resized(out, image_size)
    return ds


def materialize(ds: Dataset, classes: Sequence[str] | None = None) -> TensorDataset:
    """Stack a dataset of equally sized uint8 (or [0, 1] float) images into a :class:`TensorDataset`."""
    xs, ys = [], []
    for img, label in ds:
        img = torch.as_tensor(img)
        if img.dtype != torch.uint8:
            img = (img.float().clamp(0, 1) * 255).round().to(torch.uint8)
        xs.append(img)
        ys.append(int(label))
    if not xs:
        raise ValueError("cannot materialize an empty dataset")
    shapes = {tuple(x.shape) for x in xs}
    if len(shapes) != 1:
        raise ValueError(f"images differ in size {sorted(shapes)[:3]}...; load with image_size=")
    names = classes if classes is not None else getattr(ds, "classes", None)
    return TensorDataset(torch.stack(xs), torch.tensor(ys), names)


def load_tensors(
    name: str,
    split: str = "train",
    image_size: int = 224,
    max_per_class: int | None = None,
    seed: int = 0,
    root: str | Path | None = None,
) -> TensorDataset:
    """A registry dataset as a :class:`TensorDataset`, ready for :func:`batches`.

    Fixed-size sets (digits, CIFAR) keep their native resolution (resize them batch by batch on the
    device with ``batches(size=...)``: a 224-px copy of CIFAR would not fit in memory); sets of mixed
    image sizes are resized and centre-cropped to ``image_size`` once. With ``max_per_class`` every
    class is capped at that many images (drawn with ``seed``) when all classes have more."""
    spec = DATASETS.get(name)
    fixed = not isinstance(spec, _Remote) or spec.fixed_size  # local sets are all fixed-size
    ds = load(name, split, root=root, image_size=None if fixed else image_size)
    ds = ds if isinstance(ds, TensorDataset) else materialize(ds)
    if max_per_class is not None and int(torch.bincount(ds.y).min()) > max_per_class:
        ds = subset_per_class(ds, max_per_class, seed=seed)
    return ds
