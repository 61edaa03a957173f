"""Peak resident memory of streamed head metrics at N = 16,384 tokens (benchmark, not a test).

One head (d = 32) compares softmax with elu+1 linear attention, both built block by block
with plain torch, with every metric on (values for the output error, scores for Spearman).
The work runs in a fresh subprocess so ``ru_maxrss`` is that run's own peak, not pytest's or
an earlier import's. The result is written atomically to
``benchmarks/results/metrics_memory.json``. Target: at most 2 GB (a single dense float32
16,384 x 16,384 map alone is 1 GiB; the pair of maps would be 2 GiB).

Usage::

    .venv/bin/python benchmarks/metrics_memory.py            # N=16384, d=32, block 256
    .venv/bin/python benchmarks/metrics_memory.py --n 4096 --block-rows 128
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import subprocess
import sys
import time
from pathlib import Path

from hla_analysis._io import atomic_write_json

TARGET_BYTES = 2 * 1000**3
RESULT = Path(__file__).resolve().parent / "results" / "metrics_memory.json"


def _maxrss_bytes() -> int:
    import resource

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024  # Linux reports KiB, macOS bytes


def child(n: int, d: int, block_rows: int, threads: int, seed: int) -> dict:
    import torch

    from hla_analysis.metrics import stream_head_metrics

    torch.set_num_threads(threads)
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(n, d, generator=g) for _ in range(3))
    scale = 1.0 / math.sqrt(d)
    # Same convention as the variants: feature maps see q*sqrt(scale), k*sqrt(scale).
    fq = torch.nn.functional.elu(q * math.sqrt(scale)) + 1
    fk = torch.nn.functional.elu(k * math.sqrt(scale)) + 1
    fk_sum = fk.sum(0)

    def scores(rows: slice) -> torch.Tensor:
        return scale * (q[rows] @ k.T)

    def softmax_rows(rows: slice) -> torch.Tensor:
        return torch.softmax(scores(rows), dim=-1)

    def linear_rows(rows: slice) -> tuple[torch.Tensor, torch.Tensor]:
        den = fq[rows] @ fk_sum
        return (fq[rows] @ fk.T) / den[:, None], den <= 0

    baseline = _maxrss_bytes()
    t0 = time.perf_counter()
    metrics = stream_head_metrics(
        softmax_rows, linear_rows, n_queries=n, v=v, block_rows=block_rows,
        scores_rows=scores, progress=True,
    )
    seconds = time.perf_counter() - t0
    return {"baseline_rss_bytes": baseline, "peak_rss_bytes": _maxrss_bytes(), "seconds": seconds,
            "metrics": metrics, "torch": torch.__version__}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=16384, help="tokens (query and key rows)")
    ap.add_argument("--d", type=int, default=32, help="head dim")
    ap.add_argument("--block-rows", type=int, default=256, help="query rows per streamed block")
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads (CI has 2 cores)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=RESULT)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.n, args.d, args.block_rows, args.threads, args.seed)))
        return 0

    cmd = [sys.executable, __file__, "--child", "--n", str(args.n), "--d", str(args.d),
           "--block-rows", str(args.block_rows), "--threads", str(args.threads), "--seed", str(args.seed)]
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, check=True, text=True)
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    peak = res["peak_rss_bytes"]
    out = {
        "benchmark": "streamed head metrics, softmax vs linear:phi=elu1, CPU float32",
        "command": "python benchmarks/metrics_memory.py " + " ".join(
            f"--{k.replace('_', '-')} {getattr(args, k)}" for k in ("n", "d", "block_rows", "threads", "seed")),
        "n_tokens": args.n, "head_dim": args.d, "block_rows": args.block_rows, "threads": args.threads,
        "peak_rss_bytes": peak, "peak_rss_mb": round(peak / 1e6, 1),
        "baseline_rss_mb": round(res["baseline_rss_bytes"] / 1e6, 1),
        "dense_map_float32_mb": round(4 * args.n**2 / 1e6, 1),
        "target_bytes": TARGET_BYTES, "within_target": peak <= TARGET_BYTES,
        "seconds": round(res["seconds"], 2), "metrics": res["metrics"],
        "torch": res["torch"], "python": platform.python_version(), "machine": platform.machine(),
    }
    atomic_write_json(args.out, out)
    print(f"peak RSS {out['peak_rss_mb']} MB (after imports and inputs: {out['baseline_rss_mb']} MB; "
          f"one dense float32 map: {out['dense_map_float32_mb']} MB); target <= {TARGET_BYTES / 1e6:.0f} MB: "
          f"{'OK' if out['within_target'] else 'OVER'}; {out['seconds']} s -> {args.out}")
    return 0 if out["within_target"] else 1


if __name__ == "__main__":
    sys.exit(main())
