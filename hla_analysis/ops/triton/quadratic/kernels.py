"""Quadratic fused HLA kernels, any number of factors: FlashAttention-style tiles, no state.

``o_i = sum_j w_ij v_j / sum_j w_ij`` with the weight built on chip, tile by tile:

* ``w = prod_f (q_f . k_f)^POW`` over ``NF`` factor tensors. Untied factors run with
  ``NF = M, POW = 1``; tied ones (all query factors equal, all key factors equal) with
  ``NF = 1, POW = M``: one ``Q K^T`` tile raised to the M-th power pointwise.
* No running maximum: the weights are polynomials, not exponentials, so the row
  normaliser ``l_i = sum_j w_ij`` is a plain running sum (stored per row for the backward).
* O(N) memory: only ``O`` and ``l`` are written; the N x N map never leaves the chip.

Layout (flat, contiguous): factors ``[NF, BH, N, RP]`` zero-padded to ``RP = RMAIN + RTAIL``
columns (``RMAIN`` a power of two, ``RTAIL`` 0 or a power of two >= 16), so a width such
as 65 (affine features of a 64-wide head) costs 64 + 16 columns per dot, not 128. Values
``[BH, N, DV]``, ``DV`` a power of two >= 16. Out-of-range rows and keys load as zero
features, hence zero weight: only the causal diagonal needs an explicit mask.

Backward (FlashAttention-2 style): with ``P = w / l`` and ``D_i = rowsum(dO_i * O_i)``,
``dw_ij = (dO_i . v_j - D_i) / l_i``; the product rule gives
``ds_f = dw * POW s_f^(POW-1) prod_{g != f} s_g^POW``. One kernel per key block writes dK
(and dV), one per query block writes dQ; each program owns one factor ``f`` (grid axis 1).
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _rows(ptr, rows, col0, W: tl.constexpr, RP: tl.constexpr, N):
    cols = col0 + tl.arange(0, W)
    return tl.load(ptr + rows[:, None] * RP + cols[None, :], mask=(rows < N)[:, None], other=0.0)


@triton.jit
def _dot_t(a, b, acc, PRECISION: tl.constexpr):
    """``acc + a @ b^T``."""
    return tl.dot(a, tl.trans(b), acc, input_precision=PRECISION)


@triton.jit
def _power(s, POW: tl.constexpr):
    out = s
    for _ in tl.static_range(POW - 1):
        out = out * s
    return out


@triton.jit
def _similarity(qa, qb, k_ptr, keys, N, RMAIN: tl.constexpr, RTAIL: tl.constexpr, BLOCK_M: tl.constexpr,
                BLOCK_N: tl.constexpr, PRECISION: tl.constexpr):
    """``Q K^T`` tile of one factor from preloaded query tiles (main and tail columns)."""
    RP: tl.constexpr = RMAIN + RTAIL
    s = _dot_t(qa, _rows(k_ptr, keys, 0, RMAIN, RP, N), tl.zeros([BLOCK_M, BLOCK_N], tl.float32), PRECISION)
    if RTAIL > 0:
        s = _dot_t(qb, _rows(k_ptr, keys, RMAIN, RTAIL, RP, N), s, PRECISION)
    return s


@triton.jit
def _weight_tile(q_ptr, k_ptr, qa0, qb0, rows, keys, N, factor_stride, NF: tl.constexpr, POW: tl.constexpr,
                 RMAIN: tl.constexpr, RTAIL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                 PRECISION: tl.constexpr):
    """``prod_f (q_f k_f^T)^POW`` on chip; query tiles of factor 0 are passed in (hoisted)."""
    RP: tl.constexpr = RMAIN + RTAIL
    w = _power(_similarity(qa0, qb0, k_ptr, keys, N, RMAIN, RTAIL, BLOCK_M, BLOCK_N, PRECISION), POW)
    for f in tl.static_range(1, NF):
        qa = _rows(q_ptr + f * factor_stride, rows, 0, RMAIN, RP, N)
        qb = qa
        if RTAIL > 0:
            qb = _rows(q_ptr + f * factor_stride, rows, RMAIN, RTAIL, RP, N)
        s = _similarity(qa, qb, k_ptr + f * factor_stride, keys, N, RMAIN, RTAIL, BLOCK_M, BLOCK_N, PRECISION)
        w = w * _power(s, POW)
    return w


@triton.jit
def quadratic_fwd_kernel(q_ptr, k_ptr, v_ptr, o_ptr, l_ptr, N, factor_stride,
                         NF: tl.constexpr, POW: tl.constexpr, RMAIN: tl.constexpr, RTAIL: tl.constexpr,
                         DV: tl.constexpr, CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                         PRECISION: tl.constexpr):
    RP: tl.constexpr = RMAIN + RTAIL
    pid_m = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    q_ptr += bh * N * RP
    k_ptr += bh * N * RP
    v_ptr += bh * N * DV
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    dcols = tl.arange(0, DV)
    qa0 = _rows(q_ptr, rows, 0, RMAIN, RP, N)
    qb0 = qa0
    if RTAIL > 0:
        qb0 = _rows(q_ptr, rows, RMAIN, RTAIL, RP, N)
    acc = tl.zeros([BLOCK_M, DV], tl.float32)
    norm = tl.zeros([BLOCK_M], tl.float32)
    # keys strictly below the diagonal block need no mask (out-of-range keys weigh zero)
    full_end = pid_m * BLOCK_M if CAUSAL else N
    for start in range(0, full_end, BLOCK_N):
        keys = start + tl.arange(0, BLOCK_N)
        w = _weight_tile(q_ptr, k_ptr, qa0, qb0, rows, keys, N, factor_stride, NF, POW, RMAIN, RTAIL,
                         BLOCK_M, BLOCK_N, PRECISION)
        norm += tl.sum(w, 1)
        vv = tl.load(v_ptr + keys[:, None] * DV + dcols[None, :], mask=(keys < N)[:, None], other=0.0)
        acc = tl.dot(w.to(vv.dtype), vv, acc, input_precision=PRECISION)
    if CAUSAL:
        for start in range(full_end, tl.minimum(full_end + BLOCK_M, N), BLOCK_N):
            keys = start + tl.arange(0, BLOCK_N)
            w = _weight_tile(q_ptr, k_ptr, qa0, qb0, rows, keys, N, factor_stride, NF, POW, RMAIN, RTAIL,
                             BLOCK_M, BLOCK_N, PRECISION)
            w = tl.where(keys[None, :] <= rows[:, None], w, 0.0)
            norm += tl.sum(w, 1)
            vv = tl.load(v_ptr + keys[:, None] * DV + dcols[None, :], mask=(keys < N)[:, None], other=0.0)
            acc = tl.dot(w.to(vv.dtype), vv, acc, input_precision=PRECISION)
    out = acc / norm[:, None]
    ok = rows < N
    tl.store(o_ptr + bh * N * DV + rows[:, None] * DV + dcols[None, :], out.to(o_ptr.dtype.element_ty),
             mask=ok[:, None])
    tl.store(l_ptr + bh * N + rows, norm, mask=ok)


@triton.jit
def _grad_parts(q_ptr, k_ptr, rows, keys, N, factor_stride, me, NF: tl.constexpr, POW: tl.constexpr,
                RMAIN: tl.constexpr, RTAIL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                PRECISION: tl.constexpr):
    """Weight tile ``w`` and ``dw/ds_me = POW s_me^(POW-1) prod_{g != me} s_g^POW``."""
    RP: tl.constexpr = RMAIN + RTAIL
    w = tl.full([BLOCK_M, BLOCK_N], 1.0, tl.float32)
    others = tl.full([BLOCK_M, BLOCK_N], 1.0, tl.float32)
    own = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for f in tl.static_range(NF):
        qa = _rows(q_ptr + f * factor_stride, rows, 0, RMAIN, RP, N)
        qb = qa
        if RTAIL > 0:
            qb = _rows(q_ptr + f * factor_stride, rows, RMAIN, RTAIL, RP, N)
        s = _similarity(qa, qb, k_ptr + f * factor_stride, keys, N, RMAIN, RTAIL, BLOCK_M, BLOCK_N, PRECISION)
        term = _power(s, POW)
        w = w * term
        others = others * tl.where(me == f, 1.0, term)
        own = tl.where(me == f, s, own)
    local = others * POW
    if POW > 1:
        local = local * _power(own, POW - 1)
    return w, local


@triton.jit
def quadratic_dkdv_kernel(q_ptr, k_ptr, v_ptr, do_ptr, l_ptr, delta_ptr, dk_ptr, dv_ptr, N, factor_stride,
                          NF: tl.constexpr, POW: tl.constexpr, RMAIN: tl.constexpr, RTAIL: tl.constexpr,
                          DV: tl.constexpr, CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                          PRECISION: tl.constexpr):
    RP: tl.constexpr = RMAIN + RTAIL
    pid_n = tl.program_id(0)
    me = tl.program_id(1)
    bh = tl.program_id(2).to(tl.int64)
    q_ptr += bh * N * RP
    k_ptr += bh * N * RP
    v_ptr += bh * N * DV
    do_ptr += bh * N * DV
    l_ptr += bh * N
    delta_ptr += bh * N
    keys = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    dcols = tl.arange(0, DV)
    vv = tl.load(v_ptr + keys[:, None] * DV + dcols[None, :], mask=(keys < N)[:, None], other=0.0)
    dk_a = tl.zeros([BLOCK_N, RMAIN], tl.float32)
    dk_b = tl.zeros([BLOCK_N, RTAIL if RTAIL > 0 else 16], tl.float32)
    dv = tl.zeros([BLOCK_N, DV], tl.float32)
    start_m = (pid_n * BLOCK_N // BLOCK_M) * BLOCK_M if CAUSAL else 0
    for start in range(start_m, N, BLOCK_M):
        rows = start + tl.arange(0, BLOCK_M)
        w, local = _grad_parts(q_ptr, k_ptr, rows, keys, N, factor_stride, me, NF, POW, RMAIN, RTAIL,
                               BLOCK_M, BLOCK_N, PRECISION)
        if CAUSAL:
            w = tl.where(keys[None, :] <= rows[:, None], w, 0.0)
            local = tl.where(keys[None, :] <= rows[:, None], local, 0.0)
        ok = rows < N
        norm = tl.load(l_ptr + rows, mask=ok, other=1.0)
        delta = tl.load(delta_ptr + rows, mask=ok, other=0.0)
        dout = tl.load(do_ptr + rows[:, None] * DV + dcols[None, :], mask=ok[:, None], other=0.0)
        if me == 0:
            p = w / norm[:, None]
            dv = tl.dot(tl.trans(p.to(dout.dtype)), dout, dv, input_precision=PRECISION)
        dp = _dot_t(dout, vv, tl.zeros([BLOCK_M, BLOCK_N], tl.float32), PRECISION)
        ds = ((dp - delta[:, None]) / norm[:, None]) * local
        ds = ds.to(dout.dtype)
        qf = q_ptr + me * factor_stride
        dk_a = tl.dot(tl.trans(ds), _rows(qf, rows, 0, RMAIN, RP, N), dk_a, input_precision=PRECISION)
        if RTAIL > 0:
            dk_b = tl.dot(tl.trans(ds), _rows(qf, rows, RMAIN, RTAIL, RP, N), dk_b, input_precision=PRECISION)
    kok = (keys < N)[:, None]
    dk_base = dk_ptr + me * factor_stride + bh * N * RP + keys[:, None] * RP
    tl.store(dk_base + tl.arange(0, RMAIN)[None, :], dk_a.to(dk_ptr.dtype.element_ty), mask=kok)
    if RTAIL > 0:
        tl.store(dk_base + RMAIN + tl.arange(0, RTAIL)[None, :], dk_b.to(dk_ptr.dtype.element_ty), mask=kok)
    if me == 0:
        tl.store(dv_ptr + bh * N * DV + keys[:, None] * DV + dcols[None, :], dv.to(dv_ptr.dtype.element_ty),
                 mask=kok)


@triton.jit
def quadratic_dq_kernel(q_ptr, k_ptr, v_ptr, do_ptr, l_ptr, delta_ptr, dq_ptr, N, factor_stride,
                        NF: tl.constexpr, POW: tl.constexpr, RMAIN: tl.constexpr, RTAIL: tl.constexpr,
                        DV: tl.constexpr, CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                        PRECISION: tl.constexpr):
    RP: tl.constexpr = RMAIN + RTAIL
    pid_m = tl.program_id(0)
    me = tl.program_id(1)
    bh = tl.program_id(2).to(tl.int64)
    q_ptr += bh * N * RP
    k_ptr += bh * N * RP
    v_ptr += bh * N * DV
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    dcols = tl.arange(0, DV)
    ok = rows < N
    norm = tl.load(l_ptr + bh * N + rows, mask=ok, other=1.0)
    delta = tl.load(delta_ptr + bh * N + rows, mask=ok, other=0.0)
    dout = tl.load(do_ptr + bh * N * DV + rows[:, None] * DV + dcols[None, :], mask=ok[:, None], other=0.0)
    dq_a = tl.zeros([BLOCK_M, RMAIN], tl.float32)
    dq_b = tl.zeros([BLOCK_M, RTAIL if RTAIL > 0 else 16], tl.float32)
    end = tl.minimum((pid_m + 1) * BLOCK_M, N) if CAUSAL else N
    kf = k_ptr + me * factor_stride
    for start in range(0, end, BLOCK_N):
        keys = start + tl.arange(0, BLOCK_N)
        _, local = _grad_parts(q_ptr, k_ptr, rows, keys, N, factor_stride, me, NF, POW, RMAIN, RTAIL,
                               BLOCK_M, BLOCK_N, PRECISION)
        if CAUSAL:
            local = tl.where(keys[None, :] <= rows[:, None], local, 0.0)
        vv = tl.load(v_ptr + keys[:, None] * DV + dcols[None, :], mask=(keys < N)[:, None], other=0.0)
        dp = _dot_t(dout, vv, tl.zeros([BLOCK_M, BLOCK_N], tl.float32), PRECISION)
        ds = (((dp - delta[:, None]) / norm[:, None]) * local).to(dout.dtype)
        dq_a = tl.dot(ds, _rows(kf, keys, 0, RMAIN, RP, N), dq_a, input_precision=PRECISION)
        if RTAIL > 0:
            dq_b = tl.dot(ds, _rows(kf, keys, RMAIN, RTAIL, RP, N), dq_b, input_precision=PRECISION)
    dq_base = dq_ptr + me * factor_stride + bh * N * RP + rows[:, None] * RP
    tl.store(dq_base + tl.arange(0, RMAIN)[None, :], dq_a.to(dq_ptr.dtype.element_ty), mask=ok[:, None])
    if RTAIL > 0:
        tl.store(dq_base + RMAIN + tl.arange(0, RTAIL)[None, :], dq_b.to(dq_ptr.dtype.element_ty),
                 mask=ok[:, None])
