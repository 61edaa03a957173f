"""Launchers and the autograd.Function around the state kernels in :mod:`.kernels` (M = 1, 2).

Tensors here are flat and contiguous: factors ``[BH, N, r]``, values ``[BH, N, dv]``.
States: ``S [BH, C, R1*R2, dv]`` (C = 1 non-causal, else one per chunk) in the compute
dtype, ``z [BH, C, R1, R2]`` in fp32.
"""

from __future__ import annotations

import math
import os

import torch

from hla_analysis._checks import _active_or_none, diagnose_rows, require_flags
from hla_analysis.ops.triton.config import _causal_state_plan, _chunks, _split_plan
from hla_analysis.ops.triton.dtypes import _precision
from hla_analysis.ops.triton.state import kernels


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def _block_a(block_c: int, r1: int, r2: int) -> int:
    # tiles hold whole a-rows of the (a, b) Khatri-Rao index: BLOCK_C = BLOCK_A * R2
    return max(1, min(r1, block_c // r2))


def per_a(cfg: dict, f2) -> bool:
    """Whether the column-at-a-time kernels run (M = 2 only; see :mod:`.kernels`)."""
    return bool(cfg.get("PER_A")) and f2 is not None


def transpose(src, dst=None):
    """``src [Z, A, B]`` transposed to ``[Z, B, A]`` (contiguous), or added into ``dst``.

    A tiled kernel: both the reads and the writes are coalesced, unlike a strided copy.
    """
    z, a, b = src.shape
    add = dst is not None
    if dst is None:
        dst = torch.empty((z, b, a), device=src.device, dtype=src.dtype)
    block = 16 if _interpreting() else 64
    kernels.transpose_kernel[(math.ceil(a / block), math.ceil(b / block), z)](
        src, dst, a, b, ADD=add, BLOCK_A=block, BLOCK_B=block)
    return dst


def transposed(f1, f2, cfg: dict):
    """``f1`` as ``[BH, R1, N]`` for the column-at-a-time kernels, else ``None``."""
    return transpose(f1) if per_a(cfg, f2) else None


def widened(q1, q2, k1, k2, *, causal: bool, dv: int):
    """M = 2 factors with a 32-wide factor zero-padded to 64 where the kernels fail at 32.

    On an H200 (Triton 3.6, bf16) the non-causal M = 2 kernels with a 32-wide second factor
    and ``dv >= 64`` gave wrong rows at N = 8,192 and 32,760: NaN/Inf from the column kernels,
    up to 45% row error from the tile kernels (session 11, ``benchmarks/gpu/results/session11/
    r32_check*.log``); the interpreter and the causal kernels were right. Zero columns add
    nothing to any similarity, so padding both sides of a factor to 64 is exact, at the cost
    of the 64-wide kernels. Both factors are widened (the first only matters when it is 32 and
    the second is not, which was right, but one rule keeps one code path).
    """
    if q2 is None or causal or dv < 64 or 32 not in (q1.shape[-1], q2.shape[-1]):
        return q1, q2, k1, k2

    def pad(t):
        return torch.nn.functional.pad(t, (0, 32)) if t.shape[-1] == 32 else t

    return pad(q1), pad(q2), pad(k1), pad(k2)


def compute_states(f1, f2, x, w, *, mode: str, cfg: dict, f1t=None, initial=None):
    """``S`` and ``z`` of factors ``(f1, f2)`` against rows ``x`` (weights ``w`` for ``z``).

    mode: "total" (one state), "prefix" (exclusive, per chunk), "suffix" (exclusive, per chunk).
    ``f1t``: ``f1`` transposed (:func:`transposed`), needed when :func:`per_a`.
    ``initial``: ``(S0 [BH, R, dv], z0 [BH, R1, R2])``, fp32, added to every prefix/suffix state
    (the state carried in from outside the sequence; the scan kernel starts from it).
    """
    if initial is not None and mode == "total":
        raise ValueError("an initial state applies to the prefix/suffix modes only")
    bh, n, r1 = f1.shape
    r2 = 1 if f2 is None else f2.shape[-1]
    dv = x.shape[-1]
    r = r1 * r2
    causal = mode != "total"
    nc = _chunks(n, causal, cfg)
    cols = per_a(cfg, f2) and cfg.get("STATE_KERNEL", "cols") == "cols"
    block_a = min(cfg["STATE_BA"], r1) if cols else _block_a(cfg["STATE_BLOCK_C"], r1, r2)
    block_dv = min(cfg["STATE_BLOCK_DV"], dv)
    if cols and block_a not in (1, 2, 4):
        raise ValueError(f"STATE_BA must be 1, 2 or 4, got {block_a}")

    def state(grid, f1, f2, x, s, n, tps, *, BLOCK_A, HAS_F2, **kw):
        """One launch of the state kernel chosen above, both behind one signature."""
        if cols:
            kernels.state_cols_kernel[grid](f1t, f2, x, s, n, tps, BA=BLOCK_A, TRANS=int(cfg["STATE_TRANS"]), **kw)
        else:
            kernels.state_kernel[grid](f1, f2, x, s, n, tps, BLOCK_A=BLOCK_A, HAS_F2=HAS_F2, **kw)

    grid_a, grid_d = r1 // block_a, dv // block_dv
    f2_arg = f1 if f2 is None else f2
    if mode == "total":
        splits, tps = _split_plan(n, grid_a * grid_d * bh, cfg, f1.device)
        buf = torch.empty((splits, bh, r, dv), device=f1.device, dtype=f1.dtype if splits == 1 else torch.float32)
        state((grid_a, grid_d, bh * splits),
            f1, f2_arg, x, buf, n, tps, R1=r1, R2=r2, DV=dv, BLOCK_N=cfg["STATE_BLOCK_N"], BLOCK_A=block_a,
            BLOCK_DV=block_dv, HAS_F2=f2 is not None, MODE=0, CHUNK=cfg["CHUNK"], NUM_CHUNKS=1, SPLITS=splits,
            PRECISION=_precision(f1.dtype), num_warps=cfg["STATE_WARPS"], num_stages=cfg["STAGES"])
        s = buf.sum(0).to(f1.dtype) if splits > 1 else buf[0]
        s = s.view(bh, 1, r, dv)
    else:
        block_dv, grid_d, parallel = _causal_state_plan(cfg, grid_a * bh, block_dv, dv, f1.device)
        if parallel:
            # too few programs for one sequential sweep (small states): sum each chunk in
            # parallel, then scan the chunk sums (cheap because the state is small)
            buf = torch.empty((nc, bh, r, dv), device=f1.device, dtype=torch.float32)
            state((grid_a, grid_d, bh * nc),
                f1, f2_arg, x, buf, n, cfg["CHUNK"], R1=r1, R2=r2, DV=dv, BLOCK_N=cfg["STATE_BLOCK_N"],
                BLOCK_A=block_a, BLOCK_DV=block_dv, HAS_F2=f2 is not None, MODE=0, CHUNK=cfg["CHUNK"],
                NUM_CHUNKS=1, SPLITS=nc, PRECISION=_precision(f1.dtype), num_warps=cfg["STATE_WARPS"],
                num_stages=cfg["STAGES"])
            inclusive = buf.cumsum(0)
            s = inclusive - buf if mode == "prefix" else inclusive[-1:] - inclusive
            if initial is not None:
                s = s + initial[0][None]
            s = s.transpose(0, 1).to(f1.dtype).contiguous()
            return s, _with_initial_z(_normaliser_state(f1, f2, w, nc=nc, mode=mode, chunk=cfg["CHUNK"]), initial)
        s = torch.empty((bh, nc, r, dv), device=f1.device, dtype=f1.dtype)
        state((grid_a, grid_d, bh),
            f1, f2_arg, x, s, n, n, R1=r1, R2=r2, DV=dv, BLOCK_N=cfg["STATE_BLOCK_N"], BLOCK_A=block_a,
            BLOCK_DV=block_dv, HAS_F2=f2 is not None, MODE=1 if mode == "prefix" else 2, CHUNK=cfg["CHUNK"],
            NUM_CHUNKS=nc, SPLITS=1, PRECISION=_precision(f1.dtype), num_warps=cfg["STATE_WARPS"],
            num_stages=cfg["STAGES"], s0_ptr=None if initial is None else initial[0], HAS_INIT=initial is not None)
    return s, _with_initial_z(_normaliser_state(f1, f2, w, nc=nc, mode=mode, chunk=cfg["CHUNK"]), initial)


def _with_initial_z(z, initial):
    return z if initial is None else z + initial[1][:, None]


def _normaliser_state(f1, f2, w, *, nc: int, mode: str, chunk: int):
    """z = sum_n w_n f1[n] (x) f2[n] per chunk (then prefix/suffix-summed), fp32 ``[BH, C, R1, R2]``.

    A matrix product in the compute dtype with fp32 accumulation: 1/dv of the kernels' work.
    """
    bh, n, r1 = f1.shape
    fw = f1 if w is None else f1 * w[..., None].to(f1.dtype)
    if f2 is None:
        f2 = torch.ones((bh, n, 1), device=f1.device, dtype=f1.dtype)
    r2 = f2.shape[-1]
    if mode == "total":
        z = torch.bmm(fw.transpose(1, 2), f2).float().view(bh, 1, r1, r2)
        return z.contiguous()
    pad = nc * chunk - n
    fw = torch.nn.functional.pad(fw, (0, 0, 0, pad)).view(bh * nc, chunk, r1)
    f2 = torch.nn.functional.pad(f2, (0, 0, 0, pad)).view(bh * nc, chunk, r2)
    z = torch.bmm(fw.transpose(1, 2), f2).float().view(bh, nc, r1, r2)
    inclusive = z.cumsum(1)
    if mode == "prefix":
        return (inclusive - z).contiguous()
    return (inclusive[:, -1:] - inclusive).contiguous()


def apply_states(q1, q2, k1, k2, v, s, z, *, causal: bool, cfg: dict, q1t=None, normalize: bool = True, chk=None,
                 signed: bool = False, qsigns: bool = False, acc=None):
    """``(o, den)``: ``o = num / den`` in ``v.dtype``, or with ``normalize=False`` ``num`` in fp32.

    ``acc``: ``(num, den)`` fp32 of other parts of the same output, added before the division
    (``den`` returned is then the total).

    ``chk`` (fp32, ``BH * N`` long, optional) gets one pass/fail flag per row (1.0 / 0.0: the
    normaliser, the output and, with ``qsigns``, the query features' signs; ``signed`` is
    ``allow_signed``; see :func:`.kernels.apply_kernel`)."""
    bh, n, r1 = q1.shape
    r2 = 1 if q2 is None else q2.shape[-1]
    dv = v.shape[-1]
    o = torch.empty_like(v) if normalize else torch.empty(v.shape, device=v.device, dtype=torch.float32)
    den = torch.empty((bh, n), device=v.device, dtype=torch.float32)
    bm = cfg["APPLY_BLOCK_M"]
    kernels.apply_kernel[(math.ceil(n / bm), bh)](
        q1, q1 if q2 is None else q2, k1, k1 if k2 is None else k2, v, s, z, o, den, q1 if q1t is None else q1t,
        den if chk is None else chk, n,
        R1=r1, R2=r2, DV=dv, BLOCK_M=bm, BLOCK_N=cfg["BLOCK_N"], BLOCK_A=_block_a(cfg["APPLY_BLOCK_C"], r1, r2),
        HAS_F2=q2 is not None, CAUSAL=causal, CHUNK=cfg["CHUNK"], NUM_CHUNKS=s.shape[1],
        PRECISION=_precision(v.dtype), PER_A=per_a(cfg, q2) and not causal, NORMALIZE=normalize, CHECK=chk is not None,
        SIGNED=signed, QSIGNS=qsigns, acc_ptr=None if acc is None else acc[0],
        accden_ptr=None if acc is None else acc[1], HAS_ACC=acc is not None,
        num_warps=cfg["APPLY_WARPS"], num_stages=cfg["STAGES"])
    return o, den


def factor_grads(x1, x2, g, wx, y1, y2, h, wy, s, z, *, causal: bool, query_side: bool, cfg: dict, x1t=None):
    """fp32 gradients of one side's factors (and, for the key side, of the values)."""
    bh, n, r1 = x1.shape
    r2 = 1 if x2 is None else x2.shape[-1]
    dv = g.shape[-1]
    dx1 = torch.empty((bh, n, r1), device=x1.device, dtype=torch.float32)
    dx2 = torch.empty((bh, n, r2), device=x1.device, dtype=torch.float32) if x2 is not None else dx1
    out = torch.empty((bh, n, dv), device=x1.device, dtype=torch.float32) if not query_side else dx1
    bm = cfg["GRAD_BLOCK_M"]
    dummy = g
    cols = per_a(cfg, x2)
    dx1t = torch.empty((bh, r1, n), device=x1.device, dtype=torch.float32) if cols else dx1
    kernels.grad_kernel[(math.ceil(n / bm), bh)](
        x1, x1 if x2 is None else x2, g, dummy if wx is None else wx, y1, y1 if y2 is None else y2, h,
        dummy if wy is None else wy, s, z, dx1, dx2, out, x1 if x1t is None else x1t, dx1t, n,
        R1=r1, R2=r2, DV=dv, BLOCK_M=bm, BLOCK_N=cfg["BLOCK_N"], BLOCK_A=_block_a(cfg["GRAD_BLOCK_C"], r1, r2),
        HAS_F2=x2 is not None, CAUSAL=causal, QUERY_SIDE=query_side, WANT_OUT=not query_side,
        CHUNK=cfg["CHUNK"], NUM_CHUNKS=s.shape[1], PRECISION=_precision(g.dtype), PER_A=cols,
        num_warps=cfg["GRAD_WARPS"], num_stages=cfg["STAGES"])
    if cols:
        transpose(dx1t, dx1)
    return dx1, (dx2 if x2 is not None else None), (out if not query_side else None)


def part_states(q1, q2, k1, k2, v, *, causal: bool, cfg: dict):
    """``(s, z, q1t, k1t)``: the keys' state against ``v`` (prefix per chunk when causal) and the
    transposed factors the column kernels read (``None`` where they do not run)."""
    k1t = transposed(k1, k2, cfg)
    s, z = compute_states(k1, k2, v, None, mode="prefix" if causal else "total", cfg=cfg, f1t=k1t)
    q1t = transposed(q1, q2, cfg)  # launched while the state kernel runs
    return s, z, q1t, k1t


def output_grads(grad, o, den, dtype):
    """``(dnum, dden)`` of ``o = num / den``: ``d num = g / den`` (in ``dtype``), ``d den = -(g . o) / den``."""
    grad = grad.contiguous()
    dnum = (grad.float() / den[..., None]).to(dtype)
    dden = (-(grad.float() * o.float()).sum(-1) / den).contiguous()
    return dnum, dden


def cast_like(t, like):
    return None if t is None else t.to(like.dtype)


def part_grads(q1, q2, k1, k2, v, s, z, q1t, k1t, dnum, dden, *, causal: bool, cfg: dict):
    """``(dq1, dq2, dk1, dk2, dv)`` of one state part, given the output's ``(dnum, dden)``: the
    factor gradients in their own dtypes, ``dv`` in fp32 (the caller sums parts, then casts)."""
    ds, dz = compute_states(q1, q2, dnum, dden, mode="suffix" if causal else "total", cfg=cfg, f1t=q1t)
    dq1, dq2, _ = factor_grads(q1, q2, dnum, dden, k1, k2, v, None, s, z,
                               causal=causal, query_side=True, cfg=cfg, x1t=q1t)
    dk1, dk2, dv = factor_grads(k1, k2, v, None, q1, q2, dnum, dden, ds, dz,
                                causal=causal, query_side=False, cfg=cfg, x1t=k1t)
    return cast_like(dq1, q1), cast_like(dq2, q1), cast_like(dk1, k1), cast_like(dk2, k1), dv


SIGN_BLOCK = 4096  # elements per program of kernels.sign_kernel


def _key_sign_flags(k1, k2, flags_tail):
    """One :func:`kernels.sign_kernel` launch over both key factors into ``flags_tail``."""
    y = k1 if k2 is None else k2
    kernels.sign_kernel[(flags_tail.numel(),)](k1, y, k1.numel(), y.numel(), flags_tail, BLOCK=SIGN_BLOCK)


def forward_states(q1, q2, k1, k2, v, *, causal, allow_signed, signs, cfg):
    """The forward of :class:`HLAFunction`: ``(o, saved)``, ``saved`` what the backward needs.

    With value checks on (no :func:`~hla_analysis._checks.checks_disabled`), the apply kernel
    writes one pass/fail flag per row (normaliser, output and, with ``signs``, the query
    features' signs) and, with ``signs``, one :func:`kernels.sign_kernel` launch flags the key
    features into the tail of the same vector: one ``amin`` read with the call's one sync.
    The detailed diagnosis (which check, how many rows) runs only when a flag is 0.
    """
    s, z, q1t, k1t = part_states(q1, q2, k1, k2, v, causal=causal, cfg=cfg)
    _, skip = _active_or_none()
    signs = signs and not allow_signed
    rows = v.shape[0] * v.shape[1]
    flags = chk = None
    if not skip:
        tail = math.ceil(max(k1.numel(), 0 if k2 is None else k2.numel()) / SIGN_BLOCK) if signs else 0
        flags = torch.empty(rows + tail, device=v.device, dtype=torch.float32)
        chk = flags[:rows]
        if tail:
            _key_sign_flags(k1, k2, flags[rows:])
    o, den = apply_states(q1, q2, k1, k2, v, s, z, causal=causal, cfg=cfg, q1t=q1t, chk=chk,
                          signed=allow_signed, qsigns=signs)
    if flags is not None:
        qs = [q1] if q2 is None else [q1, q2]
        ks = [k1] if k2 is None else [k1, k2]
        require_flags(flags, lambda: diagnose_rows(den.view(v.shape[:2]), o, qs, ks,
                                                   allow_signed=allow_signed, signs=signs))
    return o, (q1, q2, k1, k2, v, o, den, s, z, q1t, k1t)


class HLAFunction(torch.autograd.Function):
    """Flat HLA (M = 1 when ``q2 is None``) with Triton forward and backward."""

    @staticmethod
    def forward(ctx, q1, q2, k1, k2, v, causal, allow_signed, cfg, signs=False):
        o, saved = forward_states(q1, q2, k1, k2, v, causal=causal, allow_signed=allow_signed, signs=signs,
                                  cfg=cfg)
        ctx.save_for_backward(*saved)
        ctx.causal, ctx.cfg = causal, cfg
        return o

    @staticmethod
    def backward(ctx, grad):
        q1, q2, k1, k2, v, o, den, s, z, q1t, k1t = ctx.saved_tensors
        causal, cfg = ctx.causal, ctx.cfg
        dnum, dden = output_grads(grad, o, den, v.dtype)
        dq1, dq2, dk1, dk2, dv = part_grads(q1, q2, k1, k2, v, s, z, q1t, k1t, dnum, dden, causal=causal, cfg=cfg)
        return dq1, dq2, dk1, dk2, cast_like(dv, v), None, None, None, None
