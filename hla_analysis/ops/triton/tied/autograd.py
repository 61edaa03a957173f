"""Launchers and the autograd.Function for tied HLA, M = 2 (kernels in :mod:`.kernels`).

Tensors are flat and contiguous: ``q, k [BH, N, r]``, ``v [BH, N, dv]``. States:
``S [BH, C, TP * r, dv]`` (the packed symmetric rows, see :mod:`.kernels`) in the compute
dtype, ``z [BH, C, r, r]`` in fp32. Block sizes come from the untied configuration: a tile
of ``BLOCK_C`` columns holds ``BT = BLOCK_C // r`` folded rows; the three kernels may use
different ``BT`` but share one state, padded to ``TP`` rows (``cfg["TIED_TP"]``, set by
:func:`tied_config`).
"""

from __future__ import annotations

import math

import torch

from hla_analysis._checks import check_normalizers
from hla_analysis.ops.triton.config import KernelConfig, _causal_state_plan, _chunks, _split_plan
from hla_analysis.ops.triton.dtypes import _precision
from hla_analysis.ops.triton.state.autograd import _normaliser_state
from hla_analysis.ops.triton.tied import kernels


def folded_rows(r: int, *block_cs: int) -> tuple[int, int]:
    """``(BT, TP)``: folded rows per tile of the first ``block_c``, and in all (``r/2 + 1``
    rounded up to the largest ``BT`` among ``block_cs``; all are powers of two).

    >>> folded_rows(64, 128), folded_rows(64, 64), folded_rows(64, 64, 128), folded_rows(16, 16)
    ((2, 34), (1, 33), (1, 34), (1, 9))
    """
    bts = [max(1, c // r) for c in block_cs]
    return bts[0], math.ceil((r // 2 + 1) / max(bts)) * max(bts)


def symmetric_state_rows(r: int, block_c: int) -> int:
    """Rows of the tied state as stored (``r (r + 1) / 2`` of them non-zero).

    >>> symmetric_state_rows(64, 128), 64 * 65 // 2, 64 * 64
    (2176, 2080, 4096)
    """
    return folded_rows(r, block_c)[1] * r


def tied_config(cfg: KernelConfig, r: int) -> KernelConfig:
    """The untied block sizes plus ``TIED_TP``, the folded rows that all three kernels use."""
    if r >= 128:  # 128-column key-side gradient tiles at 128 rows overflowed shared memory on an H200
        cfg = cfg.replace(GRAD_BLOCK_M=min(cfg["GRAD_BLOCK_M"], 64))
    return cfg.replace(TIED_TP=folded_rows(r, cfg["STATE_BLOCK_C"], cfg["APPLY_BLOCK_C"], cfg["GRAD_BLOCK_C"])[1])


def _bt(r: int, block_c: int) -> int:
    return max(1, block_c // r)


def compute_sym_states(f, x, w, *, mode: str, cfg: dict):
    """``S = sum_n sym(f[n]) (x) x[n]`` and ``z = sum_n w_n f[n] f[n]^T``, per chunk when causal.

    mode: "total", "prefix" or "suffix" (exclusive, per chunk), as in
    :func:`.state.autograd.compute_states`.
    """
    bh, n, r = f.shape
    dv = x.shape[-1]
    bt, tp = _bt(r, cfg["STATE_BLOCK_C"]), cfg["TIED_TP"]
    p = tp * r
    causal = mode != "total"
    nc = _chunks(n, causal, cfg)
    block_dv = min(cfg["STATE_BLOCK_DV"], dv)
    grid_t, grid_d = tp // bt, dv // block_dv
    common = dict(R=r, DV=dv, BLOCK_N=cfg["STATE_BLOCK_N"], BT=bt, TP=tp, CHUNK=cfg["CHUNK"],
                  PRECISION=_precision(f.dtype), num_warps=cfg["STATE_WARPS"], num_stages=cfg["STAGES"])
    if mode == "total":
        splits, tps = _split_plan(n, grid_t * grid_d * bh, cfg, f.device)
        buf = torch.empty((splits, bh, p, dv), device=f.device, dtype=f.dtype if splits == 1 else torch.float32)
        kernels.sym_state_kernel[(grid_t, grid_d, bh * splits)](
            f, x, buf, n, tps, BLOCK_DV=block_dv, MODE=0, NUM_CHUNKS=1, SPLITS=splits, **common)
        s = buf.sum(0).to(f.dtype) if splits > 1 else buf[0]
        return s.view(bh, 1, p, dv), _normaliser_state(f, f, w, nc=1, mode=mode, chunk=cfg["CHUNK"])
    block_dv, grid_d, parallel = _causal_state_plan(cfg, grid_t * bh, block_dv, dv, f.device)
    if parallel:
        buf = torch.empty((nc, bh, p, dv), device=f.device, dtype=torch.float32)
        kernels.sym_state_kernel[(grid_t, grid_d, bh * nc)](
            f, x, buf, n, cfg["CHUNK"], BLOCK_DV=block_dv, MODE=0, NUM_CHUNKS=1, SPLITS=nc, **common)
        inclusive = buf.cumsum(0)
        s = inclusive - buf if mode == "prefix" else inclusive[-1:] - inclusive
        s = s.transpose(0, 1).to(f.dtype).contiguous()
    else:
        s = torch.empty((bh, nc, p, dv), device=f.device, dtype=f.dtype)
        kernels.sym_state_kernel[(grid_t, grid_d, bh)](
            f, x, s, n, n, BLOCK_DV=block_dv, MODE=1 if mode == "prefix" else 2, NUM_CHUNKS=nc, SPLITS=1,
            **common)
    return s, _normaliser_state(f, f, w, nc=nc, mode=mode, chunk=cfg["CHUNK"])


def apply_sym_states(q, k, v, s, z, *, causal: bool, cfg: dict):
    bh, n, r = q.shape
    dv = v.shape[-1]
    o = torch.empty_like(v)
    den = torch.empty((bh, n), device=v.device, dtype=torch.float32)
    bm = cfg["APPLY_BLOCK_M"]
    bt, tp = _bt(r, cfg["APPLY_BLOCK_C"]), cfg["TIED_TP"]
    kernels.sym_apply_kernel[(math.ceil(n / bm), bh)](
        q, k, v, s, z, o, den, n, R=r, DV=dv, BLOCK_M=bm, BLOCK_N=cfg["BLOCK_N"], BT=bt, TP=tp,
        CAUSAL=causal, CHUNK=cfg["CHUNK"], NUM_CHUNKS=s.shape[1], PRECISION=_precision(v.dtype),
        num_warps=cfg["APPLY_WARPS"], num_stages=cfg["STAGES"])
    return o, den


def sym_factor_grads(x, g, wx, y, h, wy, s, z, *, causal: bool, query_side: bool, cfg: dict):
    """fp32 gradient of one side's tied factor (and, for the key side, of the values)."""
    bh, n, r = x.shape
    dv = g.shape[-1]
    dx = torch.zeros((bh, n, r), device=x.device, dtype=torch.float32)
    out = torch.empty((bh, n, dv), device=x.device, dtype=torch.float32) if not query_side else dx
    bm = cfg["GRAD_BLOCK_M"]
    bt, tp = _bt(r, cfg["GRAD_BLOCK_C"]), cfg["TIED_TP"]
    dummy = g
    kernels.sym_grad_kernel[(math.ceil(n / bm), bh)](
        x, g, dummy if wx is None else wx, y, h, dummy if wy is None else wy, s, z, dx, out, n,
        R=r, DV=dv, BLOCK_M=bm, BLOCK_N=cfg["BLOCK_N"], BT=bt, TP=tp, CAUSAL=causal,
        QUERY_SIDE=query_side, WANT_OUT=not query_side, CHUNK=cfg["CHUNK"], NUM_CHUNKS=s.shape[1],
        PRECISION=_precision(g.dtype), num_warps=cfg["GRAD_WARPS"], num_stages=cfg["STAGES"])
    return dx, (out if not query_side else None)


class TiedHLAFunction(torch.autograd.Function):
    """Flat tied HLA, ``a_ij ∝ (q_i . k_j)^2``, with Triton forward and backward."""

    @staticmethod
    def forward(ctx, q, k, v, causal, allow_signed, cfg):
        s, z = compute_sym_states(k, v, None, mode="prefix" if causal else "total", cfg=cfg)
        o, den = apply_sym_states(q, k, v, s, z, causal=causal, cfg=cfg)
        check_normalizers(den, allow_signed=allow_signed)
        ctx.save_for_backward(q, k, v, o, den, s, z)
        ctx.causal, ctx.cfg = causal, cfg
        return o

    @staticmethod
    def backward(ctx, grad):
        q, k, v, o, den, s, z = ctx.saved_tensors
        causal, cfg = ctx.causal, ctx.cfg
        grad = grad.contiguous()
        dnum = (grad.float() / den[..., None]).to(v.dtype)
        dden = (-(grad.float() * o.float()).sum(-1) / den).contiguous()
        ds, dz = compute_sym_states(q, dnum, dden, mode="suffix" if causal else "total", cfg=cfg)
        dq, _ = sym_factor_grads(q, dnum, dden, k, v, None, s, z, causal=causal, query_side=True, cfg=cfg)
        dk, dv = sym_factor_grads(k, v, None, q, dnum, dden, ds, dz, causal=causal, query_side=False, cfg=cfg)
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None, None
