"""Same capture, same settings: the compare table on CUDA equals the CPU one up to float32 rounding.

Usage: python benchmarks/gpu/check_compare_devices.py --capture DIR --out FILE.json
Runs `run_comparison` on both devices over a small capture (e.g. MiniLM, 4 inputs x 128 tokens)
and records the largest relative difference per metric, the time on each device, and the verdict.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from hla_analysis._io import atomic_write_json
from hla_analysis.compare import run_comparison
from hla_analysis.fit import FitConfig


def _diff(cpu, cuda) -> dict:
    key = ["input", "layer", "head", "variant", "metric"]
    merged = cpu.merge(cuda, on=key, suffixes=("_cpu", "_cuda"), how="outer", indicator=True)
    same_rows = bool((merged["_merge"] == "both").all())
    a, b = merged["value_cpu"].to_numpy(float), merged["value_cuda"].to_numpy(float)
    both_nan = np.isnan(a) & np.isnan(b)
    absdiff = np.where(both_nan, 0.0, np.abs(a - b))
    rel = absdiff / np.maximum(np.abs(a), 1e-6)
    frame = merged.assign(rel=rel, abs=absdiff)
    return {"same_rows": same_rows, "rows": len(merged),
            "nan_mismatch": int((np.isnan(a) != np.isnan(b)).sum()),
            "max_rel_diff_by_metric": frame.groupby("metric")["rel"].max().sort_values(ascending=False).to_dict(),
            "max_abs_diff_by_metric": frame.groupby("metric")["abs"].max().sort_values(ascending=False).to_dict(),
            "max_rel_diff_by_variant": frame.groupby("variant")["rel"].max().sort_values(ascending=False).to_dict(),
            "_frame": frame}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--capture", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--variants", default="default")
    p.add_argument("--devices", default="cpu,cuda", help="the two devices compared (cpu,cpu checks the script)")
    args = p.parse_args(argv)
    tokens = max(json.loads((Path(args.capture) / "manifest.json").read_text()).get("lengths", [1]))
    first, second = args.devices.split(",")
    result = {"device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
              "devices": args.devices, "torch": torch.__version__, "tokens": tokens}
    # steps=0: the learnable variants keep their (deterministic) initial parameters, so the two
    # tables differ by evaluation rounding alone; steps=3: Adam's first steps are sign-like and
    # turn rounding into parameter moves of order lr, shown apart
    for steps in (0, 3):
        tables, seconds = {}, {}
        with tempfile.TemporaryDirectory() as tmp:
            for name, device in (("cpu", first), ("cuda", second)):
                start = time.perf_counter()
                tables[name] = run_comparison(args.capture, out=Path(tmp) / f"{name}.parquet",
                                              variants=args.variants, fit=FitConfig(steps=steps),
                                              device=device, progress=False)
                seconds[name] = time.perf_counter() - start
        diff = _diff(tables["cpu"], tables["cuda"])
        frame = diff.pop("_frame")
        # float32 sums over rows of n keys carry ~eps32 * n relative rounding; metrics built from
        # logs of tiny weights (KL of near-equal rows) carry it in absolute terms, hence max(|cpu|, 1)
        bound = np.finfo(np.float32).eps * tokens
        ok = (frame["abs"] <= bound * np.maximum(frame["value_cpu"].abs().fillna(0), 1.0)).to_numpy()
        diff["bound"] = f"|cpu - cuda| <= eps32 * n_tokens * max(|cpu|, 1) = {bound:.2e} * max(|cpu|, 1)"
        diff["within_bound_fraction"] = float(ok.mean())
        diff["outside_bound_by_variant"] = frame[~ok].groupby("variant").size().to_dict()
        diff["seconds"] = seconds
        result[f"fit_steps_{steps}"] = diff
    atomic_write_json(args.out, result)
    print(json.dumps({k: (v if not isinstance(v, dict) else {kk: vv for kk, vv in v.items()
                      if kk in ("within_bound_fraction", "outside_bound_by_variant", "nan_mismatch", "seconds")})
                      for k, v in result.items()}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
