"""What each fine-tuning method trains, and what nclab.finetune's wrapper costs, in one run.

1. Parameter budget (Table 3's "% params trained") of every registry backbone for each method,
   counted on the meta device (shapes only: instant, no memory). ResNet-50 (Block 8) and ViT-B/32
   (Layer 8) are printed beside the paper's values.
2. Step time (forward + backward + SGD) of prepared models against plain baselines on the same
   random batch: ``linear``/``full`` against the bare torchvision/timm model with a new ``nn.Linear``
   classifier (frozen / not frozen), ``scl`` (hook, pool, pad) and ``layer_lora`` against ``layer``.
   Ratios near 1.0 mean the wrapper adds nothing measurable. Random-init weights: speed does not
   depend on them.

    python benchmarks/bench_finetune_params.py --device cuda        # 224 px, batch 128
    python benchmarks/bench_finetune_params.py --quick              # CPU, ResNet-18 at 64 px, < 60 s
"""

from __future__ import annotations

import argparse
import copy
import time

import torch
import torch.nn.functional as F
from torch import nn

from nclab import finetune as FT
from nclab.models import BACKBONES, blocks, load_backbone

PAPER = {("resnet50", 10): (0.09, 8.23, 6.52), ("resnet50", 100): (0.86, 8.56, 7.24),
         ("vit_b32", 100): (0.09, 1.00, 8.18)}
BLOCK = {"densenet121": 3, "densenet169": 3, "densenet201": 3, "mobilenet_v2": 14,
         "googlenet": 7, "convnet_s": 3, "resnet_s": 2}


def budget(classes: list[int]) -> None:
    print("== % parameters trained (meta device; Block as the paper where it states one)")
    methods = ("linear", "mlp", "layer", "scl", "full", "layer_lora")
    print(f"{'model':14s} {'K':>4s} {'block':>18s} " + " ".join(f"{m:>10s}" for m in methods))
    for name in BACKBONES:
        with torch.device("meta"):
            model = load_backbone(name, pretrained=False,
                                  **({"device": "meta"} if name.startswith("clip") else {}))
        k = BLOCK.get(name)
        for K in classes:
            row = []
            for m in methods:
                try:
                    ft = FT.prepare(model, m, block=k, num_classes=K, copy=True)
                    row.append(f"{FT.trainable_percent(ft):10.2f}")
                except (ValueError, RuntimeError):  # e.g. a block wider than the feature
                    row.append(f"{'n/a':>10s}")
            unit = blocks(model)[(k or FT.prepare(model, 'layer', num_classes=K).block) - 1][0]
            print(f"{name:14s} {K:4d} {unit:>18s} " + " ".join(row))
            if (name, K) in PAPER:
                lin, mlp, layer = PAPER[(name, K)]
                print(f"{'  paper':14s} {K:4d} {'':>18s} {lin:10.2f} {mlp:10.2f} {layer:10.2f} "
                      f"{layer:10.2f} {100:10.2f}")


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def step_time(model: nn.Module, x: torch.Tensor, y: torch.Tensor, iters: int) -> float:
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=1e-3, momentum=0.9)
    amp = x.device.type == "cuda"

    def one() -> None:
        opt.zero_grad(set_to_none=True)
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=amp):
            loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()

    for _ in range(2):
        one()
    best = float("inf")
    for _ in range(3):
        _sync(x.device)
        t0 = time.perf_counter()
        for _ in range(iters):
            one()
        _sync(x.device)
        best = min(best, (time.perf_counter() - t0) / iters)
    return best


def bare(name: str, dev: torch.device, K: int, train_all: bool, size: int) -> nn.Module:
    """The plain library model with a new classifier: the baseline for linear / full."""
    model = load_backbone(name, pretrained=False, **({"img_size": size} if name == "vit_b32"
                                                      else {}))
    model = nn.Sequential(model, nn.Linear(model.num_features, K))
    for p in model[0].parameters():
        p.requires_grad_(train_all)
    return model.to(dev)


def timings(names: list[str], dev: torch.device, batch: int, size: int, iters: int,
            K: int = 100) -> None:
    print(f"\n== step time (fwd+bwd+SGD), batch {batch}, {size} px, {dev}")
    for name in names:
        kw = {"img_size": size} if name == "vit_b32" else {}
        base = load_backbone(name, pretrained=False, **kw)
        if dev.type == "cuda":
            base = base.to(memory_format=torch.channels_last)
        x = torch.randn(batch, 3, size, size, device=dev)
        y = torch.randint(0, K, (batch,), device=dev)
        res = {}
        for m in ("linear", "full", "layer", "scl", "layer_lora"):
            ft = FT.prepare(copy.deepcopy(base), m, num_classes=K,
                            block=BLOCK.get(name), copy=False).to(dev)
            res[m] = step_time(ft, x, y, iters)
        res["bare_linear"] = step_time(bare(name, dev, K, False, size), x, y, iters)
        res["bare_full"] = step_time(bare(name, dev, K, True, size), x, y, iters)
        print(f"{name}: " + ", ".join(f"{k} {v * 1e3:.1f} ms" for k, v in res.items()))
        print(f"  ratios: linear/bare {res['linear'] / res['bare_linear']:.2f}, full/bare "
              f"{res['full'] / res['bare_full']:.2f}, scl/layer {res['scl'] / res['layer']:.2f}, "
              f"layer_lora/layer {res['layer_lora'] / res['layer']:.2f}, layer/full "
              f"{res['layer'] / res['full']:.2f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--models", nargs="+", default=None)
    ap.add_argument("--batch", type=int, default=None)
    ap.add_argument("--size", type=int, default=None)
    ap.add_argument("--iters", type=int, default=None)
    ap.add_argument("--classes", type=int, nargs="+", default=[10, 100])
    ap.add_argument("--quick", action="store_true", help="CPU-sized run (< 60 s)")
    args = ap.parse_args()
    dev = torch.device(args.device)
    quick = args.quick or dev.type == "cpu"
    if dev.type == "cpu":
        torch.set_num_threads(1)
    names = args.models or (["resnet18"] if quick else ["resnet50", "vit_b32"])
    batch = args.batch or (16 if quick else 128)
    size = args.size or (64 if quick else 224)
    iters = args.iters or (2 if quick else 10)
    budget([10] if args.quick else args.classes)
    timings(names, dev, batch, size, iters)


if __name__ == "__main__":
    main()
