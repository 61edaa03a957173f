#!/usr/bin/env bash
# Session 3's one GPU call: GPU tests of every new path, the CPU-vs-CUDA compare table, the
# validation overhead through the public calls, one-GPU sequence parallel, and the synthetic
# 32,760-token compare layer. Usage (on the device): bash benchmarks/gpu/session3.sh "$OUT"
set -u
OUT=${1:?output folder}
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
nvidia-smi --query-gpu=name,driver_version --format=csv > "$OUT/env.txt"
python3 -c "import torch, triton; print(torch.__version__, triton.__version__)" >> "$OUT/env.txt"
timeout 180 python3 -m pytest -q -p no:cacheprovider tests/test_triton_hla.py tests/test_quadratic.py tests/test_initial_state.py tests/test_bad_input.py tests/test_faults.py tests/test_metrics_streaming.py > "$OUT/gpu_tests.log" 2>&1; echo "gpu tests rc=$?" >> "$OUT/gpu_tests.log"
tail -5 "$OUT/gpu_tests.log"
timeout 90 python3 benchmarks/gpu/check_compare_devices.py --capture .gpu/cap_minilm --out "$OUT/compare_devices_h200.json" 2>&1 | tail -3
timeout 60 python3 benchmarks/validation_overhead.py --device cuda --n 8192 32760 --heads 12 --width 64 --dv 128 --dtype bfloat16 --repeats 20 2>&1 | tail -8
cp benchmarks/results/validation_overhead_cuda.json "$OUT/" 2>/dev/null
timeout 70 python3 benchmarks/gpu/bench_sequence_parallel.py --out "$OUT/sequence_parallel_1gpu.json" 2>&1 | tail -6
timeout 180 python3 benchmarks/gpu/bench_compare.py --only synthetic --device cuda --quiet --out "$OUT/compare_synthetic_h200.json" 2>&1 | tail -5
echo done
