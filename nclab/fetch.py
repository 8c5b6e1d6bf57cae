"""Everything a profile downloads, fetched before class: ``nclab fetch --profile course``.

:func:`plan` lists every file a profile's chapters and assignments read from the network: the
torchvision datasets (archives checked by torchvision's own MD5, extracted into the layout
:func:`nclab.data.load` reads under ``$NCLAB_DATA``), the torchvision ImageNet weights (into the
torch hub cache, checked by the SHA-256 prefix in their file names, as ``torch.hub`` does), the
timm / open_clip weights (into the Hugging Face cache, checked by the SHA-256 the hub publishes as
the file's ETag) and the files of the local mirror (:mod:`nclab.mirror`, checked by their pinned
SHA-256). :func:`fetch` downloads what is missing with a progress bar, resuming a partial
``<file>.part`` with an HTTP ``Range`` request; a file whose checksum differs is deleted and
:class:`ChecksumMismatch` names it. Every origin host is probed first with a short connect timeout,
so offline each source fails within seconds (:class:`SourceUnreachable`, naming the files and
their URLs). Datasets that no script can download (miniImageNet) are listed with instructions.

Sizes are bytes; a size not known to the byte (the weights, from torchvision's metadata in MiB with
three decimals or from the parameter count, and some archives) is marked approximate.
"""

from __future__ import annotations

import os
import re
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

from . import mirror
from .data import DATASETS
from .models import BACKBONES
from .net import offline, reachable
from .runtime import Profile, data_dir

__all__ = [
    "ChecksumMismatch",
    "FetchError",
    "FetchItem",
    "SourceUnreachable",
    "TORCHVISION_ARCHIVES",
    "HF_WEIGHTS",
    "download",
    "fetch",
    "format_plan",
    "human_size",
    "plan",
    "total_size",
]


class FetchError(RuntimeError):
    """A file of the plan could not be fetched."""


class ChecksumMismatch(FetchError):
    """A downloaded file's checksum is not the published one (the file was deleted)."""


class SourceUnreachable(FetchError):
    """The origin host of a file does not answer within the connect timeout (offline)."""


@dataclass(frozen=True)
class FetchItem:
    """One file of a plan.

    ``kind``: ``dataset`` (torchvision archive), ``torchvision`` (ImageNet weights), ``hf`` (timm /
    open_clip weights in the Hugging Face cache), ``mirror`` (:data:`nclab.mirror.MIRROR`) or
    ``manual`` (cannot be downloaded: ``about`` says how to get it). ``dest``: the file's path
    (``hf``: the repository's folder in the Hugging Face cache). ``size``: bytes, ``exact`` when
    known to the byte. Checks: ``md5`` (torchvision's), ``sha256`` (pinned), ``sha256_prefix``
    (torch hub file names). ``extract_to``: the folder an archive is extracted into;
    ``extracted``: the folder whose presence shows it was. ``used_by``: what reads the file.
    """

    name: str
    kind: str
    url: str
    dest: Path
    size: int | None
    exact: bool
    used_by: str
    about: str = ""
    md5: str | None = None
    sha256: str | None = None
    sha256_prefix: str | None = None
    extract_to: Path | None = None
    extracted: Path | None = None
    hf_repo: str | None = None
    hf_file: str | None = None

    @property
    def check(self) -> str:
        """The checksum the file is verified by, in words."""
        if self.md5:
            return "MD5 (torchvision)"
        if self.sha256:
            return "SHA-256 (pinned)"
        if self.sha256_prefix:
            return "SHA-256 prefix (file name)"
        if self.kind == "hf":
            return "SHA-256 (hub ETag)"
        if self.kind == "mirror":
            return "SHA-256 of arrays (pinned)"
        return "none published"


# --------------------------------------------------------------------------- tables

#: The torchvision dataset archives, by registry name -> ((file name, URL, MD5 or None, size in bytes,
#: size exact?, download folder relative to the data root, extracted folder relative to the data
#: root), ...). URLs and MD5s are torchvision 0.29's (``CIFAR10.url``/``tgz_md5``, ``DTD._URL``/
#: ``_MD5``, ``OxfordIIITPet._RESOURCES``, ``FGVCAircraft._URL``, which publishes no checksum);
#: tests/test_fetch.py checks them against the installed torchvision. The two CIFAR sizes are
#: exact; the others are approximate.
TORCHVISION_ARCHIVES: dict[str, tuple[tuple[str, str, str | None, int, bool, str, str], ...]] = {
    "cifar10": (("cifar-10-python.tar.gz", "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
                 "c58f30108f718f92721af3b95e74349a", 170_498_071, True, ".", "cifar-10-batches-py"),),
    "cifar100": (("cifar-100-python.tar.gz",
                  "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
                  "eb9058c3a382ffc7106e4002c42a8d85", 169_001_437, True, ".", "cifar-100-python"),),
    "dtd": (("dtd-r1.0.1.tar.gz",
             "https://www.robots.ox.ac.uk/~vgg/data/dtd/download/dtd-r1.0.1.tar.gz",
             "fff73e5086ae6bdbea199a49dfb8a4c1", 625_000_000, False, "dtd", "dtd/dtd"),),
    "oxford_pets": (
        ("images.tar.gz", "https://www.robots.ox.ac.uk/~vgg/data/pets/data/images.tar.gz",
         "5c4f3ee8e5d25df40f4fd59a7f44e54c", 792_000_000, False, "oxford-iiit-pet",
         "oxford-iiit-pet/images"),
        ("annotations.tar.gz", "https://www.robots.ox.ac.uk/~vgg/data/pets/data/annotations.tar.gz",
         "95a8c909bbe2e81eed6a22bccdf3f68f", 19_000_000, False, "oxford-iiit-pet",
         "oxford-iiit-pet/annotations"),
    ),
    "fgvc_aircraft": (("fgvc-aircraft-2013b.tar.gz",
                       "https://www.robots.ox.ac.uk/~vgg/data/fgvc-aircraft/archives/"
                       "fgvc-aircraft-2013b.tar.gz",
                       None, 2_750_000_000, False, ".", "fgvc-aircraft-2013b"),),
}

#: Weights from the Hugging Face hub, by backbone name -> (repository, file, approximate size in bytes
#: = parameters x 4 bytes of float32, as counted from the architecture). The repository and file are
#: the ones :func:`nclab.models.load_backbone` (timm's default tag, open_clip ``openai``) and
#: ``timm.create_model(..., pretrained=True)`` read; tests/test_fetch.py checks them against timm and
#: open_clip.
HF_WEIGHTS: dict[str, tuple[str, str, int]] = {
    "vit_b32": ("timm/vit_base_patch32_224.augreg_in21k_ft_in1k", "model.safetensors", 352_896_928),
    "clip_vit_b32": ("timm/vit_base_patch32_clip_224.openai", "open_clip_model.safetensors",
                     605_109_252),
    "convnext_atto": ("timm/convnext_atto.d2_in1k", "model.safetensors", 14_782_080),
}

#: Few-shot split families and the registry dataset each is cut from (None: bundled or manual).
_FEWSHOT_SOURCE = {"cifar_fs": "cifar100", "cifar10_fs": "cifar10_2k",
                   "fashion_mnist_fs": "fashion_mnist_2k", "digits_fs": None, "miniimagenet": None}

#: What notebooks load by a literal name beyond the studies' configuration: profile -> {name: user}.
_NOTEBOOK_EXTRAS: dict[str, dict[str, str]] = {
    "real": {"resnet20": "assignment 02", "fashion_mnist_2k": "assignment 02"},
    "course": {"convnext_atto": "assignment 03"},
    "paper": {"convnext_atto": "assignment 03"},
}


# --------------------------------------------------------------------------- the plan


def _needs(prof: Profile) -> dict[str, list[str]]:
    """Registry names (datasets and backbones) the profile reads -> the chapters that read them."""
    from .collapse import quickstart
    from .collapse import study as collapse_study
    from .downstream import recipe_study
    from .downstream import study as downstream_study
    from .fewshot import study as fewshot_study
    from .finetune_study import study as finetune_study

    out: dict[str, list[str]] = {}

    def add(name: str | None, user: str) -> None:
        if name and user not in out.setdefault(name, []):
            out[name].append(user)

    qs = quickstart(prof)
    add(qs.dataset, "ch. 00")
    if qs.pretrained:
        add(qs.arch, "ch. 00")
    cs = collapse_study(prof)
    for d in (cs.terminal_data, cs.images, cs.projection_source, cs.projection_downstream):
        add(d, "ch. 01")
    for m in (*cs.models, *((cs.projection_model,) if cs.projection_pretrained else ())):
        add(m, "ch. 01")
    ds = downstream_study(prof)
    for m in (*ds.models, *ds.family, *ds.one_family, ds.encoder):
        add(m, "ch. 02")
    for t in (*ds.tasks, *ds.encoder_tasks, *((ds.source,) if ds.source else ())):
        add(t.dataset, "ch. 02")
    add(prof.source, "ch. 03")
    for d in prof.downstream:
        add(d, "ch. 03")
    rs = recipe_study(prof)
    for m in rs.models:
        add(m, "ch. 03")
    for t in (*rs.tasks, *((rs.source,) if rs.source else ())):
        add(t.dataset, "ch. 03")
    fs = fewshot_study(prof)
    add(_FEWSHOT_SOURCE.get(fs.dataset), "ch. 04")
    add(_FEWSHOT_SOURCE.get(fs.cross_domain or ""), "ch. 04")
    for m in fs.cross_models:
        add(m, "ch. 04")
    ft = finetune_study(prof)
    for m in (ft.backbone, ft.second):
        add(m, "ch. 05")
    add(ft.downstream, "ch. 05")
    for name, user in _NOTEBOOK_EXTRAS.get(prof.name, {}).items():
        add(name, user)
    return out


def _tv_weights(arch: str) -> tuple[str, int]:
    """URL and approximate size (torchvision's ``_file_size`` in MiB) of ``IMAGENET1K_V1``."""
    from torchvision.models import get_model_weights

    w = get_model_weights(arch)["IMAGENET1K_V1"]
    return w.url, round(float(w.meta.get("_file_size", 0.0)) * 2**20)


def _hf_cache() -> Path:
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def _items_for(name: str, users: list[str]) -> list[FetchItem]:
    used_by = ", ".join(sorted(users))
    root = data_dir()
    if name in mirror.MIRROR:
        spec = mirror.MIRROR[name]
        url = spec.origins[0] + (f" (+{len(spec.origins) - 1} more)" if len(spec.origins) > 1 else "")
        return [FetchItem(name, "mirror", url, spec.local_path(), _MIRROR_SIZES.get(name),
                          spec.build is None, used_by, spec.about,
                          sha256=spec.sha256 if spec.build is None else None)]
    if name in TORCHVISION_ARCHIVES:
        return [FetchItem(name if len(TORCHVISION_ARCHIVES[name]) == 1 else f"{name}/{fname}",
                          "dataset", url, root / folder / fname, size, exact, used_by,
                          f"torchvision {DATASETS[name].tv_name}", md5=md5,
                          extract_to=root / folder, extracted=root / marker)
                for fname, url, md5, size, exact, folder, marker in TORCHVISION_ARCHIVES[name]]
    if name in HF_WEIGHTS:
        repo, fname, size = HF_WEIGHTS[name]
        about = BACKBONES[name].about if name in BACKBONES else f"timm {name} (ImageNet-1k)"
        return [FetchItem(name, "hf", f"https://huggingface.co/{repo}/resolve/main/{fname}",
                          _hf_cache() / f"models--{repo.replace('/', '--')}", size, False, used_by,
                          about, hf_repo=repo, hf_file=fname)]
    spec = BACKBONES.get(name)
    if spec is not None and spec.source == "torchvision":
        import torch

        url, size = _tv_weights(spec.arch)
        fname = os.path.basename(url)
        prefix = re.search(r"-([a-f0-9]+)\.", fname)
        return [FetchItem(name, "torchvision", url, Path(torch.hub.get_dir()) / "checkpoints" / fname,
                          size, False, used_by, spec.about,
                          sha256_prefix=prefix.group(1) if prefix else None)]
    return []  # bundled (digits) or trained in the chapter (small nets)


#: Sizes of the mirror files in bytes: the published files (exact). The two datasets are rebuilt
#: from their origin files, whose download is about the size of the file built from them.
_MIRROR_SIZES: dict[str, int] = {
    "cifar10_2k": 8_504_982, "fashion_mnist_2k": 886_334,
    "resnet20": 1_099_231, "resnet32": 1_890_043, "resnet44": 2_680_855, "resnet56": 3_471_733,
    "pyhessian_resnet20": 1_120_314, "captum_lenet": 249_703, "convex_small_linf8": 2_755_704,
    "convex_small_l2_36": 1_830_278, "oval_base": 425_358, "oval_wide": 861_167, "oval_deep": 221_666,
    "sdp_cnn_a_adv": 862_519, "sdp_cnn_a_adv4": 862_519, "sdp_cnn_a_adv_alt": 862_519,
    "sdp_cnn_a_mix": 862_519, "sdp_cnn_a_mix4": 862_519, "eran_conv_small_pgd": 504_448,
    "eran_conv_small_sigmoid": 1_015_551, "marabou_small": 344_457, "marabou_medium": 665_609,
    "marabou_large": 1_357_001, "abcrown_resnet2b": 453_823, "abcrown_resnet4b": 504_281,
}


def _manual(prof: Profile) -> list[FetchItem]:
    if prof.name not in ("course", "paper"):
        return []
    return [FetchItem(
        "miniimagenet", "manual", "https://image-net.org/download.php (ImageNet, registration)",
        data_dir() / "miniimagenet", None, False, "ch. 04 (optional: fewshot.load_split('miniimagenet'))",
        "miniImageNet cannot be downloaded by a script: build it from ImageNet (Ravi & Larochelle "
        "2017 splits; the wnids are in nclab/resources/miniimagenet_{train,val,test}_wnids.txt) as "
        f"{data_dir() / 'miniimagenet'}/<split>/<wnid>/*.jpg")]


def plan(profile: str | Profile | None = None) -> list[FetchItem]:
    """Every file ``profile`` (a name, a :class:`~nclab.runtime.Profile`, or None for the active
    one) downloads, in a fixed order: datasets, weights, mirror files, then manual ones."""
    from .runtime import profile as active_profile

    prof = active_profile(profile)
    items: list[FetchItem] = []
    for name, users in _needs(prof).items():
        items += _items_for(name, users)
    order = {"dataset": 0, "torchvision": 1, "hf": 2, "mirror": 3}
    items.sort(key=lambda it: order[it.kind])
    return items + _manual(prof)


def total_size(items: Iterable[FetchItem]) -> tuple[int, bool]:
    """Sum of the sizes of the downloadable items and whether every one of them is exact."""
    items = [it for it in items if it.kind != "manual"]
    return sum(it.size or 0 for it in items), all(it.exact and it.size is not None for it in items)


def human_size(n: int | None, exact: bool = True) -> str:
    """``n`` bytes in decimal units (B, kB, MB, GB), ``approx.`` in front when not exact."""
    if n is None:
        return "unknown"
    size: float = n
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if size < 1000 or unit == "TB":
            break
        size /= 1000
    text = f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
    return text if exact else f"approx. {text}"


def format_plan(items: list[FetchItem], profile_name: str) -> str:
    """The plan as a Markdown table (file, origin, size, check, used by) and a total line."""
    rows = [it for it in items if it.kind != "manual"]
    lines = [f"Plan for profile `{profile_name}`: {len(rows)} file(s) to download.", "",
             "| file | origin | size | check | used by |", "|---|---|---|---|---|"]
    for it in rows:
        lines.append(f"| {it.name} | {it.url} | {human_size(it.size, it.exact)} | {it.check} | "
                     f"{it.used_by} |")
    total, exact = total_size(items)
    lines += ["", f"Total: {human_size(total, exact)} ({total:,} bytes{'' if exact else ', approx.'})."]
    roots = sorted({f"{it.kind}: {it.dest.parent if it.kind != 'dataset' else it.extract_to}"
                    for it in rows})
    if roots:
        lines += ["Destinations:"] + [f"  {r}" for r in roots]
    for it in items:
        if it.kind == "manual":
            lines += ["", f"Manual ({it.used_by}): {it.name} from {it.url}: {it.about}."]
    return "\n".join(lines)


# --------------------------------------------------------------------------- downloading


def _verify(path: Path, name: str, url: str, md5: str | None = None, sha256: str | None = None,
            sha256_prefix: str | None = None) -> None:
    """Raise :class:`ChecksumMismatch` (after deleting ``path``) unless its hash is the expected one."""
    checks = [("MD5", "md5", md5, False), ("SHA-256", "sha256", sha256, False),
              ("SHA-256 prefix", "sha256", sha256_prefix, True)]
    for label, algo, want, prefix in checks:
        if not want:
            continue
        got = mirror.file_digest(path, algo)
        if (got.startswith(want.lower()) if prefix else got == want.lower()):
            continue
        path.unlink(missing_ok=True)
        raise ChecksumMismatch(
            f"{name}: the file downloaded from {url} has {label} {got[:len(want)] if prefix else got}, "
            f"expected {want}; it was deleted. Run the fetch again; if it fails the same way, the "
            "origin serves another file than the published one.")


def download(url: str, dest: str | os.PathLike, name: str | None = None, size: int | None = None,
             md5: str | None = None, sha256: str | None = None, sha256_prefix: str | None = None,
             timeout: float = 5.0, progress: bool = True, chunk: int = 1 << 20) -> Path:
    """Download ``url`` to ``dest``, resuming ``dest.part`` with ``Range: bytes=<size of .part>-``.

    The host is probed first (TCP connect, ``timeout`` seconds in total): unreachable, it raises
    :class:`SourceUnreachable` naming the file and URL. The finished file is verified (``md5``,
    ``sha256``, or ``sha256_prefix``) and moved to ``dest`` only when it matches; otherwise the
    partial file is deleted and :class:`ChecksumMismatch` is raised. A server that ignores the range
    (status 200) restarts the file; one that answers 416 means the ``.part`` is already complete."""
    from tqdm.auto import tqdm

    dest = Path(dest)
    name = name or dest.name
    if not reachable(url, timeout):
        host = urlparse(url).netloc
        raise SourceUnreachable(f"{name}: {host} does not answer within {timeout:g} s (offline?). "
                                f"Fetch {url} into {dest} on a machine with internet.")
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    offset = part.stat().st_size if part.is_file() else 0
    req = urllib.request.Request(url, headers={"User-Agent": "nclab-fetch"})
    if offset:
        req.add_header("Range", f"bytes={offset}-")
    try:
        resp = urllib.request.urlopen(req, timeout=max(timeout, 30.0))  # noqa: S310
    except urllib.error.HTTPError as err:
        if err.code != 416 or not offset:
            raise FetchError(f"{name}: {url} answered HTTP {err.code} {err.reason}") from err
        resp = None  # the .part already holds the whole file
    except (urllib.error.URLError, OSError) as err:
        raise SourceUnreachable(f"{name}: could not open {url} ({err}). Fetch it into {dest} "
                                "on a machine with internet.") from err
    if resp is not None:
        with resp:
            resumed = offset and resp.status == 206
            mode = "ab" if resumed else "wb"
            start = offset if resumed else 0
            length = resp.headers.get("Content-Length")
            total = start + int(length) if length and length.isdigit() else size
            with open(part, mode) as f, tqdm(total=total, initial=start, unit="B", unit_scale=True,
                                             unit_divisor=1024, desc=name, disable=not progress,
                                             leave=False) as bar:
                while block := resp.read(chunk):
                    f.write(block)
                    bar.update(len(block))
    _verify(part, name, url, md5, sha256, sha256_prefix)
    os.replace(part, dest)
    return dest


def _present(it: FetchItem) -> bool:
    """Whether ``it`` is already where its loader reads it (datasets: extracted; verified files)."""
    if it.kind == "dataset":
        return bool(it.extracted and it.extracted.is_dir())
    if it.kind == "mirror":
        return mirror.is_available(it.name)
    if it.kind == "hf":
        from huggingface_hub import try_to_load_from_cache

        return isinstance(try_to_load_from_cache(it.hf_repo, it.hf_file), str)
    return it.dest.is_file()


def _fetch_hf(it: FetchItem, timeout: float) -> None:
    from huggingface_hub import hf_hub_download

    if not reachable(it.url, timeout):
        raise SourceUnreachable(f"{it.name}: huggingface.co does not answer within {timeout:g} s "
                                f"(offline?). Fetch {it.url} (huggingface-cli download {it.hf_repo} "
                                f"{it.hf_file}) into the Hugging Face cache {_hf_cache()}.")
    path = Path(hf_hub_download(it.hf_repo, it.hf_file))  # resumes, shows a tqdm bar
    blob = path.resolve().name
    if re.fullmatch(r"[0-9a-f]{64}", blob):  # LFS blobs are named by their SHA-256
        _verify(path.resolve(), it.name, it.url, sha256=blob)


def _fetch_mirror(it: FetchItem, timeout: float, progress: bool) -> None:
    spec = mirror.MIRROR[it.name]
    if spec.build is None:
        download(it.url, it.dest, it.name, it.size, sha256=spec.sha256, timeout=timeout,
                 progress=progress)
        return
    staging = it.dest.parent / f".fetch-{it.name}"
    files = [download(u, staging / os.path.basename(urlparse(u).path), f"{it.name}/"
                      f"{os.path.basename(urlparse(u).path)}", timeout=timeout, progress=progress)
             for u in spec.origins]
    built = staging / ("built" + it.dest.suffix)
    spec.build(files, built)
    try:
        mirror.verify(it.name, built)
    except mirror.MirrorHashMismatch as err:
        built.unlink(missing_ok=True)
        raise ChecksumMismatch(f"{it.name}: {err}") from err
    os.replace(built, it.dest)
    for f in files:
        f.unlink(missing_ok=True)
    staging.rmdir()


def _fetch_one(it: FetchItem, timeout: float, progress: bool) -> None:
    if it.kind == "hf":
        _fetch_hf(it, timeout)
    elif it.kind == "mirror":
        _fetch_mirror(it, timeout, progress)
    elif it.kind == "dataset":
        if not it.dest.is_file():
            download(it.url, it.dest, it.name, it.size, md5=it.md5, timeout=timeout, progress=progress)
        else:
            _verify(it.dest, it.name, it.url, md5=it.md5)
        from torchvision.datasets.utils import extract_archive

        extract_archive(str(it.dest), str(it.extract_to))
    else:
        download(it.url, it.dest, it.name, it.size, sha256_prefix=it.sha256_prefix, timeout=timeout,
                 progress=progress)


def fetch(items: list[FetchItem], timeout: float = 5.0, progress: bool = True,
          log: Callable[[str], None] = print) -> list[tuple[FetchItem, str]]:
    """Fetch every item of a :func:`plan` that is not yet in place; returns ``(item, state)`` with
    state ``present``, ``fetched``, ``manual`` or the error message. Once a host failed to answer,
    its other files fail at once (no second wait); an offline switch (``NCLAB_OFFLINE``,
    ``HF_HUB_OFFLINE``) fails every missing file at once."""
    results: list[tuple[FetchItem, str]] = []
    dead: dict[str, str] = {}
    for it in items:
        if it.kind == "manual":
            log(f"manual  {it.name}: {it.about}")
            results.append((it, "manual"))
            continue
        if _present(it):
            log(f"present {it.name}")
            results.append((it, "present"))
            continue
        host = urlparse(it.url).netloc
        t0 = time.perf_counter()
        try:
            if offline():
                raise SourceUnreachable(f"{it.name}: an offline switch (NCLAB_OFFLINE/HF_HUB_OFFLINE) "
                                        f"is set. Fetch {it.url} into {it.dest}.")
            if host in dead:
                raise SourceUnreachable(f"{it.name}: {host} did not answer ({dead[host]}). Fetch "
                                        f"{it.url} into {it.dest}.")
            _fetch_one(it, timeout, progress)
        except SourceUnreachable as err:
            dead.setdefault(host, "no answer")
            log(f"FAILED  {err}")
            results.append((it, str(err)))
            continue
        except FetchError as err:
            log(f"FAILED  {err}")
            results.append((it, str(err)))
            continue
        log(f"fetched {it.name} ({human_size(it.size, it.exact)}) in {time.perf_counter() - t0:.0f} s"
            f" -> {it.dest}")
        results.append((it, "fetched"))
    return results
