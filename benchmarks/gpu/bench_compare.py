"""Time `compare` at the token counts HLA is for (issue 12); writes one JSON file.

(a) ``smollm2``: SmolLM2 capture + comparison end to end (8 inputs x 8,192 tokens,
    30 layers x 9 heads, default variants, every row, the usual held-out split).
(b) ``synthetic``: random q, k, v at N = 32,760, 12 heads, d = 128 through the same
    per-layer code path of the comparison (one layer, default variants, every row).

    python benchmarks/gpu/bench_compare.py --device cuda --out benchmarks/results/compare_h200.json
    python benchmarks/gpu/bench_compare.py --smoke --device cpu --out /tmp/bench_compare.json   # seconds, on CPU

The fits of the synthetic case use every ``--fit-row-stride``-th query row: a fit
materializes its training maps whole (with autograd), which at N = 32,760 and stride 4 would
need ~100 GB. The JSON records every setting.
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import torch

from hla_analysis import compare
from hla_analysis.capture import capture
from hla_analysis.fit import FitConfig


class SyntheticCapture:
    """Random q, k, v shaped like one layer of a video DiT, with the Capture interface compare reads."""

    def __init__(self, *, tokens: int, heads: int, head_dim: int, inputs: int = 2, seed: int = 0,
                 causal: bool = False):
        self.num_layers, self.num_inputs, self.num_heads, self.head_dim = 1, inputs, heads, head_dim
        self.lengths = [tokens] * inputs
        self.manifest = {"model": f"synthetic-{heads}x{tokens}x{head_dim}"}
        self.seed, self.causal = seed, causal

    def get(self, layer: int, input_index: int) -> dict:
        g = torch.Generator().manual_seed(self.seed * 1000 + input_index)
        shape = (self.num_heads, self.lengths[input_index], self.head_dim)
        q, k, v = (torch.randn(shape, generator=g) for _ in range(3))
        return {"q": q, "k": k, "v": v, "scale": self.head_dim ** -0.5, "causal": self.causal, "attention_mask": None}


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def bench_smollm2(args, work: Path) -> dict:
    if args.smoke:
        kw = dict(num_inputs=2, max_tokens=32, modules=r"layers\.(0|1)\.")
    else:
        kw = dict(num_inputs=8, max_tokens=8192)
    settings = {"settings": {**{k: v for k, v in kw.items()}, "variants": args.variants, "row_stride": 1},
                "stage": args.stage, "target_s": 600}
    started = time.perf_counter()
    if args.stage == "compare":  # the capture an earlier `--stage capture` left in --work
        cap = work / "cap"
    else:
        cap = capture("smollm2", out=work / "cap", device=args.device, progress=not args.quiet, **kw)
        _sync(args.device)
    captured = time.perf_counter()
    if args.stage == "capture":
        return {**settings, "capture_s": round(captured - started, 2)}
    table = compare.run_comparison(cap, out=work / "results.parquet", variants=args.variants, device=args.device,
                                   progress=not args.quiet, overwrite=True)
    _sync(args.device)
    done = time.perf_counter()
    out = {**settings, "compare_s": round(done - captured, 2), "table_rows": len(table)}
    if args.stage == "all":
        out.update(capture_s=round(captured - started, 2), total_s=round(done - started, 2))
    return out


def bench_synthetic(args) -> dict:
    shape = dict(tokens=256, heads=2, head_dim=16) if args.smoke else dict(tokens=32760, heads=12, head_dim=128)
    cap = SyntheticCapture(**shape)
    fit = FitConfig(row_stride=args.fit_row_stride)
    config = compare.CompareConfig(variants=compare.resolve_variants(args.variants), train_inputs=1, fit=fit)
    if args.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    _sync(args.device)
    started = time.perf_counter()
    table, _, _ = compare._layer_rows(cap, 0, config, progress=not args.quiet, device=torch.device(args.device))
    _sync(args.device)
    seconds = time.perf_counter() - started
    out = {"settings": {**shape, "inputs": cap.num_inputs, "layers": 1, "variants": args.variants,
                        "fit_row_stride": args.fit_row_stride, "block_rows": config.block_rows, "row_stride": 1},
           "seconds": round(seconds, 2), "table_rows": len(table), "target_s": 300}
    if args.device.startswith("cuda"):
        out["peak_gpu_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="JSON file to write")
    p.add_argument("--device", default="cuda")
    p.add_argument("--variants", default="default")
    p.add_argument("--only", choices=("smollm2", "synthetic"), help="run one case only")
    p.add_argument("--fit-row-stride", type=int, default=64, help="query-row stride of the synthetic case's fits")
    p.add_argument("--smoke", action="store_true", help="tiny shapes: checks the script in seconds, on CPU")
    p.add_argument("--quiet", action="store_true")
    p.add_argument("--stage", choices=("all", "capture", "compare"), default="all",
                   help="smollm2: both stages in one process, or one of them (capture into --work, then "
                        "compare from it: a run longer than one device call, timed as two)")
    p.add_argument("--work", help="folder for the smollm2 capture and table (default: a temporary one); "
                                  "needed by --stage capture / compare")
    args = p.parse_args()
    if args.stage != "all" and not args.work:
        p.error("--stage capture/compare needs --work DIR (the capture passes through it)")
    result = {"device": (torch.cuda.get_device_name() if args.device.startswith("cuda")
                         else platform.processor() or "cpu"),
              "torch": torch.__version__, "smoke": args.smoke, "threads": torch.get_num_threads()}
    with tempfile.TemporaryDirectory() as tmp:
        if args.only in (None, "smollm2"):
            work = Path(args.work) if args.work else Path(tmp)
            work.mkdir(parents=True, exist_ok=True)
            result["smollm2"] = bench_smollm2(args, work)
            print(json.dumps(result["smollm2"]), flush=True)
        if args.only in (None, "synthetic"):
            result["synthetic"] = bench_synthetic(args)
            print(json.dumps(result["synthetic"]), flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
