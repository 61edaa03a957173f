"""Tied (symmetric-state) against untied Triton HLA, M = 2, on one GPU.

Same inputs both ways: ``hla_triton([q, q], [k, k], v)`` takes the tied kernels, and
``tied=False`` forces the untied ``r^2``-row state. Median of CUDA-event timings after
warm-up (``timed`` from ``bench_hla.py``). Also checks that both agree on the large shape.

Usage (on a CUDA machine, from the repository root)::

    python3 benchmarks/gpu/bench_tied.py --out results/h200_tied.json [--backward]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))
sys.path.insert(0, os.path.dirname(__file__))

from bench_hla import timed  # noqa: E402

from hla_analysis.ops.triton import hla_triton  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="JSON file for the results")
    parser.add_argument("--n", type=int, default=32760)
    parser.add_argument("--r", type=int, nargs="+", default=[64])
    parser.add_argument("--backward", action="store_true", help="also time forward+backward")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("bench_tied.py needs CUDA")
    b, h, dv, n = 1, 12, 128, args.n
    rows = []
    for r in args.r:
        for causal in (False, True):
            g = torch.Generator(device="cuda").manual_seed(0)
            q = (torch.rand(b, h, n, r, device="cuda", generator=g) / r ** 0.5).bfloat16()
            k = (torch.rand(b, h, n, r, device="cuda", generator=g) / r ** 0.5).bfloat16()
            v = torch.randn(b, h, n, dv, device="cuda", generator=g).bfloat16()
            outs = {}
            for tied in (True, False):
                fwd = lambda: hla_triton([q, q], [k, k], v, causal=causal, tied=tied)  # noqa: E731
                outs[tied] = fwd().float()
                ms, reps = timed(fwd)
                row = dict(r=r, causal=causal, tied=tied, n=n, b=b, h=h, dv=dv, pass_="fwd", ms=ms, reps=reps)
                rows.append(row)
                print(json.dumps(row), flush=True)
                if args.backward:
                    qg, kg, vg = (t.detach().requires_grad_() for t in (q, k, v))

                    def fwd_bwd():
                        out = hla_triton([qg, qg], [kg, kg], vg, causal=causal, tied=tied)
                        out.backward(torch.ones_like(out))

                    ms, reps = timed(fwd_bwd)
                    row = dict(row, pass_="fwd+bwd", ms=ms, reps=reps)
                    rows.append(row)
                    print(json.dumps(row), flush=True)
            err = float((outs[True] - outs[False]).norm() / outs[False].norm())
            rows.append(dict(r=r, causal=causal, n=n, check="tied vs untied output, relative error", value=err))
            print(json.dumps(rows[-1]), flush=True)
    meta = dict(device=torch.cuda.get_device_name(), torch=torch.__version__, python=platform.python_version())
    try:
        import triton

        meta["triton"] = triton.__version__
    except ImportError:
        pass
    tmp = args.out + ".tmp"
    with open(tmp, "w") as fh:
        json.dump(dict(meta=meta, rows=rows), fh, indent=1)
    os.replace(tmp, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
