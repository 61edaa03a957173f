#!/usr/bin/env bash
# Session 10, call 1 of 3 (one H200; carry .gpu_p1 and .gpu_w):
#   - stash half 1 of the SmolLM2 GGUF for `session5_compare.sh capture` / `compare` (calls 2, 3);
#   - the compare table on CUDA against the CPU one on two small captures: MiniLM (bidirectional)
#     and SmolLM2 (causal: the blocks that drop unseen keys), check_compare_devices.py;
#   - the value checks' cost (bench_public.py --only overhead) and a host profile of the public calls.
# Usage (device, repo root): bash benchmarks/gpu/session10a.sh "$OUT"
set -u
OUT=${1:?output folder}; mkdir -p "$OUT"
[ -f .gpu_p1/gguf.part1 ] && mkdir -p /tmp/smol && cp .gpu_p1/gguf.part1 /tmp/smol/ && echo "stashed half 1: $(du -b /tmp/smol/gguf.part1)"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
{ nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm --format=csv
  python3 -c "import torch, triton; print(torch.__version__, triton.__version__)"; } > "$OUT/env.txt" 2>&1
# the captures travel in whichever carried folder has room (.gpu_p1 with half 1 of the GGUF, or
# .gpu_p2 with half 2: one call carries at most 64 MiB), so check every one that came along
for capdir in .gpu_p1/*_cap .gpu_p2/*_cap; do
  [ -f "$capdir/manifest.json" ] || continue
  cap=$(basename "$capdir" _cap)
  timeout ${DEVICES_S:-150} python3 benchmarks/gpu/check_compare_devices.py --capture "$capdir" \
    --out "$OUT/compare_devices_${cap}_h200.json" > "$OUT/compare_devices_${cap}.log" 2>&1
  echo "compare devices $cap rc=$?"; tail -12 "$OUT/compare_devices_${cap}.log"
done
[ "${DEVICES_ONLY:-0}" = 1 ] && exit 0
timeout ${OVER_S:-150} python3 benchmarks/gpu/bench_public.py --only overhead --ns 8192 32760 75600 \
  --out "$OUT/overhead_h200.json" > "$OUT/overhead.log" 2>&1
echo "overhead rc=$?"; tail -3 "$OUT/overhead.log" | cut -c1-400
timeout ${PROF_S:-60} python3 benchmarks/gpu/profile_public.py > "$OUT/profile_public.txt" 2>&1
echo "profile rc=$?"
