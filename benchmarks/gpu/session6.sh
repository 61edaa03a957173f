#!/usr/bin/env bash
# Session 6's GPU call (one H200, one call of <= 8 minutes): issue 10 item 1 (cheap checks) and
# the kernels after the grad_kernel split (issue 17).
#   1. compile + run every kernel configuration once against fp64 (compile_kernels.py)
#   2. the checks' cost: public calls with checks on / off / bare kernels, same run (bench_public overhead)
#   3. GPU tests of the kernels: the gpu-marked bf16 tests, then every refusal on CUDA
#   4. the public-call benchmark at N = 8,192 / 32,760 / 75,600 (hla, sdpa, variants, fla/retention)
# Each step runs under `timeout`, capped by what is left of TOTAL_S, so no hang can eat the call.
# Usage (on the device, in the repo root): bash benchmarks/gpu/session6.sh "$OUT"
#   SMOKE=1 bash benchmarks/gpu/session6.sh /tmp/out    (CPU, TRITON_INTERPRET=1: the python parts)
# fla-core and retention wheels, if carried in .gpu_w/, go to /tmp/site with pip --target.
set -u
OUT=${1:?output folder}; mkdir -p "$OUT"
TOTAL_S=${TOTAL_S:-465}
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
PY=${PY:-python3}
SMOKE=${SMOKE:-0}
left() { echo $(( TOTAL_S - SECONDS )); }
cap() { local want=$1 l; l=$(left); [ "$l" -lt "$want" ] && want=$l; [ "$want" -lt 5 ] && want=5; echo "$want"; }
step() { echo "== $1 (${SECONDS}s elapsed, $(left)s left)"; }

if [ "$SMOKE" = 1 ]; then
  export TRITON_INTERPRET=1; SM=--smoke
  NS_ARGS=""
else
  SM=""; NS_ARGS="--ns 8192 32760 75600"
  { nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm --format=csv
    $PY -c "import torch, triton; print(torch.__version__, triton.__version__)"; } > "$OUT/env.txt" 2>&1
  if ls .gpu_w/*.whl >/dev/null 2>&1; then
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .gpu_w/*.whl \
      > "$OUT/wheels.log" 2>&1; echo "wheels rc=$?"
    export PYTHONPATH=$PWD:/tmp/site
  else
    echo "no wheels in .gpu_w: no fla/retention rows"
  fi
fi

step "1 compile_kernels"
timeout $(cap 70) $PY benchmarks/gpu/compile_kernels.py $SM --out "$OUT/compile.json" > "$OUT/compile.log" 2>&1
echo "compile rc=$?"; tail -2 "$OUT/compile.log"

step "2 checks overhead"
timeout $(cap 110) $PY benchmarks/gpu/bench_public.py $SM $NS_ARGS --only overhead --out "$OUT/overhead.json" \
  > "$OUT/overhead.log" 2>&1
echo "overhead rc=$?"; grep -o "'call': '[^']*', 'n': [0-9]*\|'overhead_vs_bare': [-0-9.e]*" "$OUT/overhead.log" | paste - - | tail -12

step "3 gpu tests"
if [ "$SMOKE" = 1 ]; then
  GPU_ARGS=(tests/test_triton_hla.py -k hedgehog)
  CHK_ARGS=(tests/test_triton_hla.py -k "fused_refuses_signed or fused_checks_cost")
else  # bf16 kernels (names with gpu), hedgehog, quadratic bf16; then every refusal on CUDA
  GPU_ARGS=(tests/test_triton_hla.py tests/test_quadratic.py -k "gpu or hedgehog or quadratic_matches")
  CHK_ARGS=(tests/test_triton_hla.py tests/test_quadratic.py tests/test_bad_input.py
            -k "fused_ or refuses or public_checks or nan or overflow or signed")
fi
timeout $(cap 130) $PY -m pytest -q -p no:cacheprovider --no-header "${GPU_ARGS[@]}" > "$OUT/gpu_tests.log" 2>&1
echo "gpu tests rc=$?" | tee -a "$OUT/gpu_tests.log"; tail -3 "$OUT/gpu_tests.log"
timeout $(cap 70) $PY -m pytest -q -p no:cacheprovider --no-header "${CHK_ARGS[@]}" > "$OUT/check_tests.log" 2>&1
echo "check tests rc=$?" | tee -a "$OUT/check_tests.log"; tail -3 "$OUT/check_tests.log"

step "4 public-call benchmark"
timeout $(cap 400) $PY benchmarks/gpu/bench_public.py $SM $NS_ARGS --only hla sdpa variants baselines \
  --out "$OUT/public_h200.json" > "$OUT/bench.log" 2>&1
echo "bench rc=$? (124: cut at the budget; rows so far are in the JSON)"; tail -2 "$OUT/bench.log"
step "done"
