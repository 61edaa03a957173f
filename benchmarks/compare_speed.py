"""Wall time, rows/s and peak memory of ``hla-analysis compare`` on a capture (benchmark, not a test).

Times the public call as a user makes it (``run_comparison`` with its checks, default
variants, every query row) in a fresh subprocess, so ``ru_maxrss`` is that run's own peak.
The issue-12 target: the 8 inputs x 256 tokens MiniLM capture on 2 cores in <= 30 s with
<= 2 GB peak memory. Timings on a machine shared with other jobs must say so (``--loaded``).

Usage::

    hla-analysis capture --model minilm --out runs/cap8 --num-inputs 8 --max-tokens 256
    .venv/bin/python benchmarks/compare_speed.py runs/cap8            # -> benchmarks/results/compare_speed.json
    .venv/bin/python benchmarks/compare_speed.py runs/cap8 --loaded --tag loaded
    .venv/bin/python benchmarks/compare_speed.py runs/cap8 --threads 1 --profile --tag t1

``cpu_seconds`` (user + sys of the run's process and its helper processes: ``run_comparison``
splits layers over one process per thread by default, ``--workers 1`` keeps one) is the figure
to compare across machines under load; at ``--threads 1`` it is close to the wall time of an idle core. With
more threads on a loaded machine, set ``OMP_WAIT_POLICY=PASSIVE`` (recorded in the result):
libgomp's default spin-waiting then costs several times the CPU of one thread.
``--profile`` adds a stage breakdown (``stages``, CPU seconds of this process): ``fits``
(every ``fit_variant`` call), ``reference`` (softmax rows, logits and what every variant
shares, once per block), ``weights`` (the variants' weights and normalizers while scoring),
``metrics`` (scoring each variant against the reference) and ``other`` (loading, tables,
writing). A stage entered inside another is counted in the outer one.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from hla_analysis._io import atomic_write_json

TARGET_SECONDS = 30.0
TARGET_BYTES = 2 * 1000**3
RESULTS = Path(__file__).resolve().parent / "results"


def _maxrss_bytes() -> int:
    """Peak of this process plus the largest helper's peak: an upper bound of the run's peak."""
    import resource

    rss = sum(resource.getrusage(who).ru_maxrss for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN))
    return rss if sys.platform == "darwin" else rss * 1024  # Linux reports KiB, macOS bytes


def _cpu_seconds() -> float:
    return sum(os.times()[:4])  # user + sys of this process and its finished helper processes


class _Stages:
    """CPU seconds per stage, by wrapping module functions; nested calls count in the outer stage."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self.active: str | None = None

    def wrap(self, owner, name: str, stage: str) -> None:
        inner = getattr(owner, name)

        def timed(*args, **kwargs):
            if self.active is not None:
                return inner(*args, **kwargs)
            self.active, start = stage, _cpu_seconds()
            try:
                return inner(*args, **kwargs)
            finally:
                self.seconds[stage] = self.seconds.get(stage, 0.0) + _cpu_seconds() - start
                self.active = None

        setattr(owner, name, timed)

    def install(self) -> None:
        from hla_analysis import compare, variants
        from hla_analysis.metrics.streaming import StreamingAttentionMetrics

        self.wrap(compare, "fit_variant", "fits")
        self.wrap(compare, "reference_rows", "reference")
        self.wrap(compare._REFERENCE, "attention_map", "reference")
        for cls in {type(variants.make_variant(spec)) for spec in variants.list_variants()}:
            if cls is not variants.SoftmaxVariant:  # softmax scores as the reference itself
                self.wrap(cls, "weights", "weights")
        self.wrap(StreamingAttentionMetrics, "update_against", "metrics")


def child(capture: str, variants: str, threads: int, profile: bool = False, workers="auto") -> dict:
    import torch

    from hla_analysis.capture import load_capture
    from hla_analysis.compare import run_comparison

    torch.set_num_threads(threads)
    cap = load_capture(capture)
    stages = _Stages()
    if profile:
        stages.install()
    with tempfile.TemporaryDirectory() as tmp:
        started, cpu_started = time.perf_counter(), _cpu_seconds()
        table = run_comparison(capture, out=Path(tmp) / "r.parquet", variants=variants, progress=False,
                               workers=1 if profile else workers)
        seconds, cpu = time.perf_counter() - started, _cpu_seconds() - cpu_started
    rows = sum(cap.lengths) * cap.num_layers  # query rows scored per variant
    extra = {}
    if profile:
        timed = {name: round(value, 2) for name, value in sorted(stages.seconds.items())}
        extra["stages"] = {**timed, "other": round(cpu - sum(stages.seconds.values()), 2)}
    return {
        "seconds": round(seconds, 2), "cpu_seconds": round(cpu, 2), **extra,
        "query_rows": rows, "rows_per_s": round(rows / seconds, 1),
        "variants": int(table["variant"].nunique()), "peak_rss_bytes": _maxrss_bytes(),
        "inputs": cap.num_inputs, "tokens": max(cap.lengths), "layers": cap.num_layers, "heads": cap.num_heads,
        "model": cap.manifest.get("model"), "threads": threads, "torch": torch.__version__,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("capture", help="capture directory (hla-analysis capture)")
    parser.add_argument("--variants", default="default")
    parser.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    parser.add_argument("--loaded", action="store_true", help="the machine was shared with other jobs")
    parser.add_argument("--tag", default="", help="suffix of the result file: compare_speed_<tag>.json")
    parser.add_argument("--profile", action="store_true",
                        help="add a per-stage breakdown of CPU seconds (fits, reference, weights, metrics)")
    parser.add_argument("--workers", default="auto",
                        help="run_comparison's workers (default auto; --profile uses 1: stages are timed in-process)")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        workers = args.workers if args.workers == "auto" else int(args.workers)
        print(json.dumps(child(args.capture, args.variants, args.threads, args.profile, workers)))
        return 0
    cmd = [sys.executable, __file__, args.capture, "--variants", args.variants,
           "--threads", str(args.threads), "--workers", args.workers, "--child"]
    cmd += ["--profile"] if args.profile else []
    load_start = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        sys.stderr.write(done.stderr)
        return done.returncode
    result = json.loads(done.stdout.strip().splitlines()[-1])
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    result.update({
        "capture": str(Path(args.capture).resolve()), "machine": platform.machine(), "cpus": os.cpu_count(),
        "loaded": args.loaded, "load_average_1min_at_start": load_start, "load_average_1min_at_end": load,
        # libgomp's default (ACTIVE) spins between parallel regions: on a shared machine
        # 2 threads then burn several times the CPU of 1 (see NOTES_i12.md)
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
        "target_seconds": TARGET_SECONDS, "target_peak_bytes": TARGET_BYTES,
        "workers": 1 if args.profile else args.workers,
        "meets_targets": result["seconds"] <= TARGET_SECONDS and result["peak_rss_bytes"] <= TARGET_BYTES,
        "command": " ".join(["python", "benchmarks/compare_speed.py", args.capture, "--threads", str(args.threads)]
                            + (["--workers", args.workers] if args.workers != "auto" else [])
                            + (["--loaded"] if args.loaded else []) + (["--profile"] if args.profile else [])
                            + (["--tag", args.tag] if args.tag else [])),
    })
    out = RESULTS / (f"compare_speed_{args.tag}.json" if args.tag else "compare_speed.json")
    atomic_write_json(out, result)
    print(json.dumps(result, indent=2))
    print(f"-> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
