"""Fused Triton kernels for HLA with one or two factors, causal and not, with backward.

:func:`hla_triton` computes exactly :func:`hla_analysis.ops.hla_attention_output` (the
materialized reference) for M in {1, 2}: ``o_i = sum_j a_ij v_j`` with
``a_ij = prod_m s^(m)_ij / sum_l prod_m s^(m)_il``, never forming the ``r1 * r2`` Kronecker
features in device memory. ``hla(..., backend="triton" | "auto")`` dispatches here.

Tied factors (M = 2, both query factors equal and both key factors equal) can take the
symmetric-state kernels of :mod:`.tied.kernels` (``tied=True``): ``(q.k)^2 = <sym(q), sym(k)>``
with ``r (r + 1) / 2`` packed features built on chip, so the state is about half as large.
They are not taken by default (``TIED_BY_DEFAULT``): on an H200 at r = 64 their forward was
2.1x (non-causal) and 1.8x (causal) slower than the untied kernels on the same inputs
(``benchmarks/gpu/results/h200_tied.json``), because each packed tile costs several
CUDA-core operations per element where the Kronecker tile costs one.

Without CUDA the same kernels run under ``TRITON_INTERPRET=1`` (set before the first call), in fp32.

Layout: one folder per fused op, each with its Triton ``kernels``, its launchers and
``autograd.Function`` (``autograd``) and a plain-torch twin with the same interface
(``naive``): :mod:`.state` (M = 1, 2, the Khatri-Rao state; ``steps`` for sequence
parallelism), :mod:`.tied` (tied M = 2, the symmetric state) and :mod:`.quadratic` (any M,
FlashAttention-style tiles). Shared by all: :mod:`.config` (block sizes, chunk and split
plans), :mod:`.dtypes` and :mod:`.split` (any width as sums of parts). The modules that define
kernels import Triton; they are imported on first use, so that this package, the configuration
and the naive twins import without it.
"""

from __future__ import annotations

import os

import torch

from hla_analysis._checks import check_hla_signs, check_output
from hla_analysis.ops.triton.config import KernelConfig, default_config
from hla_analysis.ops.triton.dtypes import narrowed, work_dtype

__all__ = ["supports", "hla_triton", "default_config", "KernelConfig", "factors_tied", "TIED_BY_DEFAULT"]

# Whether ``tied=None`` detects tied factors and takes the symmetric-state kernels. Off: they
# are correct but were measured slower than the untied kernels (see the module docstring).
TIED_BY_DEFAULT = False

_WIDTHS = (16, 32, 64, 128)
_VALUE_WIDTHS = (16, 32, 64, 128)
_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def supports(qs, ks, v, *, causal, key_padding_mask) -> bool:
    """Whether :func:`hla_triton` can run these inputs.

    True for M in {1, 2} factor pairs, factor widths 1..256 (M = 2) or 1..4096 (M = 1; 16, 32,
    64 and 128 run as they are, other widths as exact sums of parts, :mod:`.split`), value width in
    {16, 32, 64, 128}, one floating dtype among fp16/bf16/fp32, and CUDA tensors (or the
    Triton interpreter). ``causal`` needs as many queries as keys.

    Examples
    --------
    >>> q = torch.rand(2, 10, 16)
    >>> supports([q, q], [q, q], torch.rand(2, 10, 32), causal=False, key_padding_mask=None) == _interpreting()
    True
    >>> supports([q, q, q], [q, q, q], torch.rand(2, 10, 32), causal=False, key_padding_mask=None)
    False
    >>> (supports([q[..., :5]], [q[..., :5]], torch.rand(2, 10, 32), causal=False, key_padding_mask=None)
    ...  == _interpreting())
    True
    """
    from hla_analysis.ops.triton import split  # imports Triton

    qs, ks = list(qs), list(ks)
    if len(qs) not in (1, 2) or len(ks) != len(qs):
        return False
    tensors = [*qs, *ks, v]
    if any(not isinstance(t, torch.Tensor) for t in tensors):
        return False
    if not all(t.is_cuda or _interpreting() for t in tensors):
        return False
    if v.dtype not in _DTYPES or any(t.dtype != v.dtype for t in tensors):
        return False
    if v.shape[-1] not in _VALUE_WIDTHS or any(t.dim() < 2 for t in tensors):
        return False
    widest = split.MAX_WIDTH if len(qs) == 2 else split.MAX_FEATURES
    for q, k in zip(qs, ks):
        if q.shape[-1] != k.shape[-1] or not 1 <= q.shape[-1] <= widest:
            return False
    n_q, n_k = qs[0].shape[-2], ks[0].shape[-2]
    if any(q.shape[-2] != n_q for q in qs) or any(k.shape[-2] != n_k for k in ks) or v.shape[-2] != n_k:
        return False
    if n_q != n_k:  # the kernels index queries and keys by one token axis
        return False
    if key_padding_mask is not None and key_padding_mask.shape[-1] != n_k:
        return False
    try:
        _lead_shape(tensors)
    except RuntimeError:
        return False
    return True


def _lead_shape(tensors) -> torch.Size:
    """The broadcast leading shape (all but the last two dims); equal shapes skip the
    general rule, which costs tens of microseconds per call."""
    shapes = {t.shape[:-2] for t in tensors}
    return shapes.pop() if len(shapes) == 1 else torch.broadcast_shapes(*shapes)


def factors_tied(qs, ks) -> bool:
    """Whether two factor pairs are tied: the same tensors, or equal ones (``torch.equal``).

    Examples
    --------
    >>> q, k = torch.rand(5, 16), torch.rand(5, 16)
    >>> factors_tied([q, q], [k, k]), factors_tied([q, q.clone()], [k, k]), factors_tied([q, k], [k, k])
    (True, True, False)
    """
    qs, ks = list(qs), list(ks)
    if len(qs) != 2 or len(ks) != 2:
        return False

    def same(a, b):
        return a is b or (a.shape == b.shape and a.dtype == b.dtype and a.device == b.device and torch.equal(a, b))

    return same(qs[0], qs[1]) and same(ks[0], ks[1])


def hla_triton(qs, ks, v, *, causal=False, key_padding_mask=None, allow_signed=False, chunk_size=None, config=None,
               tied=None, _validated=False, _signs=False):
    """HLA output with the fused Triton kernels (differentiable).

    Parameters
    ----------
    qs, ks : sequence of 1 or 2 tensors ``[..., N, r_m]``
        Feature-mapped query and key factors (widths 16, 32, 64 or 128).
    v : Tensor ``[..., N, dv]``
        Values, ``dv`` in {16, 32, 64, 128}.
    causal : bool
        Row ``i`` attends to keys ``j <= i`` (chunked: quadratic inside a chunk, state across).
    key_padding_mask : bool Tensor ``[..., N]``, optional
        True for real keys; padded keys get zero weight and zero gradient.
    allow_signed : bool
        Return the signed result instead of raising on a non-positive normaliser.
    chunk_size : int, optional
        Causal chunk length (a multiple of 128 on CUDA); default picked from the state size.
    config : dict, optional
        Block-size overrides, for benchmarking (:class:`KernelConfig` keys; unknown keys and
        out-of-range values are refused).
    tied : bool, optional
        Symmetric-state kernels for tied factors (M = 2, ``qs[0] == qs[1]`` and
        ``ks[0] == ks[1]``, by identity, else ``torch.equal``). ``True`` takes them (and
        raises on untied factors), ``False`` never does; ``None`` detects tied factors when
        ``TIED_BY_DEFAULT`` is set (it is not: the untied kernels were faster on an H200).

    Returns
    -------
    Tensor ``[..., N, dv]`` in ``v.dtype``. fp16 inputs are computed in bf16 (the state
    sums ``N`` terms and would overflow fp16); accumulation is fp32 throughout.

    Raises
    ------
    ValueError
        Unsupported inputs (see :func:`supports`), rows whose normaliser is zero or
        negative (unless ``allow_signed``), or an output that overflowed to Inf/NaN. Inside a
        :func:`hla_analysis._checks.check_batch` these checks join the batch's one sync.

    Examples
    --------
    >>> import os
    >>> if os.environ.get("TRITON_INTERPRET") == "1":
    ...     g = torch.Generator().manual_seed(0)
    ...     q1, q2, k1, k2 = (torch.rand(1, 1, 20, 16, generator=g) for _ in range(4))
    ...     v = torch.randn(1, 1, 20, 16, generator=g)
    ...     out = hla_triton([q1, q2], [k1, k2], v, causal=True)
    ...     from hla_analysis.ops import hla_attention_output
    ...     ref = hla_attention_output([q1, q2], [k1, k2], v, causal=True)
    ...     print(torch.allclose(out, ref, atol=1e-5, rtol=1e-4))
    ... else:
    ...     print(True)
    True
    """
    from hla_analysis.ops.triton import split  # the kernels' modules import Triton
    from hla_analysis.ops.triton.state.autograd import HLAFunction, forward_states, widened
    from hla_analysis.ops.triton.tied.autograd import TiedHLAFunction, tied_config

    qs, ks = list(qs), list(ks)
    # _validated: hla() has already asked supports() for these inputs (host time per call).
    # _signs: hla() asks for the sign certificate of its factors (odd pairs present, not
    # allow_signed); the untied kernels flag it on chip, the other paths check it in torch.
    if not _validated and not supports(qs, ks, v, causal=causal, key_padding_mask=key_padding_mask):
        raise ValueError(
            f"hla_triton does not support these inputs (M={len(qs)}, widths {[q.shape[-1] for q in qs]}, "
            f"dv={v.shape[-1]}, dtype {v.dtype}, device {v.device}): it needs M in {{1, 2}}, widths in "
            f"{_WIDTHS}, dv in {_VALUE_WIDTHS}, one dtype among fp16/bf16/fp32, equal query and key "
            "counts, and CUDA tensors (or TRITON_INTERPRET=1). Use hla(..., backend='torch')."
        )
    want_tied = TIED_BY_DEFAULT if tied is None else bool(tied)
    splitting = split.needs_split(qs)
    use_tied = want_tied and not splitting and factors_tied(qs, ks)
    if tied and not use_tied:
        if splitting:
            raise ValueError(f"tied=True needs factor widths in {_WIDTHS}, got {[q.shape[-1] for q in qs]}; "
                             "leave tied=None (other widths run as sums of untied parts).")
        raise ValueError("tied=True needs M = 2 with qs[0] equal to qs[1] and ks[0] equal to ks[1]; "
                         "leave tied=None to detect it.")
    if _signs and (splitting or use_tied) and not allow_signed:
        check_hla_signs(qs, ks, allow_signed=allow_signed)
    if splitting:
        if config:
            default_config(r1=16, r2=16, dv=16, causal=causal, dtype=v.dtype).replace(**config)  # checks it
        return _split_call(qs, ks, v, causal=causal, key_padding_mask=key_padding_mask,
                           allow_signed=allow_signed, config=config)
    if use_tied:
        # equal but distinct tensors: by symmetry each factor gets half the tied gradient
        qs = [qs[0] if qs[0] is qs[1] else 0.5 * (qs[0] + qs[1])]
        ks = [ks[0] if ks[0] is ks[1] else 0.5 * (ks[0] + ks[1])]
    if key_padding_mask is not None:
        if key_padding_mask.dtype != torch.bool:
            raise ValueError(f"key_padding_mask must be bool (True = real token), got {key_padding_mask.dtype}.")
        # a zero first key factor removes the key from the state, the normaliser and the
        # intra-chunk tiles; autograd through the product zeroes its gradient too
        ks = [ks[0] * key_padding_mask[..., None].to(ks[0].dtype), *ks[1:]]
    out_dtype = v.dtype
    work = work_dtype(v.dtype)
    lead = _lead_shape([*qs, *ks, v])
    n = v.shape[-2]

    def flat(t):
        t = t.to(work)
        if t.shape[:-2] != lead:
            t = t.expand(*lead, *t.shape[-2:])
        t = t.reshape(-1, n, t.shape[-1])
        return t if t.is_contiguous() else t.contiguous()

    q1, k1 = flat(qs[0]), flat(ks[0])
    q2, k2 = (flat(qs[1]), flat(ks[1])) if len(qs) == 2 else (None, None)
    if not use_tied:  # a 32-wide factor where the GPU kernels fail at 32: exact zero padding to 64
        q1, q2, k1, k2 = widened(q1, q2, k1, k2, causal=causal, dv=v.shape[-1])
    r2 = q1.shape[-1] if use_tied else (1 if q2 is None else q2.shape[-1])
    cfg = default_config(r1=q1.shape[-1], r2=r2, dv=v.shape[-1], causal=causal, dtype=work, tied=use_tied)
    if chunk_size is not None:
        cfg = cfg.replace(CHUNK=int(chunk_size))
    if config:
        cfg = cfg.replace(**config)
    if causal and cfg["CHUNK"] % max(cfg["APPLY_BLOCK_M"], cfg["GRAD_BLOCK_M"], cfg["BLOCK_N"]) != 0:
        raise ValueError(
            f"chunk_size={cfg['CHUNK']} must be a multiple of the row blocks "
            f"({cfg['APPLY_BLOCK_M']}, {cfg['GRAD_BLOCK_M']}, {cfg['BLOCK_N']})."
        )
    if use_tied:
        cfg = tied_config(cfg, q1.shape[-1])
        out = TiedHLAFunction.apply(q1, k1, flat(v), bool(causal), bool(allow_signed), cfg)
        check_output(out, allow_signed=allow_signed)  # the untied kernels check it on chip
    else:
        vf = flat(v)
        flat_in = (q1, q2, k1, k2, vf)
        if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in flat_in):
            out = HLAFunction.apply(*flat_in, bool(causal), bool(allow_signed), cfg, bool(_signs))
        else:  # no autograd node (and nothing saved for a backward) under no_grad or for constants
            out, _ = forward_states(*flat_in, causal=bool(causal), allow_signed=bool(allow_signed),
                                    signs=bool(_signs), cfg=cfg)
    return narrowed(out.reshape(*lead, n, v.shape[-1]), out_dtype)


def _split_call(qs, ks, v, *, causal, key_padding_mask, allow_signed, config):
    """Widths outside the kernels' set: exact sum of parts (:mod:`.split`), divided once."""
    from hla_analysis.ops.triton import split

    if key_padding_mask is not None:
        if key_padding_mask.dtype != torch.bool:
            raise ValueError(f"key_padding_mask must be bool (True = real token), got {key_padding_mask.dtype}.")
        masked = ks[0] * key_padding_mask[..., None].to(ks[0].dtype)
        # tied keys stay one object (a 0/1 mask squared is the mask)
        ks = [masked if k is ks[0] else k for k in ks]
    out_dtype = v.dtype
    work = work_dtype(v.dtype)
    lead = _lead_shape([*qs, *ks, v])
    n = v.shape[-2]
    cache = {}

    def flatten(t):
        f = t.to(work).expand(*lead, *t.shape[-2:])
        return f.reshape(-1, n, f.shape[-1])

    def flat(t):  # tied factors stay one object, so their cross terms are run once
        if id(t) not in cache:
            cache[id(t)] = flatten(t)
            split.flat_blocks(t, cache[id(t)], flatten)  # e.g. phi=affine's x block, not a strided copy
        return cache[id(t)]

    fq, fk = [flat(q) for q in qs], [flat(k) for k in ks]
    # the last part's apply adds the other parts, divides and flags each row (normaliser, output)
    out = split.split_output(fq, fk, flat(v).contiguous(), causal=causal, allow_signed=allow_signed, config=config)
    return narrowed(out, out_dtype).reshape(*lead, n, v.shape[-1])
