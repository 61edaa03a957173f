#!/usr/bin/env bash
# Session 11, call A (one H200, nothing carried): after the split-path changes of this session
# (recorded affine blocks, one flag read in the last part's apply, block-symmetric tied split),
#   - sweep_configs.py: tied affine-shaped factors with whole vs 64-/32-wide blocks
#     (split.TIED_BLOCK), then single config changes of the M = 2 parts the variants run;
#   - diagnose_public.py at N = 32,760: syncs, host time, per-kernel device time of the calls.
# Usage (device, repo root): bash benchmarks/gpu/session11b.sh "$OUT"
set -u
OUT=${1:?output folder}; mkdir -p "$OUT"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
{ nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm --format=csv
  python3 -c "import torch, triton; print(torch.__version__, triton.__version__)"; } > "$OUT/env_a.txt" 2>&1
timeout ${SWEEP_S:-200} python3 benchmarks/gpu/sweep_configs.py --out "$OUT/sweep_h200.json" \
  --budget-s ${SWEEP_BUDGET:-90} > "$OUT/sweep.log" 2>&1
echo "sweep rc=$?"; grep '^{' "$OUT/sweep.log" | cut -c1-230
timeout ${DIAG_S:-90} python3 benchmarks/gpu/diagnose_public.py --n 32760 --out "$OUT/diagnose_after_h200.json" \
  > "$OUT/diagnose_after.log" 2>&1
echo "diagnose rc=$?"; grep '^{' "$OUT/diagnose_after.log" | cut -c1-260
