#!/usr/bin/env bash
# Session 3's second GPU call: the GPU test files with short tracebacks, and the keyed
# CPU-vs-CUDA compare table check. Usage (on the device): bash benchmarks/gpu/session3b.sh "$OUT"
set -u
OUT=${1:?output folder}
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
timeout 150 python3 -m pytest -q -p no:cacheprovider --tb=short -x tests/test_triton_hla.py > "$OUT/gpu_tests_triton.log" 2>&1; echo "rc=$?" >> "$OUT/gpu_tests_triton.log"
timeout 150 python3 -m pytest -q -p no:cacheprovider --tb=short tests/test_quadratic.py tests/test_initial_state.py tests/test_metrics_streaming.py > "$OUT/gpu_tests_rest.log" 2>&1; echo "rc=$?" >> "$OUT/gpu_tests_rest.log"
tail -15 "$OUT/gpu_tests_triton.log"; tail -4 "$OUT/gpu_tests_rest.log"
timeout 80 python3 benchmarks/gpu/check_compare_devices.py --capture .gpu/cap_minilm --out "$OUT/compare_devices_h200.json" 2>&1 | tail -3
