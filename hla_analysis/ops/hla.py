"""Efficient HLA: O(N) in tokens, never materializing the N x N map.

Notation (../MISSION.md, "Efficient form"): the state is
``S = sum_j k_j^(1) (x) ... (x) k_j^(M) (x) [v_j, 1]``. Appending a ones column to ``v``
carries the normalizer ``z`` in the same state, so numerator and denominator come out
of one contraction. Factors are contracted one at a time:

* *modulate*: the token-wise outer product of key factors ``2..M`` with the values;
* *demodulate*: contracting query factors ``2..M`` back out, one mode at a time.

Factor 1 is the only one contracted over tokens (a matmul), so no ``prod_m r_m`` Kronecker
vector is ever built for a query. All forms below compute the same function; the tests
prove it against :func:`hla_analysis.ops.reference.hla_attention_map`.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from hla_analysis._checks import (
    _active_or_none,
    _odd_pairs,
    as_factors,
    broadcast_leading,
    check_batch,
    check_factor_lists,
    check_finite,
    check_hla_signs,
    check_mask_leading_dims,
    check_normalizers,
    check_output,
    check_padding_mask,
    check_stacked_against_values,
    check_values,
    require_finite,
    signs_certified,
)
from hla_analysis.ops.tied import is_tied, symmetric_power_features

FORMS = ("auto", "contract", "recurrent", "chunked", "value_modulation", "tied", "quadratic")
BACKENDS = ("auto", "torch", "triton")


def _modulate(factors: Sequence[Tensor], values: Tensor) -> Tensor:
    """Token-wise ``f_1 (x) ... (x) f_K (x) values``, flattened: ``[..., n, r_1*...*r_K*e]``."""
    out = values
    for f in reversed(factors):
        out = (f.unsqueeze(-1) * out.unsqueeze(-2)).flatten(-2)
    return out


def _demodulate(factors: Sequence[Tensor], mixed: Tensor) -> Tensor:
    """Contract ``[..., n, r_1*...*r_K*e]`` with query factors ``f_1..f_K`` mode by mode -> ``[..., n, e]``."""
    out = mixed
    for f in factors:
        out = out.unflatten(-1, (f.shape[-1], -1))
        out = torch.einsum("...nr,...nre->...ne", f, out)
    return out


def _key_state(ks: Sequence[Tensor], values: Tensor) -> Tensor:
    """``sum_j k1_j (x) ... (x) kM_j (x) values_j`` as ``[..., r_1, r_2*...*r_M*e]``."""
    return ks[0].transpose(-1, -2) @ _modulate(ks[1:], values)


def _query_apply(qs: Sequence[Tensor], state: Tensor) -> Tensor:
    return _demodulate(qs[1:], qs[0] @ state)


def _blocks(n: int, size: int):
    for start in range(0, n, size):
        yield slice(start, min(start + size, n))


def _contract(qs, ks, values, *, block: int) -> Tensor:
    """Non-causal: reduce the state over token blocks, then apply it to query blocks."""
    state = None
    for sl in _blocks(ks[0].shape[-2], block):
        part = _key_state([k[..., sl, :] for k in ks], values[..., sl, :])
        state = part if state is None else state + part
    return torch.cat([_query_apply([q[..., sl, :] for q in qs], state) for sl in _blocks(qs[0].shape[-2], block)], -2)


def _recurrent(qs, ks, values, *, causal: bool, initial_state: Tensor | None = None) -> Tensor:
    """Token by token: ``S_t = S_{t-1} + k_t (x) v_t``; causal rows read the state after their token.

    ``initial_state`` (layout of :func:`_key_state`): ``S_0``, the state of keys before this sequence.
    """
    state, outs = initial_state, []
    for t in range(ks[0].shape[-2]):
        sl = slice(t, t + 1)
        part = _key_state([k[..., sl, :] for k in ks], values[..., sl, :])
        state = part if state is None else state + part
        if causal:
            outs.append(_query_apply([q[..., sl, :] for q in qs], state))
    return torch.cat(outs, -2) if causal else _query_apply(qs, state)


def _chunked(qs, ks, values, *, chunk: int, initial_state: Tensor | None = None) -> Tensor:
    """Causal chunks: quadratic (Hadamard of factor tiles) inside a chunk, the state across chunks.

    ``initial_state`` (layout of :func:`_key_state`): the state of keys before this sequence.
    """
    state, outs = initial_state, []
    for sl in _blocks(ks[0].shape[-2], chunk):
        qc = [q[..., sl, :] for q in qs]
        kc = [k[..., sl, :] for k in ks]
        vc = values[..., sl, :]
        tile = qc[0] @ kc[0].transpose(-1, -2)
        for fq, fk in zip(qc[1:], kc[1:]):
            tile = tile * (fq @ fk.transpose(-1, -2))
        out = tile.tril() @ vc
        if state is not None:
            out = out + _query_apply(qc, state)
        outs.append(out)
        part = _key_state(kc, vc)
        state = part if state is None else state + part
    return torch.cat(outs, -2)


def _value_modulation(qs, ks, values, *, causal: bool, chunk: int) -> Tensor:
    """``(S1 (.) S2 ...) V = sum_r diag(Q2[:, r]) S1 diag(K2[:, r]) V``, all r at once.

    Factors 2..M are folded into the values (one modulated value set per index r), factor 1
    runs as plain linear attention over them, and the query factors are contracted back out.
    """
    modulated = _modulate(ks[1:], values)
    if causal:
        mixed = _chunked(qs[:1], ks[:1], modulated, chunk=chunk)
    else:
        mixed = qs[0] @ (ks[0].transpose(-1, -2) @ modulated)
    return _demodulate(qs[1:], mixed)


def _tied(q: Tensor, k: Tensor, m: int, values, *, causal: bool, chunk: int, block: int) -> Tensor:
    """``(q.k)^M`` through the symmetric state of C(r+M-1, M) entries instead of r^M."""
    fq, fk = symmetric_power_features(q, m), symmetric_power_features(k, m)
    return _chunked([fq], [fk], values, chunk=chunk) if causal else _contract([fq], [fk], values, block=block)


def _resolve_form(form: str, *, causal: bool, tied: bool, num_factors: int) -> str:
    if form not in FORMS:
        raise ValueError(f"unknown form {form!r}; choose one of {', '.join(FORMS)}.")
    if form == "auto":
        if tied and num_factors > 1:
            return "tied"
        return "chunked" if causal else "contract"
    return form


def hla(
    qs: Tensor | Sequence[Tensor],
    ks: Tensor | Sequence[Tensor],
    v: Tensor,
    *,
    causal: bool = False,
    key_padding_mask: Tensor | None = None,
    form: str = "auto",
    chunk_size: int = 64,
    allow_signed: bool = False,
    backend: str = "auto",
) -> Tensor:
    """Hadamard Linear Attention output ``o_i = sum_j a_ij v_j`` in O(N) time and memory.

    ``a_ij = prod_m s^(m)_ij / sum_l prod_m s^(m)_il`` with ``s^(m) = qs[m] @ ks[m]^T``
    (``l <= i`` when causal). Features are used as given: apply feature maps first.

    Parameters
    ----------
    qs, ks : sequence of Tensor or Tensor
        ``M`` tensors ``[..., N, r_m]`` (widths may differ per factor) or one stacked
        ``[..., M, N, r]``. Leading dims broadcast with ``v``'s. A bare tensor is always
        read as stacked factors (dim -3 is M): for one factor pass ``[q]``.
    v : Tensor
        Values ``[..., N, dv]``.
    causal : bool
        Row ``i`` attends to ``j <= i`` (needs as many queries as keys).
    key_padding_mask : Tensor, optional
        Bool ``[..., N]``, True for real tokens. Padded keys get zero weight.
    form : str
        ``"contract"`` (non-causal state, factor by factor), ``"recurrent"`` (token by token),
        ``"chunked"`` (quadratic inside chunks, state across), ``"value_modulation"``
        (factors 2..M folded into the values), ``"tied"`` (symmetric state, needs all query
        factors equal and all key factors equal) or ``"auto"`` (tied when the factors are
        tied, else chunked if causal, else contract; on CUDA the cheaper of that state path and
        the quadratic kernel by the cost model) or ``"quadratic"`` (exact FlashAttention-style
        tiles, any M; :mod:`hla_analysis.ops.quadratic_dispatch` records each choice).
    chunk_size : int
        Tokens per chunk (chunked forms) or per block (state reduction).
    allow_signed : bool
        Sign-indefinite features can give negative weights and a zero or negative
        normalizer. By default both raise a ``ValueError``: a non-positive normalizer with
        the number of rows affected, and features that may give negative weights (an odd
        number of factor pairs with a negative feature; tied pairs multiply to squares)
        since this O(N) form never sees single weights. With ``allow_signed=True`` the
        signed ratio is returned as is; a zero normalizer then yields Inf/NaN in its row.
    backend : str
        ``"torch"``, ``"triton"`` (fused GPU kernels, M <= 2) or ``"auto"`` (Triton when it
        supports the inputs, else torch).

    Returns
    -------
    Tensor
        ``[..., N, dv]`` in the dtype of ``v`` (accumulated in at least float32).

    Raises
    ------
    ValueError
        Mismatched shapes, dtypes or factor counts, empty sequences or features, NaN/Inf
        inputs, a mask that does not fit the inputs or leaves a row with no key, an output
        that overflows to Inf, or (unless ``allow_signed``) a non-positive normalizer or
        features that may give negative weights. Value checks cost one host sync per call.

    Examples
    --------
    >>> g = torch.Generator().manual_seed(0)
    >>> q1, k1 = torch.rand(2, 5, 4, generator=g), torch.rand(2, 5, 4, generator=g)
    >>> q2, k2 = torch.rand(2, 5, 3, generator=g), torch.rand(2, 5, 3, generator=g)
    >>> v = torch.randn(2, 5, 8, generator=g)
    >>> out = hla([q1, q2], [k1, k2], v, causal=True)
    >>> out.shape
    torch.Size([2, 5, 8])
    >>> from hla_analysis.ops import hla_attention_output
    >>> torch.allclose(out, hla_attention_output([q1, q2], [k1, k2], v, causal=True), atol=1e-6)
    True
    """
    with check_batch():
        return _hla_checked(
            qs, ks, v, causal=causal, key_padding_mask=key_padding_mask, form=form,
            chunk_size=chunk_size, allow_signed=allow_signed, backend=backend,
        )


# -- per-shape verdicts: repeated calls skip the Python-side validation ------------------------
# Shape, dtype, device and option checks, and the dispatch decision, depend only on the key of
# :func:`_verdict_key`, so a call whose key was seen before skips them (tens of microseconds of
# host time before the first kernel launch, which a checked call cannot hide behind the
# previous call's kernels). Value checks (NaN/Inf, normalisers, outputs, signs, masks that
# leave a row empty) still run on every call. ``clear_verdicts()`` empties the cache (tests that
# patch the dispatcher's cost model call it).

_VERDICTS: dict = {}
_MAX_VERDICTS = 256


@dataclass(frozen=True)
class _Verdict:
    path: object  # quadratic_dispatch.Dispatch
    triton: bool  # the state path runs the fused kernels
    signs: bool  # some factor pair occurs an odd number of times: its signs need a certificate
    symmetric: bool = False  # tied M >= 3 on the M = 1 kernels, through symmetric power features


def clear_verdicts() -> None:
    """Forget every cached shape/dispatch verdict of :func:`hla`."""
    _VERDICTS.clear()


def _describe(x):
    if isinstance(x, torch.Tensor):
        return (x.shape, x.dtype, x.device)
    return None


def _verdict_key(qs, ks, v, key_padding_mask, options):
    """Everything the shape checks and the dispatcher read, or None when not cacheable."""
    if not isinstance(v, torch.Tensor):
        return None
    if key_padding_mask is not None and not isinstance(key_padding_mask, torch.Tensor):
        return None
    parts = []
    for factors in (qs, ks):
        if isinstance(factors, torch.Tensor):
            parts.append(("stacked", factors.shape, factors.dtype, factors.device))
        elif isinstance(factors, (list, tuple)) and factors and all(isinstance(f, torch.Tensor) for f in factors):
            parts.append(tuple(_describe(f) for f in factors))
        else:
            return None
    tensors = [*(qs if isinstance(qs, (list, tuple)) else [qs]), *(ks if isinstance(ks, (list, tuple)) else [ks]), v]
    ids = [id(t) for t in tensors]
    identity = tuple(ids.index(i) for i in ids)  # tied factors (the same objects) dispatch differently
    grad = torch.is_grad_enabled() and any(t.requires_grad for t in tensors)
    mask = None if key_padding_mask is None else _describe(key_padding_mask)
    return (*parts, _describe(v), mask, identity, grad, options, os.environ.get("TRITON_INTERPRET"))


def _input_diagnosis(qs, ks, v):
    """The NaN/Inf diagnosis of every input, registered with the call's batch (no device work):
    NaN/Inf in any input reaches the normaliser or the output flags, which fail first."""
    def diagnose():
        seen = set()
        for m, (fq, fk) in enumerate(zip(qs, ks)):
            if (id(fq), id(fk)) not in seen:
                seen.add((id(fq), id(fk)))
                check_finite(f"qs[{m}]", fq)
                check_finite(f"ks[{m}]", fk)
        check_finite("v", v)

    batch, skip = _active_or_none()
    if batch is not None and not skip:
        batch.add(None, diagnose)


def _masked_keys(ks, key_padding_mask: Tensor) -> list[Tensor]:
    """Key factors with the padded keys' features set to zero (tied factors stay one object).

    A padded key then has zero weight in every form, and its features can neither fail the
    sign certificate nor overflow a product (``where``, not a multiplication: 0 * inf is NaN).
    """
    keep = key_padding_mask[..., None]
    masked: dict[int, Tensor] = {}
    for m, k in enumerate(ks):
        if id(k) not in masked:
            # zeroing hides a NaN/Inf in a padded key from the normaliser and output flags, and a
            # bad input is refused wherever it is (as a padded value is): a flag of its own
            require_finite(f"ks[{m}]", k)
            masked[id(k)] = torch.where(keep, k, torch.zeros((), dtype=k.dtype, device=k.device))
    return [masked[id(k)] for k in ks]


def _hla_checked(qs, ks, v, *, causal, key_padding_mask, form, chunk_size, allow_signed, backend) -> Tensor:
    """:func:`hla` inside a :class:`~hla_analysis._checks.CheckBatch`: value checks are flags.

    NaN/Inf in qs, ks or v always reach the normaliser or the output (IEEE products and
    sums keep them, also against the zeroed values of padded keys), so those inputs get no
    flag of their own: the normaliser and output flags catch them, and only then does the
    detailed diagnosis name the input.
    """
    from hla_analysis.ops import quadratic_dispatch

    key = _verdict_key(qs, ks, v, key_padding_mask, (causal, form, chunk_size, allow_signed, backend))
    try:
        verdict = None if key is None else _VERDICTS.get(key)
    except TypeError:  # an unhashable option (refused below with its own message)
        key = verdict = None
    if verdict is not None:
        qs, ks = as_factors(qs, "qs"), as_factors(ks, "ks")
        _input_diagnosis(qs, ks, v)
        if key_padding_mask is not None:
            check_padding_mask(key_padding_mask, ks[0].shape[-2], causal=causal)  # a value check
        path = quadratic_dispatch._record(verdict.path)
    else:
        if isinstance(v, torch.Tensor):
            check_stacked_against_values(qs, v)
        qs, ks = as_factors(qs, "qs"), as_factors(ks, "ks")
        check_factor_lists(qs, ks, propagates=True)
        n_queries, n_keys = qs[0].shape[-2], ks[0].shape[-2]
        check_values(v, n_keys, propagates=True)
        broadcast_leading({"qs[0]": qs[0], "ks[0]": ks[0], "v": v})
        if causal and n_queries != n_keys:
            raise ValueError(f"causal HLA needs as many queries as keys, got {n_queries} and {n_keys}.")
        if not isinstance(chunk_size, int) or isinstance(chunk_size, bool) or chunk_size < 1:
            raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}.")
        for name, flag in (("causal", causal), ("allow_signed", allow_signed)):
            if not isinstance(flag, bool):
                raise ValueError(f"{name} must be True or False, got {flag!r}.")
        dtypes = {t.dtype for t in (*qs, *ks, v)}
        if len(dtypes) > 1:
            names = ", ".join(sorted(str(d).replace("torch.", "") for d in dtypes))
            raise ValueError(f"qs, ks and v must share one dtype, got {names}; cast them to one (e.g. .to(v.dtype)).")
        if backend not in BACKENDS:
            raise ValueError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}.")
        if form not in FORMS:
            raise ValueError(f"unknown form {form!r}; choose one of {', '.join(FORMS)}.")
        if key_padding_mask is not None:
            check_mask_leading_dims(key_padding_mask, *qs, *ks, v)
            check_padding_mask(key_padding_mask, n_keys, causal=causal)
        path = quadratic_dispatch.choose(qs, ks, v, causal=causal, form=form, backend=backend)
        triton = symmetric = False
        if path.path == "state" and backend != "torch":
            from hla_analysis.ops import triton_backend

            # the cost model already asked the kernels (one supports() per call, not two)
            known = path.engine == "triton" and path.reason == "cost model" and len(qs) <= 2
            triton = known or triton_backend.usable(qs, ks, v, causal=causal, key_padding_mask=key_padding_mask,
                                                    explicit=backend == "triton")
            symmetric = not triton and triton_backend.usable_symmetric(
                qs, ks, v, causal=causal, key_padding_mask=key_padding_mask, explicit=backend == "triton")
            if not triton and not symmetric and backend == "triton":
                raise ValueError(triton_backend.why_not(qs, ks, v, causal=causal, key_padding_mask=key_padding_mask))
        verdict = _Verdict(path, triton, bool(_odd_pairs(qs, ks)), symmetric)
        if key is not None:
            if len(_VERDICTS) >= _MAX_VERDICTS:
                _VERDICTS.clear()
            _VERDICTS[key] = verdict

    if key_padding_mask is not None:
        ks = _masked_keys(ks, key_padding_mask)
    if any(t.numel() == 0 for t in (*qs, *ks, v)):  # a zero-size batch dimension: nothing to compute
        lead = torch.broadcast_shapes(*(t.shape[:-2] for t in (*qs, *ks, v)))
        return v.new_zeros(*lead, qs[0].shape[-2], v.shape[-1]) + 0 * v.sum()
    if path.path == "quadratic":
        return quadratic_dispatch.run(path, qs, ks, v, causal=causal, key_padding_mask=key_padding_mask,
                                      allow_signed=allow_signed)
    if verdict.triton:
        from hla_analysis.ops import triton_backend

        # the kernels flag normalisers, outputs and (signs) the features' signs per row; the
        # flags join this call's batch: one amin, read with the call's one sync
        return triton_backend.run(qs, ks, v, causal=causal, key_padding_mask=key_padding_mask,
                                  allow_signed=allow_signed,
                                  signs=verdict.signs and not allow_signed and not signs_certified())

    if verdict.symmetric:
        from hla_analysis.ops import triton_backend

        out = triton_backend.run_symmetric(qs, ks, v, causal=causal, key_padding_mask=key_padding_mask,
                                           allow_signed=allow_signed)
        check_hla_signs(qs, ks, allow_signed=allow_signed)  # the features are signed by design
        return out

    tied = form in ("auto", "tied") and is_tied(qs, ks)
    form = _resolve_form(form, causal=causal, tied=tied, num_factors=len(qs))
    if form == "tied" and not tied:
        raise ValueError("form='tied' needs all query factors equal and all key factors equal; use form='auto'.")
    signs = (qs, ks)  # before the casts below, which would break tied factors' identity
    work = torch.promote_types(v.dtype, torch.float32)
    qs = [q.to(work) for q in qs]
    ks = [k.to(work) for k in ks]
    values = torch.cat([v.to(work), torch.ones_like(v[..., :1], dtype=work)], -1)
    if key_padding_mask is not None:
        values = values * key_padding_mask[..., None].to(work)

    if form == "contract":
        if causal:
            raise ValueError("form='contract' is the non-causal form; use form='chunked' or 'recurrent' for causal.")
        out = _contract(qs, ks, values, block=max(chunk_size, 256))
    elif form == "recurrent":
        out = _recurrent(qs, ks, values, causal=causal)
    elif form == "chunked":
        out = _chunked(qs, ks, values, chunk=chunk_size) if causal else _contract(qs, ks, values, block=chunk_size)
    elif form == "value_modulation":
        out = _value_modulation(qs, ks, values, causal=causal, chunk=chunk_size)
    else:
        out = _tied(qs[0], ks[0], len(qs), values, causal=causal, chunk=chunk_size, block=max(chunk_size, 256))

    num, den = out[..., :-1], out[..., -1:]
    check_normalizers(den, allow_signed=allow_signed)
    check_hla_signs(*signs, allow_signed=allow_signed)
    result = (num / den).to(v.dtype)
    check_output(result, den, allow_signed=allow_signed)
    return result


def linear_attention(
    fq: Tensor,
    fk: Tensor,
    v: Tensor,
    *,
    causal: bool = False,
    key_padding_mask: Tensor | None = None,
    allow_signed: bool = False,
    chunk_size: int = 64,
) -> Tensor:
    """Kernel linear attention ``o_i = sum_j (fq_i.fk_j) v_j / sum_l fq_i.fk_l`` in O(N).

    The M = 1 case of :func:`hla`; ``fq``, ``fk`` are features ``[..., N, r]`` (apply the
    feature map first), ``v`` is ``[..., N, dv]``.

    Examples
    --------
    >>> fq = torch.ones(3, 2); fk = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    >>> v = torch.tensor([[1.0], [2.0], [4.0]])
    >>> linear_attention(fq, fk, v, causal=True)
    tensor([[1.0000],
            [1.5000],
            [2.7500]])
    """
    return hla(
        [fq], [fk], v, causal=causal, key_padding_mask=key_padding_mask,
        allow_signed=allow_signed, chunk_size=chunk_size,
    )
