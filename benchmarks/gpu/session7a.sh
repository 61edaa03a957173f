#!/usr/bin/env bash
# Session 7, first GPU call (one H200): profiles to direct the work.
#   1. compare at SmolLM2's shape: fit and scoring times, torch profiles (profile_compare.py)
#   2. the public calls' host path: cProfile by own and cumulative time (profile_public.py)
#   3. the one-host-read test as changed in session 6 (form="contract"), on CUDA
# Usage (device, repo root): bash benchmarks/gpu/session7a.sh "$OUT"
set -u
OUT=${1:?output folder}; mkdir -p "$OUT"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
{ nvidia-smi --query-gpu=name,driver_version --format=csv; python3 -c "import torch, triton; print(torch.__version__, triton.__version__)"; } > "$OUT/env.txt" 2>&1
echo "== 1 profile compare ($SECONDS s)"
timeout 300 python3 benchmarks/gpu/profile_compare.py --out "$OUT/profile_compare.json" > "$OUT/profile_compare.txt" 2>&1
echo "rc=$?"; grep -E "^fit |^score " "$OUT/profile_compare.txt"
echo "== 2 profile public ($SECONDS s)"
timeout 90 python3 benchmarks/gpu/profile_public.py > "$OUT/profile_public.txt" 2>&1; echo "rc=$?"
echo "== 3 one-host-read test ($SECONDS s)"
timeout 90 python3 -m pytest -q -p no:cacheprovider --no-header tests/test_triton_hla.py -k one_host_read > "$OUT/host_read_test.log" 2>&1
echo "rc=$?"; tail -3 "$OUT/host_read_test.log"; echo "done ($SECONDS s)"
