"""Materialized attention maps: the plain, readable ground truth for every other form.

Each function builds the full ``[..., Nq, Nk]`` row-normalised map from its definition
(../MISSION "Definitions"). They cost O(N^2) memory and exist to be obviously right.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from hla_analysis._checks import (
    allowed_keys,
    as_factors,
    check_batch,
    check_factor_lists,
    check_mask_leading_dims,
    check_nonnegative_weights,
    check_normalizers,
    check_output,
    check_pair,
    check_scale,
    check_values,
    defer_check,
)


def softmax_attention_map(q: Tensor, k: Tensor, *, scale: float | None = None, causal: bool = False,
                          key_padding_mask: Tensor | None = None, query_offset: int | Tensor = 0) -> Tensor:
    """Row-normalised softmax attention map ``softmax(scale * q k^T)``.

    Parameters
    ----------
    q, k : Tensor
        ``[..., Nq, d]`` and ``[..., Nk, d]``; leading dims broadcast.
    scale : float, optional
        Logit scale; default ``1 / sqrt(d)``.
    causal : bool
        Query ``i`` attends to keys ``j <= query_offset + i``.
    key_padding_mask : Tensor, optional
        Bool ``[..., Nk]``; True marks real tokens, False padding.
    query_offset : int or Tensor
        Global index of the first query row, to evaluate a causal map in row blocks; or a 1-D
        integer tensor of every query row's position (rows need not be contiguous).

    Returns
    -------
    Tensor
        ``[..., Nq, Nk]``; every row sums to one, masked entries are exactly zero.

    Raises
    ------
    ValueError
        Mismatched widths, empty sequences, NaN/Inf, or a mask that leaves a row empty.

    Examples
    --------
    >>> q = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    >>> softmax_attention_map(q, q, scale=1.0, causal=True)
    tensor([[1.0000, 0.0000],
            [0.2689, 0.7311]])
    """
    check_pair(q, k)
    check_mask_leading_dims(key_padding_mask, q, k)
    scale = check_scale(scale, q.shape[-1])
    scores = (q @ k.transpose(-1, -2)) * scale
    if scores.dtype in (torch.float16, torch.bfloat16):
        scores = scores.float()
    _require_finite_logits(scores)
    allowed = allowed_keys(
        q.shape[-2], k.shape[-2], causal=causal, key_padding_mask=key_padding_mask,
        query_offset=query_offset, device=q.device,
    )
    if allowed is not None:
        scores = scores.masked_fill(~allowed, float("-inf"))
    return torch.softmax(scores, dim=-1).to(q.dtype)


def _require_finite_logits(scores: Tensor) -> None:
    """Refuse logits that overflowed, with the active check batch's one host read if there is one.

    Only a 0-d count outlives this call (the batch may resolve much later, as in a fit's block).
    """
    bad = torch.isfinite(scores).logical_not_().sum()

    def refuse() -> None:
        count = int(bad)
        if count:
            raise ValueError(f"{count} logit(s) scale*q.k overflowed to Inf/NaN; "
                             "rescale q and k (or compute in float64).")

    defer_check(lambda: bad == 0, refuse)


def hla_attention_map(qs: Tensor | Sequence[Tensor], ks: Tensor | Sequence[Tensor], *, causal: bool = False,
                      key_padding_mask: Tensor | None = None, query_offset: int = 0,
                      allow_signed: bool = False) -> Tensor:
    """Materialized HLA map ``a_ij = prod_m s^(m)_ij / sum_l prod_m s^(m)_il``.

    ``s^(m) = qs[m] @ ks[m]^T``: features are used as given (apply feature maps first).

    Parameters
    ----------
    qs, ks : sequence of Tensor or Tensor
        ``M`` tensors ``[..., N, r_m]`` (widths may differ between factors) or one stacked
        ``[..., M, N, r]``.
    causal, key_padding_mask, query_offset
        As in :func:`softmax_attention_map`.
    allow_signed : bool
        With sign-indefinite features weights can be negative and a row normalizer zero or
        negative. By default either raises (negative weights also under a positive
        normalizer); with ``allow_signed=True`` the signed ratio is returned as is (a zero
        normalizer then gives Inf/NaN in that row, by the caller's choice).

    Returns
    -------
    Tensor
        ``[..., Nq, Nk]`` with rows summing to one.

    Examples
    --------
    Two tied affine factors ``[1, x/sqrt(2)]`` give ``(1 + q.k/2)^2``:

    >>> x = torch.tensor([[0.0], [2.0]])
    >>> phi = torch.cat([torch.ones(2, 1), x / 2 ** 0.5], dim=-1)
    >>> hla_attention_map([phi, phi], [phi, phi])
    tensor([[0.5000, 0.5000],
            [0.1000, 0.9000]])
    """
    with check_batch():
        weights, den = hla_weights(
            qs, ks, causal=causal, key_padding_mask=key_padding_mask, query_offset=query_offset
        )
        check_normalizers(den, allow_signed=allow_signed)
        check_nonnegative_weights(weights, allow_signed=allow_signed)
        attention = weights / den
        check_output(attention, den, allow_signed=allow_signed, what="attention weight")
        return attention


def hla_weights(qs: Tensor | Sequence[Tensor], ks: Tensor | Sequence[Tensor], *, causal: bool = False,
                key_padding_mask: Tensor | None = None, query_offset: int = 0) -> tuple[Tensor, Tensor]:
    """Unnormalised HLA weights ``prod_m s^(m)_ij`` (masked entries 0) and row normalizers.

    Returns ``(weights [..., Nq, Nk], normalizer [..., Nq, 1])`` without judging the sign of
    the normalizer: callers that count failing rows (the comparison runner) need it raw.
    """
    qs, ks = as_factors(qs, "qs"), as_factors(ks, "ks")
    check_factor_lists(qs, ks)
    check_mask_leading_dims(key_padding_mask, *qs, *ks)
    weights = qs[0] @ ks[0].transpose(-1, -2)
    for fq, fk in zip(qs[1:], ks[1:]):
        weights = weights * (fq @ fk.transpose(-1, -2))
    return masked_row_sums(weights, causal=causal, key_padding_mask=key_padding_mask, query_offset=query_offset)


def masked_row_sums(weights: Tensor, *, causal: bool, key_padding_mask: Tensor | None, query_offset: int,
                    in_place: bool = False) -> tuple[Tensor, Tensor]:
    """Zero the entries of unnormalised weights ``[..., Nq, Nk]`` that a query may not attend to
    (causal, padding) and return ``(weights, row sums [..., Nq, 1])``; the tail of :func:`hla_weights`.

    ``in_place`` masks ``weights`` itself (callers that own it and need no gradient).
    """
    allowed = allowed_keys(weights.shape[-2], weights.shape[-1], causal=causal, key_padding_mask=key_padding_mask,
                           query_offset=query_offset, device=weights.device)
    if allowed is not None:
        weights = weights.masked_fill_(~allowed, 0.0) if in_place else weights.masked_fill(~allowed, 0.0)
    return weights, weights.sum(-1, keepdim=True)


def kernel_attention_map(
    fq: Tensor,
    fk: Tensor,
    *,
    causal: bool = False,
    key_padding_mask: Tensor | None = None,
    query_offset: int = 0,
    allow_signed: bool = False,
) -> Tensor:
    """Materialized kernel linear attention map ``phi(q_i).phi(k_j) / sum_l phi(q_i).phi(k_l)``.

    The M = 1 case of :func:`hla_attention_map`; ``fq``/``fk`` are features ``[..., N, r]``.

    Examples
    --------
    >>> f = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    >>> kernel_attention_map(f, f)
    tensor([[0.5000, 0.5000],
            [0.3333, 0.6667]])
    """
    return hla_attention_map(
        [fq], [fk], causal=causal, key_padding_mask=key_padding_mask,
        query_offset=query_offset, allow_signed=allow_signed,
    )


def _apply(attention: Tensor, v: Tensor, *, allow_signed: bool = False) -> Tensor:
    check_values(v, attention.shape[-1])
    out = attention @ v.to(attention.dtype)
    if not allow_signed:  # signed maps may carry the Inf/NaN rows of zero normalizers
        check_output(out)
    return out


def softmax_attention_output(q: Tensor, k: Tensor, v: Tensor, **kwargs) -> Tensor:
    """``softmax_attention_map(q, k, **kwargs) @ v``: the reference softmax output [..., Nq, dv]."""
    return _apply(softmax_attention_map(q, k, **kwargs), v)


def hla_attention_output(qs, ks, v: Tensor, **kwargs) -> Tensor:
    """``hla_attention_map(qs, ks, **kwargs) @ v``: the reference HLA output [..., Nq, dv]."""
    return _apply(hla_attention_map(qs, ks, **kwargs), v, allow_signed=kwargs.get("allow_signed", False))


def kernel_attention_output(fq: Tensor, fk: Tensor, v: Tensor, **kwargs) -> Tensor:
    """``kernel_attention_map(fq, fk, **kwargs) @ v``: the reference linear-attention output."""
    return _apply(kernel_attention_map(fq, fk, **kwargs), v, allow_signed=kwargs.get("allow_signed", False))
