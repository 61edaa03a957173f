"""Any factor width on the fused kernels: split the features, sum the parts, divide once.

The kernels take widths 16, 32, 64 and 128. A factor of another width ``w`` is cut into
column blocks of those widths, plus at most one block of width 1 (the constant feature of
``phi=affine``, width ``d + 1``) or one short tail (zero-padded to 16). Similarities add
over blocks, ``q.k = sum_b q_b.k_b``, so the M = 2 weight splits exactly:

    (a0 + A)(b0 + B) = a0 b0 + a0 B + b0 A + A B

(for affine factors ``(1 + a)(1 + b) = 1 + a + b + ab``). Each term is one fused launch:
two blocks wider than 1 give an M = 2 part of their widths; a block of width 1 is a scalar
per token, folded into the other factor's block as a scale, so the term is an M = 1 part;
the M = 1 parts are concatenated (``q.k + q'.k' = [q, q'].[k, k']``) into launches of at most
128 features. Tied factors (the same tensor objects) give equal cross terms, run once with
weight 2. Every part but the last stores its unnormalised numerator and normaliser
(``NORMALIZE=False`` in :func:`.state.kernels.apply_kernel`); the last part's apply adds them
(``HAS_ACC``), divides once and checks each row, so the result is the exact HLA output.
The cost follows the product of the real widths (plus one launch per
part), not the next power of two: ``w = 65`` costs a 64 x 64 part and a 65-wide M = 1 part.

:class:`SplitFunction` is the autograd node of all the parts: the gradient of
``o = sum_p num_p / sum_p den_p`` reaches each part as ``d num_p = g / den`` and
``d den_p = -(g . o) / den``, which the existing backward kernels take as they are.
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F

from hla_analysis._checks import _active_or_none, diagnose_rows, require_flags
from hla_analysis.ops import feature_blocks
from hla_analysis.ops.triton.config import default_config
from hla_analysis.ops.triton.state.autograd import (
    apply_states,
    cast_like,
    output_grads,
    part_grads,
    part_states,
    widened,
)

KERNEL_WIDTHS = (16, 32, 64, 128)
# widest factor the split path takes (129 is phi=affine at d = 128; M = 1 features such as
# hedgehog at d = 128 are 256 wide)
MAX_WIDTH = 256
# widest M = 1 feature map: its parts are 128-wide launches summed (the symmetric power
# features of tied M >= 3 factors, C(r + M - 1, M) wide, run this way)
MAX_FEATURES = 4096
# widest block of tied factors (the same tensors on both sides of the M = 2 product). Their
# blocks give a block-symmetric state: the term of blocks (i, j) equals that of (j, i), so
# the split runs i <= j only, the off-diagonal ones with weight 2 (power attention's route, in
# 64-wide blocks). A tied 128-wide block as two 64-wide ones: 3 parts of 64 x 64 against one of
# 128 x 128, a quarter fewer state entries (phi=affine at d = 128, width 129).
TIED_BLOCK = 64


def _padded(w: int) -> int:
    """Smallest kernel width >= w."""
    for k in KERNEL_WIDTHS:
        if k >= w:
            return k
    raise ValueError(f"block width {w} exceeds {KERNEL_WIDTHS[-1]}")


def blocks(w: int, widest: int = KERNEL_WIDTHS[-1]) -> list[tuple[int, int]]:
    """Column blocks ``(start, size)`` of a width-``w`` factor.

    A leading width-1 block when ``w - 1`` is a multiple of 16 (the affine constant), then
    the largest kernel widths up to ``widest`` that fit, then a tail (width 1, or < 16 and
    padded at launch).

    >>> blocks(64), blocks(65), blocks(129), blocks(100), blocks(7)
    ([(0, 64)], [(0, 1), (1, 64)], [(0, 1), (1, 128)], [(0, 64), (64, 32), (96, 4)], [(0, 7)])
    >>> blocks(129, widest=64)
    [(0, 1), (1, 64), (65, 64)]
    """
    if not 1 <= w <= MAX_WIDTH:
        raise ValueError(f"factor width {w} outside 1..{MAX_WIDTH}")
    out, start = [], 0
    if w % 16 == 1 and w > 1:
        out.append((0, 1))
        start = 1
    while start < w:
        rest = w - start
        size = next((k for k in reversed(KERNEL_WIDTHS) if k <= min(rest, widest)), rest)
        out.append((start, size))
        start += size
    return out


def needs_split(qs) -> bool:
    return any(q.shape[-1] not in KERNEL_WIDTHS for q in qs)


def _pad(t, width):
    return t if t.shape[-1] == width else F.pad(t, (0, width - t.shape[-1]))


def flat_blocks(t, f, flatten) -> None:
    """Carry ``t``'s recorded column blocks (:mod:`hla_analysis.ops.feature_blocks`) over to its
    flat form ``f``, with ``flatten`` applied to each block."""
    rec = feature_blocks.recorded(t)
    if rec is not None and f is not t:
        feature_blocks.record(f, {b: flatten(part) for b, part in rec.items()})


def _block(t, block, width, cache):
    """Column block ``(start, size)`` of ``t``, contiguous, zero-padded to ``width``: the block the
    feature map recorded, else a copy of the slice; once per distinct tensor and block in a call
    (tied factors read theirs once)."""
    key = (id(t), block, width)
    if key not in cache:
        cache[key] = _pad(_cols(t, block), width).contiguous()
    return cache[key]


@functools.lru_cache(maxsize=256)
def _layout(widths: tuple[int, ...], tied: bool, tied_block: int):
    """The terms of one call's widths: ``(m2, m1)``, ``m2`` a tuple of ``(x, y, weight)`` block
    pairs run as M = 2 parts, ``m1`` a tuple of ``(x, y, weight)`` pairs with a width-1 block
    (``x`` the width-1 one), pooled into M = 1 parts; an M = 1 call pools its whole factor."""
    if len(widths) == 1:
        return (), None
    widest = tied_block if tied else KERNEL_WIDTHS[-1]
    b1, b2 = blocks(widths[0], widest), blocks(widths[1], widest)
    m2, m1 = [], []
    for i, x in enumerate(b1):
        for j, y in enumerate(b2):
            if tied and j < i:
                continue  # equal to the (j, i) term, counted there with weight 2
            weight = 2.0 if tied and j > i else 1.0
            if x[1] > 1 and y[1] > 1:
                m2.append((x, y, weight))
            else:
                m1.append((x, y, weight))
    return tuple(m2), tuple(m1)


def plan(qs, ks):
    """The parts of one call: ``(m2, m1)`` with ``m2`` a list of ``(q1, q2, k1, k2)`` M = 2
    parts (kernel widths, contiguous) and ``m1`` a list of ``(q, k)`` M = 1 parts (kernel widths)."""
    tied = len(qs) == 2 and qs[0] is qs[1] and ks[0] is ks[1]
    layout_m2, layout_m1 = _layout(tuple(q.shape[-1] for q in qs), tied, TIED_BLOCK)
    cache: dict = {}
    if layout_m1 is None:
        pool_q, pool_k = [qs[0]], [ks[0]]
    else:
        pool_q, pool_k = [], []
    m2 = []
    for x, y, weight in layout_m2:
        wx, wy = _padded(x[1]), _padded(y[1])
        q1, k1 = _block(qs[0], x, wx, cache), _block(ks[0], x, wx, cache)
        q2, k2 = _block(qs[1], y, wy, cache), _block(ks[1], y, wy, cache)
        m2.append((q1 * weight if weight != 1.0 else q1, q2, k1, k2))
    for x, y, weight in layout_m1 or ():
        q1, k1 = _cols(qs[0], x), _cols(ks[0], x)
        q2, k2 = _cols(qs[1], y), _cols(ks[1], y)
        if weight != 1.0:
            q1 = q1 * weight
        if x[1] == 1:
            pool_q.append(q1 * q2)
            pool_k.append(k1 * k2)
        else:
            pool_q.append(q2 * q1)
            pool_k.append(k2 * k1)
    m1 = []
    if pool_q:
        fq = pool_q[0] if len(pool_q) == 1 else torch.cat(pool_q, -1)
        fk = pool_k[0] if len(pool_k) == 1 else torch.cat(pool_k, -1)
        for start in range(0, fq.shape[-1], KERNEL_WIDTHS[-1]):
            sl = slice(start, start + KERNEL_WIDTHS[-1])
            width = _padded(fq[..., sl].shape[-1])
            m1.append((_pad(fq[..., sl], width).contiguous(), _pad(fk[..., sl], width).contiguous()))
    return m2, m1


def _cols(t, block):
    start, size = block
    rec = feature_blocks.recorded(t)
    part = None if rec is None else rec.get(block)
    return part if part is not None else t[..., start:start + size]


def _part_forward(parts, cfgs, v, *, causal: bool, allow_signed: bool):
    """``(o, den, states)`` of the parts ``(q1, q2, k1, k2)`` (``q2 = k2 = None`` for M = 1).

    Every part but the last stores its unnormalised numerator and normaliser (fp32, summed here
    when there are several); the last part's apply adds them on chip, divides, checks the rows
    (``CHECK``: normaliser finite and > 0, output finite) and stores ``o`` in ``v.dtype``: no
    torch pass over the output. ``states``: per part ``(s, z, q1t, k1t)`` for the backward.
    """
    _, skip = _active_or_none()
    num = den = o = None
    states = []
    last = len(parts) - 1
    for i, ((q1, q2, k1, k2), cfg) in enumerate(zip(parts, cfgs)):
        s, z, q1t, k1t = part_states(q1, q2, k1, k2, v, causal=causal, cfg=cfg)
        states.append((s, z, q1t, k1t))
        if i < last:
            pn, pd = apply_states(q1, q2, k1, k2, v, s, z, causal=causal, cfg=cfg, q1t=q1t, normalize=False)
            num, den = (pn, pd) if num is None else (num + pn, den + pd)
            continue
        chk = None if skip else torch.empty(v.shape[0] * v.shape[1], device=v.device, dtype=torch.float32)
        o, den = apply_states(q1, q2, k1, k2, v, s, z, causal=causal, cfg=cfg, q1t=q1t, chk=chk,
                              signed=allow_signed, acc=None if num is None else (num, den))
        if chk is not None:
            require_flags(chk, lambda o=o, den=den: diagnose_rows(den, o, [], [], allow_signed=allow_signed,
                                                                    signs=False))
    return o, den, states


class SplitFunction(torch.autograd.Function):
    """Every part of one split call as one autograd node: ``o = sum_p num_p / sum_p den_p``.

    The gradient reaches each part as ``d num_p = g / den`` and ``d den_p = -(g . o) / den``
    (the same for every part), which the existing backward kernels take as they are.
    ``factors``: the parts' ``(q1, q2, k1, k2)``, flattened (``None`` where M = 1).
    """

    @staticmethod
    def forward(ctx, v, causal, allow_signed, cfgs, *factors):
        parts = [factors[i:i + 4] for i in range(0, len(factors), 4)]
        o, den, states = _part_forward(parts, cfgs, v, causal=causal, allow_signed=allow_signed)
        ctx.save_for_backward(v, o, den, *factors, *(t for state in states for t in state))
        ctx.causal, ctx.cfgs = causal, cfgs
        return o

    @staticmethod
    def backward(ctx, grad):
        v, o, den, *rest = ctx.saved_tensors
        causal, cfgs = ctx.causal, ctx.cfgs
        n = len(cfgs)
        factors, states = rest[:4 * n], rest[4 * n:]
        dnum, dden = output_grads(grad, o, den, v.dtype)  # the same for every part
        grads, dv = [], None
        for i, cfg in enumerate(cfgs):
            *factor_part, dv_part = part_grads(*factors[4 * i:4 * i + 4], v, *states[4 * i:4 * i + 4], dnum, dden,
                                                causal=causal, cfg=cfg)
            grads += factor_part
            dv = dv_part if dv is None else dv + dv_part
        return (cast_like(dv, v), None, None, None, *grads)


def split_output(qs, ks, v, *, causal: bool, allow_signed: bool = False, config: dict | None = None):
    """HLA output ``[BH, N, dv]`` in ``v.dtype`` of flat factors ``[BH, N, w_m]`` (any widths <= MAX_WIDTH):
    the parts of :func:`plan`, summed and divided once in the last part's apply, rows checked there."""
    m2, m1 = plan(qs, ks)
    dv = v.shape[-1]
    m2 = [widened(*part, causal=causal, dv=dv) for part in m2]  # no 32-wide M = 2 part where it fails
    parts = [*m2, *((q, None, k, None) for q, k in m1)]
    cfgs = []
    for q1, q2, _, _ in parts:
        cfg = default_config(r1=q1.shape[-1], r2=1 if q2 is None else q2.shape[-1], dv=dv, causal=causal,
                             dtype=v.dtype)
        cfgs.append(cfg.replace(**config) if config else cfg)
    factors = [t for part in parts for t in part]
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (v, *factors)):
        return SplitFunction.apply(v, bool(causal), bool(allow_signed), tuple(cfgs), *factors)
    # no autograd node (and nothing saved for a backward) under no_grad or for constants
    return _part_forward(parts, cfgs, v, causal=bool(causal), allow_signed=bool(allow_signed))[0]


def part_count(widths) -> int:
    """Launch groups (parts) for factor widths ``widths`` (tied counted as untied)."""
    if len(widths) == 1:
        return math.ceil(widths[0] / KERNEL_WIDTHS[-1])
    b1, b2 = blocks(widths[0]), blocks(widths[1])
    return sum(1 for x in b1 for y in b2 if x[1] > 1 and y[1] > 1) + 1
