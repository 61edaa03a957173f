"""Kernel-config sweep for the M = 2 parts the variants run, one change at a time from the default.

The affine variants' main part is an M = 2 state of two equal factors at dv = d: r = 64 with
dv = 64 (d = 64) and r = 128 with dv = 128 (d = 128). The defaults were tuned at r = 64,
dv = 128 (``hla()``'s headline shape). Each row: one override of :func:`default_config`,
forward of the bare kernels (``hla_triton``, checks off, no_grad; a sweep, not a user-facing
speed), CUDA events, median; its output against the default config's (relative error).

    python benchmarks/gpu/sweep_configs.py --out sweep.json [--n 32760] [--budget-s 200]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))
sys.path.insert(0, os.path.dirname(__file__))

from bench_hla import timed  # noqa: E402

from hla_analysis._checks import checks_disabled  # noqa: E402
from hla_analysis._io import atomic_write_json  # noqa: E402
from hla_analysis.ops.triton import hla_triton  # noqa: E402
from hla_analysis.ops.triton.config import default_config  # noqa: E402

SHAPES = [  # (r, dv, causal)
    (64, 64, False), (128, 128, False), (64, 64, True),
]
CHANGES = [
    {}, {"STATE_BA": 1}, {"STATE_BA": 2}, {"STATE_BA": 4}, {"STATE_WARPS": 4}, {"STATE_WARPS": 8},
    {"STATE_TRANS": 0}, {"STATE_TRANS": 1}, {"STAGES": 2}, {"STAGES": 4}, {"APPLY_WARPS": 8},
    {"APPLY_WARPS": 4}, {"APPLY_BLOCK_M": 64}, {"STATE_KERNEL": "tiles", "STATE_BLOCK_C": 128},
    {"STATE_KERNEL": "tiles", "STATE_BLOCK_C": 64, "STATE_WARPS": 4},
]
CAUSAL_CHANGES = [
    {}, {"CHUNK": 512}, {"CHUNK": 1024}, {"STAGES": 2}, {"STATE_WARPS": 4}, {"APPLY_WARPS": 4},
    {"APPLY_BLOCK_M": 64, "BLOCK_N": 32}, {"CAUSAL_STATE": "parallel"}, {"CAUSAL_STATE": "sequential"},
]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--n", type=int, default=32760)
    ap.add_argument("--budget-s", type=float, default=200.0)
    args = ap.parse_args(argv)
    t_start = time.time()
    rows = []
    g = torch.Generator(device="cuda").manual_seed(0)
    # tied affine-shaped factors (width d + 1, constant first column): the block-symmetric split
    # (split.TIED_BLOCK) against whole blocks, through hla_triton's split path, checks off
    from hla_analysis.ops.triton import split

    default_block = split.TIED_BLOCK
    with torch.no_grad(), checks_disabled():
        for d, blocks in ((128, (128, 64)), (64, (64, 32))):
            x = torch.cat([torch.ones(12, args.n, 1, device="cuda"),
                           torch.randn(12, args.n, d, device="cuda", generator=g) / (2 * d ** 0.5)], -1)
            y = torch.cat([torch.ones(12, args.n, 1, device="cuda"),
                           torch.randn(12, args.n, d, device="cuda", generator=g) / (2 * d ** 0.5)], -1)
            x, y = x.to(torch.bfloat16), y.to(torch.bfloat16)
            v = torch.randn(12, args.n, d, device="cuda", generator=g).to(torch.bfloat16)
            ref = None
            for causal in (False, True):
                ref = None
                for block in blocks:
                    split.TIED_BLOCK = block
                    row = {"tied_affine_width": d + 1, "dv": d, "causal": causal, "n": args.n, "tied_block": block}
                    try:
                        def fwd(causal=causal):
                            return hla_triton([x, x], [y, y], v, causal=causal)
                        out = fwd().float()
                        ref = out if ref is None else ref
                        row["rel_err_vs_first"] = float((out - ref).norm() / ref.norm())
                        row["ms"], row["reps"] = timed(fwd)
                    except Exception as exc:  # noqa: BLE001
                        row["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:160]}"
                    rows.append(row)
                    print(json.dumps(row), flush=True)
                    atomic_write_json(args.out, {"device": torch.cuda.get_device_name(), "rows": rows})
    split.TIED_BLOCK = default_block
    t_start = time.time()
    with torch.no_grad(), checks_disabled():
        for r, dv, causal in SHAPES:
            q = (torch.rand(12, args.n, r, device="cuda", generator=g) * 0.5 + 0.05).to(torch.bfloat16)
            k = (torch.rand(12, args.n, r, device="cuda", generator=g) * 0.5 + 0.05).to(torch.bfloat16)
            v = torch.randn(12, args.n, dv, device="cuda", generator=g).to(torch.bfloat16)
            base = default_config(r1=r, r2=r, dv=dv, causal=causal, dtype=torch.bfloat16)
            ref = None
            for change in (CAUSAL_CHANGES if causal else CHANGES):
                if time.time() - t_start > args.budget_s:
                    print("budget spent", flush=True)
                    break
                if change and all(base[key] == value for key, value in change.items()):
                    continue  # the default itself
                row = {"r": r, "dv": dv, "causal": causal, "n": args.n, "change": change}
                try:
                    def fwd(change=change):
                        return hla_triton([q, q], [k, k], v, causal=causal, config=change or None)
                    out = fwd().float()
                    if ref is None:
                        ref = out
                    row["rel_err_vs_default"] = float((out - ref).norm() / ref.norm())
                    row["ms"], row["reps"] = timed(fwd)
                except Exception as exc:  # noqa: BLE001 - out of resources etc.: the row says so
                    row["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:160]}"
                    traceback.print_exc(limit=1)
                rows.append(row)
                print(json.dumps(row), flush=True)
                atomic_write_json(args.out, {"device": torch.cuda.get_device_name(), "rows": rows})
    atomic_write_json(args.out, {"device": torch.cuda.get_device_name(), "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
