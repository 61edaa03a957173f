"""Quadratic fused HLA (M >= 3) beside cuDNN SDPA on one GPU, through the public calls.

H = 12, dv = 128, N in {8192, 32760, 75600}; forward under torch.no_grad() and forward +
backward with autograd; median of CUDA-event timings after warm-up (``bench_hla.timed``),
bf16 matmul peak measured in the same run. Variants run as users call them,
``make_variant(spec).forward(q, k, v)`` (feature maps, checks and dispatch included), and
each row records the path the dispatcher took (``quadratic_dispatch.last_dispatch``).

    python benchmarks/gpu/bench_quadratic.py --out benchmarks/gpu/results/quadratic_h200.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))
sys.path.insert(0, os.path.dirname(__file__))

from bench_hla import fwd_bwd, matmul_peak, timed  # noqa: E402

B, H, DV = 1, 12, 128
NS = (8192, 32760, 75600)
SPECS = (("hla:m=4,phi=affine", 64), ("hla:m=4,phi=affine", 128), ("hla:m=4,phi=affine,proj=1", 64),
         ("hla:m=3,phi=affine", 64), ("hla:m=3,phi=affine", 128))


def inputs(n, d, dv=DV):
    # positive q, k: every affine factor 1 + s/M > 0, so odd M has no signed rows to refuse
    q, k = ((torch.rand(B, H, n, d, device="cuda") * 0.5).to(torch.bfloat16).requires_grad_() for _ in range(2))
    v = torch.randn(B, H, n, dv, device="cuda", dtype=torch.bfloat16).requires_grad_()
    return q, k, v


def sdpa_rows(n, d):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    q, k, v = inputs(n, d)
    rows = []
    for name, be in (("cudnn", SDPBackend.CUDNN_ATTENTION), ("flash", SDPBackend.FLASH_ATTENTION)):
        def forward(be=be):
            with sdpa_kernel([be]):
                return torch.nn.functional.scaled_dot_product_attention(q, k, v)
        try:
            f, fb = fwd_bwd(forward, [q, k, v])
            rows.append(dict(method=f"sdpa_{name}", n=n, d=d, fwd_ms=timed(f)[0], fwd_bwd_ms=timed(fb)[0]))
            break  # cuDNN when it runs, flash as the fallback
        except RuntimeError as err:
            rows.append(dict(method=f"sdpa_{name}", n=n, d=d, error=str(err)[:200]))
    return rows


def variant_row(spec, n, d, *, backward=True):
    from hla_analysis.ops import quadratic_dispatch
    from hla_analysis.variants import make_variant

    var = make_variant(spec).to("cuda")
    var.bind(d)
    var.to("cuda")
    q, k, v = inputs(n, d)
    f, fb = fwd_bwd(lambda: var(q, k, v), [q, k, v])
    row = dict(method=spec, n=n, d=d, fwd_ms=timed(f)[0])
    disp = quadratic_dispatch.last_dispatch
    row.update(path=disp.path, engine=disp.engine, state_cost=disp.state_cost, quadratic_cost=disp.quadratic_cost)
    if backward:
        row["fwd_bwd_ms"] = timed(fb)[0]
    return row


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--ns", default=",".join(map(str, NS)))
    args = ap.parse_args()
    ns = [int(x) for x in args.ns.split(",")]
    result = dict(device=torch.cuda.get_device_name(), torch=torch.__version__, B=B, H=H, dv=DV,
                  matmul_peak_tflops=matmul_peak(), rows=[])

    def save():
        tmp = args.out + ".tmp"
        with open(tmp, "w") as fh:
            json.dump(result, fh, indent=1)
        os.replace(tmp, args.out)

    for n in ns:
        for d in (64, 128):
            result["rows"].extend(sdpa_rows(n, d))
            save()
        for spec, d in SPECS:
            try:
                row = variant_row(spec, n, d)
            except Exception as err:  # noqa: BLE001 -- a failing row is recorded, the run goes on
                row = dict(method=spec, n=n, d=d, error=f"{type(err).__name__}: {str(err)[:300]}")
            result["rows"].append(row)
            print(row, flush=True)
            save()
    # the state path beside the quadratic one, where it fits (torch tied state, M = 3, r = 65)
    from hla_analysis.variants import make_variant

    var = make_variant("hla:m=3,phi=affine").to("cuda")
    q, k, v = inputs(8192, 64)
    with torch.no_grad():
        ms = timed(lambda: var(q, k, v, backend="torch"), warmup=1, min_reps=1, max_reps=3)[0]
    result["rows"].append(dict(method="hla:m=3,phi=affine", n=8192, d=64, path="state", engine="torch", fwd_ms=ms))
    save()
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
