"""HLA speed through the calls users make, beside cuDNN SDPA, on one GPU (issues 10 and 11).

Every HLA row goes through ``hla()``, ``linear_attention()`` or ``make_variant(spec).forward``
(feature maps, value checks and dispatch included), in one process, with:

* B = 1, H = 12, bf16, N in {8192, 32760, 75600};
* three modes: forward under ``torch.no_grad()``, forward with autograd (inputs need grad,
  nothing backward), forward + backward;
* ``hla()`` rows with dv = 128 (M = 1 and M = 2 at r = 64 and 128, causal and not), variant
  rows with dv = d (tied ``hla:m=2,phi=affine`` at d = 64 and 128, fitted ``proj=1``, untied
  ``tied=0``, ``power:p=2``, ``linear:phi=elu1``, M = 3 and M = 4 which take the quadratic
  kernel), each with the path the dispatcher took (``quadratic_dispatch.last_dispatch``);
* cuDNN SDPA at d = 64 and d = 128 (dv = d), causal and not;
* the bf16 matmul peak (8192^3) measured in the same run;
* the value checks' cost: back-to-back calls with checks on, with
  ``_checks.checks_disabled()``, and the bare kernels (``hla_triton``), same inputs.

Timing: CUDA events around each call, two warm-up calls, median of at least five repetitions
(three above 100 ms); the overhead rows time batches of 20 back-to-back calls (a per-call
host sync cannot hide behind the next call's kernels there). Rows are written atomically
after each one, so a run cut short keeps what it measured.

    python benchmarks/gpu/bench_public.py --out benchmarks/gpu/results/session4/public_h200.json

Rows run category by category (``--only``/``--skip``: overhead, sdpa, hla, variants,
baselines), each over every N, so a run cut short by its time limit keeps whole categories.
``baselines`` are fla ``chunk_linear_attn`` (K = 64, 128, causal) and ``power_retention``
deg 2 (d = 64), when those packages import (they spend minutes autotuning: run them last).

``--smoke``: the same code on CPU through ``TRITON_INTERPRET=1`` (set it before starting),
fp32, B = 1, H = 2, N = 40, widths 16, perf-counter timing; it checks the script, not speed.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
import traceback

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))

from hla_analysis._checks import check_batch, checks_disabled
from hla_analysis._io import atomic_write_json

B, H = 1, 12
NS = (8192, 32760, 75600)
DEVICE, DTYPE, BACKEND = "cuda", torch.bfloat16, "auto"
WIDTH = None  # --smoke: every width (r, d, dv) becomes this
CATEGORIES = ("overhead", "sdpa", "hla", "variants", "baselines")


def _w(x):
    return x if WIDTH is None else WIDTH


def _cuda() -> bool:
    return DEVICE == "cuda"


def _sync():
    if _cuda():
        torch.cuda.synchronize()
MODES = ("fwd_nograd", "fwd_autograd", "fwd_bwd")
VARIANTS = (("linear:phi=elu1", 64), ("power:p=2", 64), ("hla:m=2,phi=affine", 64), ("hla:m=2,phi=affine", 128),
            ("hla:m=2,phi=affine,proj=1", 64), ("hla:m=2,phi=affine,tied=0", 64), ("hla:m=3,phi=affine", 64),
            ("hla:m=3,phi=affine,tied=0", 64), ("hla:m=4,phi=affine", 64), ("hla:m=4,phi=affine", 128),
            ("hla:m=4,phi=affine,proj=1", 64), ("hla:m=4,phi=affine,tied=0", 64))
HLA_CALLS = ((1, 64, False), (1, 64, True), (2, 64, False), (2, 64, True), (2, 128, False), (2, 128, True))


def timed(fn, *, warmup=2, target_ms=100.0, min_reps=5, max_reps=30):
    """Median ms of ``fn`` (CUDA events around each call, synchronised), after warm-up.

    The timing loop of ``bench_hla.timed``, with this script's shorter defaults.
    """
    if not _cuda():  # --smoke: perf counter, few reps
        fn()
        times = []
        for _ in range(2):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(times), len(times)
    from bench_hla import timed as timed_loop  # the script's folder is on sys.path

    return timed_loop(fn, warmup=warmup, target_ms=target_ms, min_reps=min_reps, max_reps=max_reps)


def per_call_ms(fn, *, calls=20, batches=5):
    """Median over batches of ms per call, ``calls`` back-to-back calls per batch."""
    if not _cuda():
        calls, batches = 2, 2
        fn()
        times = []
        for _ in range(batches):
            t0 = time.perf_counter()
            for _ in range(calls):
                fn()
            times.append((time.perf_counter() - t0) * 1e3 / calls)
        return statistics.median(times)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(batches):
        start.record()
        for _ in range(calls):
            fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / calls)
    return statistics.median(times)


def matmul_peak_tflops():
    if not _cuda():
        return None
    a, b = (torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    ms, _ = timed(lambda: a @ b, warmup=5, target_ms=300, min_reps=20, max_reps=60)
    return 2 * 8192 ** 3 / (ms * 1e-3) / 1e12


def pos(*shape, grad=False):
    # positive features: every normaliser > 0, odd-M affine factors have no signed weights
    return (torch.rand(*shape, device=DEVICE) * 0.5 + 0.05).to(DTYPE).requires_grad_(grad)


def gauss(*shape, grad=False):
    return torch.randn(*shape, device=DEVICE, dtype=DTYPE, requires_grad=grad)


def modes(forward, leaves):
    """Callables per mode; ``forward()`` builds the output from ``leaves``."""
    def nograd():
        with torch.no_grad():
            forward()

    def autograd():
        forward()

    def both():
        out = forward()
        torch.autograd.grad(out, leaves, torch.full_like(out, 1e-3))

    return {"fwd_nograd": nograd, "fwd_autograd": autograd, "fwd_bwd": both}


def sdpa_case(n, d, causal):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    d = _w(d)
    q, k, v = (gauss(B, H, n, d, grad=True) for _ in range(3))
    backends = [SDPBackend.CUDNN_ATTENTION] if _cuda() else [SDPBackend.MATH]

    def forward():
        with sdpa_kernel(backends):
            return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal)

    return dict(method="sdpa_cudnn", spec=f"softmax d={d}", d=d, dv=d), forward, [q, k, v]


def hla_case(m, r, n, causal, tied=False, form="auto"):
    """``hla()`` with M factors of width r (tied: the same q and k objects M times), dv = 128."""
    from hla_analysis.ops import hla

    r = _w(r)
    leaves = [pos(B, H, n, r, grad=True) for _ in range(2 if tied else 2 * m)]
    v = gauss(B, H, n, _w(128), grad=True)
    qs, ks = ([leaves[0]] * m, [leaves[1]] * m) if tied else (leaves[:m], leaves[m:])

    def forward():
        return hla(qs, ks, v, causal=causal, backend=BACKEND, form=form)

    spec = f"M={m} r={r}" + (" tied" if tied else "") + (f" form={form}" if form != "auto" else "")
    return dict(method="hla()", spec=spec, d=r, dv=v.shape[-1]), forward, [*leaves, v]


def variant_case(spec, d, n, causal):
    from hla_analysis.variants import make_variant

    d = _w(d)
    var = make_variant(spec).bind(d).to(DEVICE)
    q, k = pos(B, H, n, d, grad=True), pos(B, H, n, d, grad=True)
    v = gauss(B, H, n, d, grad=True)

    def forward():
        return var.forward(q, k, v, causal=causal, backend=BACKEND)

    return dict(method="make_variant().forward", spec=spec, d=d, dv=d), forward, [q, k, v]


def baseline_cases(n):
    """fla ``chunk_linear_attn`` (K = 64, 128; its layout [B, T, H, D]) and ``power_retention``
    deg 2 (d = 64), causal, dv = 128 and 64; skipped when the package does not import."""
    import importlib.util

    cases = []
    if importlib.util.find_spec("fla") is not None:
        from fla.ops.linear_attn import chunk_linear_attn

        for kdim in (64, 128):
            q, k = (pos(B, n, H, kdim, grad=True) for _ in range(2))
            v = gauss(B, n, H, 128, grad=True)
            cases.append((dict(method="fla_chunk_linear_attn", spec=f"K={kdim}", d=kdim, dv=128),
                          (lambda q=q, k=k, v=v: chunk_linear_attn(q, k, v, normalize=True)[0]), [q, k, v]))
    if importlib.util.find_spec("retention") is not None:
        from retention import power_retention

        q, k, v = (gauss(B, n, H, 64, grad=True) for _ in range(3))
        cases.append((dict(method="power_retention", spec="deg=2 d=64 chunk=1024", d=64, dv=64),
                      (lambda: power_retention(q, k, v, deg=2, chunk_size=1024)), [q, k, v]))
    return cases


def run_row(meta, forward, leaves, *, n, causal, rows, out_path, skip_bwd=False):
    from hla_analysis.ops import quadratic_dispatch

    for mode, fn in modes(forward, leaves).items():
        if skip_bwd and mode == "fwd_bwd":
            continue
        row = dict(meta, n=n, causal=causal, mode=mode)
        t0 = time.perf_counter()
        try:
            quadratic_dispatch.last_dispatch = None
            row["ms"], row["reps"] = timed(fn)
            d = quadratic_dispatch.last_dispatch
            if d is not None and meta["method"] != "sdpa_cudnn":
                row["path"], row["engine"] = d.path, d.engine
        except Exception as err:  # noqa: BLE001 - a failed row is recorded, the run goes on
            row["error"] = f"{type(err).__name__}: {str(err)[:300]}"
        row["wall_s"] = round(time.perf_counter() - t0, 2)
        rows.append(row)
        print({k: row[k] for k in ("method", "spec", "n", "causal", "mode") if k in row},
              row.get("ms", row.get("error")), flush=True)
        atomic_write_json(out_path, {**HEADER, "rows": rows})
        if _cuda():
            torch.cuda.empty_cache()


def host_ms(fn, reps=10):
    """Median host milliseconds of one call started on an idle GPU (checks off: launch time only)."""
    times = []
    for _ in range(reps if _cuda() else 2):
        _sync()
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    _sync()
    return statistics.median(times)


def overhead_rows(out_path, rows, ns=NS):
    """Checks on / off / bare kernels, back-to-back forward calls (no_grad), same inputs."""
    from hla_analysis.ops import hla, linear_attention
    from hla_analysis.ops.triton import hla_triton
    from hla_analysis.variants import make_variant

    result = []
    for n in ns:
        result.extend(_overhead_at(n, hla, linear_attention, hla_triton, make_variant, out_path, rows, result))
    return result


def _overhead_at(n, hla, linear_attention, hla_triton, make_variant, out_path, rows, done):
    """Each call with checks on, off (``checks_disabled``) and the bare kernels, same inputs.

    ``overhead_vs_bare`` is the issue's measure (target <= 3% at N >= 8,192): the public call
    against ``hla_triton`` with no checks at all, forward under no_grad, back-to-back calls.
    """
    out = []
    r, dv = _w(64), _w(128)
    q1, q2, k1, k2 = (pos(B, H, n, r) for _ in range(4))
    v = gauss(B, H, n, dv)
    x = pos(B, H, n, r)
    xv = gauss(B, H, n, r)
    affine = make_variant("hla:m=2,phi=affine").bind(r).to(DEVICE)
    affine4 = make_variant("hla:m=4,phi=affine").bind(r).to(DEVICE)  # the quadratic kernel

    def bare(qs, ks, vv, causal=False):
        with checks_disabled(), check_batch():
            return hla_triton(qs, ks, vv, causal=causal)

    calls = {
        "hla M=2 r=64": (lambda: hla([q1, q2], [k1, k2], v, backend=BACKEND),
                         lambda: bare([q1, q2], [k1, k2], v)),
        "hla M=2 r=64 causal": (lambda: hla([q1, q2], [k1, k2], v, causal=True, backend=BACKEND),
                                lambda: bare([q1, q2], [k1, k2], v, causal=True)),
        "linear_attention M=1 r=64": (lambda: linear_attention(q1, k1, v) if _cuda() else
                                      hla([q1], [k1], v, backend=BACKEND), lambda: bare([q1], [k1], v)),
        "hla:m=2,phi=affine d=64 .forward": (lambda: affine.forward(x, x, xv, backend=BACKEND), None),
        "hla:m=4,phi=affine d=64 .forward": (lambda: affine4.forward(x, x, xv, backend=BACKEND), None),
    }
    for name, (call, bare_call) in calls.items():
        with torch.no_grad():
            on = per_call_ms(call)
            with checks_disabled():
                off = per_call_ms(call)
            kernels = per_call_ms(bare_call) if bare_call else None
            on2 = per_call_ms(call)  # the same timing again: spread between repeats
            kernels2 = per_call_ms(bare_call) if bare_call else None
            host_on = host_ms(call)
            with checks_disabled():
                host_off = host_ms(call)
        bare_ms = None if kernels is None else min(kernels, kernels2)
        row = dict(call=name, n=n, checks_on_ms=on, checks_on_repeat_ms=on2, checks_off_ms=off,
                   host_on_ms=host_on, host_off_ms=host_off, bare_kernels_ms=kernels, bare_kernels_repeat_ms=kernels2,
                   overhead_vs_off=min(on, on2) / off - 1,
                   overhead_vs_bare=None if bare_ms is None else min(on, on2) / bare_ms - 1)
        out.append(row)
        print(row, flush=True)
        atomic_write_json(out_path, {**HEADER, "rows": rows, "overhead": done + out})
    return out


HEADER: dict = {}


def main(argv=None):
    global DEVICE, DTYPE, BACKEND, WIDTH, H
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--ns", type=int, nargs="+", default=list(NS))
    parser.add_argument("--skip", nargs="*", default=[], choices=CATEGORIES)
    parser.add_argument("--only", nargs="*", default=None, choices=CATEGORIES)
    parser.add_argument("--smoke", action="store_true", help="CPU, TRITON_INTERPRET=1, tiny shapes (a script check)")
    parser.add_argument("--variants", nargs="+", default=None, metavar="SPEC[@d]",
                        help="only these variant rows, e.g. hla:m=2,phi=affine@128 linear:phi=elu1 "
                             "(a spec without @d takes every d it has in VARIANTS)")
    parser.add_argument("--hla-calls", nargs="+", default=None, metavar="M:r[:causal]",
                        help="only these hla() rows, e.g. 1:64:causal 2:64:causal 3:8:tied 3:8:tied:quadratic "
                             "(default: all of HLA_CALLS)")
    args = parser.parse_args(argv)
    import triton

    if args.smoke:
        if os.environ.get("TRITON_INTERPRET") != "1":
            parser.error("--smoke needs TRITON_INTERPRET=1 in the environment (set before starting)")
        DEVICE, DTYPE, BACKEND, WIDTH, H = "cpu", torch.float32, "triton", 16, 2
        args.ns = [40]
    todo = [c for c in (args.only or CATEGORIES) if c not in args.skip]
    variants = list(VARIANTS)
    if args.variants:
        wanted = [(w.split("@")[0], int(w.split("@")[1]) if "@" in w else None) for w in args.variants]
        variants = [(spec, d) for spec, d in VARIANTS if any(spec == ws and wd in (None, d) for ws, wd in wanted)]
        unknown = [w for w in args.variants if not any(v[0] == w.split("@")[0] for v in VARIANTS)]
        if unknown:
            parser.error(f"--variants: not in VARIANTS: {unknown}")
    hla_calls = [(m, r, causal, set()) for m, r, causal in HLA_CALLS]
    if args.hla_calls:
        try:
            hla_calls = []
            for call in args.hla_calls:
                m, r, *flags = call.split(":")
                if not set(flags) <= {"causal", "tied", "quadratic"}:
                    raise ValueError(call)
                hla_calls.append((int(m), int(r), "causal" in flags, set(flags)))
        except ValueError:
            parser.error(f"--hla-calls takes M:r[:causal][:tied][:quadratic], got {args.hla_calls}")
    HEADER.update(device=torch.cuda.get_device_name() if _cuda() else "cpu (smoke, TRITON_INTERPRET=1)",
                  torch=torch.__version__, triton=triton.__version__,
                  python=platform.python_version(), B=B, H=H, dtype=str(DTYPE).replace("torch.", ""),
                  timing="CUDA events, 2 warm-ups, median of >= 5 reps (3 above 100 ms)",
                  categories=todo, variants=[[spec, d] for spec, d in variants],
                  hla_calls=[[m, r, causal, sorted(f)] for m, r, causal, f in hla_calls])
    HEADER["matmul_peak_tflops"] = matmul_peak_tflops()
    print("bf16 matmul peak", HEADER["matmul_peak_tflops"], flush=True)
    rows: list = []
    overhead = []
    if "overhead" in todo:
        try:
            overhead = overhead_rows(args.out, rows, ns=args.ns)
        except Exception:  # noqa: BLE001
            traceback.print_exc()
    HEADER["overhead"] = overhead
    for category in todo:
        for n in args.ns:
            if category == "sdpa":
                for d in (64, 128):
                    for causal in (False, True):
                        meta, fwd, leaves = sdpa_case(n, d, causal)
                        run_row(meta, fwd, leaves, n=n, causal=causal, rows=rows, out_path=args.out)
            elif category == "hla":
                for m, r, causal, flags in hla_calls:
                    meta, fwd, leaves = hla_case(m, r, n, causal, tied="tied" in flags,
                                                 form="quadratic" if "quadratic" in flags else "auto")
                    run_row(meta, fwd, leaves, n=n, causal=causal, rows=rows, out_path=args.out)
            elif category == "variants":
                for spec, d in variants:
                    both = spec in ("hla:m=2,phi=affine", "linear:phi=elu1") and d == 64
                    for causal in (False, True) if both else (False,):
                        meta, fwd, leaves = variant_case(spec, d, n, causal)
                        run_row(meta, fwd, leaves, n=n, causal=causal, rows=rows, out_path=args.out)
            elif category == "baselines" and _cuda():
                try:
                    cases = baseline_cases(n)
                except Exception:  # noqa: BLE001 - a broken wheel costs its rows, not the run
                    traceback.print_exc()
                    cases = []
                for meta, fwd, leaves in cases:
                    run_row(meta, fwd, leaves, n=n, causal=True, rows=rows, out_path=args.out)
    atomic_write_json(args.out, {**HEADER, "rows": rows})


if __name__ == "__main__":
    main()
