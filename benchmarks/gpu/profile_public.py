"""Host-side profile of the public calls on a GPU: where the time before the kernels goes.

cProfile over 30 back-to-back ``hla()`` calls (M = 2, r = 64, N = 8192, H = 12, dv = 128,
bf16, no_grad) with checks on and off, and the torch profiler's op counts for one call of
each. Prints text (the device run saves it beside the benchmark JSON).

    python benchmarks/gpu/profile_public.py
"""

from __future__ import annotations

import cProfile
import io
import os
import pstats
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))

from hla_analysis._checks import checks_disabled
from hla_analysis.ops import hla, linear_attention
from hla_analysis.variants import make_variant


def main():
    n, h = 8192, 12
    pos = lambda w: (torch.rand(1, h, n, w, device="cuda") * 0.5 + 0.05).to(torch.bfloat16)
    q1, q2, k1, k2 = (pos(64) for _ in range(4))
    v = torch.randn(1, h, n, 128, device="cuda", dtype=torch.bfloat16)
    affine = make_variant("hla:m=2,phi=affine").bind(64).to("cuda")
    affine4 = make_variant("hla:m=4,phi=affine").bind(64).to("cuda")  # the quadratic kernel
    xv = v[..., :64].contiguous()
    calls = {"hla M=2": lambda: hla([q1, q2], [k1, k2], v),
             "linear_attention": lambda: linear_attention(q1, k1, v),
             "affine .forward": lambda: affine.forward(q1, k1, xv),
             "affine M=4 .forward": lambda: affine4.forward(q1, k1, xv)}
    with torch.no_grad():
        for name, call in calls.items():
            for label, ctx in (("checks on", None), ("checks off", checks_disabled)):
                if ctx:
                    cm = ctx()
                    cm.__enter__()
                for _ in range(3):
                    call()
                torch.cuda.synchronize()
                prof = cProfile.Profile()
                prof.enable()
                for _ in range(30):
                    call()
                torch.cuda.synchronize()
                prof.disable()
                s = io.StringIO()
                pstats.Stats(prof, stream=s).sort_stats("tottime").print_stats(18)
                pstats.Stats(prof, stream=s).sort_stats("cumulative").print_stats(40)
                print(f"===== {name}, {label}: cProfile, 30 calls, by tottime, then by cumulative time")
                print("\n".join(line for line in s.getvalue().splitlines() if line.strip()))
                from torch.profiler import ProfilerActivity, profile

                with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as p:
                    call()
                    torch.cuda.synchronize()
                print(f"===== {name}, {label}: torch profiler, one call")
                print(p.key_averages().table(sort_by="self_cpu_time_total", row_limit=25))
                if ctx:
                    cm.__exit__(None, None, None)


if __name__ == "__main__":
    main()
