"""Triton kernels for tied HLA, M = 2: ``(q.k)^2 = <sym(q), sym(k)>`` with a symmetric state.

``sym(x)`` holds one entry per pair ``a <= b``: ``x_a x_b``, times ``sqrt(2)`` off the
diagonal (the convention of :func:`hla_analysis.ops.tied.symmetric_power_features`, in
another order). It is never stored: each kernel builds ``BT * R``-column tiles of it on chip.

Packed layout ("folded rectangle"). The ``R (R + 1) / 2`` pairs are laid out as
``R / 2 + 1`` rectangle rows of ``R`` columns. Rectangle row ``t < R/2`` holds the whole
upper row ``t`` (pairs ``(t, c)``, ``c >= t``) followed, in its first ``t`` columns, by the
upper row ``R - t`` (pairs ``(R - t, R - 1 - c)``, ``c < t``). Rectangle row ``R/2`` holds
the upper row ``R/2`` (``c >= R/2``) and zeros. Every pair appears once, and both factors
of a tile are ``where``-selections of four plain loads (``x[t]``, ``x[R - t]``, ``x[c]``,
``x[R - 1 - c]``), so no gather is needed. The rows are padded with zeros to ``TP`` (a
multiple of ``BT``), so the state has ``TP * R`` rows: 2,112 (BT = 1) or 2,176 (BT = 2)
instead of 4,096 at ``R = 64``; ``R (R + 1) / 2 = 2,080`` of them are non-zero.

The normaliser state stays the small ``R x R`` matrix ``z = sum_n w_n k_n k_n^T`` (the
caller's matrix product), entering as ``q^T z q``.
"""

import triton
import triton.language as tl

from hla_analysis.ops.triton.state.kernels import _row_normaliser

SQRT2 = tl.constexpr(1.4142135623730951)  # jit code may read constexpr globals only


@triton.jit
def _sym_parts(x_ptr, rows, row_ok, t0, R: tl.constexpr, BT: tl.constexpr):
    """Factors ``a, b`` ``[ROWS, BT, R]``, weights ``w [BT, R]`` (zero outside the triangle)
    and the branch mask ``lo [BT, R]`` (True: pair ``(t, c)``; False: ``(R - t, R - 1 - c)``),
    so that the ``sym`` tile is ``a * b * w``."""
    HALF: tl.constexpr = R // 2
    offs_t = t0 + tl.arange(0, BT)
    offs_c = tl.arange(0, R)
    tt = offs_t[:, None]
    cc = offs_c[None, :]
    lo = cc >= tt
    keep = (tt < HALF) | (lo & (tt == HALF))
    w = tl.where((cc == tt) | (cc == tt - 1), 1.0, SQRT2)
    w = tl.where(keep, w, 0.0)
    base = x_ptr + rows[:, None] * R
    ok = row_ok[:, None]
    xt = tl.load(base + offs_t[None, :], mask=ok & (offs_t[None, :] <= HALF), other=0.0).to(tl.float32)
    far = (offs_t[None, :] > 0) & (offs_t[None, :] < HALF)
    xrt = tl.load(base + (R - offs_t)[None, :], mask=ok & far, other=0.0).to(tl.float32)
    xc = tl.load(base + offs_c[None, :], mask=ok, other=0.0).to(tl.float32)
    xr = tl.load(base + (R - 1 - offs_c)[None, :], mask=ok, other=0.0).to(tl.float32)
    a = tl.where(lo[None, :, :], xt[:, :, None], xrt[:, :, None])
    b = tl.where(lo[None, :, :], xc[:, None, :], xr[:, None, :])
    return a, b, w, lo


@triton.jit
def _sym_tile(x_ptr, rows, row_ok, t0, R: tl.constexpr, BT: tl.constexpr, BLOCK_ROWS: tl.constexpr):
    """fp32 tile ``sym(x)[rows, t0*R : (t0+BT)*R]``."""
    a, b, w, lo = _sym_parts(x_ptr, rows, row_ok, t0, R, BT)
    return tl.reshape(a * b * w[None, :, :], (BLOCK_ROWS, BT * R))


@triton.jit
def sym_state_kernel(f_ptr, x_ptr, s_ptr, N, tokens_per_split,
                     R: tl.constexpr, DV: tl.constexpr, BLOCK_N: tl.constexpr, BT: tl.constexpr,
                     TP: tl.constexpr, BLOCK_DV: tl.constexpr, MODE: tl.constexpr, CHUNK: tl.constexpr,
                     NUM_CHUNKS, SPLITS, PRECISION: tl.constexpr):
    """``S = sum_n sym(f[n])^T x[n]``. MODE 0: per split of the tokens. MODE 1 / 2: exclusive
    prefix / suffix at every chunk boundary (as in :func:`.state.kernels.state_kernel`)."""
    pid_t = tl.program_id(0)
    pid_d = tl.program_id(1)
    pid_z = tl.program_id(2)
    BLOCK_C: tl.constexpr = BT * R
    P: tl.constexpr = TP * R
    if MODE == 0:
        bh = pid_z // SPLITS
        split = pid_z % SPLITS
    else:
        bh = pid_z
        split = 0
    t0 = pid_t * BT
    f_ptr += bh.to(tl.int64) * N * R
    x_ptr += bh.to(tl.int64) * N * DV
    offs_p = t0 * R + tl.arange(0, BLOCK_C)
    offs_d = pid_d * BLOCK_DV + tl.arange(0, BLOCK_DV)
    offs_n = tl.arange(0, BLOCK_N)
    acc = tl.zeros((BLOCK_C, BLOCK_DV), dtype=tl.float32)
    dt = s_ptr.dtype.element_ty
    if MODE == 0:
        start = split * tokens_per_split
        end = tl.minimum(start + tokens_per_split, N)
        for n0 in range(start, end, BLOCK_N):
            rows = n0 + offs_n
            ok = rows < end
            tile = _sym_tile(f_ptr, rows, ok, t0, R, BT, BLOCK_N)
            xv = tl.load(x_ptr + rows[:, None] * DV + offs_d[None, :], mask=ok[:, None], other=0.0)
            acc = tl.dot(tl.trans(tile.to(xv.dtype)), xv, acc, input_precision=PRECISION)
        out = s_ptr + (split.to(tl.int64) * (tl.num_programs(2) // SPLITS) + bh) * P * DV
        tl.store(out + offs_p[:, None] * DV + offs_d[None, :], acc.to(dt))
    else:
        for i in range(0, NUM_CHUNKS):
            if MODE == 1:
                c = i
            else:
                c = NUM_CHUNKS - 1 - i
            out = s_ptr + (bh.to(tl.int64) * NUM_CHUNKS + c) * P * DV
            tl.store(out + offs_p[:, None] * DV + offs_d[None, :], acc.to(dt))
            for n0 in range(c * CHUNK, c * CHUNK + CHUNK, BLOCK_N):
                rows = n0 + offs_n
                ok = rows < N
                tile = _sym_tile(f_ptr, rows, ok, t0, R, BT, BLOCK_N)
                xv = tl.load(x_ptr + rows[:, None] * DV + offs_d[None, :], mask=ok[:, None], other=0.0)
                acc = tl.dot(tl.trans(tile.to(xv.dtype)), xv, acc, input_precision=PRECISION)


@triton.jit
def sym_apply_kernel(q_ptr, k_ptr, v_ptr, s_ptr, z_ptr, o_ptr, den_ptr, N,
                     R: tl.constexpr, DV: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                     BT: tl.constexpr, TP: tl.constexpr, CAUSAL: tl.constexpr, CHUNK: tl.constexpr,
                     NUM_CHUNKS, PRECISION: tl.constexpr):
    """``o = (sym(q) @ S + intra) / (q^T z q + intra)``; intra: ``(q.k)^2`` tiles inside the chunk."""
    pid_m = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    BLOCK_C: tl.constexpr = BT * R
    P: tl.constexpr = TP * R
    q_ptr += bh * N * R
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < N
    offs_d = tl.arange(0, DV)
    offs_r = tl.arange(0, R)
    if CAUSAL:
        chunk = (pid_m * BLOCK_M) // CHUNK
    else:
        chunk = 0
    s_ptr += (bh * NUM_CHUNKS + chunk) * P * DV
    z_ptr += (bh * NUM_CHUNKS + chunk) * R * R
    dt = s_ptr.dtype.element_ty

    f = tl.load(q_ptr + rows[:, None] * R + offs_r[None, :], mask=row_ok[:, None], other=0.0)
    den = _row_normaliser(f, f, z_ptr, R, R, True, PRECISION)
    acc = tl.zeros((BLOCK_M, DV), dtype=tl.float32)
    offs_p = tl.arange(0, BLOCK_C)
    for t0 in range(0, TP, BT):
        tile = _sym_tile(q_ptr, rows, row_ok, t0, R, BT, BLOCK_M)
        st = tl.load(s_ptr + (t0 * R + offs_p)[:, None] * DV + offs_d[None, :])
        acc = tl.dot(tile.to(dt), st, acc, input_precision=PRECISION)

    if CAUSAL:
        k_ptr += bh * N * R
        v_ptr += bh * N * DV
        offs_n = tl.arange(0, BLOCK_N)
        lo = chunk * CHUNK
        hi = tl.minimum((pid_m + 1) * BLOCK_M, N)
        for n0 in range(lo, hi, BLOCK_N):
            cols = n0 + offs_n
            col_ok = cols < N
            y = tl.load(k_ptr + cols[:, None] * R + offs_r[None, :], mask=col_ok[:, None], other=0.0)
            sim = tl.dot(f, tl.trans(y), input_precision=PRECISION)
            sim = tl.where(cols[None, :] <= rows[:, None], sim * sim, 0.0)
            den += tl.sum(sim, 1)
            vv = tl.load(v_ptr + cols[:, None] * DV + offs_d[None, :], mask=col_ok[:, None], other=0.0)
            acc = tl.dot(sim.to(vv.dtype), vv, acc, input_precision=PRECISION)

    out = acc / tl.where(row_ok, den, 1.0)[:, None]  # rows past N: no 0/0
    o_ptr += bh * N * DV
    tl.store(o_ptr + rows[:, None] * DV + offs_d[None, :], out.to(o_ptr.dtype.element_ty), mask=row_ok[:, None])
    tl.store(den_ptr + bh * N + rows, den, mask=row_ok)


@triton.jit
def sym_grad_kernel(x_ptr, g_ptr, wx_ptr, y_ptr, h_ptr, wy_ptr, s_ptr, z_ptr, dx_ptr, out_ptr, N,
                    R: tl.constexpr, DV: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                    BT: tl.constexpr, TP: tl.constexpr, CAUSAL: tl.constexpr, QUERY_SIDE: tl.constexpr,
                    WANT_OUT: tl.constexpr, CHUNK: tl.constexpr, NUM_CHUNKS, PRECISION: tl.constexpr):
    """Gradient of one side's (tied) factor ``x`` through ``d sym(x) = g @ S^T`` and
    ``d (w x^T z x) = w (z + z^T) x``; roles as in :func:`.state.kernels.grad_kernel`. The key
    side also writes ``out = dv = sym(k) @ dS`` (+ the intra-chunk ``A^T dnum``).

    ``dx_ptr`` must hold zeros: the per-tile parts land on disjoint columns (``x[t]`` for
    ``t <= R/2``, ``x[R - t]`` above), then one pass adds the register-held rest.
    """
    pid_m = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    HALF: tl.constexpr = R // 2
    BLOCK_C: tl.constexpr = BT * R
    P: tl.constexpr = TP * R
    x_ptr += bh * N * R
    dx_ptr += bh * N * R
    g_ptr += bh * N * DV
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < N
    offs_d = tl.arange(0, DV)
    offs_r = tl.arange(0, R)
    if CAUSAL:
        chunk = (pid_m * BLOCK_M) // CHUNK
    else:
        chunk = 0
    s_ptr += (bh * NUM_CHUNKS + chunk) * P * DV
    z_ptr += (bh * NUM_CHUNKS + chunk) * R * R
    dt = s_ptr.dtype.element_ty

    f = tl.load(x_ptr + rows[:, None] * R + offs_r[None, :], mask=row_ok[:, None], other=0.0)
    g = tl.load(g_ptr + rows[:, None] * DV + offs_d[None, :], mask=row_ok[:, None], other=0.0)
    if QUERY_SIDE:
        wx = tl.load(wx_ptr + bh * N + rows, mask=row_ok, other=0.0)
    else:
        wx = tl.where(row_ok, 1.0, 0.0)
    zt = tl.load(z_ptr + offs_r[:, None] + offs_r[None, :] * R)
    zz = tl.load(z_ptr + offs_r[:, None] * R + offs_r[None, :])
    ff = f.to(tl.float32)
    dcol = wx[:, None] * (tl.dot(ff, zt, input_precision=PRECISION) + tl.dot(ff, zz, input_precision=PRECISION))
    out_acc = tl.zeros((BLOCK_M, DV), dtype=tl.float32)

    if CAUSAL:
        y_ptr += bh * N * R
        h_ptr += bh * N * DV
        offs_n = tl.arange(0, BLOCK_N)
        if QUERY_SIDE:
            lo = chunk * CHUNK
            hi = tl.minimum((pid_m + 1) * BLOCK_M, N)
        else:
            lo = pid_m * BLOCK_M
            hi = tl.minimum(chunk * CHUNK + CHUNK, N)
        for n0 in range(lo, hi, BLOCK_N):
            cols = n0 + offs_n
            col_ok = cols < N
            y = tl.load(y_ptr + cols[:, None] * R + offs_r[None, :], mask=col_ok[:, None], other=0.0)
            s1 = tl.dot(f, tl.trans(y), input_precision=PRECISION)
            hh = tl.load(h_ptr + cols[:, None] * DV + offs_d[None, :], mask=col_ok[:, None], other=0.0)
            da = tl.dot(g, tl.trans(hh), input_precision=PRECISION)
            if QUERY_SIDE:
                da += wx[:, None]
                keep = cols[None, :] <= rows[:, None]
            else:
                wy = tl.load(wy_ptr + bh * N + cols, mask=col_ok, other=0.0)
                da += wy[None, :]
                keep = (cols[None, :] >= rows[:, None]) & row_ok[:, None]
            da = tl.where(keep, da, 0.0)
            # d (x.y)^2 / dx = 2 (x.y) y
            dcol += tl.dot((2.0 * da * s1).to(y.dtype), y, input_precision=PRECISION)
            if WANT_OUT:
                a = tl.where(keep, s1 * s1, 0.0)
                out_acc = tl.dot(a.to(hh.dtype), hh, out_acc, input_precision=PRECISION)

    drev = tl.zeros((BLOCK_M, R), dtype=tl.float32)  # column c stands for x[R - 1 - c]
    offs_p = tl.arange(0, BLOCK_C)
    offs_bt = tl.arange(0, BT)
    for t0 in range(0, TP, BT):
        st = tl.load(s_ptr + (t0 * R + offs_p)[:, None] * DV + offs_d[None, :])
        p = tl.dot(g.to(dt), tl.trans(st), input_precision=PRECISION)  # d sym tile, [BLOCK_M, BLOCK_C]
        a, b, w, upper = _sym_parts(x_ptr, rows, row_ok, t0, R, BT)
        if WANT_OUT:
            tile = tl.reshape(a * b * w[None, :, :], (BLOCK_M, BLOCK_C))
            out_acc = tl.dot(tile.to(dt), st, out_acc, input_precision=PRECISION)
        pw = tl.reshape(p, (BLOCK_M, BT, R)) * w[None, :, :]
        pa = pw * b
        pb = pw * a
        up3 = upper[None, :, :]
        d_t = tl.sum(tl.where(up3, pa, 0.0), 2)  # -> x[t]
        d_rt = tl.sum(tl.where(up3, 0.0, pa), 2)  # -> x[R - t]
        dcol += tl.sum(tl.where(up3, pb, 0.0), 1)
        drev += tl.sum(tl.where(up3, 0.0, pb), 1)
        tt = t0 + offs_bt
        ok = row_ok[:, None]
        tl.store(dx_ptr + rows[:, None] * R + tt[None, :], d_t, mask=ok & (tt[None, :] <= HALF))
        far = (tt[None, :] > 0) & (tt[None, :] < HALF)
        tl.store(dx_ptr + rows[:, None] * R + (R - tt)[None, :], d_rt, mask=ok & far)
    tl.debug_barrier()
    ptr = dx_ptr + rows[:, None] * R + offs_r[None, :]
    prev = tl.load(ptr, mask=row_ok[:, None], other=0.0)
    tl.store(ptr, prev + dcol + tl.flip(drev, 1), mask=row_ok[:, None])
    if WANT_OUT:
        out_ptr += bh * N * DV
        tl.store(out_ptr + rows[:, None] * DV + offs_d[None, :], out_acc, mask=row_ok[:, None])
