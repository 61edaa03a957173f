"""State path or quadratic path: the choice :func:`hla_analysis.ops.hla` makes, and its record.

Costs mirror :func:`hla_analysis.symbolic.cost_model.hla_cost` (state form, FLOPs per head)
and count the quadratic form as ``pairs * (2 sum_f RP_f + 2 dv)`` (the dots per tile that
the kernel of :mod:`hla_analysis.ops.triton.quadratic.kernels` runs; ``pairs = N^2``, or
``N (N + 1) / 2`` causal). Each cost is divided by the throughput of the engine that would
run it: the fused Triton kernels (bf16 tensor cores) at 1, the torch state forms (fp32
einsums) at ``TORCH_STATE_RATE``.

``form="quadratic"`` forces the quadratic path on any device: the Triton kernel on CUDA or
under ``TRITON_INTERPRET=1`` (fp16/bf16/fp32), else (and for float64)
:func:`~hla_analysis.ops.triton.quadratic.naive.quadratic_torch`, a blockwise torch twin (exact tiles
over key blocks; O(N) forward memory, autograd keeps its tiles; it imports without Triton).

:data:`last_dispatch` holds the last :class:`Dispatch` (per process, not per thread).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch

from hla_analysis._checks import check_hla_signs, check_normalizers, check_output
from hla_analysis.ops.triton.quadratic.naive import quadratic_torch  # torch only: imports without Triton

# Throughput of the torch state forms relative to the fused kernels on one GPU: fp32 SIMT
# einsums against bf16 tensor cores (H200 datasheet: 67 vs 990 TFLOP/s dense).
TORCH_STATE_RATE = 1 / 15
# fwd+bwd over fwd of the state path (the quadratic path: 1 + 3 NF untied, NF = factor tiles per
# tile; tied, measured: 5.5-5.8 at N >= 32,760, 4.2 at 8,192, benchmarks/gpu/results/session9/public_h200.json)
STATE_WITH_BACKWARD = 4.0
QUADRATIC_TIED_WITH_BACKWARD = 5.7
# The symmetric state path (tied M >= 3 as C(r+M-1, M) features on the M = 1 kernels) is priced
# from its measured time, not its FLOPs: building the features in torch and running one M = 1
# launch per 128 of them cost 70-180x the FLOPs' price. Fitted on session 9's H200 rows (M = 3, 4
# at r = 8, dv = 128, N = 8,192-75,600, forward), in FLOP-equivalents per head at the quadratic
# kernel's measured rate (534 TFLOP/s): a fixed cost per feature plus a cost per token and feature.
SYMMETRIC_PER_FEATURE = 3.3e8
SYMMETRIC_PER_TOKEN_FEATURE = 3.4e4
SYMMETRIC_WITH_BACKWARD = 9.0  # measured 6.0-10.3, 8.2-10.3 at N >= 32,760


@dataclass(frozen=True)
class Dispatch:
    """Which path :func:`hla_analysis.ops.hla` took: ``path`` is "state" or "quadratic",
    ``engine`` "triton" or "torch"; the costs are estimated seconds-equivalents (FLOPs over
    relative throughput), ``None`` where not compared."""

    path: str
    engine: str
    reason: str
    state_cost: float | None = None
    quadratic_cost: float | None = None


last_dispatch: Dispatch | None = None


def _record(d: Dispatch) -> Dispatch:
    global last_dispatch
    last_dispatch = d
    return d


def _tied(qs, ks) -> bool:
    return all(q is qs[0] for q in qs) and all(k is ks[0] for k in ks)


def state_flops(widths, dv: int, n: int, *, tied: bool) -> float:
    """FLOPs of the state form per head (``cost_model.hla_cost`` evaluated)."""
    if tied:
        p = math.comb(widths[0] + len(widths) - 1, len(widths))
        return n * (2 * p + 4 * p * (dv + 1) + dv)
    p = math.prod(widths)
    build = sum(math.prod(widths[: m + 1]) for m in range(1, len(widths)))
    contract = 2 * (dv + 1) * sum(p / math.prod(widths[:m]) for m in range(len(widths)))
    return n * (build + 2 * p * (dv + 1) + contract + dv)


def quadratic_flops(widths, dv: int, n: int, *, tied: bool, causal: bool) -> float:
    """FLOPs of the quadratic kernel per head, counting padded dot widths."""
    from hla_analysis.ops.triton.quadratic.autograd import split_width

    main, tail = split_width(max(widths))
    nf = 1 if tied else len(widths)
    pairs = n * (n + 1) / 2 if causal else n * n
    return pairs * (2 * nf * (main + tail) + 2 * max(16, dv) + nf * len(widths))


def prices(widths, dv: int, n: int, *, tied: bool, causal: bool, state_engine: str, backward: bool):
    """``(state, quadratic)`` costs per head, in FLOP-equivalents at the fused kernels' rate.

    ``state_engine``: "fused" (the state kernels), "symmetric" (tied M >= 3 as symmetric power
    features on the M = 1 kernels, priced from measurements) or "torch" (the einsum state forms).
    ``backward``: a backward follows (H200: fwd+bwd over fwd is 3.1-3.8x on the state kernels,
    about 9x on the symmetric path, 5.7x tied and 7-22x untied on the quadratic kernel, whose
    backward recomputes every factor tile).
    """
    if state_engine == "symmetric":
        features = math.comb(widths[0] + len(widths) - 1, len(widths))
        state = features * (SYMMETRIC_PER_FEATURE + SYMMETRIC_PER_TOKEN_FEATURE * n)
    else:
        state = state_flops(widths, dv, n, tied=tied) / (TORCH_STATE_RATE if state_engine == "torch" else 1.0)
    quad = quadratic_flops(widths, dv, n, tied=tied, causal=causal)
    if backward:
        state *= SYMMETRIC_WITH_BACKWARD if state_engine == "symmetric" else STATE_WITH_BACKWARD
        quad *= QUADRATIC_TIED_WITH_BACKWARD if tied else 1 + 3 * len(widths)
    return state, quad


def _kernel_runs(tensors) -> bool:
    import importlib.util

    if importlib.util.find_spec("triton") is None:
        return False
    if any(t.dtype not in (torch.float16, torch.bfloat16, torch.float32) for t in tensors):
        return False  # float64 takes the torch twin: the kernel accumulates in fp32
    return all(t.is_cuda for t in tensors) or os.environ.get("TRITON_INTERPRET") == "1"


def choose(qs, ks, v, *, causal: bool, form: str, backend: str) -> Dispatch:
    """Pick (and record) the path for validated inputs; see the module docstring."""
    tensors = [*qs, *ks, v]
    same_n = qs[0].shape[-2] == ks[0].shape[-2]
    if form == "quadratic":
        if not same_n:
            raise ValueError("form='quadratic' needs as many queries as keys.")
        engine = "triton" if backend != "torch" and _kernel_runs(tensors) else "torch"
        return _record(Dispatch("quadratic", engine, "forced by form='quadratic'"))
    if form != "auto" or backend == "torch" or not v.is_cuda or not same_n or len(qs) > 8:
        return _record(Dispatch("state", "torch" if backend == "torch" else backend, "form or device"))
    tied = _tied(qs, ks)
    widths = [q.shape[-1] for q in qs]
    n, dv = v.shape[-2], v.shape[-1]
    from hla_analysis.ops import triton_backend

    if triton_backend.usable(qs, ks, v, causal=causal, key_padding_mask=None, explicit=False):
        state_engine, pricing = "triton", "fused"
    elif triton_backend.usable_symmetric(qs, ks, v, causal=causal, key_padding_mask=None, explicit=False):
        state_engine, pricing = "triton", "symmetric"
    else:
        state_engine, pricing = "torch", "torch"
    backward = torch.is_grad_enabled() and any(t.requires_grad for t in tensors)
    state, quad = prices(widths, dv, n, tied=tied, causal=causal, state_engine=pricing, backward=backward)
    if quad < state:
        return _record(Dispatch("quadratic", "triton", "cost model", state, quad))
    return _record(Dispatch("state", state_engine, "cost model", state, quad))


def run(d: Dispatch, qs, ks, v, *, causal: bool, key_padding_mask, allow_signed: bool):
    """Run the quadratic path chosen by :func:`choose`, with the checks of the state path:
    normalisers, the sign certificate of the factors (odd pairs of sign-indefinite features
    can give negative weights under a positive normaliser) and an output that overflows."""
    if d.engine == "triton":
        from hla_analysis.ops.triton.quadratic.autograd import hla_quadratic_triton

        out = hla_quadratic_triton(qs, ks, v, causal=causal, key_padding_mask=key_padding_mask,
                                   allow_signed=allow_signed)
        check_hla_signs(qs, ks, allow_signed=allow_signed)  # normalisers and output: in the Function
        return out
    num, den = quadratic_torch(qs, ks, v, causal=causal, key_padding_mask=key_padding_mask)
    check_normalizers(den, allow_signed=allow_signed)
    check_hla_signs(qs, ks, allow_signed=allow_signed)
    out = (num / den).to(v.dtype)
    check_output(out, den, allow_signed=allow_signed)
    return out
