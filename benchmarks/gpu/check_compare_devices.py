"""Same capture, same settings: the compare table on CUDA equals the CPU one up to float32 rounding.

Usage: python benchmarks/gpu/check_compare_devices.py --capture DIR --out FILE.json
Runs `run_comparison` on both devices over a small capture (e.g. MiniLM, 4 inputs x 128 tokens)
and records the largest relative difference per metric, the time on each device, and the verdict.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from hla_analysis._io import atomic_write_json
from hla_analysis.compare import run_comparison
from hla_analysis.fit import FitConfig


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--capture", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--variants", default="default")
    args = p.parse_args(argv)
    fit = FitConfig(steps=3)  # few Adam steps: updates carry rounding along, keep it short
    tables, seconds = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for device in ("cpu", "cuda"):
            start = time.perf_counter()
            tables[device] = run_comparison(args.capture, out=Path(tmp) / f"{device}.parquet",
                                            variants=args.variants, fit=fit, device=device, progress=False)
            seconds[device] = time.perf_counter() - start
    key = ["input", "layer", "head", "variant", "metric"]
    merged = tables["cpu"].merge(tables["cuda"], on=key, suffixes=("_cpu", "_cuda"), how="outer", indicator=True)
    same_rows = bool((merged["_merge"] == "both").all())
    cpu = merged
    a, b = merged["value_cpu"].to_numpy(float), merged["value_cuda"].to_numpy(float)
    both_nan = np.isnan(a) & np.isnan(b)
    rel = np.where(both_nan, 0.0, np.abs(a - b) / np.maximum(np.abs(a), 1e-6))
    worst = cpu.assign(rel=rel).groupby("metric")["rel"].max().sort_values(ascending=False)
    by_variant = cpu.assign(rel=rel).groupby("variant")["rel"].max().sort_values(ascending=False)
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": len(cpu),
              "same_rows": same_rows, "seconds": seconds, "max_rel_diff_by_metric": worst.to_dict(),
              "max_rel_diff_by_variant": by_variant.to_dict(),
              "nan_mismatch": int((np.isnan(a) != np.isnan(b)).sum()),
              "verdict_rel_1e-4": bool(same_rows and (np.isnan(a) == np.isnan(b)).all() and worst.max() <= 1e-4)}
    atomic_write_json(args.out, result)
    print(result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
