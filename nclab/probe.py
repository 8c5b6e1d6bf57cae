"""Fast probes on frozen features: multinomial logistic regression (L-BFGS) and a one-hidden-layer MLP.

Both standardise the features with the training mean and standard deviation, train in torch on the
features' device (or ``device=``) and report accuracies as fractions in [0, 1].

The linear probe minimises

    L(W, b) = (1/N) Σ_i CE(W z_i + b, y_i) + weight_decay · ‖W‖²_F,   z_i = (h_i − mean) / std,

(the bias is not penalised), full batch, with L-BFGS and a strong-Wolfe line search. This is
scikit-learn's ``LogisticRegression(C=1 / (2 N weight_decay))`` objective divided by ``C N``.

Degenerate inputs: a training set with a single class raises ``ValueError``; test classes that
the training set never holds are scored (they can never be predicted) with a ``UserWarning`` that
names them and their share of the test set; an empty test set gives ``test_acc = nan`` with a
``UserWarning``. Feature rows with NaN/inf raise ``ValueError``, in ``predict`` too.
"""

from __future__ import annotations

import math
import operator
import warnings
from collections.abc import Iterable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ._checks import features_labels, positive_int

__all__ = ["ProbeResult", "linear_probe", "mlp_probe", "probe_layers", "sklearn_C"]


@dataclass
class ProbeResult:
    """A fitted probe: accuracies (fractions), the standardisation and the classifier.

    ``weight`` (K, d) and ``bias`` (K,) act on standardised features (linear probe; for the MLP probe
    they are its last layer); ``model`` maps standardised features to logits; ``predict(h)`` maps raw
    features to labels."""

    train_acc: float
    test_acc: float
    weight: torch.Tensor
    bias: torch.Tensor
    mean: torch.Tensor
    std: torch.Tensor
    model: nn.Module
    loss: float
    iterations: int

    @torch.no_grad()
    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """Logits ``model((h − mean) / std)`` of raw features ``h`` (N, d); ``ValueError`` for a
        wrong width or NaN/inf rows."""
        h = torch.as_tensor(h)
        d = self.mean.shape[0]
        if h.ndim != 2 or h.shape[1] != d:
            raise ValueError(f"predict: features must be (N, {d}) like the probe's training features, "
                             f"got shape {tuple(h.shape)}")
        bad = (~torch.isfinite(h)).any(1).sum().item() if h.is_floating_point() else 0
        if bad:
            raise ValueError(f"predict: {bad} feature rows contain NaN/inf; drop or fix them first")
        dev = self.mean.device
        return self.model(((h.to(dev).float()) - self.mean) / self.std)

    def predict(self, h: torch.Tensor) -> torch.Tensor:
        """Predicted labels ``argmax_k logits(h)_k`` (N,) of raw features ``h`` (N, d)."""
        return self.logits(h).argmax(1)


@contextmanager
def _cpu_threads_for(dev: torch.device, work: float, limit: float = 5e7):
    """Run small CPU problems (``work`` = N·d·K below ``limit``) on one thread: they are bound by
    per-operation overhead, and with several threads on a busy machine each tiny GEMM waits for
    every thread (measured: 10x slower L-BFGS on 2 shared cores). Restores the thread count."""
    if dev.type != "cpu" or work > limit or torch.get_num_threads() == 1:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def sklearn_C(weight_decay: float, n: int) -> float:
    """scikit-learn's inverse regularisation ``C`` for the same optimum: ``1 / (2 n weight_decay)``."""
    if weight_decay <= 0:
        raise ValueError(f"weight_decay must be > 0 to map to a finite C, got {weight_decay}")
    return 1.0 / (2.0 * n * weight_decay)


def _num_classes(num_classes) -> int | None:
    """``num_classes`` as a Python int >= 1 or None (:func:`nclab._checks.positive_int`)."""
    return None if num_classes is None else positive_int(num_classes, "num_classes")


def _finite(value, name: str, positive: bool) -> float:
    """``value`` as a float, or a ``ValueError`` naming ``name`` when it is NaN/inf, negative (or
    zero with ``positive``) or not a number."""
    try:
        v = float(value)
    except (TypeError, ValueError):
        v = float("nan")
    if isinstance(value, bool) or not math.isfinite(v) or v < 0 or (positive and v == 0):
        raise ValueError(f"{name} must be a finite number {'>' if positive else '>='} 0, got {value!r}")
    return v


def _prepare(train_feats, train_y, test_feats, test_y, device, num_classes):
    num_classes = _num_classes(num_classes)
    train_feats, train_y = features_labels(train_feats, train_y, "train")
    test_feats, test_y = features_labels(test_feats, test_y, "test")
    if train_feats.shape[1] != test_feats.shape[1]:
        raise ValueError(f"train and test feature widths differ: {train_feats.shape[1]} vs "
                         f"{test_feats.shape[1]}")
    if len(train_y) < 2:
        raise ValueError("need at least 2 training samples")
    seen = torch.unique(train_y)
    if len(seen) < 2:
        raise ValueError(f"the training labels hold a single class ({int(seen[0])}); a probe needs "
                         f"samples of at least 2 classes")
    if len(test_y) == 0:
        warnings.warn("the test set is empty: test_acc is nan", UserWarning, stacklevel=3)
    else:
        unseen = torch.unique(test_y)[~torch.isin(torch.unique(test_y), seen)]
        if len(unseen):
            share = float(torch.isin(test_y, unseen).float().mean())
            names = unseen.tolist()
            warnings.warn(f"test classes {names[:20]}{' ...' if len(names) > 20 else ''} "
                          f"({len(names)} classes, {share:.1%} of the test samples) never occur in "
                          f"the training set: the probe cannot predict them", UserWarning, stacklevel=3)
    dev = torch.device(device) if device is not None else train_feats.device
    k = int(max(train_y.max(), test_y.max() if len(test_y) else 0)) + 1
    if num_classes is not None:
        if k > num_classes:
            raise ValueError(f"labels reach {k - 1}, outside [0, {num_classes})")
        k = num_classes
    xtr = train_feats.to(dev, torch.float32)
    mean = xtr.mean(0)
    std = xtr.std(0)
    # constant columns (up to float32 rounding, relative to their mean) are left unscaled, as in
    # scikit-learn's StandardScaler; tiny but varying columns are scaled up like any other
    const = (std == 0) | (std <= 1e-6 * mean.abs())
    std = torch.where(const, torch.ones_like(std), std)
    ztr = (xtr - mean) / std
    zte = (test_feats.to(dev, torch.float32) - mean) / std
    return ztr, train_y.to(dev), zte, test_y.to(dev), mean, std, k


def _acc(model: nn.Module, z: torch.Tensor, y: torch.Tensor) -> float:
    if len(y) == 0:
        return float("nan")
    with torch.no_grad():
        return float((model(z).argmax(1) == y).float().mean())


def linear_probe(
    train_feats: torch.Tensor,
    train_y: torch.Tensor,
    test_feats: torch.Tensor,
    test_y: torch.Tensor,
    weight_decay: float = 1e-4,
    max_iter: int = 300,
    device: torch.device | str | None = None,
    num_classes: int | None = None,
    tol: float = 1e-5,
) -> ProbeResult:
    """Multinomial logistic regression on standardised features (objective in the module docstring),
    full batch, up to ``max_iter`` L-BFGS iterations (stops earlier when the gradient's largest entry
    falls below ``tol``). Runs on ``device`` (default: the training features' device)."""
    weight_decay = _finite(weight_decay, "weight_decay", positive=False)
    if max_iter < 1:
        raise ValueError(f"max_iter must be >= 1, got {max_iter}")
    ztr, ytr, zte, yte, mean, std, k = _prepare(train_feats, train_y, test_feats, test_y,
                                                device, num_classes)
    lin = nn.Linear(ztr.shape[1], k).to(ztr.device)
    nn.init.zeros_(lin.weight)
    nn.init.zeros_(lin.bias)
    opt = torch.optim.LBFGS(lin.parameters(), lr=1, max_iter=max_iter, history_size=20,
                            tolerance_grad=tol, tolerance_change=1e-12,
                            line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(lin(ztr), ytr) + weight_decay * lin.weight.pow(2).sum()
        loss.backward()
        return loss

    with torch.enable_grad(), _cpu_threads_for(ztr.device, ztr.numel() * k):
        opt.step(closure)
        loss = float(closure().detach())
    state = opt.state[opt._params[0]]
    lin.requires_grad_(False)
    return ProbeResult(_acc(lin, ztr, ytr), _acc(lin, zte, yte), lin.weight.detach(),
                       lin.bias.detach(), mean, std, lin, loss, int(state.get("n_iter", 0)))


def mlp_probe(
    train_feats: torch.Tensor,
    train_y: torch.Tensor,
    test_feats: torch.Tensor,
    test_y: torch.Tensor,
    hidden: int = 1024,
    epochs: int = 100,
    lr: float = 1e-3,
    weight_decay: float = 1e-4,
    batch_size: int | None = None,
    seed: int = 0,
    device: torch.device | str | None = None,
    num_classes: int | None = None,
) -> ProbeResult:
    """A one-hidden-layer probe ``Linear(d, hidden) → ReLU → Linear(hidden, K)`` (hidden 1024 as in
    the paper) on standardised features, trained with AdamW (decoupled ``weight_decay``) for
    ``epochs`` passes: full batch when ``batch_size`` is None, else shuffled minibatches. Seeded:
    the same ``seed`` gives the same probe."""
    if hidden < 1 or epochs < 1:
        raise ValueError(f"hidden and epochs must be >= 1, got hidden={hidden}, epochs={epochs}")
    weight_decay = _finite(weight_decay, "weight_decay", positive=False)
    lr = _finite(lr, "lr", positive=True)
    if batch_size is not None:
        try:
            bs_ok = not isinstance(batch_size, bool) and operator.index(batch_size) >= 1
        except TypeError:
            bs_ok = False
        if not bs_ok:
            raise ValueError(f"batch_size must be None (full batch) or an integer >= 1, "
                             f"got {batch_size!r}")
        batch_size = operator.index(batch_size)
    ztr, ytr, zte, yte, mean, std, k = _prepare(train_feats, train_y, test_feats, test_y,
                                                device, num_classes)
    gen = torch.Generator().manual_seed(seed)
    mlp = nn.Sequential(nn.Linear(ztr.shape[1], hidden), nn.ReLU(), nn.Linear(hidden, k))
    with torch.no_grad():
        for layer in (mlp[0], mlp[2]):  # torch's default init, seeded by ``seed`` alone
            bound = 1.0 / layer.in_features ** 0.5
            for p in (layer.weight, layer.bias):
                p.copy_(torch.empty(p.shape).uniform_(-bound, bound, generator=gen))
    mlp = mlp.to(ztr.device)
    opt = torch.optim.AdamW(mlp.parameters(), lr=lr, weight_decay=weight_decay)
    n = len(ytr)
    bs = n if batch_size is None else min(batch_size, n)
    steps = 0
    with torch.enable_grad(), _cpu_threads_for(ztr.device, n * (ztr.shape[1] + k) * hidden):
        for _ in range(epochs):
            order = torch.randperm(n, generator=gen).to(ztr.device) if bs < n else None
            for i in range(0, n, bs):
                idx = order[i:i + bs] if order is not None else slice(None)
                loss = F.cross_entropy(mlp(ztr[idx]), ytr[idx])
                opt.zero_grad()
                loss.backward()
                opt.step()
                steps += 1
    mlp.requires_grad_(False)
    with torch.no_grad():
        final = float(F.cross_entropy(mlp(ztr), ytr))
    return ProbeResult(_acc(mlp, ztr, ytr), _acc(mlp, zte, yte), mlp[2].weight.detach(),
                       mlp[2].bias.detach(), mean, std, mlp, final, steps)


def probe_layers(
    model: nn.Module,
    train: Iterable,
    test: Iterable,
    layers: Sequence[str] | None = None,
    pool: str = "avg",
    weight_decay: float = 1e-4,
    max_iter: int = 300,
    scores: bool = False,
    device: torch.device | str | None = None,
    progress: bool = True,
):
    """Layer by layer: downstream NC1 on the training features and linear-probe accuracy.

    ``layers`` default to every fine-tuning unit of ``model`` (:func:`nclab.models.blocks`) followed
    by ``"output"``. One :func:`nclab.features.extract` pass over ``train`` and one over ``test``
    give every layer's pooled features; each layer gets ``nc1`` (paper eq. 4, on the training
    features) and a :func:`linear_probe`. With ``scores`` also :func:`nclab.transfer.h_score` and
    :func:`nclab.transfer.logme` of the training features.

    Returns a pandas ``DataFrame``, one row per layer: ``layer`` (name), ``depth`` (1-based position
    in ``layers``), ``dim``, ``nc1``, ``train_acc``, ``test_acc`` (fractions)
    [, ``h_score``, ``logme``].
    """
    import pandas as pd

    from .features import extract
    from .metrics import nc1

    if layers is None:
        from .models import blocks

        layers = [name for name, _ in blocks(model)] + ["output"]
    layers = list(layers)
    kw = dict(pool=pool, return_features=True, device=device, progress=progress)
    tr, ytr = extract(model, train, layers, **kw)
    te, yte = extract(model, test, layers, **kw)
    k = int(max(ytr.max(), yte.max())) + 1
    rows = []
    for i, name in enumerate(layers, start=1):
        res = linear_probe(tr[name], ytr, te[name], yte, weight_decay=weight_decay,
                           max_iter=max_iter, num_classes=k)
        row = dict(layer=name, depth=i, dim=tr[name].shape[1],
                   nc1=float(nc1(tr[name].double(), ytr, num_classes=k)),
                   train_acc=res.train_acc, test_acc=res.test_acc)
        if scores:
            from .transfer import h_score, logme

            row["h_score"] = h_score(tr[name], ytr)
            row["logme"] = logme(tr[name], ytr).score
        rows.append(row)
    return pd.DataFrame(rows)
