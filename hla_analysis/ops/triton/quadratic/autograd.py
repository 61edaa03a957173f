"""Launchers and autograd around :mod:`.kernels` (quadratic fused HLA, any M).

:func:`hla_quadratic_triton` packs the factors (``[NF, BH, N, RP]``, zero-padded), runs the
forward kernel, validates the stored row normalisers with the shared check (one host
sync) and divides nothing on the host: the kernel already returns ``O = num / l``.
"""

from __future__ import annotations

import os

import torch

from hla_analysis._checks import check_normalizers, check_output
from hla_analysis.ops.triton.dtypes import _precision, narrowed, work_dtype
from hla_analysis.ops.triton.quadratic import kernels


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def _pow2(x: int) -> int:
    return 1 << max(0, (int(x) - 1).bit_length())


def split_width(r: int) -> tuple[int, int]:
    """Columns per dot as ``(main, tail)``: 65 -> (64, 16), 129 -> (128, 16), 48 -> (64, 0).

    >>> split_width(65), split_width(16), split_width(100), split_width(3)
    ((64, 16), (16, 0), (128, 0), (16, 0))
    """
    if r <= 16:
        return 16, 0
    main = 1 << (r.bit_length() - 1)
    rest = r - main
    if rest == 0:
        return main, 0
    tail = max(16, _pow2(rest))
    return (_pow2(r), 0) if main + tail >= _pow2(r) else (main, tail)


def _config(dtype, backward: bool) -> dict:
    if _interpreting():
        return dict(BLOCK_M=16, BLOCK_N=16, num_warps=4, num_stages=1)
    if dtype == torch.float32:
        return dict(BLOCK_M=64, BLOCK_N=32, num_warps=4, num_stages=2)
    if backward:
        return dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=2)
    return dict(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=3)


def _pack(factors, lead, n, main, tail, work):
    """``[NF, BH, N, main + tail]`` contiguous, zero-padded columns (no copy when already so)."""
    rp = main + tail
    flat = [f.to(work).expand(*lead, n, f.shape[-1]).reshape(-1, n, f.shape[-1]) for f in factors]
    if len(flat) == 1 and flat[0].shape[-1] == rp:
        return flat[0].contiguous().unsqueeze(0)
    out = flat[0].new_zeros(len(flat), flat[0].shape[0], n, rp)
    for i, f in enumerate(flat):
        out[i, :, :, : f.shape[-1]] = f
    return out


class QuadraticHLAFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, pow_, causal, allow_signed, main, tail):
        nf, bh, n, _ = q.shape
        dv = v.shape[-1]
        cfg = _config(v.dtype, backward=False)
        o = torch.empty_like(v)
        norm = torch.empty(bh, n, device=v.device, dtype=torch.float32)
        grid = (triton_cdiv(n, cfg["BLOCK_M"]), bh)
        kernels.quadratic_fwd_kernel[grid](
            q, k, v, o, norm, n, bh * n * (main + tail), NF=nf, POW=pow_, RMAIN=main, RTAIL=tail, DV=dv,
            CAUSAL=causal, BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], PRECISION=_precision(v.dtype),
            num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
        check_normalizers(norm, allow_signed=allow_signed)
        check_output(o, norm[..., None], allow_signed=allow_signed)  # overflow from finite inputs
        ctx.save_for_backward(q, k, v, o, norm)
        ctx.meta = (pow_, causal, main, tail)
        return o

    @staticmethod
    def backward(ctx, grad_o):
        q, k, v, o, norm = ctx.saved_tensors
        pow_, causal, main, tail = ctx.meta
        nf, bh, n, rp = q.shape
        dv_width = v.shape[-1]
        grad_o = grad_o.contiguous().to(v.dtype)
        delta = (grad_o.float() * o.float()).sum(-1).contiguous()
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        cfg = _config(v.dtype, backward=True)
        common = dict(NF=nf, POW=pow_, RMAIN=main, RTAIL=tail, DV=dv_width, CAUSAL=causal,
                      BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], PRECISION=_precision(v.dtype),
                      num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
        stride = bh * n * rp
        kernels.quadratic_dkdv_kernel[(triton_cdiv(n, cfg["BLOCK_N"]), nf, bh)](
            q, k, v, grad_o, norm, delta, dk, dv, n, stride, **common)
        kernels.quadratic_dq_kernel[(triton_cdiv(n, cfg["BLOCK_M"]), nf, bh)](
            q, k, v, grad_o, norm, delta, dq, n, stride, **common)
        return dq, dk, dv, None, None, None, None, None


def triton_cdiv(a: int, b: int) -> int:
    return -(-a // b)


def hla_quadratic_triton(qs, ks, v, *, causal=False, key_padding_mask=None, allow_signed=False, tied=None):
    """HLA output through the quadratic fused kernel (differentiable), any M in 1..8.

    Parameters
    ----------
    qs, ks : sequences of M tensors ``[..., N, r_m]`` (widths may differ; padded to the widest).
    v : Tensor ``[..., N, dv]``.
    causal, key_padding_mask, allow_signed : as in :func:`hla_analysis.ops.hla`.
    tied : bool, optional
        Treat the factors as tied (one ``Q K^T`` tile to the M-th power). ``None`` detects it
        by identity (``qs[m] is qs[0]`` and ``ks[m] is ks[0]``), which is how variants pass
        tied factors.

    Returns
    -------
    Tensor ``[..., N, dv]`` in ``v.dtype`` (fp16 runs in bf16; accumulation in fp32).

    Examples
    --------
    >>> import os, torch
    >>> if os.environ.get("TRITON_INTERPRET") == "1":
    ...     g = torch.Generator().manual_seed(0)
    ...     q, k = torch.rand(1, 20, 5, generator=g), torch.rand(1, 20, 5, generator=g)
    ...     v = torch.randn(1, 20, 16, generator=g)
    ...     out = hla_quadratic_triton([q] * 3, [k] * 3, v, causal=True)
    ...     from hla_analysis.ops import hla_attention_output
    ...     print(torch.allclose(out, hla_attention_output([q] * 3, [k] * 3, v, causal=True), atol=1e-5))
    ... else:
    ...     print(True)
    True
    """
    qs, ks = list(qs), list(ks)
    m = len(qs)
    if not 1 <= m <= 8 or len(ks) != m:
        raise ValueError(f"the quadratic kernel takes 1 to 8 factor pairs, got {len(qs)} and {len(ks)}.")
    n = v.shape[-2]
    if any(q.shape[-2] != n for q in qs) or any(k.shape[-2] != n for k in ks):
        raise ValueError("the quadratic kernel needs as many queries as keys (one token axis).")
    if tied is None:
        tied = all(q is qs[0] for q in qs) and all(k is ks[0] for k in ks)
    if tied:
        qs, ks = qs[:1], ks[:1]
    if key_padding_mask is not None:
        ks = [ks[0] * key_padding_mask[..., None].to(ks[0].dtype), *ks[1:]]
    out_dtype = v.dtype
    work = work_dtype(v.dtype)
    tensors = [*qs, *ks, v]
    lead = torch.broadcast_shapes(*(t.shape[:-2] for t in tensors))
    main, tail = split_width(max(q.shape[-1] for q in qs))
    q = _pack(qs, lead, n, main, tail, work)
    k = _pack(ks, lead, n, main, tail, work)
    dv = v.shape[-1]
    dvp = max(16, _pow2(dv))
    vf = v.to(work).expand(*lead, n, dv).reshape(-1, n, dv)
    if dvp != dv:
        vf = torch.nn.functional.pad(vf, (0, dvp - dv))
    out = QuadraticHLAFunction.apply(q, k, vf.contiguous(), m if tied else 1, bool(causal), bool(allow_signed),
                                     main, tail)
    return narrowed(out[..., :dv].reshape(*lead, n, dv), out_dtype)
