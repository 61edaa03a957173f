"""Triton kernels for HLA with M = 1 or 2 factors (layout ``[BH, N, r]``, contiguous).

Notation: factors ``f1 [N, R1]``, ``f2 [N, R2]``; their row-wise Khatri-Rao product
``kr[n, a * R2 + b] = f1[n, a] * f2[n, b]`` (width ``R = R1 * R2``) only ever exists as an
on-chip tile of ``BLOCK_A * R2`` columns, i.e. whole ``a``-rows, so that gradients with
respect to ``f1`` can be written tile by tile. With M = 1, ``R2 = 1`` and ``f2`` is unused.

Three kernels cover forward and backward, causal and not:

* ``state_kernel``: ``S = sum_n kr[n]^T x[n]`` over token ranges. Non-causal: one sum per
  split of the tokens (partials reduced by the caller). Causal: the exclusive prefix (or
  suffix, for the backward) sum at every chunk boundary.
* ``apply_kernel``: ``o = (qkr @ S + intra) / (qkr . z + intra)`` and the normaliser.
* ``grad_kernel``: gradients of one side's factors (and, for the key side, of the values)
  from the state of the other side, plus the quadratic intra-chunk part when causal.

The normaliser state ``z`` (``R1 x R2`` per chunk) is a small matrix product done by the
caller; in-kernel it enters through ``f1 . (f2 @ z^T)`` once per program, not per tile.

Two ways to feed the tensor cores with Khatri-Rao tiles (M = 2):

* tiles (``PER_A = False``): a ``[rows, BLOCK_A * R2]`` tile built as a 3-D broadcast product
  and reshaped, so one MMA has ``K = BLOCK_A * R2``;
* columns (``PER_A = True``, :func:`state_cols_kernel` for the state): one ``a`` at a time,
  ``kr[:, a, :] = f1[:, a] * f2``, a row-scaled copy of the ``f2`` tile with the same layout
  (no reshape), ``K = R2``. The column ``f1[:, a]`` is read from a transposed copy
  ``f1t [R1, N]`` so that it is one contiguous load. On an H200 this was faster (see
  ``benchmarks/gpu/README.md``).
"""

import triton
import triton.language as tl


@triton.jit
def _kr_tile(f1_ptr, f2_ptr, rows, row_ok, a0, R1: tl.constexpr, R2: tl.constexpr,
             BLOCK_A: tl.constexpr, BLOCK_ROWS: tl.constexpr, HAS_F2: tl.constexpr):
    """fp32 tile ``kr[rows, a0*R2 : (a0+BLOCK_A)*R2]``, built from two small loads."""
    offs_a = a0 + tl.arange(0, BLOCK_A)
    x1 = tl.load(f1_ptr + rows[:, None] * R1 + offs_a[None, :], mask=row_ok[:, None], other=0.0).to(tl.float32)
    if HAS_F2:
        offs_b = tl.arange(0, R2)
        x2 = tl.load(f2_ptr + rows[:, None] * R2 + offs_b[None, :], mask=row_ok[:, None], other=0.0).to(tl.float32)
        tile = tl.reshape(x1[:, :, None] * x2[:, None, :], (BLOCK_ROWS, BLOCK_A * R2))
    else:
        tile = x1
    return tile


@triton.jit
def _state_mma(acc, kr, xv, PRECISION: tl.constexpr):
    return tl.dot(tl.trans(kr.to(xv.dtype)), xv, acc, input_precision=PRECISION)


@triton.jit
def state_kernel(f1_ptr, f2_ptr, x_ptr, s_ptr, N, tokens_per_split,
                 R1: tl.constexpr, R2: tl.constexpr, DV: tl.constexpr, BLOCK_N: tl.constexpr,
                 BLOCK_A: tl.constexpr, BLOCK_DV: tl.constexpr, HAS_F2: tl.constexpr,
                 MODE: tl.constexpr, CHUNK: tl.constexpr, NUM_CHUNKS, SPLITS, PRECISION: tl.constexpr,
                 s0_ptr=None, HAS_INIT: tl.constexpr = False):
    """MODE 0: s[split, bh] = sum over the split's tokens. MODE 1: exclusive prefix per chunk,
    s[bh, c] = sum over tokens before chunk c. MODE 2: exclusive suffix, tokens after chunk c.

    ``HAS_INIT`` (MODES 1 and 2): the scan starts from ``s0 [BH, R, DV]`` (fp32) instead of
    zero, the state carried in from tokens before this sequence (sequence parallelism).
    (An ``S^T`` orientation was measured slower on an H200 and removed; git history: session 2.)"""
    pid_a = tl.program_id(0)
    pid_d = tl.program_id(1)
    pid_z = tl.program_id(2)
    BLOCK_C: tl.constexpr = BLOCK_A * R2
    R: tl.constexpr = R1 * R2
    if MODE == 0:
        bh = pid_z // SPLITS
        split = pid_z % SPLITS
    else:
        bh = pid_z
        split = 0
    a0 = pid_a * BLOCK_A
    f1_ptr += bh.to(tl.int64) * N * R1
    f2_ptr += bh.to(tl.int64) * N * R2
    x_ptr += bh.to(tl.int64) * N * DV
    offs_c = a0 * R2 + tl.arange(0, BLOCK_C)
    offs_d = pid_d * BLOCK_DV + tl.arange(0, BLOCK_DV)
    offs_n = tl.arange(0, BLOCK_N)
    acc = tl.zeros((BLOCK_C, BLOCK_DV), dtype=tl.float32)
    out_offs = offs_c[:, None] * DV + offs_d[None, :]
    if HAS_INIT:
        acc += tl.load(s0_ptr + bh.to(tl.int64) * R * DV + out_offs).to(tl.float32)
    dt = s_ptr.dtype.element_ty
    if MODE == 0:
        start = split * tokens_per_split
        end = tl.minimum(start + tokens_per_split, N)
        for n0 in range(start, end, BLOCK_N):
            rows = n0 + offs_n
            ok = rows < end
            kr = _kr_tile(f1_ptr, f2_ptr, rows, ok, a0, R1, R2, BLOCK_A, BLOCK_N, HAS_F2)
            xv = tl.load(x_ptr + rows[:, None] * DV + offs_d[None, :], mask=ok[:, None], other=0.0)
            acc = _state_mma(acc, kr, xv, PRECISION)
        out = s_ptr + (split.to(tl.int64) * (tl.num_programs(2) // SPLITS) + bh) * R * DV
        tl.store(out + out_offs, acc.to(dt))
    else:
        for i in range(0, NUM_CHUNKS):
            if MODE == 1:
                c = i
            else:
                c = NUM_CHUNKS - 1 - i
            out = s_ptr + (bh.to(tl.int64) * NUM_CHUNKS + c) * R * DV
            tl.store(out + out_offs, acc.to(dt))
            for n0 in range(c * CHUNK, c * CHUNK + CHUNK, BLOCK_N):
                rows = n0 + offs_n
                ok = rows < N
                kr = _kr_tile(f1_ptr, f2_ptr, rows, ok, a0, R1, R2, BLOCK_A, BLOCK_N, HAS_F2)
                xv = tl.load(x_ptr + rows[:, None] * DV + offs_d[None, :], mask=ok[:, None], other=0.0)
                acc = _state_mma(acc, kr, xv, PRECISION)


@triton.jit
def transpose_kernel(src_ptr, dst_ptr, A, B, ADD: tl.constexpr, BLOCK_A: tl.constexpr, BLOCK_B: tl.constexpr):
    """``dst[z] (+)= src[z]^T`` for ``src [Z, A, B]``, ``dst [Z, B, A]``, both contiguous."""
    pid_a = tl.program_id(0)
    pid_b = tl.program_id(1)
    z = tl.program_id(2).to(tl.int64)
    offs_a = pid_a * BLOCK_A + tl.arange(0, BLOCK_A)
    offs_b = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
    ok = (offs_a[:, None] < A) & (offs_b[None, :] < B)
    tile = tl.load(src_ptr + z * A * B + offs_a[:, None] * B + offs_b[None, :], mask=ok, other=0.0)
    dst = dst_ptr + z * A * B + offs_b[None, :] * A + offs_a[:, None]
    if ADD:
        tile += tl.load(dst, mask=ok, other=0.0)
    tl.store(dst, tile.to(dst_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _cols_step(acc, f2, f1t_ptr, a, N, rows, ok, xv, TRANS: tl.constexpr, PRECISION: tl.constexpr):
    """``acc += kr[rows, a, :]^T x`` (``[R2, DV]``; ``[DV, R2]`` when ``TRANS == 1``).

    ``TRANS`` 0: the scaled copy of ``f2`` (``[BLOCK_N, R2]``) is transposed for the MMA;
    1: the values are transposed instead (the GPU default). Two other orientations were
    measured slower on an H200 and removed (git history: session 2).
    """
    c = tl.load(f1t_ptr + a * N + rows, mask=ok, other=0.0)
    if TRANS == 1:
        acc = tl.dot(tl.trans(xv), (f2 * c[:, None]).to(xv.dtype), acc, input_precision=PRECISION)
    else:
        acc = tl.dot(tl.trans((f2 * c[:, None]).to(xv.dtype)), xv, acc, input_precision=PRECISION)
    return acc


@triton.jit
def _cols_tokens(acc0, acc1, acc2, acc3, f1t_ptr, f2_ptr, x_ptr, a0, N, lo, hi, offs_n, offs_d,
                 R2: tl.constexpr, DV: tl.constexpr, BLOCK_N: tl.constexpr, BA: tl.constexpr,
                 TRANS: tl.constexpr, PRECISION: tl.constexpr):
    """Add tokens ``[lo, hi)`` to the ``BA`` accumulators of ``a = a0 .. a0 + BA - 1``."""
    offs_b = tl.arange(0, R2)
    for n0 in range(lo, hi, BLOCK_N):
        rows = n0 + offs_n
        ok = rows < hi
        f2 = tl.load(f2_ptr + rows[:, None] * R2 + offs_b[None, :], mask=ok[:, None], other=0.0)
        xv = tl.load(x_ptr + rows[:, None] * DV + offs_d[None, :], mask=ok[:, None], other=0.0)
        f2 = f2.to(xv.dtype)
        acc0 = _cols_step(acc0, f2, f1t_ptr, a0, N, rows, ok, xv, TRANS, PRECISION)
        if BA > 1:
            acc1 = _cols_step(acc1, f2, f1t_ptr, a0 + 1, N, rows, ok, xv, TRANS, PRECISION)
        if BA > 2:
            acc2 = _cols_step(acc2, f2, f1t_ptr, a0 + 2, N, rows, ok, xv, TRANS, PRECISION)
            acc3 = _cols_step(acc3, f2, f1t_ptr, a0 + 3, N, rows, ok, xv, TRANS, PRECISION)
    return acc0, acc1, acc2, acc3


@triton.jit
def _cols_store(out, acc0, acc1, acc2, acc3, a0, offs_d, R2: tl.constexpr, DV: tl.constexpr,
                BA: tl.constexpr, TRANS: tl.constexpr):
    dt = out.dtype.element_ty
    offs_b = tl.arange(0, R2)
    if TRANS == 1:  # accumulators are [BLOCK_DV, R2]
        ptrs = out + (a0 * R2 + offs_b)[None, :] * DV + offs_d[:, None]
    else:
        ptrs = out + (a0 * R2 + offs_b)[:, None] * DV + offs_d[None, :]
    tl.store(ptrs, acc0.to(dt))
    if BA > 1:
        tl.store(ptrs + R2 * DV, acc1.to(dt))
    if BA > 2:
        tl.store(ptrs + 2 * R2 * DV, acc2.to(dt))
        tl.store(ptrs + 3 * R2 * DV, acc3.to(dt))


@triton.jit
def _cols_load(src, acc0, acc1, acc2, acc3, a0, offs_d, R2: tl.constexpr, DV: tl.constexpr,
               BA: tl.constexpr, TRANS: tl.constexpr):
    """The accumulators of :func:`_cols_store` plus the fp32 state ``src [R, DV]`` they cover."""
    offs_b = tl.arange(0, R2)
    if TRANS == 1:
        ptrs = src + (a0 * R2 + offs_b)[None, :] * DV + offs_d[:, None]
    else:
        ptrs = src + (a0 * R2 + offs_b)[:, None] * DV + offs_d[None, :]
    acc0 += tl.load(ptrs).to(tl.float32)
    if BA > 1:
        acc1 += tl.load(ptrs + R2 * DV).to(tl.float32)
    if BA > 2:
        acc2 += tl.load(ptrs + 2 * R2 * DV).to(tl.float32)
        acc3 += tl.load(ptrs + 3 * R2 * DV).to(tl.float32)
    return acc0, acc1, acc2, acc3


@triton.jit
def state_cols_kernel(f1t_ptr, f2_ptr, x_ptr, s_ptr, N, tokens_per_split,
                      R1: tl.constexpr, R2: tl.constexpr, DV: tl.constexpr, BLOCK_N: tl.constexpr,
                      BA: tl.constexpr, BLOCK_DV: tl.constexpr, TRANS: tl.constexpr,
                      MODE: tl.constexpr, CHUNK: tl.constexpr, NUM_CHUNKS, SPLITS, PRECISION: tl.constexpr,
                      s0_ptr=None, HAS_INIT: tl.constexpr = False):
    """:func:`state_kernel` (same modes, output and ``HAS_INIT``) from ``BA`` columns ``a`` per
    program (``BA`` in {1, 2, 4}, one ``[R2, BLOCK_DV]`` accumulator each); ``f1t`` is ``[BH, R1, N]``."""
    pid_a = tl.program_id(0)
    pid_d = tl.program_id(1)
    pid_z = tl.program_id(2)
    R: tl.constexpr = R1 * R2
    if MODE == 0:
        bh = pid_z // SPLITS
        split = pid_z % SPLITS
    else:
        bh = pid_z
        split = 0
    a0 = pid_a * BA
    f1t_ptr += bh.to(tl.int64) * N * R1
    f2_ptr += bh.to(tl.int64) * N * R2
    x_ptr += bh.to(tl.int64) * N * DV
    offs_d = pid_d * BLOCK_DV + tl.arange(0, BLOCK_DV)
    offs_n = tl.arange(0, BLOCK_N)
    if TRANS == 1:
        acc0 = tl.zeros((BLOCK_DV, R2), dtype=tl.float32)
    else:
        acc0 = tl.zeros((R2, BLOCK_DV), dtype=tl.float32)
    acc1 = acc0
    acc2 = acc0
    acc3 = acc0
    if HAS_INIT:
        acc0, acc1, acc2, acc3 = _cols_load(s0_ptr + bh.to(tl.int64) * R * DV, acc0, acc1, acc2, acc3, a0, offs_d,
                                            R2, DV, BA, TRANS)
    if MODE == 0:
        start = split * tokens_per_split
        end = tl.minimum(start + tokens_per_split, N)
        acc0, acc1, acc2, acc3 = _cols_tokens(acc0, acc1, acc2, acc3, f1t_ptr, f2_ptr, x_ptr, a0, N, start, end,
                                              offs_n, offs_d, R2, DV, BLOCK_N, BA, TRANS, PRECISION)
        out = s_ptr + (split.to(tl.int64) * (tl.num_programs(2) // SPLITS) + bh) * R * DV
        _cols_store(out, acc0, acc1, acc2, acc3, a0, offs_d, R2, DV, BA, TRANS)
    else:
        for i in range(0, NUM_CHUNKS):
            if MODE == 1:
                c = i
            else:
                c = NUM_CHUNKS - 1 - i
            out = s_ptr + (bh.to(tl.int64) * NUM_CHUNKS + c) * R * DV
            _cols_store(out, acc0, acc1, acc2, acc3, a0, offs_d, R2, DV, BA, TRANS)
            acc0, acc1, acc2, acc3 = _cols_tokens(acc0, acc1, acc2, acc3, f1t_ptr, f2_ptr, x_ptr, a0, N, c * CHUNK,
                                                  tl.minimum(c * CHUNK + CHUNK, N), offs_n, offs_d, R2, DV,
                                                  BLOCK_N, BA, TRANS, PRECISION)


@triton.jit
def _row_normaliser(f1, f2, z_ptr, R1: tl.constexpr, R2: tl.constexpr, HAS_F2: tl.constexpr,
                    PRECISION: tl.constexpr):
    """``sum_ab f1[:, a] f2[:, b] z[a, b]`` for a row block, in fp32."""
    offs_a = tl.arange(0, R1)
    if HAS_F2:
        offs_b = tl.arange(0, R2)
        zt = tl.load(z_ptr + offs_b[:, None] + offs_a[None, :] * R2)  # z^T, [R2, R1]
        t = tl.dot(f2.to(tl.float32), zt, input_precision=PRECISION)
        return tl.sum(f1.to(tl.float32) * t, 1)
    else:
        z = tl.load(z_ptr + offs_a)
        return tl.sum(f1.to(tl.float32) * z[None, :], 1)


@triton.jit
def _row_flags(out, den, f1, f2, DV: tl.constexpr, SIGNED: tl.constexpr, QSIGNS: tl.constexpr):
    """1.0 per row that passes the checks of :func:`apply_kernel` (``CHECK``), else 0.0."""
    # NaN fails every comparison and Inf fails ``< inf``: a row is fine iff all DV entries pass
    out_fine = tl.sum((tl.abs(out) < float("inf")).to(tl.int32), 1) == DV
    den_finite = tl.abs(den) < float("inf")
    if SIGNED:
        fine = den_finite & (out_fine | (den == 0.0))
    else:
        fine = den_finite & (den > 0.0) & out_fine
    if QSIGNS:
        fine = fine & (tl.min(f1.to(tl.float32), 1) >= 0.0) & (tl.min(f2.to(tl.float32), 1) >= 0.0)
    return tl.where(fine, 1.0, 0.0)


@triton.jit
def sign_kernel(x_ptr, y_ptr, NX, NY, flag_ptr, BLOCK: tl.constexpr):
    """``flag[pid]`` = 1.0 when elements ``[pid * BLOCK, (pid + 1) * BLOCK)`` of both ``x`` and
    ``y`` (flat, ``NX`` and ``NY`` long) are >= 0, else 0.0 (NaN fails): the key half of the
    sign certificate, one small launch covering both key factors."""
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    x = tl.load(x_ptr + offs, mask=offs < NX, other=0.0).to(tl.float32)
    y = tl.load(y_ptr + offs, mask=offs < NY, other=0.0).to(tl.float32)
    ok = (tl.sum((x >= 0.0).to(tl.int32), 0) == BLOCK) & (tl.sum((y >= 0.0).to(tl.int32), 0) == BLOCK)
    tl.store(flag_ptr + pid, tl.where(ok, 1.0, 0.0))


@triton.jit
def apply_kernel(q1_ptr, q2_ptr, k1_ptr, k2_ptr, v_ptr, s_ptr, z_ptr, o_ptr, den_ptr, q1t_ptr, chk_ptr, N,
                 R1: tl.constexpr, R2: tl.constexpr, DV: tl.constexpr, BLOCK_M: tl.constexpr,
                 BLOCK_N: tl.constexpr, BLOCK_A: tl.constexpr, HAS_F2: tl.constexpr,
                 CAUSAL: tl.constexpr, CHUNK: tl.constexpr, NUM_CHUNKS, PRECISION: tl.constexpr,
                 PER_A: tl.constexpr, NORMALIZE: tl.constexpr, CHECK: tl.constexpr,
                 SIGNED: tl.constexpr = False, QSIGNS: tl.constexpr = False,
                 acc_ptr=None, accden_ptr=None, HAS_ACC: tl.constexpr = False):
    """``PER_A`` (non-causal only): Khatri-Rao columns one ``a`` at a time, ``q1t = q1^T``.
    ``NORMALIZE``: store ``num / den``, else the numerator itself (the parts of a split width,
    :mod:`hla_analysis.ops.triton.split`, are summed before one division).
    ``CHECK``: ``chk[row]`` = 1.0 when the row passes the public checks, else 0.0: the
    normaliser is finite and > 0 (``SIGNED``: finite, any sign), every output entry is finite
    (``SIGNED``: or the normaliser is exactly 0, the documented signed result) and, with
    ``QSIGNS``, every query feature of the row is >= 0 (the sign certificate's query half).
    NaN fails every comparison, so a NaN anywhere in the row's inputs fails the row.
    ``HAS_ACC``: add the fp32 numerator ``acc`` ``[BH, N, DV]`` and normaliser ``accden``
    ``[BH, N]`` of the parts before this one (a split width's last part normalises, checks and
    stores the whole output; ``den`` then holds the total normaliser).
    With the intra-chunk loop after it, Triton 3.6 produced NaNs on an H200 (not under the
    interpreter), so the launcher never combines ``PER_A`` with ``CAUSAL``."""
    tl.static_assert(not (PER_A and CAUSAL), "PER_A apply is non-causal only")
    pid_m = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    BLOCK_C: tl.constexpr = BLOCK_A * R2
    R: tl.constexpr = R1 * R2
    q1_ptr += bh * N * R1
    q2_ptr += bh * N * R2
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < N
    offs_d = tl.arange(0, DV)
    if CAUSAL:
        chunk = (pid_m * BLOCK_M) // CHUNK
    else:
        chunk = 0
    s_ptr += (bh * NUM_CHUNKS + chunk) * R * DV
    z_ptr += (bh * NUM_CHUNKS + chunk) * R
    dt = s_ptr.dtype.element_ty

    offs_r1 = tl.arange(0, R1)
    f1 = tl.load(q1_ptr + rows[:, None] * R1 + offs_r1[None, :], mask=row_ok[:, None], other=0.0)
    if HAS_F2:
        offs_r2 = tl.arange(0, R2)
        f2 = tl.load(q2_ptr + rows[:, None] * R2 + offs_r2[None, :], mask=row_ok[:, None], other=0.0)
    else:
        f2 = f1
    den = _row_normaliser(f1, f2, z_ptr, R1, R2, HAS_F2, PRECISION)
    acc = tl.zeros((BLOCK_M, DV), dtype=tl.float32)
    if PER_A:
        q1t_ptr += bh * N * R1
        f2c = f2.to(dt)
        for a in range(0, R1):
            c = tl.load(q1t_ptr + a * N + rows, mask=row_ok, other=0.0)
            st = tl.load(s_ptr + (a * R2 + offs_r2)[:, None] * DV + offs_d[None, :])
            acc = tl.dot((f2c * c[:, None]).to(dt), st, acc, input_precision=PRECISION)
    else:
        offs_c = tl.arange(0, BLOCK_C)
        for a0 in range(0, R1, BLOCK_A):
            kr = _kr_tile(q1_ptr, q2_ptr, rows, row_ok, a0, R1, R2, BLOCK_A, BLOCK_M, HAS_F2)
            st = tl.load(s_ptr + (a0 * R2 + offs_c)[:, None] * DV + offs_d[None, :])
            acc = tl.dot(kr.to(dt), st, acc, input_precision=PRECISION)

    if CAUSAL:
        k1_ptr += bh * N * R1
        k2_ptr += bh * N * R2
        v_ptr += bh * N * DV
        offs_n = tl.arange(0, BLOCK_N)
        lo = chunk * CHUNK
        hi = tl.minimum((pid_m + 1) * BLOCK_M, N)
        for n0 in range(lo, hi, BLOCK_N):
            cols = n0 + offs_n
            col_ok = cols < N
            y1 = tl.load(k1_ptr + cols[:, None] * R1 + offs_r1[None, :], mask=col_ok[:, None], other=0.0)
            sim = tl.dot(f1, tl.trans(y1), input_precision=PRECISION)
            if HAS_F2:
                y2 = tl.load(k2_ptr + cols[:, None] * R2 + offs_r2[None, :], mask=col_ok[:, None], other=0.0)
                sim = sim * tl.dot(f2, tl.trans(y2), input_precision=PRECISION)
            sim = tl.where(cols[None, :] <= rows[:, None], sim, 0.0)
            den += tl.sum(sim, 1)
            vv = tl.load(v_ptr + cols[:, None] * DV + offs_d[None, :], mask=col_ok[:, None], other=0.0)
            acc = tl.dot(sim.to(vv.dtype), vv, acc, input_precision=PRECISION)

    if HAS_ACC:
        acc += tl.load(acc_ptr + bh * N * DV + rows[:, None] * DV + offs_d[None, :], mask=row_ok[:, None], other=0.0)
        den += tl.load(accden_ptr + bh * N + rows, mask=row_ok, other=0.0)
    if NORMALIZE:
        out = acc / tl.where(row_ok, den, 1.0)[:, None]  # rows past N: no 0/0
    else:
        out = acc
    o_ptr += bh * N * DV
    tl.store(o_ptr + rows[:, None] * DV + offs_d[None, :], out.to(o_ptr.dtype.element_ty), mask=row_ok[:, None])
    tl.store(den_ptr + bh * N + rows, den, mask=row_ok)
    if CHECK:
        tl.store(chk_ptr + bh * N + rows, _row_flags(out, den, f1, f2, DV, SIGNED, QSIGNS), mask=row_ok)


@triton.jit
def _grad_normaliser(f1, f2, wx, z_ptr, BLOCK_M: tl.constexpr, R1: tl.constexpr, R2: tl.constexpr,
                     HAS_F2: tl.constexpr, PRECISION: tl.constexpr):
    """Step 1: ``(d1, d2)``, the derivatives of ``w * f1.(f2 @ z^T)`` by ``f1`` and ``f2``, fp32."""
    offs_a = tl.arange(0, R1)
    if HAS_F2:
        offs_b = tl.arange(0, R2)
        zt = tl.load(z_ptr + offs_b[:, None] + offs_a[None, :] * R2)  # [R2, R1]
        zz = tl.load(z_ptr + offs_a[:, None] * R2 + offs_b[None, :])  # [R1, R2]
        d1 = wx[:, None] * tl.dot(f2.to(tl.float32), zt, input_precision=PRECISION)
        d2 = wx[:, None] * tl.dot(f1.to(tl.float32), zz, input_precision=PRECISION)
    else:
        z = tl.load(z_ptr + offs_a)
        d1 = wx[:, None] * z[None, :]
        d2 = tl.zeros((BLOCK_M, R2), dtype=tl.float32)
    return d1, d2


@triton.jit
def _grad_intra_chunk(d1, d2, out_acc, f1, f2, g, wx, y1_ptr, y2_ptr, h_ptr, wy_ptr, bh, rows, row_ok, chunk,
                      pid_m, N, R1: tl.constexpr, R2: tl.constexpr, DV: tl.constexpr, BLOCK_M: tl.constexpr,
                      BLOCK_N: tl.constexpr, HAS_F2: tl.constexpr, QUERY_SIDE: tl.constexpr,
                      WANT_OUT: tl.constexpr, CHUNK: tl.constexpr, PRECISION: tl.constexpr):
    """Step 2 (causal): the quadratic part inside the row block's chunk, added to ``d1``, ``d2``
    (and ``out_acc``, the key side's ``A^T dnum``). Query side: keys ``j <= i`` of the chunk;
    key side: queries ``i >= j`` of the chunk."""
    y1_ptr += bh * N * R1
    y2_ptr += bh * N * R2
    h_ptr += bh * N * DV
    offs_n = tl.arange(0, BLOCK_N)
    offs_r1 = tl.arange(0, R1)
    offs_r2 = tl.arange(0, R2)
    offs_d = tl.arange(0, DV)
    if QUERY_SIDE:
        lo = chunk * CHUNK
        hi = tl.minimum((pid_m + 1) * BLOCK_M, N)
    else:
        lo = pid_m * BLOCK_M
        hi = tl.minimum(chunk * CHUNK + CHUNK, N)
    for n0 in range(lo, hi, BLOCK_N):
        cols = n0 + offs_n
        col_ok = cols < N
        y1 = tl.load(y1_ptr + cols[:, None] * R1 + offs_r1[None, :], mask=col_ok[:, None], other=0.0)
        s1 = tl.dot(f1, tl.trans(y1), input_precision=PRECISION)
        if HAS_F2:
            y2 = tl.load(y2_ptr + cols[:, None] * R2 + offs_r2[None, :], mask=col_ok[:, None], other=0.0)
            s2 = tl.dot(f2, tl.trans(y2), input_precision=PRECISION)
        else:
            s2 = tl.full((BLOCK_M, BLOCK_N), 1.0, tl.float32)
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
        d1 += tl.dot((da * s2).to(y1.dtype), y1, input_precision=PRECISION)
        if HAS_F2:
            d2 += tl.dot((da * s1).to(y2.dtype), y2, input_precision=PRECISION)
        if WANT_OUT:
            a = tl.where(keep, s1 * s2, 0.0)
            out_acc = tl.dot(a.to(hh.dtype), hh, out_acc, input_precision=PRECISION)
    return d1, d2, out_acc


@triton.jit
def _grad_state_cols(d2, out_acc, f2, g, s_ptr, x1t_ptr, dx1t_ptr, bh, rows, row_ok, N,
                     R1: tl.constexpr, R2: tl.constexpr, DV: tl.constexpr, WANT_OUT: tl.constexpr,
                     PRECISION: tl.constexpr):
    """Step 3, columns (``PER_A``): the state part one ``a`` at a time. ``d x1[:, a]`` goes to
    ``dx1t [R1, N]`` (the caller adds it to ``dx1``); ``d x2`` and ``out`` accumulate."""
    dt = s_ptr.dtype.element_ty
    offs_r2 = tl.arange(0, R2)
    offs_d = tl.arange(0, DV)
    x1t_ptr += bh * N * R1
    dx1t_ptr += bh * N * R1
    x2f = f2.to(tl.float32)
    f2c = f2.to(dt)
    gc = g.to(dt)
    for ia in range(0, R1):
        st = tl.load(s_ptr + (ia * R2 + offs_r2)[:, None] * DV + offs_d[None, :])
        p = tl.dot(gc, tl.trans(st), input_precision=PRECISION)  # d kr[:, ia, :], [BLOCK_M, R2]
        c = tl.load(x1t_ptr + ia * N + rows, mask=row_ok, other=0.0)
        if WANT_OUT:
            out_acc = tl.dot((f2c * c[:, None]).to(dt), st, out_acc, input_precision=PRECISION)
        tl.store(dx1t_ptr + ia * N + rows, tl.sum(p * x2f, 1), mask=row_ok)
        d2 += p * c.to(tl.float32)[:, None]
    return d2, out_acc


@triton.jit
def _grad_state_tiles(d2, out_acc, f2, g, s_ptr, x1_ptr, x2_ptr, dx1_ptr, rows, row_ok,
                      R1: tl.constexpr, R2: tl.constexpr, DV: tl.constexpr, BLOCK_M: tl.constexpr,
                      BLOCK_A: tl.constexpr, HAS_F2: tl.constexpr, WANT_OUT: tl.constexpr,
                      PRECISION: tl.constexpr):
    """Step 3, tiles: the state part tile by tile of ``BLOCK_A`` columns ``a``. ``dx1`` (which
    holds steps 1-2) gets each tile's columns added in place; ``d x2`` and ``out`` accumulate."""
    dt = s_ptr.dtype.element_ty
    BLOCK_C: tl.constexpr = BLOCK_A * R2
    offs_c = tl.arange(0, BLOCK_C)
    offs_ba = tl.arange(0, BLOCK_A)
    offs_d = tl.arange(0, DV)
    for a0 in range(0, R1, BLOCK_A):
        st = tl.load(s_ptr + (a0 * R2 + offs_c)[:, None] * DV + offs_d[None, :])
        p = tl.dot(g.to(dt), tl.trans(st), input_precision=PRECISION)  # d kr tile, [BLOCK_M, BLOCK_C]
        if WANT_OUT:
            kr = _kr_tile(x1_ptr, x2_ptr, rows, row_ok, a0, R1, R2, BLOCK_A, BLOCK_M, HAS_F2)
            out_acc = tl.dot(kr.to(dt), st, out_acc, input_precision=PRECISION)
        ptr1 = dx1_ptr + rows[:, None] * R1 + (a0 + offs_ba)[None, :]
        prev = tl.load(ptr1, mask=row_ok[:, None], other=0.0)
        if HAS_F2:
            x2f = f2.to(tl.float32)
            p3 = tl.reshape(p, (BLOCK_M, BLOCK_A, R2))
            tl.store(ptr1, prev + tl.sum(p3 * x2f[:, None, :], 2), mask=row_ok[:, None])
            x1t = tl.load(x1_ptr + rows[:, None] * R1 + (a0 + offs_ba)[None, :], mask=row_ok[:, None],
                          other=0.0).to(tl.float32)
            d2 += tl.sum(p3 * x1t[:, :, None], 1)
        else:
            tl.store(ptr1, prev + p, mask=row_ok[:, None])
    return d2, out_acc


@triton.jit
def grad_kernel(x1_ptr, x2_ptr, g_ptr, wx_ptr, y1_ptr, y2_ptr, h_ptr, wy_ptr, s_ptr, z_ptr,
                dx1_ptr, dx2_ptr, out_ptr, x1t_ptr, dx1t_ptr, N,
                R1: tl.constexpr, R2: tl.constexpr, DV: tl.constexpr, BLOCK_M: tl.constexpr,
                BLOCK_N: tl.constexpr, BLOCK_A: tl.constexpr, HAS_F2: tl.constexpr,
                CAUSAL: tl.constexpr, QUERY_SIDE: tl.constexpr, WANT_OUT: tl.constexpr,
                CHUNK: tl.constexpr, NUM_CHUNKS, PRECISION: tl.constexpr, PER_A: tl.constexpr):
    """Gradients of one side's factors ``x`` through ``dkr = g @ S^T + w z``.

    Query side (``x = q``, ``g = dnum``, ``w = dden``, other side ``y = k``, ``h = v``).
    Key side (``x = k``, ``g = v``, ``w = 1``, ``y = q``, ``h = dnum``, ``wy = dden``), which
    also writes ``out = dv = kr @ dS`` (+ the intra-chunk ``A^T dnum``).

    Steps: load the row block; 1. the normaliser part (:func:`_grad_normaliser`); 2. causal:
    the intra-chunk part (:func:`_grad_intra_chunk`), both kept in registers and ``d x1``
    parked in ``dx1``; 3. the state part, by columns (``PER_A``, :func:`_grad_state_cols`: the
    state part of ``d x1`` goes to ``dx1t [BH, R1, N]``, which the caller adds to ``dx1``) or
    by tiles (:func:`_grad_state_tiles`); 4. store ``d x2`` and ``out``.
    """
    pid_m = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    R: tl.constexpr = R1 * R2
    x1_ptr += bh * N * R1
    x2_ptr += bh * N * R2
    dx1_ptr += bh * N * R1
    dx2_ptr += bh * N * R2
    g_ptr += bh * N * DV
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < N
    offs_d = tl.arange(0, DV)
    offs_r1 = tl.arange(0, R1)
    offs_r2 = tl.arange(0, R2)
    if CAUSAL:
        chunk = (pid_m * BLOCK_M) // CHUNK
    else:
        chunk = 0
    s_ptr += (bh * NUM_CHUNKS + chunk) * R * DV
    z_ptr += (bh * NUM_CHUNKS + chunk) * R

    f1 = tl.load(x1_ptr + rows[:, None] * R1 + offs_r1[None, :], mask=row_ok[:, None], other=0.0)
    if HAS_F2:
        f2 = tl.load(x2_ptr + rows[:, None] * R2 + offs_r2[None, :], mask=row_ok[:, None], other=0.0)
    else:
        f2 = f1
    g = tl.load(g_ptr + rows[:, None] * DV + offs_d[None, :], mask=row_ok[:, None], other=0.0)
    if QUERY_SIDE:
        wx = tl.load(wx_ptr + bh * N + rows, mask=row_ok, other=0.0)
    else:
        wx = tl.where(row_ok, 1.0, 0.0)

    d1, d2 = _grad_normaliser(f1, f2, wx, z_ptr, BLOCK_M, R1, R2, HAS_F2, PRECISION)
    out_acc = tl.zeros((BLOCK_M, DV), dtype=tl.float32)
    if CAUSAL:
        d1, d2, out_acc = _grad_intra_chunk(d1, d2, out_acc, f1, f2, g, wx, y1_ptr, y2_ptr, h_ptr, wy_ptr, bh, rows,
                                            row_ok, chunk, pid_m, N, R1, R2, DV, BLOCK_M, BLOCK_N, HAS_F2,
                                            QUERY_SIDE, WANT_OUT, CHUNK, PRECISION)
    tl.store(dx1_ptr + rows[:, None] * R1 + offs_r1[None, :], d1, mask=row_ok[:, None])
    if PER_A:
        d2, out_acc = _grad_state_cols(d2, out_acc, f2, g, s_ptr, x1t_ptr, dx1t_ptr, bh, rows, row_ok, N,
                                       R1, R2, DV, WANT_OUT, PRECISION)
    else:
        # dx1 columns are owned tile by tile: the register part is parked in memory, add per tile
        tl.debug_barrier()
        d2, out_acc = _grad_state_tiles(d2, out_acc, f2, g, s_ptr, x1_ptr, x2_ptr, dx1_ptr, rows, row_ok,
                                        R1, R2, DV, BLOCK_M, BLOCK_A, HAS_F2, WANT_OUT, PRECISION)
    if HAS_F2:
        tl.store(dx2_ptr + rows[:, None] * R2 + offs_r2[None, :], d2, mask=row_ok[:, None])
    if WANT_OUT:
        out_ptr += bh * N * DV
        tl.store(out_ptr + rows[:, None] * DV + offs_d[None, :], out_acc, mask=row_ok[:, None])
