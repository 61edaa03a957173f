"""Stage-by-stage timings of the Triton HLA kernels under block-size and schedule variants.

Times each stage on its own (state reduction, apply, factor gradients) at the headline shape
(B*H = 12, N = 32,760, r = 64, dv = 128, bf16, non-causal), then whole forward and
forward+backward passes for the variants picked on the command line, and records the
compiler's register / spill / shared-memory report for every kernel compiled. Also checks
each variant's output and gradients against the fp64 reference on a small problem first.

Usage (CUDA machine)::

    python benchmarks/gpu/tune_hla.py --out benchmarks/gpu/results/h200_tune.json

The JSON has one row per (stage, variant): median ms, TFLOP/s, percentage of the bf16
matmul peak measured in the same run. FLOPs: state and apply 2*BH*N*R*dv each; query-side
gradient 2*BH*N*R*dv; key-side gradient 4*BH*N*R*dv.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
import traceback

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))
sys.path.insert(0, os.path.dirname(__file__))

from bench_hla import matmul_peak, reference_errors, timed  # noqa: E402

from hla_analysis.ops.triton import hla_triton  # noqa: E402
from hla_analysis.ops.triton.config import default_config  # noqa: E402
from hla_analysis.ops.triton.state import autograd as ag  # noqa: E402

BH, DV = 12, 128

STATE_VARIANTS = {
    "cols_ba4_w8_t1": dict(STATE_BA=4, STATE_WARPS=8, STATE_TRANS=1),
    # the S^T tile orientation (STATE_TILES_T) was measured slower in session 2 and removed
    "tiles_c128_w8": dict(STATE_KERNEL="tiles", STATE_BLOCK_C=128, STATE_WARPS=8),
    "tiles_c64_w4": dict(STATE_KERNEL="tiles", STATE_BLOCK_C=64, STATE_WARPS=4),
}
APPLY_VARIANTS = {
    "tiles_m128": dict(PER_A=False),
    "cols_m128_w4": dict(APPLY_BLOCK_M=128, APPLY_WARPS=4),
    "cols_m128_w4_s4": dict(APPLY_BLOCK_M=128, APPLY_WARPS=4, STAGES=4),
    "cols_m128_w4_s2": dict(APPLY_BLOCK_M=128, APPLY_WARPS=4, STAGES=2),
}
GRAD_VARIANTS = {
    "tiles": dict(PER_A=False),
    "cols_m64_w4": dict(GRAD_BLOCK_M=64, GRAD_WARPS=4),
    "cols_m64_w4_s4": dict(GRAD_BLOCK_M=64, GRAD_WARPS=4, STAGES=4),
    "cols_m128_w4": dict(GRAD_BLOCK_M=128, GRAD_WARPS=4),
}


def debug_causal(doc):
    """Stage-by-stage comparison of the column and tile kernels, causal, several chunks."""
    n, r, bh = 3000, 64, 6
    g = torch.Generator(device="cuda").manual_seed(1)
    pos = lambda w: (torch.rand(bh, n, w, device="cuda", generator=g) * 0.5 + 0.05).to(torch.bfloat16)  # noqa: E731
    q1, q2, k1, k2 = (pos(r) for _ in range(4))
    v = torch.randn(bh, n, DV, device="cuda", generator=g).to(torch.bfloat16)
    tiles, cols = cfg_for(dict(PER_A=False)), cfg_for({})
    out = {}

    def cmp(name, a, b):
        a, b = a.float(), b.float()
        out[name] = dict(nan_a=int(torch.isnan(a).sum()), nan_b=int(torch.isnan(b).sum()),
                         rel=float((a - b).norm() / b.norm().clamp_min(1e-30)), norm_b=float(b.norm()))
        print("debug", name, out[name], flush=True)

    for mode in ("prefix", "suffix"):
        s_t, _ = ag.compute_states(k1, k2, v, None, mode=mode, cfg=tiles)
        for how in ("sequential", "parallel"):
            c = dict(cols, CAUSAL_STATE=how)
            s_c, _ = ag.compute_states(k1, k2, v, None, mode=mode, cfg=c, f1t=ag.transposed(k1, k2, c))
            cmp(f"state_{mode}_{how}", s_c, s_t)
    s, z = ag.compute_states(k1, k2, v, None, mode="prefix", cfg=tiles)
    o_t, d_t = ag.apply_states(q1, q2, k1, k2, v, s, z, causal=True, cfg=tiles)
    o_c, d_c = ag.apply_states(q1, q2, k1, k2, v, s, z, causal=True, cfg=cols, q1t=ag.transposed(q1, q2, cols))
    cmp("apply_out", o_c, o_t)
    cmp("apply_den", d_c, d_t)
    gg = torch.randn_like(v)
    w = torch.rand(bh, n, device="cuda")
    a = ag.factor_grads(q1, q2, gg, w, k1, k2, v, None, s, z, causal=True, query_side=True, cfg=tiles)
    b = ag.factor_grads(q1, q2, gg, w, k1, k2, v, None, s, z, causal=True, query_side=True, cfg=cols,
                        x1t=ag.transposed(q1, q2, cols))
    cmp("grad_q1", b[0], a[0])
    cmp("grad_q2", b[1], a[1])
    doc["debug_causal"] = out


def cfg_for(over, r=64):
    return default_config(r1=r, r2=r, dv=DV, causal=False, dtype=torch.bfloat16).replace(**over)


def inputs(n, r, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    pos = lambda w: (torch.rand(BH, n, w, device="cuda", generator=g) * 0.5 + 0.05).to(torch.bfloat16)  # noqa: E731
    q1, q2, k1, k2 = (pos(r) for _ in range(4))
    v = torch.randn(BH, n, DV, device="cuda", generator=g).to(torch.bfloat16)
    return q1, q2, k1, k2, v


def check(over, causal, n=1000, r=64):
    """Relative errors (output, then gradients) against the fp64 reference."""
    torch.manual_seed(n)
    qs = [(torch.rand(2, 3, n, r, device="cuda") + 0.05).bfloat16().requires_grad_() for _ in range(2)]
    ks = [(torch.rand(2, 3, n, r, device="cuda") + 0.05).bfloat16().requires_grad_() for _ in range(2)]
    v = torch.randn(2, 3, n, DV, device="cuda").bfloat16().requires_grad_()
    return reference_errors(qs, ks, v, causal=causal, config=over)


def _skip_unless(stages, row):
    def wrapped(stage, *a, **k):
        if stage.split("_")[0] in stages or stage in ("fwd", "fwd+bwd"):
            return row(stage, *a, **k)
    return wrapped


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--n", type=int, default=32760)
    ap.add_argument("--budget-s", type=float, default=420.0)
    ap.add_argument("--stages", default="debug,overhead,state,apply,grad", help="which stage groups to time")
    ap.add_argument("--full", default="[]", help="JSON list of config overrides for whole fwd / fwd+bwd timings")
    args = ap.parse_args()
    end = time.time() + args.budget_s
    torch.backends.cuda.matmul.allow_tf32 = False
    peak = matmul_peak()
    import triton
    doc = dict(meta=dict(device=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
                         bf16_matmul_peak_tflops=peak, n=args.n, bh=BH, dv=DV), checks=[], rows=[])
    print(doc["meta"], flush=True)

    def save():
        tmp = args.out + ".tmp"
        with open(tmp, "w") as fh:
            json.dump(doc, fh, indent=1)
        os.replace(tmp, args.out)

    def row(stage, name, over, fn, flops):
        if time.time() > end:
            print(f"skip {stage}/{name}: budget", flush=True)
            return
        rec = dict(stage=stage, variant=name, config=over)
        try:
            ms, reps = timed(fn, target_ms=150)
            rec.update(ms=ms, reps=reps, tflops=flops / ms / 1e9, pct_peak=100 * flops / ms / 1e9 / peak)
            print(f"{stage:8s} {name:22s} {ms:8.3f} ms {rec['tflops']:6.1f} TFLOP/s {rec['pct_peak']:5.1f}%",
                  flush=True)
        except Exception as exc:  # noqa: BLE001
            rec["error"] = f"{type(exc).__name__}: {str(exc)[:300]}"
            print(f"{stage}/{name}: {rec['error']}", flush=True)
            traceback.print_exc()
        doc["rows"].append(rec)
        save()

    stages = set(args.stages.split(","))
    row = _skip_unless(stages, row)
    for over, causal, r in [(dict(STATE_KERNEL="tiles", STATE_TILES_T=True), False, 64),
                            (dict(STATE_KERNEL="tiles", STATE_TILES_T=True, STATE_BLOCK_C=256), False, 32),
                            (dict(STATE_KERNEL="tiles", STATE_TILES_T=True), False, 128)]:
        try:
            errs = check(over, causal, r=r)
            ok = all(math.isfinite(e) and e < 2e-2 for e in errs)
        except Exception as exc:  # noqa: BLE001
            errs, ok = repr(exc)[:300], False
        doc["checks"].append(dict(config=over, causal=causal, r=r, rel_errors=errs, ok=ok))
        print("check", over, causal, r, errs, "OK" if ok else "FAIL", flush=True)
    save()

    try:
        if "debug" in stages:
            debug_causal(doc)
    except Exception:  # noqa: BLE001
        traceback.print_exc()
    save()
    n, r = args.n, 64
    q1, q2, k1, k2, v = inputs(n, r)
    cfg = cfg_for({})
    row("overhead", "transpose_q1", {}, lambda: ag.transposed(q1, q2, cfg), 0)
    row("overhead", "torch_transpose_q1", {}, lambda: q1.transpose(1, 2).contiguous(), 0)
    den = torch.rand(BH, n, device="cuda") + 0.1
    from hla_analysis._checks import check_normalizers
    row("overhead", "check_normalizers", {}, lambda: check_normalizers(den, allow_signed=False), 0)
    unit = 2 * BH * n * r * r * DV
    for name, over in STATE_VARIANTS.items():
        cfg = cfg_for(over)
        k1t = ag.transposed(k1, k2, cfg)
        row("state", name, over, lambda: ag.compute_states(k1, k2, v, None, mode="total", cfg=cfg, f1t=k1t), unit)
    s, z = ag.compute_states(k1, k2, v, None, mode="total", cfg=cfg_for({}), f1t=ag.transposed(k1, k2, cfg_for({})))
    for name, over in APPLY_VARIANTS.items():
        cfg = cfg_for(over)
        q1t = ag.transposed(q1, q2, cfg)
        row("apply", name, over, lambda: ag.apply_states(q1, q2, k1, k2, v, s, z, causal=False, cfg=cfg, q1t=q1t), unit)
    g = torch.randn_like(v)
    w = torch.rand(BH, n, device="cuda")
    for name, over in GRAD_VARIANTS.items():
        cfg = cfg_for(over)
        q1t, k1t = ag.transposed(q1, q2, cfg), ag.transposed(k1, k2, cfg)
        row("grad_q", name, over, lambda: ag.factor_grads(q1, q2, g, w, k1, k2, v, None, s, z, causal=False,
                                                          query_side=True, cfg=cfg, x1t=q1t), unit)
        row("grad_k", name, over, lambda: ag.factor_grads(k1, k2, v, None, q1, q2, g, w, s, z, causal=False,
                                                          query_side=False, cfg=cfg, x1t=k1t), 2 * unit)
    s = z = None  # free the state before the whole-pass timings
    full = [{}, dict(PER_A=False)] + json.loads(args.full)
    for over in full:
        for causal in (False, True):
            qs = [t.view(1, BH, n, r).requires_grad_() for t in (q1.clone(), q2.clone())]
            ks = [t.view(1, BH, n, r).requires_grad_() for t in (k1.clone(), k2.clone())]
            vv = v.view(1, BH, n, DV).clone().requires_grad_()

            def fwd():
                with torch.no_grad():
                    return hla_triton(qs, ks, vv, causal=causal, config=over)

            def both():
                out = hla_triton(qs, ks, vv, causal=causal, config=over)
                torch.autograd.grad(out, [*qs, *ks, vv], torch.ones_like(out) * 1e-3)

            tag = ("causal " if causal else "") + json.dumps(over)
            row("fwd", tag, over, fwd, 2 * unit)
            row("fwd+bwd", tag, over, both, 6 * unit)
            torch.cuda.empty_cache()

    from hla_analysis.ops.triton.state import kernels
    compiled = []
    for kern in (kernels.state_cols_kernel, kernels.state_kernel, kernels.apply_kernel, kernels.grad_kernel):
        for dev_cache in getattr(kern, "device_caches", {}).values():
            cache = dev_cache[0] if isinstance(dev_cache, tuple) else dev_cache
            for key, ck in cache.items():
                meta = getattr(ck, "metadata", None)
                compiled.append(dict(kernel=kern.fn.__name__, key=str(key)[:400], n_regs=getattr(ck, "n_regs", None),
                                     n_spills=getattr(ck, "n_spills", None),
                                     shared=getattr(meta, "shared", None), num_warps=getattr(meta, "num_warps", None)))
    doc["compiled"] = compiled
    save()
    print(f"done; {len(compiled)} compiled kernels recorded", flush=True)


if __name__ == "__main__":
    main()
