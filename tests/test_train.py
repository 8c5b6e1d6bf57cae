"""Tests for nclab.train: Table 4 defaults, the cosine schedule, the step itself against a bare loop,
evaluation metrics against independent references, resume equivalence, atomic checkpoints, NaN
detection, the cached prefix and DDP on two CPU processes (gloo)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from torch import nn

from nclab import train as T
from nclab.data import normalize, synthetic_images
from nclab.models import ConvNetS

pytestmark = pytest.mark.usefixtures("one_thread")


# --------------------------------------------------------------------------- stand-in models
class Tiny(nn.Module):
    """A prepared-model stand-in: ``features`` = a 2-block ConvNetS, ``head`` = Linear."""

    def __init__(self, k: int = 3, method: str = "layer", tune_block: int | None = 2) -> None:
        super().__init__()
        self.backbone = ConvNetS(width=4, depth=2)
        self.head = nn.Linear(self.backbone.num_features, k)
        self.method = method
        if tune_block is not None:
            for p in self.backbone.parameters():
                p.requires_grad_(False)
            for p in self.backbone.features[tune_block - 1].parameters():
                p.requires_grad_(True)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


class NoNorm(nn.Module):
    """No batch norm: its gradient does not depend on how a batch is split across processes."""

    def __init__(self, k: int = 3) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                                  nn.Flatten())
        self.head = nn.Linear(6, k)
        self.method = "full"

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def _data(per_class: int = 16, seed: int = 0):
    return synthetic_images(num_classes=3, per_class=per_class, size=16, seed=seed)


def _tiny(seed: int = 0, **kw) -> Tiny:
    torch.manual_seed(seed)
    return Tiny(**kw)


def _strip(records):
    return [{k: v for k, v in r.items() if k != "seconds"} for r in records]


# --------------------------------------------------------------------------- defaults, schedule
def test_default_hparams_table4():
    assert T.default_hparams("full", "resnet") == {"lr": 5e-2, "weight_decay": 5e-4}
    assert T.default_hparams("linear", "cnn") == {"lr": 5e-2, "weight_decay": 1e-4}
    assert T.default_hparams("mlp", "cnn") == {"lr": 5e-2, "weight_decay": 5e-4}
    assert T.default_hparams("scl", "resnet") == {"lr": 5e-2, "weight_decay": 1e-4}
    assert T.default_hparams("full", "vit") == {"lr": 1e-3, "weight_decay": 0.0}
    assert T.default_hparams("layer", "vit") == {"lr": 1e-2, "weight_decay": 0.0}
    with pytest.raises(ValueError, match="valid methods"):
        T.default_hparams("bogus", "cnn")
    with pytest.raises(ValueError, match="family"):
        T.default_hparams("full", "rnn")


def test_model_family():
    import timm

    assert T.model_family(Tiny()) == "cnn"
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, img_size=32,
                            depth=1)
    assert T.model_family(vit) == "vit"


def test_cosine_lr_formula():
    lr, floor, total = 0.05, 1e-4, 40
    assert T.cosine_lr(0, total, lr, floor) == pytest.approx(lr)
    assert T.cosine_lr(total // 2, total, lr, floor) == pytest.approx((lr + floor) / 2)
    assert T.cosine_lr(total, total, lr, floor) == pytest.approx(floor)
    for s in range(total):
        expect = floor + (lr - floor) * (1 + math.cos(math.pi * s / total)) / 2
        assert T.cosine_lr(s, total, lr, floor) == pytest.approx(expect, rel=1e-12)
    vals = [T.cosine_lr(s, total, lr, floor) for s in range(total)]
    assert all(a > b for a, b in zip(vals, vals[1:]))


def test_fit_step_equals_bare_sgd_loop_with_cosine_schedule():
    """fit on a fixed list of batches == a hand-written SGD(momentum 0.9, wd) loop whose rate
    follows lr(s) = min_lr + (lr - min_lr)(1 + cos(pi s / S)) / 2."""
    data = _data()
    gen = torch.Generator().manual_seed(1)
    x = normalize(data.x)
    order = torch.randperm(len(x), generator=gen)
    loader = [(x[order[i:i + 8]], data.y[order[i:i + 8]]) for i in range(0, len(x), 8)]
    epochs, lr, wd = 3, 0.1, 5e-4
    torch.manual_seed(0)
    ref = NoNorm()
    model = NoNorm()
    model.load_state_dict(ref.state_dict())
    hist = T.fit(model, loader, loader, epochs=epochs, lr=lr, weight_decay=wd, progress=False)

    opt = torch.optim.SGD(ref.parameters(), lr=lr, momentum=0.9, weight_decay=wd)
    total, step = epochs * len(loader), 0
    for _ in range(epochs):
        for xb, yb in loader:
            for g in opt.param_groups:
                g["lr"] = 1e-4 + (lr - 1e-4) * (1 + math.cos(math.pi * step / total)) / 2
            loss = nn.functional.cross_entropy(ref(xb), yb)
            opt.zero_grad()
            loss.backward()
            opt.step()
            step += 1
    for (name, a), b in zip(model.state_dict().items(), ref.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7, msg=name)
    # the recorded epoch rates are the schedule at each epoch's first step
    s = len(loader)
    for e, rec in enumerate(hist.records):
        assert rec["lr"] == pytest.approx(1e-4 + (lr - 1e-4) * (1 + math.cos(math.pi * e * s / total)) / 2)


def test_defaults_from_method_and_profile():
    data = _data(per_class=4)
    hist = T.fit(_tiny(method="full", tune_block=None), data, None, epochs=1, progress=False)
    assert hist.config["lr"] == 5e-2 and hist.config["weight_decay"] == 5e-4
    assert hist.config["batch_size"] == 64  # smoke profile
    assert hist.config["min_lr"] == T.MIN_LR


# --------------------------------------------------------------------------- evaluation
def test_metrics_match_independent_references():
    train, test = _data(seed=0), _data(per_class=10, seed=1)
    model = _tiny()
    hist = T.fit(model, train, test, epochs=2, lr=0.05, weight_decay=1e-4, batch_size=16,
                 layerwise=[1, 2], progress=False)
    rec = hist.final
    x = normalize(test.x)
    with torch.no_grad():
        h = model.features(x).double().numpy()
        b1 = model.backbone.features[0](x).mean(dim=(2, 3)).double().numpy()
        logits = model(x)
    y = test.y.numpy()
    assert rec["test_acc"] == pytest.approx(float((logits.argmax(1) == test.y).double().mean()))
    assert rec["test_loss"] == pytest.approx(float(nn.functional.cross_entropy(logits, test.y)),
                                             rel=1e-5)

    def nc1_numpy(feats):  # (1/K) tr(Sigma_W Sigma_B^+), mu_G = mean of class means
        k = y.max() + 1
        mus = np.stack([feats[y == c].mean(0) for c in range(k)])
        mu_g = mus.mean(0)
        sw = sum((feats[y == c] - mus[c]).T @ (feats[y == c] - mus[c]) for c in range(k)) / len(y)
        sb = (mus - mu_g).T @ (mus - mu_g) / k
        return float(np.trace(sw @ np.linalg.pinv(sb, rcond=1e-10, hermitian=True))) / k

    assert rec["nc1"] == pytest.approx(nc1_numpy(h), rel=1e-4)
    assert set(rec["layer_nc1"]) == {"block1", "block2"}
    assert rec["layer_nc1"]["block1"] == pytest.approx(nc1_numpy(b1), rel=1e-4)
    assert rec["layer_nc1"]["block2"] == pytest.approx(rec["nc1"], rel=1e-6)  # block 2 = last
    df = hist.to_frame()
    assert list(df.index) == [1, 2] and "nc1[block1]" in df.columns
    fig = hist.plot()
    assert len(fig.axes) == 3


def test_eval_every_and_generic_iterables():
    data = _data(per_class=8)
    x = normalize(data.x)
    loader = [(x[i:i + 8], data.y[i:i + 8]) for i in range(0, len(x), 8)]
    hist = T.fit(_tiny(), loader, loader, epochs=3, eval_every=2, lr=0.05, weight_decay=0,
                 progress=False)
    evaluated = [r["epoch"] for r in hist.records if r["test_acc"] is not None]
    assert evaluated == [2, 3]


def test_trains_only_trainable_parameters_and_learns():
    train, test = _data(per_class=20, seed=0), _data(per_class=10, seed=1)
    model = _tiny()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    hist = T.fit(model, train, test, epochs=6, lr=0.1, weight_decay=0, batch_size=12, progress=False)
    after = model.state_dict()
    assert torch.equal(before["backbone.features.0.0.weight"], after["backbone.features.0.0.weight"])
    assert not torch.equal(before["backbone.features.1.0.weight"],
                           after["backbone.features.1.0.weight"])
    # batch norm statistics adapt to the downstream data for every method (App. E)
    assert not torch.equal(before["backbone.features.0.1.running_mean"],
                           after["backbone.features.0.1.running_mean"])
    assert hist.records[-1]["train_loss"] < hist.records[0]["train_loss"]
    assert hist.final["test_acc"] > 0.5


def test_bad_input():
    data = _data(per_class=4)
    with pytest.raises(ValueError, match="prepare"):
        T.fit(nn.Linear(2, 2), data, None, epochs=1)
    with pytest.raises(ValueError, match="augment"):
        T.fit(_tiny(), data, None, epochs=1, cache_prefix=True, augment=lambda x: x)
    with pytest.raises(ValueError, match="checkpoint"):
        T.fit(_tiny(), data, None, epochs=1, resume=True)
    with pytest.raises(ValueError, match="epochs"):
        T.fit(_tiny(), data, None, epochs=0)


# --------------------------------------------------------------------------- robustness
def _flip(x: torch.Tensor) -> torch.Tensor:
    """A random horizontal flip drawn from torch's global RNG (so resume must restore it)."""
    return torch.where(torch.rand(len(x), 1, 1, 1) < 0.5, x.flip(-1), x)


class _Stop(Exception):
    pass


def test_resume_equals_uninterrupted_run(tmp_path):
    train, test = _data(seed=0), _data(per_class=6, seed=1)
    kw = dict(epochs=4, lr=0.05, weight_decay=1e-4, batch_size=12, augment=_flip, seed=3,
              progress=False)
    full = _tiny()
    h_full = T.fit(full, train, test, checkpoint=tmp_path / "a.pt", **kw)

    def stop_after_two(rec):
        if rec["epoch"] == 2:
            raise _Stop

    with pytest.raises(_Stop):
        T.fit(_tiny(), train, test, checkpoint=tmp_path / "b.pt", callback=stop_after_two, **kw)
    assert T.load_checkpoint(tmp_path / "b.pt")["epoch"] == 2
    resumed = _tiny(seed=5)  # different init: everything must come from the checkpoint
    h_res = T.fit(resumed, train, test, checkpoint=tmp_path / "b.pt", resume=True, **kw)
    for (name, a), b in zip(full.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name
    assert _strip(h_full.records) == _strip(h_res.records)
    # a finished run resumes to the same history without training
    again = T.fit(_tiny(), train, test, checkpoint=tmp_path / "b.pt", resume=True, **kw)
    assert _strip(again.records) == _strip(h_full.records)
    with pytest.raises(ValueError, match="other settings"):
        T.fit(_tiny(), train, test, checkpoint=tmp_path / "b.pt", resume=True,
              **{**kw, "lr": 0.01})


def test_checkpoint_is_weights_only_and_atomic(tmp_path, monkeypatch):
    data = _data(per_class=8)
    path = tmp_path / "ck.pt"
    real_save = torch.save
    calls = {"n": 0}

    def failing_save(obj, f, *a, **k):
        calls["n"] += 1
        if calls["n"] == 4:  # second epoch's file write (each epoch: payload bytes, then the file)
            f.write(b"\x80\x02partial-garbage")
            raise OSError("disk full (simulated)")
        return real_save(obj, f, *a, **k)

    monkeypatch.setattr(torch, "save", failing_save)
    with pytest.raises(OSError, match="simulated"):
        T.fit(_tiny(), data, None, epochs=3, lr=0.05, weight_decay=0, batch_size=8,
              checkpoint=path, progress=False)
    state = T.load_checkpoint(path)  # the epoch-1 checkpoint survives intact (weights_only inside)
    assert state["epoch"] == 1 and set(state) >= {"model", "optimizer", "rng", "history"}
    assert [p.name for p in tmp_path.iterdir()] == ["ck.pt"]  # no temporary file left behind


def test_nan_loss_names_epoch_and_step():
    data = _data(per_class=16)
    calls = {"n": 0}

    def poison(x):
        calls["n"] += 1
        return x * float("nan") if calls["n"] == 9 else x  # epoch 2 (6 steps/epoch), step 3

    with pytest.raises(T.NonFiniteLossError, match="epoch 2, step 3"):
        T.fit(_tiny(), data, None, epochs=3, lr=0.05, weight_decay=0, batch_size=8, augment=poison,
              progress=False)


# --------------------------------------------------------------------------- cached prefix
def _split_tiny(model):
    """Stand-in for nclab.finetune.split: prefix = block 1, suffix = block 2 + pool + head."""
    bb = model.backbone
    prefix = bb.features[0]
    suffix = nn.Sequential(bb.features[1], bb.pool, nn.Flatten(), model.head)
    return prefix, suffix


def test_cached_prefix_matches_uncached_with_frozen_prefix_stats(monkeypatch):
    import nclab.finetune

    monkeypatch.setattr(nclab.finetune, "split", _split_tiny, raising=False)
    train, test = _data(seed=0), _data(per_class=6, seed=1)
    kw = dict(epochs=3, lr=0.05, weight_decay=1e-4, batch_size=12, progress=False)
    a, b = _tiny(), _tiny()
    before = {k: v.clone() for k, v in a.state_dict().items()}
    h_cached = T.fit(a, train, test, cache_prefix=True, **kw)
    h_plain = T.fit(b, train, test, frozen_prefix_stats=True, **kw)
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values()):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6, msg=name)
    assert h_cached.final["test_acc"] == h_plain.final["test_acc"]
    assert h_cached.final["nc1"] == pytest.approx(h_plain.final["nc1"], rel=1e-4)
    # the prefix's batch-norm statistics stay frozen (the documented deviation)
    for k in ("backbone.features.0.1.running_mean", "backbone.features.0.1.running_var"):
        assert torch.equal(before[k], a.state_dict()[k])
    assert not torch.equal(before["backbone.features.1.1.running_mean"],
                           a.state_dict()["backbone.features.1.1.running_mean"])


# --------------------------------------------------------------------------- distributed
def _ddp_worker(rank: int, world: int, init_file: str, out_file: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)
        model = NoNorm()
        hist = T.fit(model, _data(seed=0), _data(per_class=7, seed=1), epochs=2, lr=0.1,
                     weight_decay=1e-4, batch_size=8, progress=False)
        if rank == 0:
            torch.save({"model": model.state_dict(), "final": dict(hist.final),
                        "world": hist.config["world_size"]}, out_file)
    finally:
        dist.destroy_process_group()


def test_ddp_two_processes_match_single_process(tmp_path):
    """Two gloo ranks, global batch 8 (4 per rank) == one process with batch 8: parameters to 1e-5
    and final accuracy/NC1 to 1e-4 relative (float rounding of the all-reduced gradient mean)."""
    out = tmp_path / "ddp.pt"
    mp.spawn(_ddp_worker, args=(2, str(tmp_path / "init"), str(out)), nprocs=2, join=True)
    ddp = torch.load(out, weights_only=True)
    assert ddp["world"] == 2
    torch.manual_seed(0)
    single = NoNorm()
    hist = T.fit(single, _data(seed=0), _data(per_class=7, seed=1), epochs=2, lr=0.1,
                 weight_decay=1e-4, batch_size=8, progress=False)
    for (name, a), b in zip(single.state_dict().items(), ddp["model"].values()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)
    assert ddp["final"]["test_acc"] == hist.final["test_acc"]
    assert ddp["final"]["nc1"] == pytest.approx(hist.final["nc1"], rel=1e-4)
    assert ddp["final"]["train_loss"] == pytest.approx(hist.final["train_loss"], rel=1e-5)


# --------------------------------------------------------------------------- with nclab.finetune
def _backbone(seed: int = 0) -> ConvNetS:
    torch.manual_seed(seed)
    return ConvNetS(width=4, depth=3)


@pytest.mark.parametrize("method", ["layer", "scl"])
def test_cached_prefix_with_finetune_split(method):
    from nclab.finetune import prepare

    train, test = _data(seed=0), _data(per_class=6, seed=1)
    kw = dict(epochs=2, lr=0.05, weight_decay=1e-4, batch_size=12, progress=False)
    a = prepare(_backbone(), method, block=2, num_classes=3)
    b = prepare(_backbone(), method, block=2, num_classes=3)
    b.load_state_dict(a.state_dict())
    h_cached = T.fit(a, train, test, cache_prefix=True, **kw)
    h_plain = T.fit(b, train, test, frozen_prefix_stats=True, **kw)
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values()):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6, msg=name)
    assert h_cached.final["nc1"] == pytest.approx(h_plain.final["nc1"], rel=1e-4)


@pytest.mark.parametrize("kind", ["layer_lp", "blocks"])
@pytest.mark.parametrize("arch", ["convnet_s", "resnet_s"])
def test_split_and_cached_prefix_for_layer_lp_and_tune_blocks(kind, arch):
    from nclab.finetune import split
    from nclab.models import load_backbone

    torch.manual_seed(0)
    bb = _backbone() if arch == "convnet_s" else load_backbone("resnet20", pretrained=False)

    def make():
        torch.manual_seed(1)
        return T.layer_lp(bb, 2, num_classes=3) if kind == "layer_lp" else \
            T.tune_blocks(bb, [2, 3], num_classes=3)

    m = make().eval()
    prefix, suffix = split(m)
    assert not any(p.requires_grad for p in prefix.parameters())
    trainable = {id(p) for p in m.parameters() if p.requires_grad}
    assert trainable == {id(p) for p in suffix.parameters() if p.requires_grad}
    x = torch.randn(4, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(suffix(prefix(x)), m(x))
    train, test = _data(seed=0), _data(per_class=6, seed=1)
    kw = dict(epochs=2, lr=0.05, weight_decay=1e-4, batch_size=12, progress=False)
    a, b = make(), make()
    h_cached = T.fit(a, train, test, cache_prefix=True, **kw)
    h_plain = T.fit(b, train, test, frozen_prefix_stats=True, **kw)
    for (name, u), v in zip(a.state_dict().items(), b.state_dict().values()):
        torch.testing.assert_close(u, v, rtol=1e-5, atol=1e-6, msg=name)
    assert h_cached.final["nc1"] == pytest.approx(h_plain.final["nc1"], rel=1e-4)


def test_split_of_tune_blocks_without_blocks_is_linear():
    from nclab.finetune import split

    m = T.tune_blocks(_backbone(), [], num_classes=3)
    prefix, suffix = split(m)
    assert prefix is m.backbone and suffix is m.head


def test_layer_lp_drops_later_layers():
    bb = _backbone()
    model = T.layer_lp(bb, 2, num_classes=3)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {n for n, _ in model.named_parameters()
                         if n.startswith(("backbone.backbone.features.1.", "head."))}
    model.eval()
    x = torch.randn(5, 3, 16, 16)
    with torch.no_grad():
        z = bb.eval().features[1](bb.features[0](x)).mean(dim=(2, 3))  # pooled Block 2 output
        torch.testing.assert_close(model(x), model.head(z))
    assert model.num_features == 4 and model.method == "layer_lp"
    with pytest.raises(ValueError, match="1..3"):
        T.layer_lp(bb, 4, num_classes=3)


def test_tune_blocks_trains_exactly_those_blocks():
    model = T.tune_blocks(_backbone(), [2, 3], num_classes=3)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {n for n, _ in model.named_parameters()
                         if n.startswith(("backbone.features.1.", "backbone.features.2.", "head."))}
    assert model.method == "layer" and model.tuned_blocks == (2, 3)
    lp = T.tune_blocks(_backbone(), [], num_classes=3)
    assert {n for n, p in lp.named_parameters() if p.requires_grad} == {"head.weight", "head.bias"}
    assert lp.method == "linear"


def test_run_method_row():
    from nclab.finetune import trainable_percent

    train, test = _data(seed=0), _data(per_class=6, seed=1)
    row = T.run_method(_backbone(), "scl", train, test, 2, num_classes=3, block=2, batch_size=16,
                       layerwise=True, progress=False)
    assert row["method"] == "scl" and row["block"] == 2 and row["seed"] == 0
    assert 0 <= row["test_acc"] <= 1 and row["nc1"] > 0
    assert set(row["layer_nc1"]) == {"backbone.features.0", "backbone.features.1",
                                     "backbone.features.2"}
    assert 0 < row["params_percent"] < 100
    again = T.run_method(_backbone(), "scl", train, test, 2, num_classes=3, block=2,
                         batch_size=16, progress=False)
    assert again["test_acc"] == row["test_acc"]  # seeded: the same run twice
    lp = T.run_method(_backbone(), "layer_lp", train, test, 1, num_classes=3, block=1,
                      batch_size=16, progress=False)
    assert lp["params_percent"] == pytest.approx(trainable_percent(T.layer_lp(_backbone(), 1, 3)))


def test_input_size_and_normalisation_from_the_model():
    from nclab.models import load_backbone

    tv = load_backbone("resnet18", pretrained=False)
    assert T._input_size(tv) == 224  # torchvision ImageNet family
    assert T._input_size(_backbone()) is None  # small nets keep the data's size
    assert T._norm_stats(_backbone()) == (T.IMAGENET_MEAN, T.IMAGENET_STD)


def test_out_of_memory_suggests_a_batch_size():
    class Exploding(Tiny):
        def forward(self, x):
            raise T._OOM("CUDA out of memory (simulated)")

    with pytest.raises(RuntimeError, match="batch_size=16") as err:
        T.fit(Exploding(), _data(per_class=8), None, epochs=1, lr=0.05, weight_decay=0,
              batch_size=32, progress=False)
    assert isinstance(err.value.__cause__, T._OOM)


# --------------------------------------------------------------------------- issue 21: degenerate runs
def test_test_set_missing_a_class_records_nan_nc1_and_keeps_training(tmp_path):
    import warnings

    from nclab.data import TensorDataset

    train, full = _data(per_class=8, seed=0), _data(per_class=4, seed=1)
    keep = full.y != 2
    test = TensorDataset(full.x[keep], full.y[keep])
    ckpt = tmp_path / "run.pt"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        hist = T.fit(_tiny(), train, test, epochs=2, lr=0.05, weight_decay=0, batch_size=8,
                     checkpoint=ckpt, progress=False)
    msgs = [str(w.message) for w in caught if "NC1 is undefined" in str(w.message)]
    assert len(msgs) == 2  # one per evaluation, not a cascade
    assert "penultimate" in msgs[0] and "no samples" in msgs[0]
    assert [r["epoch"] for r in hist.records] == [1, 2]
    assert all(math.isnan(r["nc1"]) and 0 <= r["test_acc"] <= 1 for r in hist.records)
    assert T.load_checkpoint(ckpt)["epoch"] == 2


def test_failing_evaluation_keeps_the_epoch_and_resume_goes_on(tmp_path, monkeypatch):
    """The epoch's checkpoint is written before its evaluation: an evaluation that raises after
    epoch 1 leaves epoch 1 on disk, and resume evaluates it and continues to the same run."""
    train, test = _data(seed=0), _data(per_class=6, seed=1)
    kw = dict(epochs=3, lr=0.05, weight_decay=1e-4, batch_size=12, augment=_flip, seed=3,
              progress=False)
    full = _tiny()
    h_full = T.fit(full, train, test, **kw)
    real = T._evaluate

    def broken(*args, **kwargs):
        raise RuntimeError("evaluation failed")

    monkeypatch.setattr(T, "_evaluate", broken)
    path = tmp_path / "c.pt"
    with pytest.raises(RuntimeError, match="evaluation failed"):
        T.fit(_tiny(), train, test, checkpoint=path, **kw)
    state = T.load_checkpoint(path)
    assert state["epoch"] == 1 and state["history"][0]["test_acc"] is None
    monkeypatch.setattr(T, "_evaluate", real)
    resumed, seen = _tiny(seed=5), []
    h_res = T.fit(resumed, train, test, checkpoint=path, resume=True,
                  callback=lambda r: seen.append(r["epoch"]), **kw)
    assert seen == [1, 2, 3]  # epoch 1's record completed by its evaluation, then epochs 2-3
    for (name, a), b in zip(full.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name
    assert _strip(h_res.records) == _strip(h_full.records)


def test_labels_outside_the_head_fail_before_the_first_step():
    from nclab.data import TensorDataset

    data = _data(per_class=4)  # labels 0..2
    model = _tiny(k=2)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"train labels span \[0, 2\] but the model's head has 2 outputs"):
        T.fit(model, data, None, epochs=1, lr=0.05, weight_decay=0, progress=False)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    two = TensorDataset(data.x[data.y < 2], data.y[data.y < 2])
    with pytest.raises(ValueError, match=r"test labels span \[0, 2\].*2 outputs"):
        T.fit(_tiny(k=2), two, data, epochs=1, lr=0.05, weight_decay=0, progress=False)
    x = normalize(data.x)
    loader = [(x[i:i + 4], data.y[i:i + 4]) for i in range(0, len(x), 4)]  # generic: checked per batch
    with pytest.raises(ValueError, match=r"train labels span \[2, 2\] but the model's head has 2"):
        T.fit(_tiny(k=2), loader, None, epochs=1, lr=0.05, weight_decay=0, progress=False)


def _run(path, epochs, **kw):
    return T.fit(_tiny(), _data(per_class=8), None, epochs=epochs, lr=0.05, weight_decay=0,
                 batch_size=8, checkpoint=path, progress=False, **kw)


def test_damaged_checkpoints_raise_checkpoint_error_naming_the_file(tmp_path):
    path = tmp_path / "ck.pt"
    _run(path, 1)
    good = path.read_bytes()
    outer = torch.load(path, weights_only=True)
    assert outer["sha256"] and T.load_checkpoint(path)["epoch"] == 1
    flipped = bytearray(good)
    mid = len(flipped) // 2  # inside the payload tensor's storage
    flipped[mid:mid + 16] = bytes(b ^ 0xFF for b in flipped[mid:mid + 16])
    cases = {"damaged": bytes(flipped), "truncated": good[: len(good) // 2], "empty": b"",
             "not a readable": bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8))}
    for what, blob in cases.items():
        bad = tmp_path / f"bad_{len(blob)}.pt"
        bad.write_bytes(blob)
        with pytest.raises(T.CheckpointError, match=what) as err:
            T.load_checkpoint(bad)
        assert str(bad) in str(err.value) and "delete it" in str(err.value)
    plain = tmp_path / "plain.pt"
    torch.save({"model": {}}, plain)
    with pytest.raises(T.CheckpointError, match="not written by nclab"):
        T.load_checkpoint(plain)
    assert issubclass(T.CheckpointError, RuntimeError) and "CheckpointError" in T.__all__


def test_corrupt_latest_falls_back_to_previous_and_stale_tmp_removed(tmp_path):
    path = tmp_path / "ck.pt"
    ref = _run(tmp_path / "ref.pt", 3)
    def stop(record):
        if record["epoch"] == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        _run(path, 3, callback=stop)
    prev = tmp_path / "ck.pt.prev"
    assert T.load_checkpoint(prev)["epoch"] == 1 and T.load_checkpoint(path)["epoch"] == 2
    path.write_bytes(path.read_bytes()[:100])  # the latest is damaged
    stale = tmp_path / "ck.pt.tmp999999"
    stale.write_bytes(b"junk")
    with pytest.warns(UserWarning, match=r"resuming from the previous checkpoint .*ck.pt.prev \(epoch 1\)"):
        hist = _run(path, 3, resume=True)
    assert not stale.exists()
    assert _strip(hist.records) == _strip(ref.records)  # epochs 2-3 redone: the same run
    prev.write_bytes(b"")
    path.write_bytes(b"")
    with pytest.raises(T.CheckpointError, match="ck.pt.prev is empty"):
        _run(path, 3, resume=True)


def test_stale_tmp_cleanup_spares_live_writers(tmp_path):
    """Two runs writing the same checkpoint at once (two chapters executed in parallel): the cleanup
    on start deletes the temporary file of a dead pid, never that of a live process."""
    import subprocess
    import sys

    path = tmp_path / "ck.pt"
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    try:
        live_tmp = tmp_path / f"ck.pt.tmp{live.pid}"
        dead_tmp = tmp_path / f"ck.pt.tmp{dead.pid}"
        other = tmp_path / "ck.pt.tmpx1"  # not a pid suffix: never touched
        for f in (live_tmp, dead_tmp, other):
            f.write_bytes(b"partial")
        assert T._pid_alive(live.pid) and not T._pid_alive(dead.pid) and not T._pid_alive(0)
        T._remove_stale_tmp(path)
        assert live_tmp.exists() and other.exists() and not dead_tmp.exists()
    finally:
        live.kill()
        live.wait()
    T._remove_stale_tmp(path)
    assert not live_tmp.exists()
