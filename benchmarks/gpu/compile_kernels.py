"""Compile (and run once) every fused kernel configuration the benchmark and the GPU tests use.

One small forward + backward per configuration, so that a compile error or an
``OutOfResources`` (shared memory) shows up in seconds, named by its configuration, before the
long benchmark starts; each result is compared with the float64 materialized reference at
N = 300 (bf16 tolerance 3e-2: 8 bf16 eps; fp32 1e-4). One JSON row per configuration, written
after each, so a run cut short keeps what it compiled.

    python benchmarks/gpu/compile_kernels.py --out "$OUT/compile.json"
    TRITON_INTERPRET=1 python benchmarks/gpu/compile_kernels.py --smoke --out /tmp/compile.json
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import traceback

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))

from hla_analysis._io import atomic_write_json  # noqa: E402
from hla_analysis.ops import hla_attention_output  # noqa: E402


def configurations(smoke: bool):
    """``(name, m, r, causal, dtype, extra)``: the shapes of the benchmark, every dtype once."""
    if smoke:
        return [(f"M={m} r=16 causal={c} fp32", m, 16, c, torch.float32, {}) for m in (1, 2) for c in (False, True)] + [
            ("M=2 r=16 tied fp32", 2, 16, False, torch.float32, {"tied": True}),
            ("M=2 r=17 split fp32", 2, 17, True, torch.float32, {}),
            ("M=3 r=16 quadratic fp32", 3, 16, False, torch.float32, {"quadratic": True}),
        ]
    bf16 = torch.bfloat16
    rows = [(f"M={m} r={r} causal={c} bf16", m, r, c, bf16, {}) for m in (1, 2) for r in (64, 128)
            for c in (False, True)]
    rows += [("M=2 r=64 causal=False fp16", 2, 64, False, torch.float16, {}),
             ("M=2 r=64 causal=True fp32", 2, 64, True, torch.float32, {}),
             ("M=2 r=65 split (affine d=64) bf16", 2, 65, False, bf16, {}),
             ("M=2 r=129 split (affine d=128) causal bf16", 2, 129, True, bf16, {}),
             ("M=2 r=64 tied bf16", 2, 64, False, bf16, {"tied": True}),
             ("M=2 r=128 tied causal bf16", 2, 128, True, bf16, {"tied": True}),
             ("M=4 r=65 quadratic bf16", 4, 65, False, bf16, {"quadratic": True})]
    return rows


def run_one(m, r, causal, dtype, extra, *, device, n):
    from hla_analysis.ops import hla
    from hla_analysis.ops.triton import hla_triton

    g = torch.Generator().manual_seed(r + m)
    tied = extra.get("tied") or extra.get("quadratic")
    q, k = ((torch.rand(1, 2, n, r, generator=g) + 0.05).to(device, dtype).requires_grad_() for _ in range(2))
    qs, ks = ([q] * m, [k] * m) if tied else ([q] + [torch.rand_like(q).requires_grad_() for _ in range(m - 1)],
                                                [k] + [torch.rand_like(k).requires_grad_() for _ in range(m - 1)])
    v = torch.randn(1, 2, n, 64 if dtype != torch.float32 or device == "cuda" else 16, generator=g).to(device, dtype)
    v.requires_grad_()
    leaves = [*dict.fromkeys([*qs, *ks]), v]
    t0 = time.perf_counter()
    if extra.get("quadratic"):
        out = hla(qs, ks, v, causal=causal, form="quadratic", backend="triton")
    else:
        out = hla_triton(qs, ks, v, causal=causal, tied=bool(extra.get("tied")))
    grads = torch.autograd.grad(out, leaves, torch.ones_like(out))
    if device == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    ref_in = [t.detach().double().requires_grad_() for t in leaves]
    lookup = {id(t): ref_in[i] for i, t in enumerate(leaves)}
    ref = hla_attention_output([lookup[id(t)] for t in qs], [lookup[id(t)] for t in ks], ref_in[-1], causal=causal)
    ref_grads = torch.autograd.grad(ref, ref_in, torch.ones_like(ref))
    errs = [float((a.detach().double() - b.detach()).norm() / b.detach().norm())
            for a, b in zip([out, *grads], [ref, *ref_grads])]
    return seconds, max(errs)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--smoke", action="store_true", help="CPU, TRITON_INTERPRET=1, fp32, tiny shapes")
    args = parser.parse_args(argv)
    if args.smoke and os.environ.get("TRITON_INTERPRET") != "1":
        parser.error("--smoke needs TRITON_INTERPRET=1 in the environment (set before starting)")
    device = "cpu" if args.smoke else "cuda"
    n = 37 if args.smoke else 300
    rows, failed = [], 0
    for name, m, r, causal, dtype, extra in configurations(args.smoke):
        row = dict(config=name)
        try:
            row["compile_and_run_s"], row["max_rel_err"] = run_one(m, r, causal, dtype, extra, device=device, n=n)
            tol = 1e-4 if dtype == torch.float32 else 3e-2
            row["ok"] = row["max_rel_err"] < tol
        except Exception as err:  # noqa: BLE001 - record and go on: one broken config must not hide the rest
            row["ok"] = False
            row["error"] = f"{type(err).__name__}: {str(err)[:400]}"
            traceback.print_exc()
        failed += not row["ok"]
        rows.append(row)
        print(row, flush=True)
        atomic_write_json(args.out, {"device": device, "n": n, "rows": rows})
    print(f"{len(rows) - failed} of {len(rows)} configurations compiled and matched the reference", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
