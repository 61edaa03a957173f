"""Cost of the value checks in the public calls: hla() with and without them (benchmark).

Times ``hla()``, ``linear_attention()`` and ``make_variant(spec).forward`` on the same
inputs twice in one process: as users call them, and inside the internal switch
``hla_analysis._checks.checks_disabled()`` (shape checks still run, value checks do not).
The checks cost one host sync per call (issue 10, item 1; target <= 3% at N >= 8,192 on a
GPU). CUDA-ready: on a GPU the default backend takes the Triton kernels and timings use
``torch.cuda.synchronize``. The JSON goes to ``benchmarks/results/validation_overhead_<device>.json``.
Each timed call here ends with a sync, so the unchecked side cannot overlap calls either: this
script measures the checks' own work. ``benchmarks/gpu/bench_public.py`` also measures the cost
of the sync itself (back-to-back calls), which is what the GPU README section reports.

Usage::

    .venv/bin/python benchmarks/validation_overhead.py                 # CPU, N = 2048
    python benchmarks/validation_overhead.py --device cuda --n 8192 32760 --dtype bfloat16
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from pathlib import Path

import torch

from hla_analysis._checks import checks_disabled
from hla_analysis._io import atomic_write_json
from hla_analysis.ops import hla, linear_attention
from hla_analysis.variants import make_variant

RESULTS = Path(__file__).resolve().parent / "results"


def _time(call, *, device: str, repeats: int) -> float:
    """Median seconds of ``call()`` over ``repeats`` runs, after two warm-ups."""
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    for _ in range(2):
        call()
    sync()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def cases(n: int, *, heads: int, width: int, dv: int, device: str, dtype: torch.dtype, causal: bool):
    gen = torch.Generator(device=device).manual_seed(0)

    def feature():  # positive features: every normaliser > 0
        return torch.rand(1, heads, n, width, generator=gen, device=device, dtype=dtype) + 0.1

    q1, q2, k1, k2 = feature(), feature(), feature(), feature()
    v = torch.randn(1, heads, n, dv, generator=gen, device=device, dtype=dtype)
    x = torch.randn(1, heads, n, width, generator=gen, device=device, dtype=dtype)
    affine = make_variant("hla:m=2,phi=affine")
    return {
        "hla M=2": lambda: hla([q1, q2], [k1, k2], v, causal=causal),
        "linear_attention M=1": lambda: linear_attention(q1, k1, v, causal=causal),
        "variant hla:m=2,phi=affine": lambda: affine.forward(x, x, x, causal=causal),
    }


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--n", type=int, nargs="+", default=[2048])
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--width", type=int, default=32)
    parser.add_argument("--dv", type=int, default=32)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16", "float64"])
    parser.add_argument("--causal", action="store_true")
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args(argv)
    dtype = getattr(torch, args.dtype)
    rows = []
    for n in args.n:
        for name, call in cases(n, heads=args.heads, width=args.width, dv=args.dv, device=args.device,
                                dtype=dtype, causal=args.causal).items():
            checked = _time(call, device=args.device, repeats=args.repeats)
            with checks_disabled():
                bare = _time(call, device=args.device, repeats=args.repeats)
            rows.append({"call": name, "n": n, "checked_s": checked, "unchecked_s": bare,
                         "overhead": checked / bare - 1})
            print(f"{name:28s} N={n:6d}  checked {checked * 1e3:8.3f} ms  unchecked {bare * 1e3:8.3f} ms  "
                  f"overhead {100 * (checked / bare - 1):+6.1f}%")
    device_name = torch.cuda.get_device_name() if args.device.startswith("cuda") else platform.processor() or "cpu"
    settings = {k: getattr(args, k) for k in ("device", "heads", "width", "dv", "dtype", "causal", "repeats")}
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"validation_overhead_{args.device.split(':')[0]}.json"
    atomic_write_json(out, {"device": device_name, "torch": torch.__version__, "settings": settings,
                            "rows": rows, "target": "overhead <= 3% at N >= 8192 (GPU)"})
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
