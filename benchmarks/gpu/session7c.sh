#!/usr/bin/env bash
# Session 7, third GPU call: the baselines the session-6 table lacked (fla chunk_linear_attn
# K = 64 / 128 and power_retention deg 2, causal) beside hla() M = 1 (r = 64, 128) and M = 2
# (r = 64), causal, through the public call, in one run. Wheels carried in .gpu_w/.
# Usage (device, repo root): bash benchmarks/gpu/session7c.sh "$OUT"
set -u
OUT=${1:?output folder}; mkdir -p "$OUT"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .gpu_w/*.whl > "$OUT/wheels.log" 2>&1
echo "wheels rc=$?"; export PYTHONPATH=$PWD:/tmp/site
{ nvidia-smi --query-gpu=name,driver_version --format=csv; python3 -c "import torch, triton, fla; print(torch.__version__, triton.__version__, fla.__version__)"; } > "$OUT/env.txt" 2>&1
timeout ${BENCH_S:-280} python3 benchmarks/gpu/bench_public.py --only hla baselines --ns 8192 32760 75600 \
  --hla-calls 1:64:causal 1:128:causal 2:64:causal --out "$OUT/baselines_h200.json" > "$OUT/baselines.log" 2>&1
echo "bench rc=$?"; tail -5 "$OUT/baselines.log"
