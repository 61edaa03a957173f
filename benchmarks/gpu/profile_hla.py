"""One forward+backward of the Triton HLA at the headline shape, for a hardware profiler.

    ncu --clock-control none -k regex:'apply_kernel|state_cols_kernel|grad_kernel' -c 4 \\
        --section SpeedOfLight --section Occupancy python benchmarks/gpu/profile_hla.py

B = 1, H = 12, N = 32,760, r = 64, dv = 128, bf16, non-causal, default configuration (or
``--config`` JSON overrides).
"""

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))

from hla_analysis.ops.triton import hla_triton  # noqa: E402

ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
ap.add_argument("--n", type=int, default=32760)
ap.add_argument("--causal", action="store_true")
ap.add_argument("--config", default="{}")
args = ap.parse_args()
g = torch.Generator(device="cuda").manual_seed(0)
qs = [(torch.rand(1, 12, args.n, 64, device="cuda", generator=g) * 0.5 + 0.05).bfloat16().requires_grad_()
      for _ in range(2)]
ks = [(torch.rand(1, 12, args.n, 64, device="cuda", generator=g) * 0.5 + 0.05).bfloat16().requires_grad_()
      for _ in range(2)]
v = torch.randn(1, 12, args.n, 128, device="cuda", generator=g).bfloat16().requires_grad_()
out = hla_triton(qs, ks, v, causal=args.causal, config=json.loads(args.config))
torch.autograd.grad(out, [*qs, *ks, v], torch.ones_like(out))
torch.cuda.synchronize()
print("ok", out.shape)
