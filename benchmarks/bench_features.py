"""Cost of many layer taps in one pass: nclab.features.extract against a bare forward pass, in one run.

The bare pass is ``model(x)`` under ``torch.inference_mode`` (bf16 autocast on CUDA, as extract)
over the same batches, already on the device. ``extract`` taps every block (ViT-B/32: its 12
encoder layers; ResNet-18: the stem ``maxpool`` + its 8 residual blocks) plus nothing else, pools
each tap and streams all taps together into one ``ClassStatsGroup`` (float64, a fixed number of
kernels per batch); the second variant returns the pooled features instead; the third streams each
tap into its own ``ClassStats`` (~16 kernels per tap and batch, what extract did before), for
comparison. Also printed: operations dispatched per batch by the two streaming updates (each one
a kernel launch on a GPU), counted by the PyTorch profiler on any device. Target (issue 4):
streaming ≤ 1.15× the bare pass. Random-init models: speed does not depend on the weights.

Measured on 2 CPU cores before the centred-moment accumulators (defaults: 224 px, batch 32, 4
batches, best of 3): streaming / bare forward ResNet-18 0.98x with the group, 1.00x per tap;
ViT-B/32 1.01x and 1.02x. Operations per batch of the statistics update with the centred
moments: ResNet-18's 9 taps, group 81 vs per-tap 567 (eager checks); ViT-B/32's 12 taps, group
66 (before: 38 vs 216 and 23 vs 288). GPU
timings of the group update are not measured yet (the per-tap route measured 1.25-1.27x on an
H200 for ResNet-18).

    python benchmarks/bench_features.py --device cuda                  # 224 px, batch 256
    python benchmarks/bench_features.py --quick                        # CPU, small, < 60 s

The ``--quick`` CPU run (64 px, 16 images) checks that the script works; its ratios are not the
target's: there the forward pass is tiny next to the per-tap float64 statistics (d x d per tap),
and on a shared CPU repeated timings vary by 2x. The 1.15x target is for 224 px, batch 256, GPU.
"""

from __future__ import annotations

import argparse
import time

import torch
from torch.profiler import ProfilerActivity, profile

from nclab.features import extract, pool_tap
from nclab.metrics import ClassStats, ClassStatsGroup
from nclab.models import blocks, load_backbone


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def taps(name: str, model: torch.nn.Module) -> list[str]:
    units = [n for n, _ in blocks(model)]
    return (["maxpool"] + units) if name.startswith("resnet") else units


def bare(model, data, dev) -> None:
    with torch.inference_mode(), torch.autocast(dev.type, dtype=torch.bfloat16,
                                                enabled=dev.type == "cuda"):
        for x, _ in data:
            model(x)


def per_tap(model, data, layers: list[str], classes: int, dev) -> dict[str, ClassStats]:
    """The comparison route: hooks, pooling, and one ClassStats per tap (each updated alone)."""
    stats = {n: ClassStats(classes, device=dev, check="auto") for n in layers}
    current: dict[str, torch.Tensor] = {}
    mods = dict(model.named_modules())
    hooks = [mods[n].register_forward_hook(
        lambda _m, _i, out, n=n: current.__setitem__(n, pool_tap(out, "avg", len(current["_y"]))))
        for n in layers]
    try:
        for x, y in data:
            current.clear()
            current["_y"] = y
            with torch.inference_mode(), torch.autocast(dev.type, dtype=torch.bfloat16,
                                                        enabled=dev.type == "cuda"):
                model(x)
            for n in layers:
                stats[n].update(current[n], y)
    finally:
        for h in hooks:
            h.remove()
    for s in stats.values():
        s.check()
    return stats


def update_ops(model, data, layers: list[str], classes: int, dev) -> tuple[int, int]:
    """Operations dispatched by one batch's statistics update: (group, one ClassStats per tap)."""
    feats, y = extract(model, data[:1], layers, return_features=True, progress=False)
    hs = {n: feats[n] for n in layers}
    group = ClassStatsGroup(classes, device=dev, check="eager")
    single = {n: ClassStats(classes, device=dev) for n in layers}

    def count(fn) -> int:
        fn()  # allocate first
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            fn()
        return sum(1 for e in prof.events() if e.name.startswith("aten::") and (
            e.cpu_parent is None or not e.cpu_parent.name.startswith("aten::")))

    return (count(lambda: group.update(hs, y)),
            count(lambda: [single[n].update(hs[n], y) for n in layers]))


def timed(fn, dev, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        _sync(dev)
        t0 = time.perf_counter()
        fn()
        _sync(dev)
        best = min(best, time.perf_counter() - t0)
    return best


def run(name: str, dev: torch.device, batch: int, n_batches: int, size: int, classes: int,
        repeats: int) -> dict:
    kwargs = {"img_size": size} if name == "vit_b32" else {}
    model = load_backbone(name, pretrained=False, **kwargs).to(dev).eval()
    if dev.type == "cuda":
        model.to(memory_format=torch.channels_last)
    gen = torch.Generator().manual_seed(0)
    data = [(torch.randn(batch, 3, size, size, generator=gen).to(dev),
             torch.randint(0, classes, (batch,), generator=gen).to(dev)) for _ in range(n_batches)]
    layers = taps(name, model)
    bare(model, data[:1], dev)  # warm-up (cuDNN autotune, allocator)
    extract(model, data[:1], layers, num_classes=classes, progress=False)
    t_bare = timed(lambda: bare(model, data, dev), dev, repeats)
    t_stats = timed(lambda: extract(model, data, layers, num_classes=classes, progress=False),
                    dev, repeats)
    t_feats = timed(lambda: extract(model, data, layers, return_features=True, progress=False),
                    dev, repeats)
    per_tap(model, data[:1], layers, classes, dev)
    t_tap = timed(lambda: per_tap(model, data, layers, classes, dev), dev, repeats)
    ops_group, ops_tap = update_ops(model, data, layers, classes, dev)
    n = batch * n_batches
    return dict(model=name, taps=len(layers), images=n, bare_ips=n / t_bare,
                stats_ratio=t_stats / t_bare, feats_ratio=t_feats / t_bare,
                tap_ratio=t_tap / t_bare, ops_group=ops_group, ops_tap=ops_tap)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--models", nargs="+", default=["resnet18", "vit_b32"])
    ap.add_argument("--batch-size", type=int, default=None)
    ap.add_argument("--batches", type=int, default=None)
    ap.add_argument("--image-size", type=int, default=None)
    ap.add_argument("--classes", type=int, default=100)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="small CPU-sized run (< 60 s)")
    args = ap.parse_args()
    dev = torch.device(args.device)
    cuda = dev.type == "cuda"
    batch = args.batch_size or (256 if cuda else 8 if args.quick else 32)
    n_batches = args.batches or (20 if cuda else 2 if args.quick else 4)
    size = args.image_size or (224 if cuda else 64 if args.quick else 224)
    if cuda:
        torch.backends.cudnn.benchmark = True
    print(f"device={dev} ({torch.cuda.get_device_name(dev) if cuda else 'cpu'}), batch={batch}, "
          f"batches={n_batches}, {size} px, K={args.classes}, best of {args.repeats}")
    print(f"{'model':10s} {'taps':>4s} {'bare img/s':>11s} {'stats/bare':>11s} {'feats/bare':>11s} "
          f"{'per-tap/bare':>13s} {'ops/batch group, per-tap':>26s}")
    worst = 0.0
    for name in args.models:
        r = run(name, dev, batch, n_batches, size, args.classes, args.repeats)
        worst = max(worst, r["stats_ratio"])
        print(f"{r['model']:10s} {r['taps']:4d} {r['bare_ips']:11.1f} {r['stats_ratio']:10.3f}x "
              f"{r['feats_ratio']:10.3f}x {r['tap_ratio']:12.3f}x {r['ops_group']:14d}, "
              f"{r['ops_tap']:9d}")
    print(f"summary: worst streaming ratio {worst:.3f}x (target <= 1.15x): "
          f"{'PASS' if worst <= 1.15 else 'FAIL'}")


if __name__ == "__main__":
    main()
