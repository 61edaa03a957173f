"""Compile the default state and apply kernels for sm_90 without a GPU and count the
operations of their TTGIR (shared-memory staging, MMAs and MMA waits).

    python benchmarks/gpu/dump_ttgir.py --out-dir /tmp/ttgir

Needs only Triton (its bundled ptxas); the kernels are not run. Shapes: r = 64, dv = 128,
bf16, the non-causal defaults of ``default_config``. With Triton 3.7.1 on a machine without a
GPU the loads were not software-pipelined (less shared memory than the device build reports),
so read the MMA and wait structure from it, not the load schedule.
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import sys

os.environ.pop("TRITON_INTERPRET", None)  # compile for real, not for the interpreter
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402

from hla_analysis.ops.triton.state import kernels  # noqa: E402

OPS = ("ttg.local_alloc", "ttg.local_load", "ttg.convert_layout", "ttng.fence_async_shared",
       "ttng.warp_group_dot ", "ttng.warp_group_dot_wait", "ttg.async_copy_global_to_local", "tt.load")


def compile_one(fn, signature, constexprs, warps, stages):
    src = triton.compiler.ASTSource(fn=fn, signature=signature, constexprs=constexprs)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=warps, num_stages=stages))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out-dir", required=True)
    args = ap.parse_args()
    os.makedirs(args.out_dir, exist_ok=True)
    state_sig = dict(f1t_ptr="*bf16", f2_ptr="*bf16", x_ptr="*bf16", s_ptr="*fp32", N="i32", tokens_per_split="i32",
                     R1="constexpr", R2="constexpr", DV="constexpr", BLOCK_N="constexpr", BA="constexpr",
                     BLOCK_DV="constexpr", TRANS="constexpr", MODE="constexpr", CHUNK="constexpr",
                     NUM_CHUNKS="i32", SPLITS="i32", PRECISION="constexpr")
    apply_sig = dict(q1_ptr="*bf16", q2_ptr="*bf16", k1_ptr="*bf16", k2_ptr="*bf16", v_ptr="*bf16", s_ptr="*bf16",
                     z_ptr="*fp32", o_ptr="*bf16", den_ptr="*fp32", q1t_ptr="*bf16", N="i32", R1="constexpr",
                     R2="constexpr", DV="constexpr", BLOCK_M="constexpr", BLOCK_N="constexpr", BLOCK_A="constexpr",
                     HAS_F2="constexpr", CAUSAL="constexpr", CHUNK="constexpr", NUM_CHUNKS="i32",
                     PRECISION="constexpr", PER_A="constexpr")
    jobs = {
        "state_cols": (kernels.state_cols_kernel, state_sig,
                       dict(R1=64, R2=64, DV=128, BLOCK_N=128, BA=4, BLOCK_DV=128, TRANS=1, MODE=0, CHUNK=1024,
                            PRECISION="tf32"), 8),
        "apply_cols": (kernels.apply_kernel, apply_sig,
                       dict(R1=64, R2=64, DV=128, BLOCK_M=128, BLOCK_N=64, BLOCK_A=2, HAS_F2=True, CAUSAL=False,
                            CHUNK=1024, PRECISION="tf32", PER_A=True), 4),
    }
    for name, (fn, sig, consts, warps) in jobs.items():
        ck = compile_one(fn, sig, consts, warps, 3)
        text = ck.asm["ttgir"]
        with open(os.path.join(args.out_dir, name + ".ttgir"), "w") as fh:
            fh.write(text)
        counts = collections.Counter(m for op in OPS for m in re.findall(re.escape(op), text))
        print(name, f"shared={ck.metadata.shared}", dict(counts))


if __name__ == "__main__":
    main()
