"""Throughput of nclab.pretrain.pretrain against a bare PyTorch loop of the same step, in one run.

``pretrain`` runs one epoch (no cache) over a uint8 :class:`~nclab.data.TensorDataset` of random
CIFAR-100-sized images (N x 3 x 32 x 32, 100 classes) moved to the device, batching, augmenting
(level ``--aug-level``, on the device) and normalising there. The bare loop is the minimal step on
random float tensors already on the device (already "normalised"): the same backbone + linear
classifier, bf16 autocast on CUDA, channels_last, cross-entropy, backward, SGD(momentum 0.9) step,
cosine LR update. Both run the same number of optimiser steps; images/s are compared (target of
issue 9: pretrain >= 85 % of the bare loop on a GPU).

It first prints, per augmentation level, what one ``Augment(level)`` call on a 256 x 3 x 32 x 32
batch costs: the number of top-level aten ops (torch.profiler; at 32 px on a GPU each op is a
kernel launch and launches, not arithmetic, set the cost) and ms per call on the device.

    python benchmarks/bench_pretrain.py --device cuda      # CIFAR ResNet-18, 50000 images, batch 256
    python benchmarks/bench_pretrain.py --quick            # tiny ConvNet on CPU, < 60 s
    python benchmarks/bench_pretrain.py --augment-only     # only the per-level Augment table
"""

from __future__ import annotations

import argparse
import math
import time

import torch
import torch.nn.functional as F
from torch import nn

from nclab.data import TensorDataset
from nclab.models import ConvNetS
from nclab.pretrain import AUG_LEVELS, Augment, cifar_resnet18, pretrain


def sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def make_model(name: str) -> nn.Module:
    torch.manual_seed(0)
    if name == "resnet18":
        return cifar_resnet18()
    if name == "convnet_s":
        return ConvNetS(width=16, depth=3)
    raise ValueError(f"unknown model {name!r} (resnet18, convnet_s)")


def top_level_ops(fn, x: torch.Tensor) -> int:
    """Top-level aten ops (ops not called from inside another aten op) of one ``fn(x)``."""
    from torch.profiler import ProfilerActivity, profile

    fn(x)  # warm-up: cached constants, generator
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn(x)
    return sum(1 for e in prof.events() if e.name.startswith("aten::")
               and (e.cpu_parent is None or not e.cpu_parent.name.startswith("aten::")))


def augment_table(dev: torch.device, batch: int = 256, size: int = 32, repeats: int = 50) -> None:
    """Per level: top-level aten ops and ms per ``Augment(level)`` call (best of 5 x ``repeats``)."""
    gen = torch.Generator(device=dev).manual_seed(0)
    x = torch.rand(batch, 3, size, size, device=dev, generator=gen)
    print(f"Augment on {batch}x3x{size}x{size} float32 ({dev}):")
    print("  level  ops                               aten ops   ms/call")
    for lvl in AUG_LEVELS:
        aug = Augment(lvl)
        ops = top_level_ops(aug, x)
        best = math.inf
        for _ in range(5):
            sync(dev)
            t0 = time.perf_counter()
            for _ in range(repeats):
                aug(x)
            sync(dev)
            best = min(best, (time.perf_counter() - t0) / repeats)
        names = "+".join(AUG_LEVELS[lvl]) or "identity"
        print(f"  {lvl:5d}  {names:32s}  {ops:8d}  {1e3 * best:8.3f}")


def bare_loop(backbone: nn.Module, n: int, k: int, batch: int, dev: torch.device,
              amp: bool) -> float:
    """Images/s of the minimal training step on random tensors already on the device."""
    model = nn.Sequential(backbone, nn.Linear(backbone.num_features, k)).to(dev).train()
    if dev.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    steps = n // batch
    gen = torch.Generator(device=dev).manual_seed(0)
    x = torch.randn(batch, 3, 32, 32, device=dev, generator=gen)
    if dev.type == "cuda":
        x = x.contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, k, (batch,), device=dev, generator=gen)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
    autocast = torch.autocast(dev.type, dtype=torch.bfloat16, enabled=amp)

    def step() -> None:
        with autocast:
            out = model(x)
        loss = F.cross_entropy(out.float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()

    for _ in range(3):  # warm-up (cuDNN autotune, allocator)
        step()
    sync(dev)
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    sync(dev)
    return steps * batch / (time.perf_counter() - t0)


def pretrain_ips(model_name: str, data: TensorDataset, batch: int, dev: torch.device,
                 aug_level: int, amp: bool, **kwargs: object) -> float:
    """Images/s of one epoch of ``pretrain`` (drop_last steps only count full batches)."""
    # warm-up on a small slice so one-off costs (cuDNN autotune) are not charged to either side
    warm = TensorDataset(data.x[: 4 * batch], data.y[: 4 * batch], data.classes)
    pretrain(make_model(model_name), warm, epochs=1, batch_size=batch, aug_level=aug_level,
             device=dev, cache=False, progress=False, amp=amp, **kwargs)
    sync(dev)
    t0 = time.perf_counter()
    pretrain(make_model(model_name), data, epochs=1, batch_size=batch, aug_level=aug_level,
             device=dev, cache=False, progress=False, amp=amp, **kwargs)
    sync(dev)
    return (len(data) // batch) * batch / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--quick", action="store_true", help="tiny model and data (CPU, < 60 s)")
    ap.add_argument("--model", default=None, help="resnet18 (default on CUDA) or convnet_s")
    ap.add_argument("--n", type=int, default=None, help="images (default 50000; 1024 quick)")
    ap.add_argument("--classes", type=int, default=100)
    ap.add_argument("--batch-size", type=int, default=None, help="default 256 (64 quick)")
    ap.add_argument("--aug-levels", default="1,3,5", help="comma-separated levels to time")
    ap.add_argument("--no-amp", action="store_true", help="float32 instead of bf16 autocast")
    ap.add_argument("--augment-only", action="store_true",
                    help="print only the per-level Augment table (op counts, ms per call)")
    ap.add_argument("--variants", action="store_true",
                    help="also time SupCon (two views) and PGD-3 adversarial training (default on "
                         "CUDA); these do more work per image and are reported as cost, not target")
    args = ap.parse_args()

    dev = torch.device(args.device)
    quick = args.quick or dev.type == "cpu" and args.n is None
    model_name = args.model or ("convnet_s" if quick else "resnet18")
    n = args.n or (1024 if quick else 50000)
    batch = args.batch_size or (64 if quick else 256)
    amp = dev.type == "cuda" and not args.no_amp
    levels = [int(v) for v in args.aug_levels.split(",")]
    if dev.type == "cuda":
        torch.backends.cudnn.benchmark = True
    if quick and dev.type == "cpu":
        torch.set_num_threads(1)  # tiny nets on a shared CPU: threads fight more than they help

    augment_table(dev)
    if args.augment_only:
        return
    gen = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=gen),
                         torch.randint(0, args.classes, (n,), generator=gen),
                         [str(i) for i in range(args.classes)])
    print(f"device {dev} ({torch.cuda.get_device_name(dev) if dev.type == 'cuda' else 'cpu'}), "
          f"model {model_name}, N={n}, batch {batch}, amp(bf16)={amp}, torch {torch.__version__}")

    bare = bare_loop(make_model(model_name), n, args.classes, batch, dev, amp)
    print(f"bare loop (random tensors on device)   {bare:10.0f} img/s")
    rows = []
    for lvl in levels:
        ips = pretrain_ips(model_name, data, batch, dev, lvl, amp)
        rows.append((f"pretrain CE, aug level {lvl}", ips))
        print(f"pretrain CE, aug level {lvl}            {ips:10.0f} img/s  "
              f"{100 * ips / bare:5.1f} % of bare")
    if args.variants or (dev.type == "cuda" and not quick):
        for name, kw in [("SupCon + 2-layer head, aug 3", dict(loss="supcon", proj_head_layers=2)),
                         ("CE + PGD-3 (8/255), aug 3", dict(adversarial_eps=8, pgd_steps=3))]:
            ips = pretrain_ips(model_name, data, batch, dev, 3, amp, **kw)
            print(f"pretrain {name:30s} {ips:10.0f} img/s  ({bare / ips:.1f}x the bare step's "
                  f"time per image; more work per image)")
    print("summary: " + "; ".join(f"{name}: {100 * ips / bare:.1f} % of bare" for name, ips in rows)
          + f"  (target >= 85 % on GPU; bare {bare:.0f} img/s)")


if __name__ == "__main__":
    main()
