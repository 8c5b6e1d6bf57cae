#!/usr/bin/env bash
# Every benchmark on one CUDA GPU, one after another, each under its own time limit; the log goes
# to ${OUT:-.}/gpu_bench.log, and the lines that compare with the issues' targets are repeated at
# the end. Usage: bash benchmarks/gpu_all.sh [seconds-per-benchmark] (default 60; bench_train, the
# longest, now also times ViT-B/32 Layer FT with recompute_frozen: raise the limit if it is cut off).
set -u
limit=${1:-60}
log=${OUT:-.}/gpu_bench.log
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  python3 -c "import torch; print('torch', torch.__version__)"
  for b in metrics train features transfer pretrain finetune_params; do
    echo "=== bench_$b (limit ${limit}s)"
    t0=$(date +%s)
    timeout "$limit" python3 "benchmarks/bench_$b.py" --device cuda 2>&1 | grep -v Warning
    echo "--- bench_$b exit ${PIPESTATUS[0]} after $(( $(date +%s) - t0 )) s"
  done
} 2>&1 | tee "$log"
echo "=== against the targets (from $log)"
grep -E "target|PASS|FAIL|BELOW|ABOVE| ok$|recomputation" "$log" | grep -v "^=== "
