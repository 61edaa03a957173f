"""GPU benchmark: fused Triton HLA against softmax (cuDNN, flash) and linear-time kernels.

One H200, B = 1, H = 12, dv = 128, N in {8192, 32760, 75600}; forward and forward+backward;
median of CUDA-event timings after warm-up; TFLOP/s against a bf16 matmul peak measured in the
same run. Results go to a JSON file (and a markdown table on stdout).

Usage (on a CUDA machine; ``fla-core`` and ``retention`` optional, rows are skipped without)::

    python benchmarks/gpu/bench_hla.py --mode smoke --out /tmp/smoke.json   # correctness + config sweep
    python benchmarks/gpu/bench_hla.py --mode full --out benchmarks/gpu/results/h200.json

FLOP counts (stated so the percentages can be checked):
softmax 4 N^2 d H forward, 3.5x that for forward+backward; HLA (M factors, state width R =
prod r_m) 4 H N R dv forward and 12 H N R dv forward+backward (intra-chunk work of the causal
form not counted); fla linear attention 4 H N K dv and 3x; power retention deg 2 counted like
linear attention with state width d(d+1)/2.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time
import traceback

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))

B, H, DV = 1, 12, 128
NS = (8192, 32760, 75600)


def timed(fn, *, warmup=2, target_ms=200.0, min_reps=5, max_reps=50):
    """Median milliseconds of ``fn`` over CUDA-event-timed repetitions after warm-up.

    Calls slower than 100 ms (the unfused torch rows) get one warm-up call and three
    repetitions, so that every row fits one run.
    """
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()  # first warm-up call (compiles, autotunes)
    end.record()
    end.synchronize()
    for _ in range(warmup - 1):
        start.record()
        fn()
        end.record()
        end.synchronize()
    last = start.elapsed_time(end)
    if last > 100.0:
        min_reps = max_reps = 3
    reps = int(min(max_reps, max(min_reps, target_ms / max(last, 1e-3))))
    times = []
    for _ in range(reps):
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times), reps


def matmul_peak():
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    ms, _ = timed(lambda: a @ b, warmup=5, target_ms=500, min_reps=20, max_reps=100)
    return 2 * 8192**3 / (ms * 1e-3) / 1e12


def pos(*shape, requires_grad=False):
    # positive features keep every HLA normaliser > 0 (no signed rows to refuse)
    t = (torch.rand(*shape, device="cuda", dtype=torch.float32) * 0.5 + 0.05).to(torch.bfloat16)
    return t.requires_grad_(requires_grad)


def gauss(*shape, requires_grad=False):
    return torch.randn(*shape, device="cuda", dtype=torch.bfloat16).requires_grad_(requires_grad)


def fwd_bwd(forward, inputs):
    """A callable running forward (and backward when inputs need grad)."""
    def run_fwd():
        with torch.no_grad():
            return forward()

    def run_both():
        out = forward()
        out = out[0] if isinstance(out, tuple) else out
        torch.autograd.grad(out, inputs, torch.ones_like(out) * 1e-3)

    return run_fwd, run_both


# ---------------------------------------------------------------- methods
def case_sdpa(n, backend):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    q, k, v = (gauss(B, H, n, 128, requires_grad=True) for _ in range(3))
    be = {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION}[backend]

    def forward():
        with sdpa_kernel([be]):
            return torch.nn.functional.scaled_dot_product_attention(q, k, v)

    flops = 4 * n * n * 128 * H
    return forward, [q, k, v], flops, 3.5 * flops


def case_fla(n, kdim):
    from fla.ops.linear_attn import chunk_linear_attn

    q, k = (pos(B, n, H, kdim, requires_grad=True) for _ in range(2))
    v = gauss(B, n, H, DV, requires_grad=True)
    flops = 4 * H * n * kdim * DV
    return (lambda: chunk_linear_attn(q, k, v, normalize=True)[0]), [q, k, v], flops, 3 * flops


def case_power(n, d, chunk):
    from retention import power_retention

    q, k, v = (gauss(B, n, H, d, requires_grad=True) for _ in range(3))
    flops = 4 * H * n * (d * (d + 1) // 2) * d
    return (lambda: power_retention(q, k, v, deg=2, chunk_size=chunk)), [q, k, v], flops, 3 * flops


def case_hla(n, m, r, causal, backend, config=None):
    from hla_analysis.ops import hla
    from hla_analysis.ops.triton import hla_triton

    qs = [pos(B, H, n, r, requires_grad=True) for _ in range(m)]
    ks = [pos(B, H, n, r, requires_grad=True) for _ in range(m)]
    v = gauss(B, H, n, DV, requires_grad=True)
    if backend == "triton":
        forward = lambda: hla_triton(qs, ks, v, causal=causal, config=config)  # noqa: E731
    else:
        forward = lambda: hla(qs, ks, v, causal=causal, backend="torch")  # noqa: E731
    flops = 4 * H * n * r**m * DV
    return forward, [*qs, *ks, v], flops, 3 * flops


# ---------------------------------------------------------------- correctness
def reference_errors(qs, ks, v, *, causal, key_padding_mask=None, config=None):
    """Relative errors of the Triton output and of every gradient (a random upstream
    gradient) against the fp64 materialized reference."""
    from hla_analysis.ops import hla_attention_output
    from hla_analysis.ops.triton import hla_triton

    m = len(qs)
    out = hla_triton(qs, ks, v, causal=causal, key_padding_mask=key_padding_mask, config=config)
    g = torch.randn_like(out)
    grads = torch.autograd.grad(out, [*qs, *ks, v], g)
    ref_in = [t.detach().double().requires_grad_() for t in [*qs, *ks, v]]
    ref = hla_attention_output(ref_in[:m], ref_in[m:2 * m], ref_in[-1], causal=causal,
                               key_padding_mask=key_padding_mask)
    ref_grads = torch.autograd.grad(ref, ref_in, g.double())
    return [float((a.detach().double() - b.detach()).norm() / b.detach().norm())
            for a, b in zip([out, *grads], [ref, *ref_grads])]


def check_correctness():
    """bf16 Triton HLA (forward and gradients) against the fp64 reference, fresh inputs."""
    rows = []
    torch.manual_seed(0)
    for m, r, causal, n, masked, dtype in [
        (2, 64, False, 1000, False, torch.bfloat16), (2, 64, True, 1500, False, torch.bfloat16),
        (2, 32, True, 777, True, torch.bfloat16), (1, 128, True, 1100, False, torch.bfloat16),
        (1, 64, False, 900, True, torch.float16), (2, 16, False, 333, False, torch.float32),
        (2, 64, True, 2100, False, torch.float32), (2, 32, False, 999, True, torch.bfloat16),
        (2, 128, False, 1200, False, torch.bfloat16), (2, 64, False, 3001, True, torch.float16),
    ]:
        qs = [(torch.rand(2, 3, n, r, device="cuda") + 0.05).to(dtype).requires_grad_() for _ in range(m)]
        ks = [(torch.rand(2, 3, n, r, device="cuda") + 0.05).to(dtype).requires_grad_() for _ in range(m)]
        v = torch.randn(2, 3, n, DV, device="cuda").to(dtype).requires_grad_()
        kpm = (torch.rand(2, 1, n, device="cuda") > 0.2) if masked else None
        if kpm is not None:
            kpm[..., 0] = True
        try:
            errs = reference_errors(qs, ks, v, causal=causal, key_padding_mask=kpm)
        except Exception as exc:  # noqa: BLE001  (recorded as a failed check)
            rows.append(dict(m=m, r=r, causal=causal, n=n, dtype=str(dtype), ok=False, error=repr(exc)[:300]))
            print(f"check m={m} r={r} causal={causal} n={n} {dtype}: ERROR {exc!r}"[:400], flush=True)
            continue
        tol = 2e-2 if dtype != torch.float32 else 1e-4
        ok = all(math.isfinite(e) and e < tol for e in errs)
        rows.append(dict(m=m, r=r, causal=causal, n=n, masked=masked, dtype=str(dtype), rel_errors=errs,
                         tol=tol, ok=ok))
        print(f"check m={m} r={r} causal={causal} n={n} masked={masked} {dtype}: "
              + " ".join(f"{e:.1e}" for e in errs) + ("  OK" if ok else "  FAIL"), flush=True)
    return rows


# ---------------------------------------------------------------- driver
def measure(results, peak, name, make, n, extra, budget_end):
    for pass_name in ("fwd", "fwd+bwd"):
        if time.time() > budget_end:
            print(f"skip {name} n={n} {pass_name}: time budget", flush=True)
            continue
        row = dict(method=name, n=n, B=B, H=H, dv=DV, pass_=pass_name, **extra)
        try:
            forward, inputs, f_fwd, f_both = make()
            run_fwd, run_both = fwd_bwd(forward, inputs)
            ms, reps = timed(run_fwd if pass_name == "fwd" else run_both)
            flops = f_fwd if pass_name == "fwd" else f_both
            row.update(ms=ms, reps=reps, flops=flops, tflops=flops / (ms * 1e-3) / 1e12)
            row["pct_peak"] = 100 * row["tflops"] / peak
            print(f"[{time.strftime('%H:%M:%S')}] {name:28s} n={n:6d} {pass_name:8s} {ms:9.3f} ms "
                  f"{row['tflops']:7.1f} TFLOP/s {row['pct_peak']:5.1f}% {extra}", flush=True)
        except Exception as exc:  # noqa: BLE001  (record OOM / unsupported, keep going)
            row["error"] = f"{type(exc).__name__}: {str(exc)[:300]}"
            print(f"{name} n={n} {pass_name}: {row['error']}", flush=True)
            if "out of memory" not in str(exc):
                traceback.print_exc()
        finally:
            torch.cuda.empty_cache()
        row["pass"] = row.pop("pass_")
        results.append(row)


def sweep(results, peak, budget_end):
    """Block-size variants of the Triton kernels at the headline shape (r = 64, N = 32760)."""
    variants = {
        "default": {},
        "st_bn128": dict(STATE_BLOCK_N=128),
        "st_w4": dict(STATE_WARPS=4),
        "st_c64": dict(STATE_BLOCK_C=64, STATE_WARPS=4),
        "ap_c64": dict(APPLY_BLOCK_C=64),
        "ap_m64": dict(APPLY_BLOCK_M=64, APPLY_WARPS=4),
        "stages2": dict(STAGES=2),
        "gr_m128": dict(GRAD_BLOCK_M=128, GRAD_WARPS=8),
        "gr_c128": dict(GRAD_BLOCK_C=128, GRAD_WARPS=8),
    }
    for causal in (False, True):
        for key, cfg in variants.items():
            measure(results, peak, f"triton_hla[{key}]", lambda: case_hla(32760, 2, 64, causal, "triton", cfg),
                    32760, dict(m=2, r=64, causal=causal, config=cfg), budget_end)


def priority(results, peak, cfg, budget_end):
    for n in NS[1:]:
        for be in ("cudnn", "flash"):
            measure(results, peak, f"sdpa_{be}", lambda: case_sdpa(n, be), n, dict(d=128, causal=False), budget_end)
        for m, r, causal in ((2, 64, False), (2, 64, True), (2, 32, False), (2, 32, True), (1, 128, True),
                             (1, 64, True)):
            measure(results, peak, "triton_hla", lambda: case_hla(n, m, r, causal, "triton", cfg), n,
                    dict(m=m, r=r, causal=causal), budget_end)
    n = 32760
    measure(results, peak, "torch_hla", lambda: case_hla(n, 2, 64, False, "torch"), n,
            dict(m=2, r=64, causal=False), budget_end)
    measure(results, peak, "fla_chunk_linear_attn", lambda: case_fla(n, 128), n, dict(k=128, causal=True), budget_end)
    measure(results, peak, "power_retention_deg2", lambda: case_power(n, 64, 1024), n,
            dict(d=64, chunk=1024, causal=True), budget_end)
    n = 75600
    measure(results, peak, "fla_chunk_linear_attn", lambda: case_fla(n, 128), n, dict(k=128, causal=True), budget_end)
    measure(results, peak, "power_retention_deg2", lambda: case_power(n, 64, 1024), n,
            dict(d=64, chunk=1024, causal=True), budget_end)
    measure(results, peak, "torch_hla", lambda: case_hla(n, 2, 64, False, "torch"), n,
            dict(m=2, r=64, causal=False), budget_end)
    n = 32760
    measure(results, peak, "fla_chunk_linear_attn", lambda: case_fla(n, 64), n, dict(k=64, causal=True), budget_end)
    measure(results, peak, "torch_hla", lambda: case_hla(n, 2, 64, True, "torch"), n,
            dict(m=2, r=64, causal=True), budget_end)


def slow_anchors(results, peak, budget_end, save, *, power_ns):
    """Power retention (minutes of autotuning), then every unfused torch row; saved per row."""
    for n in power_ns:
        measure(results, peak, "power_retention_deg2", lambda: case_power(n, 64, 1024), n,
                dict(d=64, chunk=1024, causal=True), budget_end)
        save()
    for r, causal in ((64, False), (64, True), (32, False), (32, True)):
        for n in NS:
            measure(results, peak, "torch_hla", lambda: case_hla(n, 2, r, causal, "torch"), n,
                    dict(m=2, r=r, causal=causal), budget_end)
            save()


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--mode", choices=("smoke", "full", "priority", "anchors"), default="full",
                    help="priority: the headline rows first (all N), linear-time anchors after; "
                         "for a short lease, since fla and retention spend minutes autotuning")
    ap.add_argument("--skip-checks", action="store_true")
    ap.add_argument("--out", required=True)
    ap.add_argument("--config", default="{}", help="JSON block-size overrides for the Triton HLA rows")
    ap.add_argument("--budget-s", type=float, default=500.0)
    args = ap.parse_args()
    budget_end = time.time() + args.budget_s
    cfg = json.loads(args.config)
    torch.backends.cuda.matmul.allow_tf32 = False
    meta = dict(device=torch.cuda.get_device_name(), torch=torch.__version__, python=platform.python_version())
    import triton
    meta["triton"] = triton.__version__
    for pkg in ("fla", "retention"):
        try:
            mod = __import__(pkg)
            meta[pkg] = getattr(mod, "__version__", "present")
        except Exception as exc:  # noqa: BLE001
            meta[pkg] = f"missing ({type(exc).__name__})"
    from hla_analysis.ops.triton import default_config
    meta["hla_config_noncausal_r64"] = dict(default_config(r1=64, r2=64, dv=DV, causal=False, dtype=torch.bfloat16))
    meta["hla_config_causal_r64"] = dict(default_config(r1=64, r2=64, dv=DV, causal=True, dtype=torch.bfloat16))
    peak = matmul_peak()
    meta["bf16_matmul_peak_tflops"] = peak
    print(f"meta {meta}", flush=True)
    results, checks = [], []
    doc = dict(meta=meta, config=cfg, checks=checks, results=results)

    def save():
        tmp = args.out + ".tmp"
        with open(tmp, "w") as fh:
            json.dump(doc, fh, indent=1)
        os.replace(tmp, args.out)

    if not args.skip_checks:
        checks.extend(check_correctness())
    save()
    if args.mode == "priority":
        priority(results, peak, cfg, budget_end)
        save()
        return
    if args.mode == "anchors":  # power retention and unfused torch, beside the headline rows again
        for n in NS[1:]:
            measure(results, peak, "sdpa_cudnn", lambda: case_sdpa(n, "cudnn"), n, dict(d=128, causal=False),
                    budget_end)
            for causal in (False, True):
                measure(results, peak, "triton_hla", lambda: case_hla(n, 2, 64, causal, "triton", cfg), n,
                        dict(m=2, r=64, causal=causal), budget_end)
        slow_anchors(results, peak, budget_end, save, power_ns=(32760, 75600, 8192))
        return
    if args.mode == "smoke":
        sweep(results, peak, budget_end)
        for n in (8192,):
            measure(results, peak, "fla_chunk_linear_attn", lambda: case_fla(n, 128), n, dict(k=128, causal=True),
                    budget_end)
            measure(results, peak, "power_retention_deg2", lambda: case_power(n, 64, 1024), n,
                    dict(d=64, chunk=1024, causal=True), budget_end)
            measure(results, peak, "torch_hla", lambda: case_hla(n, 2, 64, False, "torch"), n,
                    dict(m=2, r=64, causal=False), budget_end)
        save()
        return
    # every row in one run: the fused and anchor rows first, then power retention (minutes of
    # autotuning), then the slow unfused torch rows
    for n in NS:
        for be in ("cudnn", "flash"):
            measure(results, peak, f"sdpa_{be}", lambda: case_sdpa(n, be), n, dict(d=128, causal=False), budget_end)
        for r in (64, 32):
            for causal in (False, True):
                measure(results, peak, "triton_hla", lambda: case_hla(n, 2, r, causal, "triton", cfg), n,
                        dict(m=2, r=r, causal=causal), budget_end)
        for r in (64, 128):
            measure(results, peak, "triton_hla", lambda: case_hla(n, 1, r, True, "triton", cfg), n,
                    dict(m=1, r=r, causal=True), budget_end)
        for kdim in (64, 128):
            measure(results, peak, "fla_chunk_linear_attn", lambda: case_fla(n, kdim), n,
                    dict(k=kdim, causal=True), budget_end)
        save()
    slow_anchors(results, peak, budget_end, save, power_ns=NS)
    save()


if __name__ == "__main__":
    main()
