#!/usr/bin/env bash
# Session 7, second GPU call: one SmolLM2-shaped layer through compare after the GPU changes
# (stacked inputs, one check read per block, compiled divergence terms, no slabs on a GPU).
# Usage (device, repo root): bash benchmarks/gpu/session7b.sh "$OUT"
set -u
OUT=${1:?output folder}; mkdir -p "$OUT"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
timeout 400 python3 benchmarks/gpu/profile_compare.py --out "$OUT/profile_compare.json" 2>&1 | tr '\r' '\n' | grep -v "^\s*$" > "$OUT/profile_compare.txt"
echo "rc=${PIPESTATUS[0]}"; grep -E "^fit |^score |^one layer|^warm|Warn|warn|Error" "$OUT/profile_compare.txt" | head -30
