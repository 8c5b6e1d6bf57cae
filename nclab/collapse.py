"""Watching collapse happen: the unconstrained features model and terminal-phase training.

* :func:`train_ufm` - the unconstrained features model (UFM; Mixon et al. 2020, Zhu et al. 2021):
  the features ``H`` are free variables trained jointly with a linear classifier ``W`` by plain
  gradient descent on cross-entropy with weight decay,

      min_{W, H, b}  (1/N) sum_i CE(W h_i + b, y_i) + (lambda/2) (||W||_F^2 + ||H||_F^2 + ||b||^2),

  whose global minimisers are exactly neural collapse (NC1-NC3). NC metrics are recorded along
  the way.
* :func:`train_terminal_phase` - a small network trained past zero training error, with the NC
  metrics of its penultimate features on train and test data every epoch and, at the end, NC1 of
  every block (progressive collapse across depth).
* :func:`layerwise_nc1` - NC1 and CDNV of every block of a (trained or pre-trained) backbone on
  several splits (e.g. the training images and held-out test images), optionally on seeded,
  equally sized class-balanced subsets so that the splits are compared at the same sample size.
* :func:`nc1_by_sample_size` - NC1 of seeded class-balanced subsets of given sizes (the plug-in
  estimate's dependence on the images per class).

What differs between profiles lives here, in two frozen configurations the chapters read:
:class:`Quickstart` (:func:`quickstart`, chapter 00) and :class:`CollapseStudy` (:func:`study`,
chapter 01, with the claims it asserts in :data:`CLAIMS`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn

from . import metrics
from .runtime import Profile
from .runtime import profile as active_profile

__all__ = ["UFMResult", "train_ufm", "Classifier", "TerminalPhaseResult", "train_terminal_phase",
           "layerwise_nc1", "nc1_by_sample_size", "Quickstart", "quickstart", "CollapseStudy",
           "study", "CLAIMS"]


@dataclass
class UFMResult:
    """History (one row per recorded iteration) and the final features ``H`` (N, d), labels
    ``y`` and classifier ``W`` (K, d), ``b`` (K,)."""

    history: pd.DataFrame
    H: torch.Tensor
    y: torch.Tensor
    W: torch.Tensor
    b: torch.Tensor


def train_ufm(
    num_classes: int = 5,
    dim: int = 16,
    per_class: int = 20,
    lr: float = 2.0,
    weight_decay: float = 5e-4,
    iters: int = 1500,
    seed: int = 0,
    record_every: int = 10,
    init_scale: float = 1.0,
    bias: bool = True,
) -> UFMResult:
    """Full-batch gradient descent on the UFM (see the module docstring), float64, on the CPU.

    Features and classifier start as ``init_scale`` times standard Gaussians (seeded). Every
    ``record_every`` iterations the history records ``loss``, training ``acc``, ``nc1``,
    ``etf_error`` (of the class means) and ``self_duality`` (of ``W``)."""
    if num_classes < 2 or dim < 1 or per_class < 1 or iters < 1:
        raise ValueError("need num_classes >= 2 and positive dim, per_class, iters")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: threads only add synchronisation overhead
    try:
        return _train_ufm(num_classes, dim, per_class, lr, weight_decay, iters, seed,
                          record_every, init_scale, bias)
    finally:
        torch.set_num_threads(threads)


def _train_ufm(num_classes, dim, per_class, lr, weight_decay, iters, seed, record_every,
               init_scale, bias) -> UFMResult:
    gen = torch.Generator().manual_seed(seed)
    k, n = num_classes, num_classes * per_class
    y = torch.arange(k).repeat_interleave(per_class)
    H = (init_scale * torch.randn(n, dim, generator=gen, dtype=torch.float64)).requires_grad_()
    W = (init_scale * torch.randn(k, dim, generator=gen, dtype=torch.float64)).requires_grad_()
    b = torch.zeros(k, dtype=torch.float64, requires_grad=bias)
    params = [H, W] + ([b] if bias else [])
    opt = torch.optim.SGD(params, lr=lr, momentum=0.0, weight_decay=weight_decay)
    rows = []
    for it in range(iters + 1):
        logits = H @ W.T + b
        loss = F.cross_entropy(logits, y)
        if it % record_every == 0 or it == iters:
            with torch.no_grad():
                h = H.detach()
                rows.append({
                    "iter": it,
                    "loss": float(loss),
                    "acc": float((logits.argmax(1) == y).double().mean()),
                    "nc1": metrics.nc1(h, y, num_classes=k),
                    "etf_error": metrics.etf_error(h, y, num_classes=k),
                    "self_duality": metrics.self_duality(h, W.detach(), y, num_classes=k),
                })
        if it == iters:
            break
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return UFMResult(pd.DataFrame(rows), H.detach(), y, W.detach(), b.detach())


class Classifier(nn.Module):
    """A backbone (images -> penultimate features, ``num_features`` wide) with a linear head."""

    def __init__(self, backbone: nn.Module, num_classes: int) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = nn.Linear(backbone.num_features, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))


@dataclass
class TerminalPhaseResult:
    """Per-epoch history (train/test accuracy and NC metrics), per-block NC1 at the end (train and
    test), and the trained model."""

    history: pd.DataFrame
    layers: pd.DataFrame
    model: Classifier
    extra: dict = field(default_factory=dict)


def _report(model: Classifier, data, k: int, device, layers: Sequence[str] = ()) -> dict:
    from .features import extract

    names = ["backbone"] + [f"backbone.{n}" for n in layers]
    stats = extract(model, data, names, num_classes=k, device=device, amp=False,
                    progress=False)
    pen = stats["backbone"]
    rep = metrics.collapse_report(pen, W=model.head.weight.detach().to(pen.device))
    out = {"nc1": rep.nc1, "cdnv": rep.cdnv, "etf_error": rep.etf_error,
           "equinorm": rep.equinorm, "self_duality": rep.self_duality}
    out["layers"] = {n: metrics.nc1(stats[f"backbone.{n}"]) for n in layers}
    return out


def train_terminal_phase(
    backbone: nn.Module,
    train,
    test,
    epochs: int,
    *,
    lr: float = 0.05,
    weight_decay: float = 5e-4,
    batch_size: int = 64,
    layers: Sequence[str] = (),
    eval_every: int = 1,
    seed: int = 0,
    device: torch.device | str | None = None,
    progress: bool = True,
) -> TerminalPhaseResult:
    """Train ``backbone`` + a linear head with SGD (momentum 0.9, cosine rate, weight decay) and
    cross-entropy on ``train`` (a :class:`nclab.data.TensorDataset`), no augmentation, recording
    every ``eval_every`` epochs the training loss/accuracy, test accuracy and NC1, CDNV, ETF error,
    equinorm and self-duality of the penultimate features on train and test data. At the end,
    NC1 of each backbone module in ``layers`` (qualified names, e.g. ``features.0``) on both."""
    from .data import batches
    from .runtime import device as default_device
    from .runtime import seed_everything

    dev = torch.device(device) if device is not None else default_device()
    seed_everything(seed)
    k = train.num_classes if hasattr(train, "num_classes") else int(train.y.max()) + 1
    model = Classifier(backbone, k).to(dev)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=weight_decay)
    train_batches = batches(train, batch_size, shuffle=True, device=dev, seed=seed)
    steps = epochs * len(train_batches)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(1, steps))
    eval_train = batches(train, 256, device=dev)
    eval_test = batches(test, 256, device=dev)
    rows = []
    epoch_iter = range(1, epochs + 1)
    if progress:
        from tqdm.auto import tqdm

        epoch_iter = tqdm(epoch_iter, desc="terminal phase", leave=False)
    for epoch in epoch_iter:
        model.train()
        tot, correct, count = 0.0, 0, 0
        for x, y in train_batches:
            logits = model(x)
            loss = F.cross_entropy(logits, y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            tot += float(loss.detach()) * len(y)
            correct += int((logits.argmax(1) == y).sum())
            count += len(y)
        if epoch % eval_every and epoch != epochs:
            continue
        model.eval()
        with torch.no_grad():
            test_acc = sum(int((model(x).argmax(1) == y).sum()) for x, y in eval_test) / len(test)
        row = {"epoch": epoch, "train_loss": tot / count, "train_acc": correct / count,
               "test_acc": test_acc}
        for split, data in (("train", eval_train), ("test", eval_test)):
            rep = _report(model, data, k, dev)
            row.update({f"{m}_{split}": v for m, v in rep.items() if m != "layers"})
        rows.append(row)
    layer_rows = []
    if layers:
        for split, data in (("train", eval_train), ("test", eval_test)):
            rep = _report(model, data, k, dev, layers)
            layer_rows += [{"layer": n, "depth": i + 1, "split": split, "nc1": v}
                           for i, (n, v) in enumerate(rep["layers"].items())]
            layer_rows.append({"layer": "penultimate", "depth": len(layers) + 1, "split": split,
                               "nc1": rep["nc1"]})
    model.eval()
    return TerminalPhaseResult(pd.DataFrame(rows), pd.DataFrame(layer_rows), model)


def layerwise_nc1(
    backbone: nn.Module,
    splits: Mapping[str, object],
    layers: Sequence[str] | None = None,
    *,
    per_class: int | None = None,
    seeds: Sequence[int] = (0,),
    batch_size: int = 256,
    device: torch.device | str | None = None,
) -> pd.DataFrame:
    """NC1 and CDNV of the average-pooled output of every block of ``backbone`` on each split.

    ``splits`` maps a split name (``"train"``, ``"test"``) to a :class:`nclab.data.TensorDataset`;
    ``layers`` are qualified module names (default: every block, :func:`nclab.models.blocks`, whose
    last entry is the penultimate feature map for the ResNets and ConvNets of nclab). With
    ``per_class`` every split is replaced, for each seed in ``seeds``, by a class-balanced subset of
    exactly ``per_class`` images per class (:func:`nclab.data.subset_per_class`), so all splits are
    measured at the same sample size: the plug-in NC1,
    ``(1/K) tr(Sigma_W Sigma_B^+)``, estimates ``Sigma_B`` from class means that carry a noise of
    order ``Sigma_W / n_k``, so fewer samples per class give a smaller NC1 when the true
    between-class spread is small. Without ``per_class`` the whole splits are used once (``seed``
    is then -1).

    Returns one row per (seed, split, layer): ``seed, split, depth`` (1-based block index),
    ``layer, stage`` (the name without its last component, e.g. ``layer2``), ``n`` (images),
    ``nc1, cdnv``.
    """
    from .data import batches, subset_per_class
    from .features import extract
    from .models import blocks

    if not splits:
        raise ValueError("splits is empty: pass e.g. {'train': train_ds, 'test': test_ds}")
    names = list(layers) if layers is not None else [n for n, _ in blocks(backbone)]
    if not names:
        raise ValueError("no layers to measure")
    if device is not None:
        dev = torch.device(device)
    else:
        param = next(iter(backbone.parameters()), None)
        dev = param.device if param is not None else torch.device("cpu")
    k = max(int(ds.num_classes) for ds in splits.values())
    rows = []
    for seed in (seeds if per_class is not None else (-1,)):
        for split, ds in splits.items():
            data = subset_per_class(ds, per_class, seed=seed) if per_class is not None else ds
            stats = extract(backbone, batches(data, batch_size, device=dev), names,
                            num_classes=k, device=dev, amp=False, progress=False)
            for depth, name in enumerate(names, start=1):
                rows.append({"seed": seed, "split": split, "depth": depth, "layer": name,
                             "stage": name.rsplit(".", 1)[0], "n": len(data),
                             "nc1": metrics.nc1(stats[name]), "cdnv": metrics.cdnv(stats[name])})
    return pd.DataFrame(rows)


def nc1_by_sample_size(
    features: torch.Tensor,
    labels: torch.Tensor,
    sizes: Sequence[int],
    seeds: Sequence[int] = (0,),
) -> pd.DataFrame:
    """NC1 of class-balanced subsets: for every ``m`` in ``sizes`` and seed, exactly ``m`` samples
    per class drawn without replacement (:func:`nclab.data.subset_per_class`), then
    ``NC1 = (1/K) tr(Sigma_W Sigma_B^+)`` on them. The plug-in ``Sigma_B`` carries a noise of order
    ``Sigma_W / m``, so where the true between-class spread is small NC1 grows with ``m``.

    Returns one row per (size, seed): ``per_class, seed, n`` (samples), ``nc1``."""
    from .data import subset_per_class

    h = torch.as_tensor(features)
    y = torch.as_tensor(labels).long()
    if h.ndim != 2 or len(h) != len(y):
        raise ValueError(f"features must be (N, d) with N = len(labels), got {tuple(h.shape)} "
                         f"and {len(y)} labels")
    if not sizes or not seeds:
        raise ValueError("need at least one size and one seed")
    k = int(y.max()) + 1
    rows = []
    for m in sizes:
        for seed in seeds:
            idx = subset_per_class(y, int(m), seed=seed)
            rows.append({"per_class": int(m), "seed": seed, "n": len(idx),
                         "nc1": metrics.nc1(h[idx], y[idx], num_classes=k)})
    return pd.DataFrame(rows)


# --------------------------------------------------------------------------- chapter configurations
@dataclass(frozen=True)
class Quickstart:
    """What chapter 00 runs in one profile.

    ``dataset``: registry name (:func:`nclab.data.load`) of the images shown and measured, under
    the title ``dataset_name``; ``sizes``: its expected (train, test) lengths; ``stratified``:
    whether its split keeps every class's test share equal (digits). ``arch``: the backbone
    whose features are measured, at random initialisation and, if ``pretrained``, with its
    published weights; ``seed`` draws the random weights."""

    profile: str
    dataset: str
    dataset_name: str
    sizes: tuple[int, int]
    stratified: bool
    arch: str
    pretrained: bool
    seed: int

    def load(self):
        """The (train, test) :class:`nclab.data.TensorDataset` pair."""
        from .data import load

        return load(self.dataset, "train"), load(self.dataset, "test")


def quickstart(profile: str | Profile | None = None) -> Quickstart:
    """Chapter 00's :class:`Quickstart` for ``profile`` (a name, a :class:`~nclab.runtime.Profile`,
    or None for the active one): real CIFAR-10 and ResNet-20 with its CIFAR-10 weights in
    ``real``; the offline digits and a randomly initialised ResNet-20 elsewhere."""
    prof = active_profile(profile)
    if prof.name == "real":
        return Quickstart(prof.name, prof.source,
                          "CIFAR-10, the first 2000 training / 1000 test images", (2000, 1000),
                          stratified=False, arch=prof.models[0], pretrained=True,
                          seed=prof.seeds[0])
    return Quickstart(prof.name, "digits", "scikit-learn digits, served at 32×32", (1257, 540),
                      stratified=True, arch="resnet20", pretrained=False, seed=prof.seeds[0])


#: The claims chapter 01 can assert, by name; a profile's ``checked`` names those that held on
#: every seed when measured there (seeds 0, 1, 2).
CLAIMS: dict[str, str] = {
    "terminal": "the terminal-phase run reaches 99 % training accuracy; its NC1 falls over training "
                "(train > 3x, test too, test ending above train) and > 10x from the first to the "
                "last block",
    "tp_every_block": "the terminal-phase network's NC1 falls at every block, train and test",
    "blocks_fall": "NC1 of the last block >10x below the first, falling at every block from the "
                   "second stage on, and test NC1 above train NC1 at the last block",
    "first_stage": "in the CIFAR-10 ResNets NC1 does not fall at every block of the first stage, "
                   "and at the first block test/train NC1 lies on both sides of 1",
    "rank_vs_nc1": "on a trained network's layers CDNV follows NC1 (Spearman > 0.9), the numerical "
                   "rank runs against it (< 0) and stays below 1.2",
    "projection": "at matched sample size the pre-trained features are more collapsed than the "
                  "random-init ones on every set, and more on the training than on the test images",
}


@dataclass(frozen=True)
class CollapseStudy:
    """What chapter 01 runs in one profile.

    Terminal phase: a network built by :meth:`terminal_backbone`, trained ``epochs`` on
    ``terminal_data`` (registry name; train/test splits) with ``batch_size``, tapped at every block
    but the last. ``models``: registry names of really trained networks measured block by block
    on ``images`` (empty: the chapter's own trained network on its own data), on ``per_class``
    images per class of each split and each of ``seeds``. Projection: backbone
    ``projection_model`` (random init, and with its weights if ``projection_pretrained``) on the
    source sets ``projection_source`` (train and test) and on ``projection_downstream`` (a
    registry name, or None for the offline stand-in :func:`nclab.data.synthetic_images`).
    ``sample_sizes``: images per class of the sample-size plot. ``cost_dims``: feature widths of
    the cost comparison. ``checked``: the :data:`CLAIMS` asserted in this profile."""

    profile: str
    seeds: tuple[int, ...]
    terminal_data: str
    epochs: int
    batch_size: int
    models: tuple[str, ...]
    images: str | None
    per_class: int
    projection_model: str
    projection_pretrained: bool
    projection_source: str
    projection_downstream: str | None
    sample_sizes: tuple[int, ...]
    cost_dims: tuple[int, ...]
    checked: frozenset[str] = field(default_factory=frozenset)

    def terminal_backbone(self) -> nn.Module:
        """A fresh, randomly initialised backbone for the terminal-phase run (seed it first)."""
        from .models import ConvNetS, ResNetS

        if self.terminal_data == "digits":
            return ConvNetS(width=16, depth=4)
        return ResNetS(width=32, depths=(2, 2, 2))

    def terminal_splits(self):
        """The (train, test) datasets of the terminal-phase run."""
        from .data import load

        return load(self.terminal_data, "train"), load(self.terminal_data, "test")

    def projection_sets(self) -> dict[str, object]:
        """``{title: dataset}``: the source's training and test images, then the downstream
        task's training images."""
        from .data import load, synthetic_images

        names = {"cifar10_2k": "CIFAR-10", "digits": "digits", "fashion_mnist_2k": "Fashion-MNIST"}
        src = names.get(self.projection_source, self.projection_source)
        out = {f"{src} train": load(self.projection_source, "train"),
               f"{src} test": load(self.projection_source, "test")}
        if self.projection_downstream is None:
            out["synthetic patterns (stand-in)"] = synthetic_images(num_classes=10,
                                                                    per_class=100, seed=0)
        else:
            down = names.get(self.projection_downstream, self.projection_downstream)
            out[f"{down} train (downstream)"] = load(self.projection_downstream, "train")
        return out


def study(profile: str | Profile | None = None) -> CollapseStudy:
    """Chapter 01's :class:`CollapseStudy` for ``profile`` (a name, a
    :class:`~nclab.runtime.Profile`, or None for the active one)."""
    prof = active_profile(profile)
    common = dict(profile=prof.name, seeds=prof.seeds, epochs=prof.pretrain_epochs,
                  batch_size=prof.batch_size, projection_model="resnet20")
    if prof.name == "real":
        # the smallest class of the 1000 CIFAR-10 test images has 86
        return CollapseStudy(terminal_data="digits", models=tuple(prof.models),
                             images=prof.source, per_class=80, projection_pretrained=True,
                             projection_source=prof.source,
                             projection_downstream=prof.downstream[0],
                             sample_sizes=(10, 20, 40, 80, 160), cost_dims=(64, 256, 1024),
                             checked=frozenset(CLAIMS), **common)
    if prof.name == "smoke":
        # the smallest digits test class has 52
        return CollapseStudy(terminal_data="digits", models=(), images=None, per_class=50,
                             projection_pretrained=False, projection_source="digits",
                             projection_downstream=None, sample_sizes=(10, 20, 40, 80),
                             cost_dims=(64, 256, 1024),
                             checked=frozenset({"terminal", "tp_every_block", "blocks_fall",
                                                "rank_vs_nc1"}),
                             **common)
    # a rehearsal times the dense NumPy reference up to d = 1024 only (d = 4096 takes minutes on a CPU)
    # (and measures 3 images per class of each split: the CIFAR-10 stand-in's test split has 3)
    return CollapseStudy(terminal_data="cifar10", models=(), images=None,
                         per_class=3 if prof.rehearsal else 50,
                         projection_pretrained=True, projection_source="cifar10_2k",
                         projection_downstream="fashion_mnist_2k",
                         sample_sizes=(10, 20, 40, 80, 160),
                         cost_dims=(64, 256, 1024) if prof.rehearsal else (64, 256, 1024, 2048, 4096),
                         **common)
