#!/usr/bin/env bash
# Session 4's GPU call: the GPU tests of the kernels, a host profile of the public calls, and
# the public-call benchmark. Usage (on the device, code in $1): bash session4.sh CODE_DIR "$OUT"
set -u
CODE=${1:?code folder}; OUT=${2:?output folder}
cd "$CODE"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
{ nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm --format=csv; python3 -c "import torch, triton; print(torch.__version__, triton.__version__)"; } > "$OUT/env.txt" 2>&1
timeout ${TEST_S:-240} python3 -m pytest -q -p no:cacheprovider tests/test_triton_hla.py tests/test_quadratic.py > "$OUT/gpu_tests.log" 2>&1; echo "gpu tests rc=$?" >> "$OUT/gpu_tests.log"
tail -4 "$OUT/gpu_tests.log"
[ "${PROFILE:-1}" = 1 ] && timeout 90 python3 benchmarks/gpu/profile_public.py > "$OUT/profile.txt" 2>&1; echo "profile rc=$?"
timeout ${BENCH_S:-300} python3 benchmarks/gpu/bench_public.py --out "$OUT/public_h200.json" ${BENCH_ARGS:-} > "$OUT/bench.log" 2>&1; echo "bench rc=$?"
tail -3 "$OUT/bench.log"
