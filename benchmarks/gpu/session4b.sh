#!/usr/bin/env bash
# Session 4's second GPU call, after the compare rewrite (issue 12) and the kernel-tree cleanup
# (issue 10): the kernel tests on CUDA, the CPU-vs-CUDA table check on a small MiniLM capture,
# and one synthetic layer at N = 32,760 through compare's per-layer path.
# Usage (on the device, in the repo root): bash benchmarks/gpu/session4b.sh CAPTURE_DIR "$OUT"
set -u
CAP=${1:?capture folder}; OUT=${2:?output folder}
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
{ nvidia-smi --query-gpu=name,driver_version --format=csv; python3 -c "import torch, triton; print(torch.__version__, triton.__version__)"; } > "$OUT/env.txt" 2>&1
timeout ${TEST_S:-120} python3 -m pytest -q -p no:cacheprovider tests/test_triton_hla.py > "$OUT/gpu_tests.log" 2>&1; echo "gpu tests rc=$?" >> "$OUT/gpu_tests.log"
tail -3 "$OUT/gpu_tests.log"
timeout ${DEVICES_S:-110} python3 benchmarks/gpu/check_compare_devices.py --capture "$CAP" --out "$OUT/compare_devices_h200.json" > "$OUT/compare_devices.log" 2>&1; echo "compare devices rc=$?"
tail -3 "$OUT/compare_devices.log"
timeout ${SYNTH_S:-300} python3 benchmarks/gpu/bench_compare.py --device cuda --only synthetic --out "$OUT/compare_synthetic_h200.json" > "$OUT/compare_synthetic.log" 2>&1; echo "synthetic rc=$?"
tail -c 600 "$OUT/compare_synthetic.log"
