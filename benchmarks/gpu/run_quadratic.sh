#!/bin/sh
# One device call: CUDA tests of the quadratic kernel, then the benchmark (results under $OUT).
python3 -m pytest -q -x -p no:cacheprovider tests/test_quadratic.py > "$OUT/quadratic_tests.log" 2>&1
tail -3 "$OUT/quadratic_tests.log"
python3 benchmarks/gpu/bench_quadratic.py --out "$OUT/quadratic_h200.json" "$@" > "$OUT/quadratic_bench.log" 2>&1
tail -30 "$OUT/quadratic_bench.log"
