"""The attention function a swapped layer runs: a variant on the model's own q, k, v and scale.

transformers hands every attention implementation ``(module, query, key, value,
attention_mask, scaling, ...)``: queries ``[B, Hq, N, d]`` after the model's QK-norm and
RoPE, keys and values ``[B, Hkv, N, d]`` with the model's grouped heads, and the additive
``[B, 1, Nq, Nk]`` mask that ``eager_mask`` built. These are the tensors a capture records
(:mod:`hla_analysis.capture.recorder`), so a swapped layer sees exactly what the comparison
scored. The mask is read back as "causal and/or key padding", the two patterns every
variant implements, so both survive the swap.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from hla_analysis._checks import check_batch
from hla_analysis.capture.recorder import allowed_from_mask


@dataclass
class SwapCounts:
    """Query rows a swapped layer computed, and how many of them had no valid normaliser.

    A row fails when its normaliser is not a positive finite number or one of its weights
    is not finite. Failed rows are never passed on as NaN: their attention output is set to
    zero and they are counted here, so a table can say "normaliser failed" beside the number.
    """

    rows: int = 0
    failed: int = 0
    calls: int = 0

    @property
    def failed_fraction(self) -> float:
        return self.failed / self.rows if self.rows else 0.0


def mask_pattern(attention_mask: Tensor | None, batch: int, nq: int, nk: int) -> tuple[bool, Tensor | None, Tensor]:
    """Read a transformers attention mask as ``(causal, key_padding_mask, real_keys)``.

    ``key_padding_mask`` is bool ``[B, 1, Nk]`` (True = real token; None without padding),
    ``real_keys`` bool ``[B, Nk]``. Raises ``ValueError`` for any other pattern (sliding
    windows, packed documents, additive biases): a variant would silently attend elsewhere.

    Examples
    --------
    >>> future = torch.ones(3, 3, dtype=torch.bool).triu(1)
    >>> m = torch.zeros(1, 1, 3, 3).masked_fill(future, torch.finfo(torch.float32).min)
    >>> causal, padding, real = mask_pattern(m, 1, 3, 3)
    >>> causal, padding, real.tolist()
    (True, None, [[True, True, True]])
    """
    allowed = allowed_from_mask(attention_mask, batch, nq, nk)
    if attention_mask is not None:
        allowed = allowed.to(attention_mask.device)
    if nq != nk:
        raise ValueError(
            f"swap_attention handles self-attention without a cache (got {nq} queries, {nk} keys: a cache, or "
            "cross-attention it did not recognise); run the model on whole sequences with use_cache=False, or "
            "swap its encoder alone (model.get_encoder())"
        )
    real = allowed.any(dim=1)  # a padding key is blocked for every query
    tril = torch.ones(nq, nk, dtype=torch.bool, device=allowed.device).tril()
    padded = not bool(real.all())
    padding = real[:, None, :] if padded else None
    if torch.equal(allowed, real[:, None, :].expand_as(allowed)):
        return False, padding, real
    if torch.equal(allowed, tril & real[:, None, :]):
        return True, padding, real
    raise ValueError(
        "the model's attention mask is neither causal nor key padding (e.g. a sliding window or packed "
        "documents); the variants implement only those two patterns, so this model cannot be swapped"
    )


def _weights(variant, q: Tensor, k: Tensor, *, scale: float, causal: bool, padding: Tensor | None,
             real: Tensor) -> tuple[Tensor, Tensor]:
    """``variant.weights`` of every row that has a key; rows with none get zero weights and a zero
    normaliser (they fail, output zero, and are padding rows, so they are not counted).

    Such rows are the padding queries of a left-padded causal batch (before the first real
    token) and every row of an input that is all padding. The variant runs on the rows and keys
    from the first real token on, one group of inputs per first position: a key-padding mask is
    per key, so these rows cannot be given a key without changing the others.
    """
    n = q.shape[-2]
    if causal and padding is not None:
        first = torch.where(real.any(1), real.int().argmax(1), torch.full_like(real[:, 0], n, dtype=torch.long))
    elif padding is not None:
        first = torch.where(real.any(1), 0, n)
    else:
        first = torch.zeros(q.shape[0], dtype=torch.long)
    starts = sorted({int(f) for f in first.tolist()})
    if starts == [0]:
        # the variant's input checks as one batch: a reduction per tensor instead of elementwise isfinite
        with check_batch():
            return variant.weights(q, k, scale=scale, causal=causal, key_padding_mask=padding)
    weights = q.new_zeros(*q.shape[:-1], k.shape[-2])
    den = q.new_zeros(*q.shape[:-1], 1)
    for start in starts:
        rows = (first == start).nonzero().flatten().to(q.device)
        if start >= n:
            continue  # all padding: every row stays empty
        mask = None if padding is None else padding[rows][..., start:]
        with check_batch():
            w, d = variant.weights(q[rows][:, :, start:], k[rows][:, :, start:], scale=scale, causal=causal,
                                   key_padding_mask=mask)
        weights[rows, :, start:, start:] = w
        den[rows, :, start:] = d
    return weights, den


def variant_attention(variant, query: Tensor, key: Tensor, value: Tensor, attention_mask: Tensor | None,
                      scaling: float | None, counts: SwapCounts | None = None) -> tuple[Tensor, Tensor]:
    """Attention output ``[B, N, Hq, dv]`` and map ``[B, Hq, N, N]`` of ``variant``, like eager.

    Grouped key/value heads are shared by consecutive query heads (the layout of
    transformers' ``repeat_kv``). Rows whose normaliser fails output zero and are counted
    in ``counts`` (padding query rows are not counted).
    """
    batch, heads, nq, _ = query.shape
    if heads % key.shape[1]:
        raise ValueError(f"{heads} query heads are not a multiple of {key.shape[1]} key/value heads")
    groups = heads // key.shape[1]
    key = key.repeat_interleave(groups, dim=1)
    value = value.repeat_interleave(groups, dim=1)
    scale = float(query.shape[-1] ** -0.5 if scaling is None else scaling)
    causal, padding, real = mask_pattern(attention_mask, batch, nq, key.shape[2])
    dtype = query.dtype
    q, k, v = query.float(), key.float(), value.float()
    weights, den = _weights(variant, q, k, scale=scale, causal=causal, padding=padding, real=real)
    failed = ~(den > 0) | ~torch.isfinite(den) | ~torch.isfinite(weights).all(-1, keepdim=True)
    probs = torch.where(failed, torch.zeros_like(weights), weights / torch.where(failed, torch.ones_like(den), den))
    if counts is not None:
        real_rows = real[:, None, :, None].expand_as(failed)
        counts.rows += int(real_rows.sum())
        counts.failed += int((failed & real_rows).sum())
        counts.calls += 1
    output = torch.matmul(probs, v).to(dtype)
    return output.transpose(1, 2).contiguous(), probs.to(dtype)
