"""Where a public call's time goes at long N, on a GPU: syncs, host time, kernels.

For each call (checks on and off, no_grad, B = 1, H = 12, bf16):
- ``syncs``: every operation that makes the host wait for the GPU (torch's sync debug mode),
  with the project frames that called it;
- ``host_idle_ms`` / ``host_busy_ms``: host time of one call on an idle GPU and right after a
  long matmul was queued (a call that waits for the GPU takes longer on a busy one);
- ``per_call_ms``: back-to-back calls, CUDA events;
- ``kernels``: the torch profiler's device time per kernel name for one call.

    python benchmarks/gpu/diagnose_public.py --n 32760 --out diag.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import traceback
import warnings

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))
sys.path.insert(0, os.path.dirname(__file__))

from bench_public import per_call_ms  # noqa: E402  (the same back-to-back timing as its overhead rows)

from hla_analysis._checks import checks_disabled  # noqa: E402
from hla_analysis._io import atomic_write_json  # noqa: E402
from hla_analysis.ops import hla  # noqa: E402
from hla_analysis.variants import make_variant  # noqa: E402


def _calls(n, h=12):
    pos = lambda w: (torch.rand(1, h, n, w, device="cuda") * 0.5 + 0.05).to(torch.bfloat16)
    gauss = lambda w: torch.randn(1, h, n, w, device="cuda", dtype=torch.bfloat16)
    q1, q2, k1, k2 = (pos(64) for _ in range(4))
    v128 = gauss(128)
    x64 = [gauss(64) for _ in range(3)]
    x128 = [gauss(128) for _ in range(3)]
    calls = {"hla M=2 r=64": lambda: hla([q1, q2], [k1, k2], v128)}
    for spec, xs in (("hla:m=2,phi=affine", x64), ("hla:m=2,phi=affine,proj=1", x64),
                     ("hla:m=2,phi=affine", x128), ("linear:phi=elu1", x64)):
        var = make_variant(spec).bind(xs[0].shape[-1]).to("cuda")
        calls[f"{spec} d={xs[0].shape[-1]} .forward"] = (lambda var=var, xs=xs: var.forward(*xs))
    return calls


def _syncs(call):
    """The syncing operations of one call, each with the project frames above it."""
    found = []

    def hook(message, category, filename, lineno, file=None, line=None):
        frames = [f"{os.path.relpath(f.filename)}:{f.lineno} {f.name}" for f in traceback.extract_stack()[:-1]
                  if "hla_analysis" in f.filename]
        found.append({"warning": str(message).splitlines()[0][:200], "frames": frames[-6:]})

    torch.cuda.synchronize()
    old = warnings.showwarning
    warnings.showwarning = hook
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("always")
            warnings.showwarning = hook
            torch.cuda.set_sync_debug_mode("warn")
            try:
                call()
            finally:
                torch.cuda.set_sync_debug_mode("default")
    finally:
        warnings.showwarning = old
    torch.cuda.synchronize()
    return found


def _host_ms(call, busy: bool, reps=7):
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    times = []
    for _ in range(reps):
        torch.cuda.synchronize()
        if busy:
            for _ in range(8):  # about 12 ms of queued GPU work
                a @ a
        t0 = time.perf_counter()
        call()
        times.append((time.perf_counter() - t0) * 1e3)
        torch.cuda.synchronize()
    return statistics.median(times)


def _kernels(call):
    from torch.profiler import ProfilerActivity, profile

    call()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as p:
        call()
        torch.cuda.synchronize()
    rows = []
    for e in p.key_averages():
        dev = getattr(e, "self_device_time_total", None)
        if dev is None:
            dev = getattr(e, "self_cuda_time_total", 0)
        if dev and e.key and not e.key.startswith("aten::"):
            rows.append({"kernel": e.key[:120], "count": e.count, "device_us": round(dev, 1)})
    rows.sort(key=lambda r: -r["device_us"])
    cpu_launches = sum(e.count for e in p.key_averages() if e.key in ("cudaLaunchKernel", "cuLaunchKernelEx"))
    return rows, cpu_launches


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, nargs="+", default=[32760])
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": []}
    with torch.no_grad():
        for n in args.n:
            for name, call in _calls(n).items():
                for label in ("checks on", "checks off"):
                    ctx = checks_disabled() if label == "checks off" else None
                    if ctx:
                        ctx.__enter__()
                    try:
                        call()  # compiles
                        torch.cuda.synchronize()
                        kernels, launches = _kernels(call)
                        row = {"call": name, "n": n, "checks": label, "syncs": _syncs(call),
                               "host_idle_ms": _host_ms(call, busy=False), "host_busy_ms": _host_ms(call, busy=True),
                               "per_call_ms": per_call_ms(call), "launches": launches,
                               "device_ms": round(sum(k["device_us"] for k in kernels) / 1e3, 4),
                               "kernels": kernels[:14]}
                    finally:
                        if ctx:
                            ctx.__exit__(None, None, None)
                    result["rows"].append(row)
                    print(json.dumps({k: row[k] for k in ("call", "n", "checks", "host_idle_ms", "host_busy_ms",
                                                          "per_call_ms", "device_ms", "launches")}), flush=True)
                    for s in row["syncs"]:
                        print("   sync:", s["warning"][:100], "|", " <- ".join(reversed(s["frames"][-3:])), flush=True)
                    atomic_write_json(args.out, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
