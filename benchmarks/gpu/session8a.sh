#!/usr/bin/env bash
# Session 8, first GPU call (one H200, <= 10 min): the public-call table of issues 10 and 11, in
# one process, and half 1 of the SmolLM2 GGUF stashed for the issue-12 calls that follow
# (`session5_compare.sh capture`, then `... compare`, on the same warm machine).
#   bench_public.py: cuDNN SDPA, hla() (M = 1, 2; r = 64, 128; M = 1 r = 128 causal for fla's
#   K = 128; tied M = 3, 4 at r = 8 by dispatch and forced quadratic), make_variant(spec).forward, fla chunk_linear_attn and power_retention (wheels in
#   .gpu_w/), then the checks' overhead; rows are written as they finish, so a cut run keeps them.
# Usage (device, repo root; carry .gpu_p1 and .gpu_w): bash benchmarks/gpu/session8a.sh "$OUT"
set -u
OUT=${1:?output folder}; mkdir -p "$OUT"
mkdir -p /tmp/smol && cp .gpu_p1/gguf.part1 /tmp/smol/ && echo "stashed half 1: $(du -b /tmp/smol/gguf.part1)"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .gpu_w/*.whl \
  > "$OUT/wheels.log" 2>&1; echo "wheels rc=$?"; export PYTHONPATH=$PWD:/tmp/site
{ nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm --format=csv
  python3 -c "import torch, triton, fla; print(torch.__version__, triton.__version__, fla.__version__)"; } \
  > "$OUT/env.txt" 2>&1
timeout ${BENCH_S:-400} python3 benchmarks/gpu/bench_public.py --only sdpa baselines hla variants overhead \
  --ns 8192 32760 75600 --hla-calls 1:64 1:64:causal 1:128:causal 2:64 2:64:causal 2:128 2:128:causal \
  3:8:tied 3:8:tied:quadratic 4:8:tied 4:8:tied:quadratic \
  --out "$OUT/public_h200.json" > "$OUT/bench.log" 2>&1
echo "bench rc=$?"; tail -4 "$OUT/bench.log"
