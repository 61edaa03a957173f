#!/usr/bin/env bash
# Session 9 (one H200): the public-call table of issues 10 and 11 in one process, plus the
# stash of half 1 of the SmolLM2 GGUF when .gpu_p1 travels (for `session5_compare.sh capture`
# and `... compare`, the issue-12 calls that follow on the same warm machine).
#   bench_public.py, categories in this order (CATS): cuDNN SDPA (d = 64, 128); hla() (M = 1, 2 at
#   r = 64, 128; M = 1 r = 128 causal for fla's K = 128; tied M = 3, 4 at r = 8 by dispatch and
#   forced quadratic); make_variant(spec).forward; fla chunk_linear_attn and power_retention
#   (wheels in .gpu_w/, minutes of autotuning on a cold machine, so they run last); then
#   `overhead` when CATS names it (it always runs first inside the script).
#   Rows are written as they finish, so a cut run keeps them.
# Usage (device, repo root; carry .gpu_w and, on the first call, .gpu_p1):
#   BENCH_S=540 bash benchmarks/gpu/session9.sh "$OUT"
#   CATS="overhead sdpa hla variants baselines" BENCH_S=570 bash benchmarks/gpu/session9.sh "$OUT"
set -u
OUT=${1:?output folder}; mkdir -p "$OUT"
if [ -f .gpu_p1/gguf.part1 ]; then
  mkdir -p /tmp/smol && cp .gpu_p1/gguf.part1 /tmp/smol/ && echo "stashed half 1: $(du -b /tmp/smol/gguf.part1)"
fi
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .gpu_w/*.whl \
  > "$OUT/wheels.log" 2>&1; echo "wheels rc=$?"; export PYTHONPATH=$PWD:/tmp/site
{ nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm --format=csv
  python3 -c "import torch, triton, fla; print(torch.__version__, triton.__version__, fla.__version__)"; } \
  > "$OUT/env.txt" 2>&1
# shellcheck disable=SC2086
timeout ${BENCH_S:-540} python3 benchmarks/gpu/bench_public.py --only ${CATS:-sdpa hla variants baselines} \
  --ns 8192 32760 75600 --hla-calls 1:64 1:64:causal 1:128:causal 2:64 2:64:causal 2:128 2:128:causal \
  3:8:tied 3:8:tied:quadratic 4:8:tied 4:8:tied:quadratic \
  --out "$OUT/public_h200.json" > "$OUT/bench.log" 2>&1
echo "bench rc=$?"; tail -4 "$OUT/bench.log"
