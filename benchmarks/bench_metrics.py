"""Benchmark nclab.metrics: NC1 vs a plain float64 NumPy eq. 4, TF32 robustness, streaming taps.

Prints ratios measured in this one run:

1. NC1 of N x d float32 features with K classes: ``nclab.nc1(H, y)`` (low-rank route, float64) vs a
   plain float64 NumPy implementation (class means, Sigma_W, Sigma_B, ``pinv``); the two must agree
   to 1e-6 relative. On CUDA also a dense float64 torch ``pinv`` route. The streamed
   ``ClassStats`` route, and its NC1 of the same features shifted by 1e8 (float64; it must stay
   within 1e-8 of the unshifted value). Beside it the arithmetic limit: the projection of the
   centred features on the r <= K-1 directions of Sigma_B costs about N*d*K multiply-adds, timed
   at this machine's float64 GEMM rate (a d x d product measured in the same run). The BLAS
   behind NumPy and torch, their thread counts and the OPENBLAS_* variables in force are printed
   first.
2. (CUDA) With TF32 switched on globally nclab's NC1 must not move; a naive float32 second-moment
   GEMM is shown for contrast.
3. Streaming cost: a torchvision ResNet-18 (random weights) with 9 taps (stem + 8 residual blocks)
   updating ``ClassStats`` vs a bare forward pass (bf16 autocast on CUDA, channels_last).

Usage::

    python benchmarks/bench_metrics.py --quick              # < 60 s on a CPU
    python benchmarks/bench_metrics.py                      # N=50000, d=2048, K=100 on CPU
    python benchmarks/bench_metrics.py --device cuda        # GPU figures
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch

import nclab
from nclab.metrics import ClassStats, nc1

TAPS = ["maxpool", "layer1.0", "layer1.1", "layer2.0", "layer2.1", "layer3.0", "layer3.1",
        "layer4.0", "layer4.1"]


def sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def timed(fn, dev: torch.device, repeats: int, warmup: int = 1) -> tuple[float, object]:
    """Median wall time (s) of ``fn()`` over ``repeats`` after ``warmup`` calls; and its value."""
    out = None
    for _ in range(warmup):
        out = fn()
    sync(dev)
    times = []
    for _ in range(repeats):
        sync(dev)
        t0 = time.perf_counter()
        out = fn()
        sync(dev)
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def blas_report() -> None:
    """Which BLAS NumPy and torch call, with how many threads, and the OPENBLAS_* settings."""
    import os

    try:
        from threadpoolctl import threadpool_info

        for info in threadpool_info():
            print(f"  BLAS {info.get('internal_api')} {info.get('version')} "
                  f"({info.get('architecture', '?')}), {info.get('num_threads')} threads, "
                  f"{os.path.basename(str(info.get('filepath')))}")
    except ImportError:
        print("  threadpoolctl not installed: BLAS not reported")
    for var in ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE", "OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS",
                "MKL_NUM_THREADS"):
        print(f"  {var}={os.environ.get(var, '(unset)')}")
    print(f"  torch: {torch.get_num_threads()} threads, MKL {torch.backends.mkl.is_available()}, "
          f"BLAS {torch.__config__.show().split('BLAS_INFO=')[-1].split(',')[0]}")


def gemm_rate(d: int, dev: torch.device, repeats: int = 3) -> float:
    """Multiply-adds per second of a float64 d x d GEMM on ``dev`` (torch)."""
    a = torch.randn(d, d, dtype=torch.float64, device=dev)
    t, _ = timed(lambda: a @ a, dev, repeats)
    return d**3 / t


def make_features(n: int, d: int, k: int, dev: torch.device, seed: int = 0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    y = torch.randint(0, k, (n,), generator=g)
    means = 3.0 * torch.randn(k, d, generator=g) / d**0.5 + 1.0
    h = means[y] + torch.randn(n, d, generator=g) / d**0.5 * 4.0
    return h.float().to(dev), y.to(dev)


def numpy_nc1(h: np.ndarray, y: np.ndarray, k: int) -> float:
    """Plain float64 NumPy eq. 4: class means, Sigma_W, Sigma_B, pinv (rcond as nclab's rtol)."""
    h = h.astype(np.float64)
    mus = np.stack([h[y == c].mean(axis=0) for c in range(k)])
    mu_g = mus.mean(axis=0)
    centred = h - mus[y]
    sigma_w = centred.T @ centred / len(h)
    m = mus - mu_g
    sigma_b = m.T @ m / k
    return float(np.trace(sigma_w @ np.linalg.pinv(sigma_b, rcond=1e-10)) / k)


def torch_dense_nc1(h: torch.Tensor, y: torch.Tensor, k: int) -> float:
    """Dense float64 route on the device: full Sigma_W and pinv(Sigma_B) (d x d)."""
    h = h.double()
    counts = torch.bincount(y, minlength=k).double()
    mus = torch.zeros(k, h.shape[1], dtype=h.dtype, device=h.device).index_add_(0, y, h)
    mus /= counts[:, None]
    c = h - mus[y]
    sigma_w = c.T @ c / len(h)
    m = mus - mus.mean(0)
    sigma_b = m.T @ m / k
    return float(torch.trace(sigma_w @ torch.linalg.pinv(sigma_b, rtol=1e-10, hermitian=True)) / k)


def naive_fp32_nc1(h: torch.Tensor, y: torch.Tensor, k: int) -> float:
    """The trap: second moments by a float32 GEMM (TF32 when enabled), then float64 algebra."""
    counts = torch.bincount(y, minlength=k).float()
    sums = torch.zeros(k, h.shape[1], device=h.device).index_add_(0, y, h)
    second = (h.T @ h).double()
    mus = sums.double() / counts.double()[:, None]
    sigma_w = (second - (counts.double()[:, None] * mus).T @ mus) / len(h)
    m = mus - mus.mean(0)
    sigma_b = m.T @ m / k
    return float(torch.trace(sigma_w @ torch.linalg.pinv(sigma_b, rtol=1e-10, hermitian=True)) / k)


def set_tf32(on: bool) -> None:
    torch.backends.cuda.matmul.allow_tf32 = on
    torch.backends.cudnn.allow_tf32 = on
    torch.set_float32_matmul_precision("high" if on else "highest")


def bench_nc1(args, dev: torch.device, rows: list) -> None:
    n, d, k = args.n, args.d, args.k
    h, y = make_features(n, d, k, dev)
    print(f"\n[NC1] N={n} d={d} K={k} float32 on {dev}")
    t_nc, v_nc = timed(lambda: nc1(h, y, num_classes=k), dev, args.repeats)
    print(f"  nclab.nc1(H, y)             {t_nc * 1e3:10.1f} ms   NC1 = {v_nc:.10g}")
    rows.append(("nc1 nclab (ms)", t_nc * 1e3))
    rate = gemm_rate(d, dev)
    floor = n * d * k / rate
    print(f"  arithmetic limit            {floor * 1e3:10.1f} ms   (N*d*K = {n * d * k:.3g} multiply-adds "
          f"at {rate / 1e9:.2f} G float64 multiply-adds/s) -> nclab at {floor / t_nc:.0%} of it")
    rows.append(("nc1 arithmetic limit (ms)", floor * 1e3))
    rows.append(("nc1 nclab / limit", t_nc / floor))

    def streamed():
        return nc1(ClassStats(k).update(h, y))

    t_st, v_st = timed(streamed, dev, args.repeats)
    print(f"  ClassStats.update + nc1     {t_st * 1e3:10.1f} ms   rel.diff {abs(v_st - v_nc) / v_nc:.1e}")
    # correctness on this device: batches of 256 (the CUDA-graph update path on GPUs) and a
    # deferred bad-label error
    batched = ClassStats(k, check="auto")
    for i in range(0, n, 256):
        batched.update(h[i:i + 256], y[i:i + 256])
    err_b = abs(nc1(batched) - v_nc) / v_nc
    bad_y = y[:256].clone()
    bad_y[0] = k
    raised = False
    try:
        ClassStats(k, check="auto").update(h[:256], bad_y).check()
    except ValueError:
        raised = True
    print(f"  batches of 256: rel.diff {err_b:.1e} (must be <= 1e-9); bad label raised: {raised}")
    assert err_b <= 1e-9 and raised, "ClassStats on this device disagrees with the direct route"
    # a shared offset 1e8 times the spread (float64 input): centred moments keep every digit
    h64 = h.double()
    v64 = nc1(h64, y, num_classes=k)
    shifted = ClassStats(k, check="auto")
    for i in range(0, n, 256):
        shifted.update(h64[i:i + 256] + 1e8, y[i:i + 256])
    err_off = abs(nc1(shifted) - v64) / v64
    print(f"  offset 1e8 x spread, batches of 256: rel.diff {err_off:.1e} (must be <= 1e-8)")
    rows.append(("nc1 rel.diff at offset 1e8", err_off))
    assert err_off <= 1e-8, "streamed NC1 drifts under a large shared offset"
    if not args.skip_numpy:
        hn, yn = h.float().cpu().numpy(), y.cpu().numpy()
        t_np, v_np = timed(lambda: numpy_nc1(hn, yn, k), torch.device("cpu"), 1, warmup=0)
        err = abs(v_nc - v_np) / abs(v_np)
        print(f"  NumPy float64 eq. 4 (CPU)   {t_np * 1e3:10.1f} ms   rel.diff {err:.1e}")
        print(f"  -> speed-up vs NumPy: {t_np / t_nc:.1f}x (target >= 10x); equal to 1e-6: "
              f"{err <= 1e-6}")
        rows.append(("nc1 speed-up vs NumPy", t_np / t_nc))
        rows.append(("nc1 rel.diff vs NumPy", err))
    if dev.type == "cuda":
        t_dense, v_dense = timed(lambda: torch_dense_nc1(h, y, k), dev, args.repeats)
        print(f"  dense float64 torch pinv    {t_dense * 1e3:10.1f} ms   rel.diff "
              f"{abs(v_dense - v_nc) / v_nc:.1e}   -> nclab {t_dense / t_nc:.1f}x faster")
        rows.append(("nc1 speed-up vs dense torch pinv", t_dense / t_nc))
        set_tf32(False)
        naive_off = naive_fp32_nc1(h, y, k)
        set_tf32(True)
        v_tf32 = nc1(h, y, num_classes=k)
        naive_on = naive_fp32_nc1(h, y, k)
        set_tf32(False)
        moved = abs(v_tf32 - v_nc) / v_nc
        print(f"  TF32 on: nclab NC1 moved by {moved:.1e} (must be ~0); naive fp32 GEMM moved by "
              f"{abs(naive_on - naive_off) / naive_off:.1e} (and is off the float64 value by "
              f"{abs(naive_on - v_nc) / v_nc:.1e})")
        rows.append(("nc1 TF32 rel. move", moved))


class _Repeat:
    """The same (x, y) batch ``n`` times (a re-iterable with a length)."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, n: int) -> None:
        self.x, self.y, self.n = x, y, n

    def __len__(self) -> int:
        return self.n

    def __iter__(self):
        for _ in range(self.n):
            yield self.x, self.y


def _hook_extract(model, data, k: int, amp: bool, update: bool = True) -> dict:
    """Taps with plain forward hooks (the fallback if nclab.features.extract is missing; with
    ``update=False`` only hooks + pooling, to split the streaming cost)."""
    mods = dict(model.named_modules())
    stats = {t: ClassStats(k, check="auto") for t in TAPS}
    cur: dict = {}
    hs = [mods[t].register_forward_hook(lambda m, i, o, t=t: cur.__setitem__(t, o.mean((2, 3))))
          for t in TAPS]
    try:
        for x, y in data:
            with torch.inference_mode(), torch.autocast(x.device.type, torch.bfloat16,
                                                        enabled=amp):
                model(x)
            if update:
                for t in TAPS:
                    stats[t].update(cur[t], y)
    finally:
        for h in hs:
            h.remove()
    return stats


def bench_stream(args, dev: torch.device, rows: list) -> None:
    from torchvision.models import resnet18

    bs, size, nb, k = args.batch_size, args.image_size, args.batches, 100
    amp = dev.type == "cuda"
    model = resnet18(weights=None).to(dev).eval().to(memory_format=torch.channels_last)
    g = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(bs, 3, size, size, generator=g).to(dev).contiguous(
        memory_format=torch.channels_last)
    y = torch.randint(0, k, (bs,), generator=g).to(dev)
    data = _Repeat(x, y, nb)
    print(f"\n[streaming] ResNet-18 (random weights), {len(TAPS)} taps, batch {bs}, {size} px, "
          f"{nb} batches, {'bf16 autocast' if amp else 'fp32'} on {dev}")

    def bare():
        for xb, _ in data:
            with torch.inference_mode(), torch.autocast(dev.type, torch.bfloat16, enabled=amp):
                model(xb)

    extract = getattr(nclab.features, "extract", None)

    def tapped():
        if extract is not None:
            return extract(model, data, TAPS, num_classes=k, amp=amp, progress=False)
        return _hook_extract(model, data, k, amp)

    t_bare, _ = timed(bare, dev, args.repeats)
    t_tap, stats = timed(tapped, dev, args.repeats)
    ratio = t_tap / t_bare
    print(f"  bare forward      {t_bare / nb * 1e3:8.2f} ms/batch  ({bs * nb / t_bare:8.0f} img/s)")
    print(f"  9 taps + stats    {t_tap / nb * 1e3:8.2f} ms/batch  ({bs * nb / t_tap:8.0f} img/s)"
          f"   via {'nclab.features.extract' if extract else 'plain hooks'}")
    print(f"  -> streaming cost {ratio:.3f}x a bare forward (target <= 1.15x on a GPU)")
    assert all(s.num_samples == bs * nb for s in stats.values())
    t_pool, _ = timed(lambda: _hook_extract(model, data, k, amp, update=False), dev, args.repeats)
    t_hook, _ = timed(lambda: _hook_extract(model, data, k, amp), dev, args.repeats)
    print(f"  breakdown: plain hooks + pooling {t_pool / t_bare:.3f}x, plain hooks + pooling + "
          f"ClassStats.update {t_hook / t_bare:.3f}x")
    rows.append(("  hooks + pooling only (x bare)", t_pool / t_bare))
    rows.append(("  plain hooks + updates (x bare)", t_hook / t_bare))
    rows.append(("streaming cost (x bare forward)", ratio))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--n", type=int, default=50_000)
    p.add_argument("--d", type=int, default=2048)
    p.add_argument("--k", type=int, default=100)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--skip-numpy", action="store_true")
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--image-size", type=int, default=None)
    p.add_argument("--batches", type=int, default=None)
    p.add_argument("--no-stream", action="store_true")
    p.add_argument("--no-nc1", action="store_true")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--quick", action="store_true", help="small sizes (< 60 s on a CPU)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    dev = torch.device(args.device)
    gpu = dev.type == "cuda"
    if args.quick:
        args.n, args.d, args.k, args.repeats = 5000, 256, 20, 2
    args.batch_size = args.batch_size or (256 if gpu else 8 if args.quick else 32)
    args.image_size = args.image_size or (224 if gpu else 64 if args.quick else 112)
    args.batches = args.batches or (20 if gpu else 2 if args.quick else 4)
    print(f"nclab {nclab.__version__}, torch {torch.__version__}, device {dev}"
          + (f" ({torch.cuda.get_device_name(dev)})" if gpu else f", {torch.get_num_threads()} "
             "CPU threads"))
    blas_report()
    rows: list = []
    if not args.no_nc1:
        bench_nc1(args, dev, rows)
    if not args.no_stream:
        bench_stream(args, dev, rows)
    print("\nsummary")
    for name, v in rows:
        print(f"  {name:36s} {v:.4g}")


if __name__ == "__main__":
    main()
