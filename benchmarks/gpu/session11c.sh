#!/usr/bin/env bash
# Session 11, call B (one H200; carry .gpu_w for the environment line only): the GPU tests of
# the fused kernels (CUDA bf16: the variants' split path, checks, widths), then the public-call
# benchmark for the rows this session's changes touch, in one process: value-check overhead,
# cuDNN SDPA (d = 64, 128), hla() M = 1 and 2, and make_variant(spec).forward for M <= 2.
# (M = 3, 4 and the fla / power_retention baselines stay session 9's rows.)
# Usage (device, repo root): bash benchmarks/gpu/session11c.sh "$OUT"
set -u
OUT=${1:?output folder}; mkdir -p "$OUT"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
{ nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm --format=csv
  python3 -c "import torch, triton; print(torch.__version__, triton.__version__)"; } > "$OUT/env_b.txt" 2>&1
timeout ${TEST_S:-150} python3 -m pytest -q -p no:cacheprovider --no-header tests/test_triton_hla.py \
  > "$OUT/gpu_tests.log" 2>&1
echo "gpu tests rc=$?"; tail -3 "$OUT/gpu_tests.log"
timeout ${BENCH_S:-380} python3 benchmarks/gpu/bench_public.py --only overhead sdpa hla variants \
  --ns 8192 32760 75600 --hla-calls 1:64 1:64:causal 1:128:causal 2:64 2:64:causal 2:128 2:128:causal \
  --variants linear:phi=elu1 power:p=2 hla:m=2,phi=affine hla:m=2,phi=affine,proj=1 hla:m=2,phi=affine,tied=0 \
  --out "$OUT/public_h200.json" > "$OUT/bench.log" 2>&1
echo "bench rc=$?"; tail -3 "$OUT/bench.log" | cut -c1-300
