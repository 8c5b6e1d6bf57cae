"""The local mirror: small real datasets and real checkpoints, verified by SHA-256 before use.

Three sources feed nclab: torchvision's dataset downloads (``course``), scikit-learn's bundled
digits (``smoke``) and this mirror (``real``). The mirror is a pair of folders laid out as

.. code-block:: text

    $NCLAB_DATA/                            (default ~/.cache/nclab/data)
        cifar10/cifar10_train2k_test1k.npz
        fashion_mnist/fashion_mnist_test2k.npz
    $NCLAB_WEIGHTS/                         (default ~/.cache/nclab/weights)
        akamaster_cifar10/resnet20-12fca82f.th  (and resnet32, resnet44, resnet56)
        abcrown_cifar10/, captum_cifar10/, convex_adversarial_cifar10/, pyhessian_cifar10/
                                            (the 19 networks of the CIFAR-10 zoo, nclab.zoo)

Every file in :data:`MIRROR` carries its SHA-256 and its public origin. :func:`fetch` returns the
path of a verified file; a missing file is downloaded from its origin when the network allows
(the checkpoints verbatim; the two datasets are rebuilt from their origin files and checked by the
SHA-256 of their array contents, since a re-written ``.npz`` differs in zip bytes only). Offline it
raises :class:`MirrorFileMissing` within seconds, naming the file, the folder, the origin URLs and
the expected hash. A file whose hash differs is never used: :class:`MirrorHashMismatch`.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import tempfile
import urllib.request
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import numpy as np

from .net import offline as _offline
from .net import reachable as _reachable  # one TCP reachability check for every download
from .runtime import data_dir

__all__ = [
    "MIRROR",
    "MirrorFile",
    "MirrorFileMissing",
    "MirrorHashMismatch",
    "content_sha256",
    "fetch",
    "file_digest",
    "file_sha256",
    "is_available",
    "status",
    "verify",
    "weights_dir",
]


class MirrorFileMissing(FileNotFoundError):
    """A mirror file is not on disk and cannot be downloaded (offline or unreachable origin)."""


class MirrorHashMismatch(ValueError):
    """A mirror file is on disk but its SHA-256 is not the expected one."""


def weights_dir(root: str | os.PathLike | None = None) -> Path:
    """Checkpoint root: ``root``, else ``$NCLAB_WEIGHTS`` (default ``~/.cache/nclab/weights``)."""
    if root is None:
        root = os.environ.get("NCLAB_WEIGHTS", Path.home() / ".cache" / "nclab" / "weights")
    return Path(root).expanduser()


@dataclass(frozen=True)
class MirrorFile:
    """One file of the mirror.

    ``kind`` is ``data`` (under :func:`nclab.runtime.data_dir`) or ``weights`` (under
    :func:`weights_dir`); ``path`` is relative to that root; ``sha256`` is the file's hash as
    published with the mirror; ``origins`` are the public URLs it comes from; ``build`` (data only)
    turns the downloaded origin files into the mirror file, whose arrays must then hash to
    ``content_sha256``.
    """

    kind: str
    path: str
    sha256: str
    origins: tuple[str, ...]
    about: str
    licence: str
    content_sha256: str | None = None
    build: Callable[[list[Path], Path], None] | None = None

    def local_path(self) -> Path:
        root = data_dir() if self.kind == "data" else weights_dir()
        return root / self.path


# --------------------------------------------------------------------------- hashes


def file_digest(path: str | os.PathLike, algo: str = "sha256", chunk: int = 1 << 20) -> str:
    """Hex digest of a file's bytes with hashlib's ``algo`` (``sha256``, ``md5``), read in chunks."""
    h = hashlib.new(algo)
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def file_sha256(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """Hex SHA-256 of a file's bytes (what ``sha256sum`` prints)."""
    return file_digest(path, "sha256", chunk)


def content_sha256(path: str | os.PathLike) -> str:
    """Hex SHA-256 of an ``.npz`` file's arrays: for each key in sorted order, the key, the dtype,
    the shape and the C-ordered bytes. Equal for two files that hold equal arrays, whatever their
    zip timestamps or compression."""
    h = hashlib.sha256()
    with np.load(path, allow_pickle=False) as z:
        for key in sorted(z.files):
            a = np.ascontiguousarray(z[key])
            h.update(f"{key}|{a.dtype.str}|{a.shape}|".encode())
            h.update(a.tobytes())
    return h.hexdigest()


# --------------------------------------------------------------------------- builders
_CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse",
                    "ship", "truck")
_FASHION_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
                    "Sneaker", "Bag", "Ankle boot")


def _decode_strip(png: Path) -> np.ndarray:
    """A ConvNetJS CIFAR-10 strip (1000 rows of 1024 RGB(A) pixels, one image per row in raster
    order) as ``(1000, 32, 32, 3)`` uint8."""
    from PIL import Image

    with Image.open(png) as im:
        a = np.asarray(im.convert("RGB"))
    if a.shape != (1000, 1024, 3):
        raise ValueError(f"{png.name}: expected a 1024x1000 strip, got {a.shape[1]}x{a.shape[0]}")
    return np.ascontiguousarray(a.reshape(1000, 32, 32, 3))


def _build_cifar10(files: list[Path], out: Path) -> None:
    strips = {p.name: p for p in files}
    labels_js = strips["cifar10_labels.js"].read_text()
    labels = np.array([int(t) for t in re.findall(r"\d+", labels_js[labels_js.index("["):])],
                      dtype=np.uint8)
    x_train = np.concatenate([_decode_strip(strips[f"cifar10_batch_{i}.png"]) for i in (0, 1)])
    x_test = _decode_strip(strips["cifar10_batch_50.png"])
    np.savez_compressed(out, x_train=x_train, y_train=labels[:2000], x_test=x_test,
                        y_test=labels[50000:51000], classes=np.array(_CIFAR10_CLASSES))


def _first_array(path: Path) -> np.ndarray:
    with np.load(path, allow_pickle=False) as z:
        return z[z.files[0]]


def _build_fashion(files: list[Path], out: Path) -> None:
    named = {p.name: p for p in files}
    x = _first_array(named["x_test.npz"]).reshape(-1, 28, 28)[:2000].astype(np.uint8)
    y = _first_array(named["y_test.npz"]).reshape(-1)[:2000].astype(np.uint8)
    np.savez_compressed(out, x=x, y=y, classes=np.array(_FASHION_CLASSES))


_CONVNETJS = "https://raw.githubusercontent.com/larrabeew/covnetJS/0d2866f/demo/cifar10/"
_NNVIS = "https://raw.githubusercontent.com/daniel-marcus/neuralnetvis/8f6eeee/public/data/fashion_mnist_20k/"
_AKAMASTER = "https://github.com/akamaster/pytorch_resnet_cifar10/raw/d5489e8/pretrained_models/"
_RESNET_SHA = {20: "12fca82f0bebc4135bf1f32f6e3710e61d5108578464b84fd6d7f5c1b04036c8",
               32: "d509ac1820d7f25398913559d7e81a13229b1e7adc5648e3bfa5e22dc137f850",
               44: "014dd6541728a1c700b1642ab640e211dc6eb8ed507d70697458dc8f8a0ae2e4",
               56: "4bfd97631478d6b638d2764fd2baff3edb1d7d82252d54439343b6596b9b5367"}

_GH = "https://raw.githubusercontent.com/"
_PYHESSIAN = _GH + "amirgholami/PyHessian/de8cf239ace21c7754ee599255897ebf3eed19cb/"
_CAPTUM = _GH + "pytorch/captum/faac08773131888714b15709b28494ebeea7f6eb/"
_CONVEX = _GH + "locuslab/convex_adversarial/2cd8149249b9e90383af10fc7e9b9fe90166813e/"
_ABCROWN = (_GH + "Verified-Intelligence/alpha-beta-CROWN/8250d5fbd530c76e5e3243db28b3cad5fbaef740/"
            "complete_verifier/models/")

#: The CIFAR-10 model zoo (:mod:`nclab.zoo`): name -> (folder, SHA-256, origin URL, licence). The
#: file is ``<folder>/<name>-<sha8>.<extension of the origin>``.
_ZOO_FILES: dict[str, tuple[str, str, str, str]] = {
    "pyhessian_resnet20": (
        "pyhessian_cifar10", "540b6fa4571068396e1e95c9159b14449dc2d18fa120476b209834b38214a719",
        _PYHESSIAN + "checkpoints/net.pkl", "MIT"),
    "captum_lenet": (
        "captum_cifar10", "228d8332085282b6d2626d1b1b1b17944c760507d9b0cabe318dc6b108acf6e9",
        _CAPTUM + "tutorials/models/cifar_torchvision.pt", "BSD-3-Clause"),
    "convex_small_linf8": (
        "convex_adversarial_cifar10",
        "f07c615f58616cbc7667974f146c4baa851bf0e71df8431a150abea8b7901f37",
        _CONVEX + "models_scaled/cifar_small_8px.pth", "MIT"),
    "convex_small_l2_36": (
        "convex_adversarial_cifar10",
        "d99894f1fe2866dd3509d3b2a69e16110e58c8d04bd696a070ad6e23d22f11b7",
        _CONVEX + "models_scaled_l2/cifar_small_36px.pth", "MIT"),
    "oval_base": (
        "abcrown_cifar10", "a1b07b56b4bbb758e4fb3471b2c140e8e8a43679bb8c032c2691095b2327275a",
        _ABCROWN + "oval/cifar_base.pth", "BSD-3-Clause"),
    "oval_wide": (
        "abcrown_cifar10", "1980beb15e180902fd48b50cd0ac24ac80d48f3ec166753d5773a7dc24d60a07",
        _ABCROWN + "oval/cifar_wide.pth", "BSD-3-Clause"),
    "oval_deep": (
        "abcrown_cifar10", "1ddec19e8e7c8adf636a9349ccd06841d1dca68b9bea5ad278b6d908252dfb58",
        _ABCROWN + "oval/cifar_deep.pth", "BSD-3-Clause"),
    "sdp_cnn_a_adv": (
        "abcrown_cifar10", "e45d79e68342395f4ada6f89852ae41feba14b430a3b2462a04d7f5e02c65657",
        _ABCROWN + "sdp/cifar_cnn_a_adv.model", "BSD-3-Clause"),
    "sdp_cnn_a_adv4": (
        "abcrown_cifar10", "f872a69536be3f0ab98397094bb7c3952d747b08321b81eafd00d9fab5eca0e7",
        _ABCROWN + "sdp/cifar_cnn_a_adv4.model", "BSD-3-Clause"),
    "sdp_cnn_a_adv_alt": (
        "abcrown_cifar10", "6540c5a9d9d0856a2870e5be19d7f2322a966cb30b5141f4116beb70dda59e46",
        _ABCROWN + "sdp/cifar_cnn_a_adv_alt.model", "BSD-3-Clause"),
    "sdp_cnn_a_mix": (
        "abcrown_cifar10", "5a1370f41961766db169ad9f945e9cc3157c9afd7986eac73bf2786c35dc3773",
        _ABCROWN + "sdp/cifar_cnn_a_mix.model", "BSD-3-Clause"),
    "sdp_cnn_a_mix4": (
        "abcrown_cifar10", "91d5ade259939afecdccbeb9f818f55f9c560466d9b5b0b01ecc86dc8eaa8d13",
        _ABCROWN + "sdp/cifar_cnn_a_mix4.model", "BSD-3-Clause"),
    "eran_conv_small_pgd": (
        "abcrown_cifar10", "01adb410a8f561aa19e53a2168ca5c71a795a72a2be18c80eb400cf2e54cdd50",
        _ABCROWN + "eran/cifar_conv_small_pgd.pth", "BSD-3-Clause"),
    "eran_conv_small_sigmoid": (
        "abcrown_cifar10", "dfe14ef941707436edccdc81b49bcd00051bb28c54a2f4dc4a5057fe4013c41a",
        _ABCROWN + "non_relu/cifar_conv_small_sigmoid.pth", "BSD-3-Clause"),
    "marabou_small": (
        "abcrown_cifar10", "29771132fd93c72d39d6a07f7d9a24933334fc9448dc23dc0dce38682050902f",
        _ABCROWN + "marabou_cifar10/cifar_marabou_small.pth", "BSD-3-Clause"),
    "marabou_medium": (
        "abcrown_cifar10", "a86f85b6d0204fc4b0fba49fbccbcddeb2cda79d8feec6e714d08c6a882b938d",
        _ABCROWN + "marabou_cifar10/cifar_marabou_medium.pth", "BSD-3-Clause"),
    "marabou_large": (
        "abcrown_cifar10", "ebc062429d071e7199c4cff81df158cd99c910ec3475347cf5007ceb0a9d593f",
        _ABCROWN + "marabou_cifar10/cifar_marabou_large.pth", "BSD-3-Clause"),
    "abcrown_resnet2b": (
        "abcrown_cifar10", "ef824b47175668e924d7fd409b5ef7e239012b8f0c31fefa66c643efda1eb05b",
        _ABCROWN + "cifar10_resnet/resnet2b.pth", "BSD-3-Clause"),
    "abcrown_resnet4b": (
        "abcrown_cifar10", "6158f9668935890e832d4e0fdc3b6cece2386ec826319eac36f329490b7729e7",
        _ABCROWN + "cifar10_resnet/resnet4b.pth", "BSD-3-Clause"),
}

#: Every file of the mirror by name.
MIRROR: dict[str, MirrorFile] = {
    "cifar10_2k": MirrorFile(
        "data", "cifar10/cifar10_train2k_test1k.npz",
        "31329c35acba63d05fe09fdcb6e337f764c780095165d2b9380f310fb725e3b1",
        tuple(_CONVNETJS + f for f in ("cifar10_batch_0.png", "cifar10_batch_1.png",
                                       "cifar10_batch_50.png", "cifar10_labels.js")),
        "real CIFAR-10, lossless: the first 2000 training and the first 1000 test images",
        "CIFAR-10 terms (Krizhevsky 2009)",
        content_sha256="b3c7cb07a5dda63d166f9193c61b43b4f01f1d20b005f296429003f87143dad9",
        build=_build_cifar10),
    "fashion_mnist_2k": MirrorFile(
        "data", "fashion_mnist/fashion_mnist_test2k.npz",
        "ad94795dd08a0ea3ad5b2904bda9eddf44cd823fe132ccb327f1835e93a69798",
        (_NNVIS + "x_test.npz", _NNVIS + "y_test.npz"),
        "real Fashion-MNIST: the first 2000 test images (28x28 grey)",
        "MIT (Zalando Research)",
        content_sha256="609818df01781f429f55f2512cf00c213cabf9907b8f5508d9520c1cfbeb54b7",
        build=_build_fashion),
    **{f"resnet{n}": MirrorFile(
        "weights", f"akamaster_cifar10/resnet{n}-{sha[:8]}.th", sha,
        (f"{_AKAMASTER}resnet{n}-{sha[:8]}.th",),
        f"CIFAR-10-trained ResNet-{n} (option-A shortcuts), akamaster/pytorch_resnet_cifar10",
        "BSD-2-Clause") for n, sha in _RESNET_SHA.items()},
    **{name: MirrorFile(
        "weights", f"{folder}/{name}-{sha[:8]}{os.path.splitext(url)[1]}", sha, (url,),
        f"CIFAR-10-trained zoo network {name} (nclab.zoo), {url.split('/')[3]}/{url.split('/')[4]}",
        licence) for name, (folder, sha, url, licence) in _ZOO_FILES.items()},
}


# --------------------------------------------------------------------------- fetch


def _download(url: str, dest: Path, timeout: float = 30.0) -> None:
    with urllib.request.urlopen(url, timeout=timeout) as r, open(dest, "wb") as f:  # noqa: S310
        shutil.copyfileobj(r, f)


#: Files verified in this process: path -> (size, mtime_ns) when it was hashed. A file changed on
#: disk since then (other size or time) is hashed again; an unchanged one is not re-read.
_VERIFIED: dict[Path, tuple[int, int]] = {}


def _stamp(path: Path) -> tuple[int, int]:
    st = path.stat()
    return st.st_size, st.st_mtime_ns


def _verify(spec: MirrorFile, path: Path) -> None:
    got = file_sha256(path)
    if got == spec.sha256:
        return
    if spec.content_sha256 is not None and zipfile.is_zipfile(path):
        try:
            if content_sha256(path) == spec.content_sha256:
                return  # rebuilt from the origin files: same arrays, other zip bytes
        except (ValueError, OSError, zipfile.BadZipFile):
            pass
    raise MirrorHashMismatch(
        f"{path} has SHA-256 {got}, expected {spec.sha256} ({spec.about}). The file is damaged "
        f"or not the published one: delete it and fetch it again from {spec.origins[0]}"
        + (" (and its sibling origin files)" if len(spec.origins) > 1 else "") + "."
    )


def verify(name: str, path: str | os.PathLike) -> None:
    """Raise :class:`MirrorHashMismatch` unless the file at ``path`` is mirror file ``name`` (its
    SHA-256, or for a dataset rebuilt from its origin files the SHA-256 of its arrays)."""
    _verify(MIRROR[name], Path(path))


def _missing_message(name: str, spec: MirrorFile, why: str) -> str:
    where = "NCLAB_DATA" if spec.kind == "data" else "NCLAB_WEIGHTS"
    origins = "\n    ".join(spec.origins)
    how = ("download it and put it there" if spec.build is None else
           "download these origin files and let nclab rebuild it (nclab.mirror.fetch"
           f"({name!r}) on a machine with internet does exactly that), or copy the published "
           "file from a machine that has it")
    return (
        f"mirror file {name!r} ({spec.about}) is not at {spec.local_path()} and cannot be "
        f"downloaded ({why}).\n  public origin:\n    {origins}\n  expected SHA-256 "
        f"{spec.sha256}\n  To use it offline, {how}; or point {where} at a folder that holds "
        f"{spec.path}. Licence: {spec.licence}."
    )


def fetch(name: str, download: bool = True) -> Path:
    """The local path of mirror file ``name`` (:data:`MIRROR`), verified by SHA-256.

    Missing and ``download`` with the origin reachable: downloaded (datasets rebuilt from their
    origin files) and verified. Missing otherwise: :class:`MirrorFileMissing` within ~3 s per
    origin host. A hash that differs: :class:`MirrorHashMismatch`."""
    if name not in MIRROR:
        raise ValueError(f"unknown mirror file {name!r}; the mirror holds: {', '.join(MIRROR)}")
    spec = MIRROR[name]
    path = spec.local_path()
    if path.is_file():
        if _VERIFIED.get(path) != _stamp(path):
            _verify(spec, path)
            _VERIFIED[path] = _stamp(path)
        return path
    if not download:
        raise MirrorFileMissing(_missing_message(name, spec, "download=False"))
    if _offline():
        raise MirrorFileMissing(_missing_message(name, spec, "NCLAB_OFFLINE/HF_HUB_OFFLINE is set"))
    if not _reachable(spec.origins[0]):
        host = urlparse(spec.origins[0]).hostname
        raise MirrorFileMissing(_missing_message(name, spec, f"{host} is unreachable"))
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
        tmp_dir = Path(tmp)
        files = []
        for url in spec.origins:
            dest = tmp_dir / os.path.basename(urlparse(url).path)
            _download(url, dest)
            files.append(dest)
        built = tmp_dir / ("built" + path.suffix)
        if spec.build is not None:
            spec.build(files, built)
        else:
            built = files[0]
        _verify(spec, built)
        os.replace(built, path)
    print(f"fetched {name} into {path}")
    return path


def _state(name: str) -> str:
    """``ok``, ``missing`` or ``bad hash`` for mirror file ``name`` (never downloads)."""
    try:
        fetch(name, download=False)
    except MirrorFileMissing:
        return "missing"
    except MirrorHashMismatch:
        return "bad hash"
    return "ok"


def is_available(name: str) -> bool:
    """Whether mirror file ``name`` is on disk with the expected hash (never downloads)."""
    return _state(name) == "ok"


def status() -> list[dict[str, str]]:
    """One row per mirror file: name, kind, local path, and ``ok`` / ``missing`` / ``bad hash``."""
    return [{"name": name, "kind": spec.kind, "path": str(spec.local_path()), "state": _state(name)}
            for name, spec in MIRROR.items()]
