"""Chapter 02's studies: downstream NC1 vs linear-probe accuracy across models, layers and tasks.

Everything that differs between profiles is in :class:`DownstreamStudy` (:func:`study`); the
chapter reads it and calls the functions below. Features are computed once per process:
:func:`features` caches the pooled features of every (model, initialisation, task, taps) on the
task's whole *pool* (its train and test images together); a probe seed ``s`` then draws a
stratified train/test split of that pool (:func:`split`), so the three seeds cost three probes,
not three forward passes. For seed ``s`` and task ``t`` a model gets

- ``nc1``: NC1 of its features on the seed's downstream *training* part (paper eq. 4),
- ``h_score``, ``logme``: the two transferability scores on the same features (:mod:`nclab.transfer`),
- ``train_acc``, ``test_acc``: a linear probe (:func:`nclab.probe.linear_probe`) fitted on the
  training part and scored on the test part.

:func:`correlations` then gives, per task and seed, Pearson r (on ``log10 NC1`` for NC1) and
Spearman ρ between a score and the accuracy, with percentile-bootstrap intervals over models.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace

import numpy as np
import torch
from torch import nn

from .correlation import bootstrap_ci, pearson, spearman
from .data import TensorDataset, batches, class_subset, load_tensors
from .features import extract
from .metrics import nc1
from .models import BACKBONES, blocks, load_backbone, normalization
from .probe import linear_probe
from .runtime import Profile, cpu_threads, device, seed_everything
from .transfer import h_score, logme
from .zoo import recipe_family

__all__ = ["CLAIMS", "DownstreamStudy", "Task", "across_datasets", "across_models", "backbone",
           "clear_cache", "compare_scores", "correlations", "features", "layer_choice",
           "layer_fits", "layerwise", "recipe_study", "source_collapse", "split", "study", "with_models",
           "zoo_table"]


@dataclass(frozen=True)
class Task:
    """A downstream task: registry ``dataset`` (:mod:`nclab.data`), optionally restricted to
    ``classes`` (relabelled 0..len-1), shown as ``name``."""

    name: str
    dataset: str
    classes: tuple[int, ...] | None = None


@dataclass(frozen=True)
class DownstreamStudy:
    """What chapter 02 runs in one profile.

    ``models``: the across-model zoo (registry names, or ``"<arch>-w<width>"`` small nets that
    :func:`backbone` pre-trains on ``source``). ``one_family``: the models of one architecture
    family and recipe, for the across-model contrast. ``family``: the models whose every block is
    probed, pre-trained and at random initialisation (:func:`layerwise`).
    ``tasks``: downstream tasks; ``seeds``: probe seeds, each a stratified ``1 - test_fraction``
    / ``test_fraction`` split of a task's pool (``resplit``; else the dataset's own split and
    the first seed only); ``layer_seeds``: the seeds of :func:`layerwise` (None: the same; fewer
    keep a deep family's block-by-block probes affordable). ``encoder``/``encoder_tasks``: the
    one frozen model of the
    across-datasets section. ``checked``: the claims the chapter asserts in this profile (each
    held on every seed when measured). ``n_boot``: bootstrap resamples of each interval.
    """

    profile: str
    models: tuple[str, ...]
    one_family: tuple[str, ...]
    family: tuple[str, ...]
    tasks: tuple[Task, ...]
    seeds: tuple[int, ...]
    image_size: int
    batch_size: int
    encoder: str
    encoder_tasks: tuple[Task, ...]
    source: Task | None = None
    pretrain_epochs: int = 0
    resplit: bool = True
    test_fraction: float = 0.3
    max_per_class: int | None = None
    n_boot: int = 1000
    checked: frozenset[str] = field(default_factory=frozenset)
    cpu_threads: int | None = None
    layer_seeds: tuple[int, ...] | None = None

    def probe_seeds(self) -> tuple[int, ...]:
        """The seeds the probes run with (the first only without ``resplit``)."""
        return self.seeds if self.resplit else self.seeds[:1]

    def layer_probe_seeds(self) -> tuple[int, ...]:
        """The seeds of :func:`layerwise`: ``layer_seeds`` if set, else :meth:`probe_seeds`."""
        return self.layer_seeds if self.layer_seeds is not None else self.probe_seeds()

    def setup(self) -> None:
        """Seed everything with the first seed; on a CPU, use ``cpu_threads`` intra-op threads
        (small models on a shared CPU run faster on one thread than on several)."""
        seed_everything(self.seeds[0])
        if self.cpu_threads is not None:
            cpu_threads(self.cpu_threads)


#: small-net shapes of the smoke zoo (five-block ConvNets, six-block ResNets)
SMALL_ARCH = {"convnet_s": {"depth": 5}, "resnet_s": {"depths": (2, 2, 2)}}

#: The claims chapter 02 can assert, by name; a profile's ``checked`` names those that held on
#: every seed when measured in that profile.
CLAIMS: dict[str, str] = {
    "zoo_nc1_negative": "r(log NC1, acc) and rho < 0 across the zoo, every task and seed",
    "zoo_nc1_interval": "... and both bootstrap intervals below 0",
    "family_sign_unstable": "over the one-family models r(log NC1, acc) takes both signs",
    "layer_r_negative": "layer-wise r(NC1, acc) < 0 for every model, init, task and seed",
    "layer_median_below": "median layer-wise r of the pre-trained runs < -0.5",
    "last_more_collapsed": "last block more collapsed than the first in every pre-trained run",
    "fig3_weaker": "every pre-trained layer-wise r2 below the paper's ResNet-34 value",
    "pre_more_collapsed_inside": "the most collapsed block of a pre-trained net is more collapsed "
                                 "than its random-init control's, in every run",
    "nc1_pick_beats_last": "NC1's pick of block probes better than the last block in every "
                           "pre-trained run",
    "scores_tie": "no paired interval separates H-score or LogME from NC1",
}
# measured with probe seeds 0, 1, 2 (layer claims in `real` on all three seeds, although the chapter
# runs the layer-wise study on the first only)
_REAL_CHECKED = frozenset(CLAIMS)
_SMOKE_CHECKED = frozenset({"zoo_nc1_negative", "layer_r_negative", "layer_median_below",
                            "last_more_collapsed", "fig3_weaker", "pre_more_collapsed_inside"})


def study(profile: str | Profile | None = None) -> DownstreamStudy:
    """Chapter 02's :class:`DownstreamStudy` for ``profile`` (a name, a
    :class:`~nclab.runtime.Profile`, or None for the active one)."""
    from .runtime import profile as active_profile
    from .zoo import ZOO

    prof = active_profile(profile)
    common = dict(profile=prof.name, seeds=prof.seeds, batch_size=prof.batch_size)
    if prof.name == "smoke":
        digits_task = Task("digits 5-9", "digits", (5, 6, 7, 8, 9))
        subsets = {"digits 5-9": (5, 6, 7, 8, 9), "digits 0-9": tuple(range(10)),
                   "digits 3,5,8": (3, 5, 8), "digits 1,7": (1, 7), "digits 4,9": (4, 9),
                   "digits 6-9": (6, 7, 8, 9)}
        return DownstreamStudy(
            models=tuple(f"convnet_s-w{w}" for w in (4, 8, 16, 32, 64))
            + tuple(f"resnet_s-w{w}" for w in (4, 8, 16)),
            one_family=tuple(f"resnet_s-w{w}" for w in (4, 8, 16)),
            family=("convnet_s-w16", "resnet_s-w16"), tasks=(digits_task,), image_size=16,
            encoder="resnet_s-w16",
            encoder_tasks=tuple(Task(n, "digits", c) for n, c in subsets.items()),
            source=Task("digits 0-4", "digits", (0, 1, 2, 3, 4)),
            pretrain_epochs=prof.pretrain_epochs, n_boot=500, checked=_SMOKE_CHECKED,
            cpu_threads=1, **common)
    if prof.name == "real":
        fashion, dig = prof.downstream
        enc_tasks = (Task(fashion, fashion), Task("fashion tops (4)", fashion, (0, 2, 4, 6)),
                     Task("fashion footwear (3)", fashion, (5, 7, 9)), Task(dig, dig),
                     Task("digits 3,5,8", dig, (3, 5, 8)), Task("digits 1,7", dig, (1, 7)),
                     Task("cifar10 vehicles (4)*", prof.source, (0, 1, 8, 9)),
                     Task("cifar10 animals (6)*", prof.source, (2, 3, 4, 5, 6, 7)))
        return DownstreamStudy(
            models=tuple(prof.models) + tuple(ZOO), one_family=tuple(prof.models),
            family=tuple(prof.models), cpu_threads=1, layer_seeds=prof.seeds[:1],
            tasks=tuple(Task(d, d) for d in prof.downstream), image_size=prof.image_size,
            encoder=prof.models[-1], encoder_tasks=enc_tasks, checked=_REAL_CHECKED, **common)
    tasks = tuple(Task(d, d) for d in prof.downstream)
    return DownstreamStudy(models=tuple(prof.models), one_family=("resnet18", "resnet34", "resnet50"),
                           family=("resnet34", "vit_b32"), tasks=tasks,
                           image_size=prof.image_size, encoder="clip_vit_b32", encoder_tasks=tasks,
                           resplit=False, max_per_class=prof.max_train_per_class, **common)


def _one_architecture(arch: str = "cnn wide") -> tuple[str, ...]:
    """The zoo networks of architecture ``arch`` (the README's name), in registry order."""
    from .zoo import ZOO

    return tuple(name for name, z in ZOO.items() if z.arch == arch)


def recipe_study(profile: str | Profile | None = None) -> DownstreamStudy:
    """Chapter 03's study of training recipes on one architecture: a :class:`DownstreamStudy`
    whose ``models`` share an architecture and differ in how they were trained, with ``source``
    the data they were trained on (for :func:`source_collapse`). Outside ``smoke`` these are the
    zoo's eight ``cnn wide`` CIFAR-10 networks (standard PGD, larger-eps PGD, mixed clean + PGD,
    provably robust), on the ``real`` profile's tasks at 32 px, source = the real CIFAR-10 training
    images (``cifar10_2k``); every profile needs the mirror's files for it. ``smoke`` stands in
    with five ConvNets of different widths pre-trained on digits 0-4 (widths, not recipes)."""
    from .runtime import profile as active_profile

    prof = active_profile(profile)
    if prof.name == "smoke":
        return with_models(study("smoke"), tuple(f"convnet_s-w{w}" for w in (4, 8, 16, 32, 64)))
    real = active_profile("real")
    s = with_models(study(real), _one_architecture())
    return replace(s, source=Task("cifar10 (train)", real.source))


# --------------------------------------------------------------------------- models and data
_MODELS: dict[tuple, nn.Module] = {}
_FEATURES: dict[tuple, tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor]] = {}


def clear_cache() -> None:
    """Forget the models and features computed in this process."""
    _MODELS.clear()
    _FEATURES.clear()


def _small(name: str) -> tuple[str, int]:
    arch, _, width = name.rpartition("-w")
    if arch not in SMALL_ARCH or not width.isdigit():
        raise ValueError(f"{name!r} is neither a registry backbone ({', '.join(BACKBONES)}) nor a "
                         f"small net '<arch>-w<width>' with arch in {sorted(SMALL_ARCH)}")
    return arch, int(width)


def _arch(name: str) -> str:
    return name if name in BACKBONES else _small(name)[0]


def _task_data(task: Task, size: int | None, split_name: str) -> TensorDataset:
    ds = load_tensors(task.dataset, split_name, size or 224)
    return class_subset(ds, task.classes) if task.classes is not None else ds


def backbone(s: DownstreamStudy, name: str, pretrained: bool = True) -> nn.Module:
    """Model ``name`` of the study on :func:`nclab.runtime.device`, eval mode, cached in this process.
    Registry names load their weights (``pretrained=False``: random init seeded with the first
    seed); small nets ``"<arch>-w<width>"`` are pre-trained on ``s.source`` for
    ``s.pretrain_epochs`` (cached on disk by :func:`nclab.pretrain.pretrain`)."""
    key = (name, pretrained, s.source, s.pretrain_epochs, s.seeds[0], s.image_size)
    if key in _MODELS:
        return _MODELS[key]
    seed_everything(s.seeds[0])
    if name in BACKBONES:
        net = load_backbone(name, pretrained=pretrained)
    else:
        from .pretrain import pretrain

        arch, width = _small(name)
        net = load_backbone(arch, pretrained=False, width=width, **SMALL_ARCH[arch])
        if pretrained:
            if s.source is None:
                raise ValueError(f"{name!r} needs a source task to pre-train on (study.source)")
            src = _task_data(s.source, s.image_size, "train")
            src = _resized(src, s.image_size)
            net = pretrain(net, src, epochs=s.pretrain_epochs, seed=s.seeds[0], progress=False)
    _MODELS[key] = net.to(device()).eval()
    return _MODELS[key]


def _resized(ds: TensorDataset, size: int) -> TensorDataset:
    """``ds`` with its images resized to ``size`` px once (uint8), for small-net pre-training."""
    if ds.x.shape[-1] == size:
        return ds
    x = torch.nn.functional.interpolate(ds.x.float(), size=(size, size), mode="bilinear",
                                        align_corners=False, antialias=ds.x.shape[-1] > size)
    return TensorDataset(x.round().clamp(0, 255).to(torch.uint8), ds.y, ds.classes)


def features(s: DownstreamStudy, name: str, task: Task, taps: str = "output",
             pretrained: bool = True) -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor]:
    """``(H, y, is_test)`` for model ``name`` on the whole pool of ``task``: ``H`` maps each tap
    (``taps="output"``: the penultimate features; ``"blocks"``: every fine-tuning unit, then
    ``"output"``) to pooled features (N, d) float32 on the CPU; ``y`` (N,) the labels;
    ``is_test`` (N,) the dataset's own test split. Computed once per process."""
    if taps not in ("output", "blocks"):
        raise ValueError(f"taps must be 'output' or 'blocks', got {taps!r}")
    key = (name, pretrained, task, taps, s.image_size, s.max_per_class, s.source,
           s.pretrain_epochs, s.seeds[0])
    if key in _FEATURES:
        return _FEATURES[key]
    if taps == "output" and name in s.family:  # one pass over every block serves both
        taps = "blocks"
        key = (*key[:3], taps, *key[4:])
        if key in _FEATURES:
            return _FEATURES[key]
    net = backbone(s, name, pretrained)
    layers = ["output"] if taps == "output" else [n for n, _ in blocks(net)] + ["output"]
    mean, std = normalization(_arch(name))
    parts, labels, test = [], [], []
    for split_name in ("train", "test"):
        ds = _task_data(task, s.image_size, split_name)
        if split_name == "train" and s.max_per_class is not None:
            from .data import subset_per_class

            if int(torch.bincount(ds.y).min()) > s.max_per_class:
                ds = subset_per_class(ds, s.max_per_class, seed=s.seeds[0])
        data = batches(ds, s.batch_size, device=device(), size=s.image_size, mean=mean, std=std)
        h, y = extract(net, data, layers, return_features=True, progress=False)
        parts.append({k: v.cpu() for k, v in h.items()})
        labels.append(y.cpu())
        test.append(torch.full((len(y),), split_name == "test"))
    feats = {k: torch.cat([p[k] for p in parts]) for k in layers}
    _FEATURES[key] = (feats, torch.cat(labels), torch.cat(test))
    return _FEATURES[key]


def split(y: torch.Tensor, seed: int, test_fraction: float = 0.3,
          fixed: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(train_idx, test_idx)`` of a pool with labels ``y``: a stratified split with
    ``test_fraction`` of every class in the test part, drawn with ``seed``; ``fixed`` (a boolean
    test mask) returns that split instead."""
    if fixed is not None:
        return torch.nonzero(~fixed).flatten(), torch.nonzero(fixed).flatten()
    gen = torch.Generator().manual_seed(seed)
    tr, te = [], []
    for k in torch.unique(y).tolist():
        idx = torch.nonzero(y == k).flatten()
        idx = idx[torch.randperm(len(idx), generator=gen)]
        n_test = int(round(test_fraction * len(idx)))
        if n_test < 1 or n_test >= len(idx):
            raise ValueError(f"class {k} has {len(idx)} samples: too few to split {test_fraction}")
        te.append(idx[:n_test])
        tr.append(idx[n_test:])
    return torch.sort(torch.cat(tr)).values, torch.sort(torch.cat(te)).values


def _measure(h: torch.Tensor, y: torch.Tensor, tr: torch.Tensor, te: torch.Tensor,
             scores: bool) -> dict[str, float]:
    k = int(y.max()) + 1
    res = linear_probe(h[tr], y[tr], h[te], y[te], num_classes=k)
    row = dict(dim=h.shape[1], nc1=float(nc1(h[tr].double(), y[tr], num_classes=k)),
               train_acc=res.train_acc, test_acc=res.test_acc)
    if scores:
        row["h_score"] = h_score(h[tr], y[tr])
        row["logme"] = logme(h[tr], y[tr]).score
    return row


def _label(name: str) -> str:
    try:
        return recipe_family(name)
    except ValueError:
        return _arch(name)


# --------------------------------------------------------------------------- the studies
def across_models(s: DownstreamStudy, models: Sequence[str] | None = None):
    """One row per (model, task, seed) of the penultimate features: ``model``, ``recipe``
    (:func:`nclab.zoo.recipe_family`, or the architecture for non-zoo models), ``task``, ``seed``,
    ``dim``, ``nc1``, ``h_score``, ``logme``, ``train_acc``, ``test_acc`` (a pandas DataFrame)."""
    import pandas as pd

    rows = []
    for name in models if models is not None else s.models:
        for task in s.tasks:
            h, y, is_test = features(s, name, task)
            for seed in s.probe_seeds():
                tr, te = split(y, seed, s.test_fraction, None if s.resplit else is_test)
                rows.append(dict(model=name, recipe=_label(name), task=task.name, seed=seed,
                                 **_measure(h["output"], y, tr, te, scores=True)))
    return pd.DataFrame(rows)


def layerwise(s: DownstreamStudy, models: Sequence[str] | None = None):
    """Every block (then ``output``) of the ``family`` models, pre-trained and at random init
    (``init``), on every task and :meth:`~DownstreamStudy.layer_probe_seeds` seed: ``model``,
    ``init``, ``task``, ``seed``, ``layer``, ``depth`` (1-based), ``dim``, ``nc1``, ``h_score``,
    ``logme``, ``train_acc``, ``test_acc``."""
    import pandas as pd

    rows = []
    for name in models if models is not None else s.family:
        for pretrained in (True, False):
            for task in s.tasks:
                h, y, is_test = features(s, name, task, taps="blocks", pretrained=pretrained)
                for seed in s.layer_probe_seeds():
                    tr, te = split(y, seed, s.test_fraction, None if s.resplit else is_test)
                    for depth, layer in enumerate(h, start=1):
                        rows.append(dict(model=name, init="pre-trained" if pretrained else
                                         "random init", task=task.name, seed=seed, layer=layer,
                                         depth=depth, **_measure(h[layer], y, tr, te, True)))
    return pd.DataFrame(rows)


def source_collapse(s: DownstreamStudy, source: Task | None = None,
                    models: Sequence[str] | None = None):
    """Collapse of each model on the data it was pre-trained on: one row per model with
    ``model``, ``recipe`` and ``source_nc1``, NC1 (paper eq. 4) of the penultimate features on
    the *training* images of ``source`` (default ``s.source``; its dataset's own train split, no
    resplit), in float64. Pair it with :func:`across_models` (same ``model`` column) for source
    NC1 vs transfer."""
    import pandas as pd

    source = source if source is not None else s.source
    if source is None:
        raise ValueError("source_collapse needs a source task: pass source= or set study.source")
    rows = []
    for name in models if models is not None else s.models:
        h, y, is_test = features(s, name, source)
        tr = ~is_test
        rows.append(dict(model=name, recipe=_label(name),
                         source_nc1=float(nc1(h["output"][tr].double(), y[tr]))))
    return pd.DataFrame(rows)


def across_datasets(s: DownstreamStudy):
    """The frozen ``encoder`` on every ``encoder_tasks`` task and seed: ``task``, ``classes``,
    ``seed``, ``dim``, ``nc1``, ``train_acc``, ``test_acc``."""
    import pandas as pd

    rows = []
    for task in s.encoder_tasks:
        h, y, is_test = features(s, s.encoder, task)
        for seed in s.probe_seeds():
            tr, te = split(y, seed, s.test_fraction, None if s.resplit else is_test)
            rows.append(dict(task=task.name, classes=int(y.max()) + 1, seed=seed,
                             **_measure(h["output"], y, tr, te, scores=False)))
    return pd.DataFrame(rows)


def _log_pearson(x: np.ndarray, y: np.ndarray) -> float:
    return pearson(np.log10(x), y)


def correlations(df, scores: Sequence[str] = ("nc1", "h_score", "logme"), acc: str = "test_acc",
                 by: Sequence[str] = ("task", "seed"), n_boot: int = 1000, seed: int = 0):
    """Per group of ``by`` and per score: Pearson ``r`` (on ``log10`` of an NC1 score, any name
    ending in ``nc1`` such as ``source_nc1``; raw for the other scores) and Spearman ``rho``
    with ``acc``, each with a 95 % percentile-bootstrap interval
    over the rows (models) of the group (``r_low``, ``r_high``, ``rho_low``, ``rho_high``), and
    ``agreement`` = ``rho`` signed so that positive means "ranks like the accuracy" (``-rho`` for
    NC1, where lower predicts better), with its interval ``agree_low``/``agree_high``; ``n`` rows."""
    import pandas as pd

    out = []
    for keys, grp in df.groupby(list(by), sort=False):
        keys = keys if isinstance(keys, tuple) else (keys,)
        a = grp[acc].to_numpy(np.float64)
        for score in scores:
            x = grp[score].to_numpy(np.float64)
            is_nc1 = score.endswith("nc1")  # nc1, source_nc1: log10, lower predicts better
            r_fn = _log_pearson if is_nc1 else pearson
            for name, v in ((acc, a), (score, x)):
                if len(v) > 1 and np.ptp(v) == 0:
                    raise ValueError(
                        f"{dict(zip(by, keys))}: {name} is {v[0]:g} for all {len(v)} models, so "
                        f"no correlation of {score} with {acc} is defined")
            r = bootstrap_ci(r_fn, x, a, n_boot=n_boot, seed=seed)
            rho = bootstrap_ci(spearman, x, a, n_boot=n_boot, seed=seed)
            sign = -1.0 if is_nc1 else 1.0
            lo, hi = sorted((sign * rho.low, sign * rho.high))
            out.append(dict(zip(by, keys), score=score, n=len(grp), r=r.estimate, r_low=r.low,
                            r_high=r.high, rho=rho.estimate, rho_low=rho.low, rho_high=rho.high,
                            agreement=sign * rho.estimate, agree_low=lo, agree_high=hi))
    return pd.DataFrame(out)


def compare_scores(df, a: str, b: str, acc: str = "test_acc", by: Sequence[str] = ("task", "seed"),
                   n_boot: int = 1000, seed: int = 0):
    """Which of two scores ranks the models better, per group of ``by``: ``diff`` = agreement of
    ``b`` minus agreement of ``a`` (agreement as in :func:`correlations`: Spearman ρ with the
    accuracy, negated for NC1), with a *paired* 95 % bootstrap interval (the same resampled models
    for both scores) ``low``/``high``; ``b_better`` when the interval lies above 0, ``a_better``
    when below."""
    import pandas as pd

    def agree(x: np.ndarray, y: np.ndarray, score: str) -> float:
        return (-1.0 if score == "nc1" else 1.0) * spearman(x, y)

    def diff(xa: np.ndarray, xb: np.ndarray, y: np.ndarray) -> float:
        return agree(xb, y, b) - agree(xa, y, a)

    out = []
    for keys, grp in df.groupby(list(by), sort=False):
        keys = keys if isinstance(keys, tuple) else (keys,)
        ci = bootstrap_ci(diff, grp[a].to_numpy(np.float64), grp[b].to_numpy(np.float64),
                          grp[acc].to_numpy(np.float64), n_boot=n_boot, seed=seed)
        out.append(dict(zip(by, keys), a=a, b=b, diff=ci.estimate, low=ci.low, high=ci.high,
                        b_better=ci.low > 0, a_better=ci.high < 0))
    return pd.DataFrame(out)


def with_models(s: DownstreamStudy, models: Sequence[str]) -> DownstreamStudy:
    """``s`` restricted to ``models`` (and its families to those among them)."""
    keep = tuple(models)
    return replace(s, models=keep, one_family=tuple(m for m in s.one_family if m in keep),
                   family=tuple(m for m in s.family if m in keep))


# --------------------------------------------------------------------------- summaries
def zoo_table(s: DownstreamStudy):
    """The study's models: ``model``, ``architecture``, ``recipe`` (family), and for the CIFAR-10
    zoo the ``source_acc`` (% on the 1000 real CIFAR-10 test images, README; akamaster's reported
    full-test-set accuracy for ``resnet20`` ... ``resnet56``)."""
    import pandas as pd

    from .zoo import ZOO

    reported = {"resnet20": 91.73, "resnet32": 92.63, "resnet44": 93.10, "resnet56": 93.39}
    rows = []
    for name in s.models:
        z = ZOO.get(name)
        if z is not None:
            arch = z.arch
        elif name in reported:
            arch = f"CIFAR ResNet-{name[len('resnet'):]}, option A"
        elif name in BACKBONES:
            arch = BACKBONES[name].about
        else:
            small, width = _small(name)
            arch = f"{small}, width {width}, pre-trained on {s.source.name if s.source else '?'}"
        rows.append(dict(model=name, architecture=arch, recipe=_label(name),
                         source_acc=z.acc if z else reported.get(name, float("nan"))))
    return pd.DataFrame(rows)


def layer_fits(layers):
    """Per (model, task, init, seed) of :func:`layerwise`'s blocks (``output`` left out: a CNN's
    output is its last block pooled): Pearson ``r`` of NC1 and probe accuracy over the blocks,
    Spearman ``rho``, ``blocks``, and NC1 / accuracy of the first and last block."""
    import pandas as pd

    rows = []
    inner = layers[layers.layer != "output"]
    for (model, task, init, seed), g in inner.groupby(["model", "task", "init", "seed"],
                                                       sort=False):
        rows.append(dict(model=model, task=task, init=init, seed=seed, blocks=len(g),
                         r=pearson(g.nc1, g.test_acc), rho=spearman(g.nc1, g.test_acc),
                         nc1_first=g.nc1.iloc[0], nc1_last=g.nc1.iloc[-1],
                         acc_first=g.test_acc.iloc[0], acc_last=g.test_acc.iloc[-1]))
    return pd.DataFrame(rows)


def layer_choice(layers):
    """Per (model, task, init, seed): the block with the smallest NC1 (``nc1_pick``, its
    accuracy ``acc_nc1_pick``), the last block's accuracy ``acc_last``, and the best block in
    hindsight (``oracle``, ``acc_oracle``); also ``nc1_min`` (the smallest NC1)."""
    import pandas as pd

    rows = []
    inner = layers[layers.layer != "output"]
    for (model, task, init, seed), g in inner.groupby(["model", "task", "init", "seed"],
                                                       sort=False):
        pick, best = g.loc[g.nc1.idxmin()], g.loc[g.test_acc.idxmax()]
        rows.append(dict(model=model, task=task, init=init, seed=seed, nc1_pick=pick.layer,
                         nc1_min=pick.nc1, acc_nc1_pick=pick.test_acc,
                         acc_last=g.test_acc.iloc[-1], oracle=best.layer,
                         acc_oracle=best.test_acc))
    return pd.DataFrame(rows)

