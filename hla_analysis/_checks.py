"""Input checks shared by every public operator.

Each check raises a ``ValueError`` that names what is wrong and what to do instead: the
toolkit never returns a silent NaN or a silently wrong number.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor


def check_stacked_against_values(qs, v: Tensor) -> None:
    """Refuse the one ambiguous call: a bare tensor whose leading dims are fewer than v's.

    ``hla(q, k, v)`` with ``q`` of shape ``[B, N, r]`` reads ``B`` as the factor count M. If
    ``v`` then has more leading dims than the factors, the caller most likely meant ``B`` as a
    batch dim; say so instead of returning a number for the other reading.
    """
    if isinstance(qs, Tensor) and qs.dim() >= 3 and v.dim() - 2 > qs.dim() - 3:
        raise ValueError(
            f"a single tensor {tuple(qs.shape)} is read as stacked factors [..., M, N, r] with "
            f"M={qs.shape[-3]}, but v {tuple(v.shape)} has more leading dims than the factors. "
            "For one factor with a batch dim pass [q], [k] (or use linear_attention); for stacked "
            "factors shared across v's batch pass list(qs.unbind(-3))."
        )


def as_factors(factors: Tensor | Sequence[Tensor], name: str) -> list[Tensor]:
    """Turn ``[..., M, N, r]`` or a sequence of ``M`` tensors ``[..., N, r_m]`` into a list."""
    if isinstance(factors, Tensor):
        if factors.dim() < 3:
            raise ValueError(
                f"{name}: a single tensor is read as stacked factors [..., M, N, r] and needs "
                f"at least 3 dims, got shape {tuple(factors.shape)}. For one factor pass a list "
                f"[{name[:-1]}] or use linear_attention."
            )
        return list(factors.unbind(-3))
    factors = list(factors)
    if not factors:
        raise ValueError(f"{name} is empty: pass at least one factor (M >= 1).")
    for m, f in enumerate(factors):
        if not isinstance(f, Tensor) or f.dim() < 2:
            raise ValueError(
                f"{name}[{m}] must be a tensor [..., N, r], got "
                f"{type(f).__name__}{tuple(f.shape) if isinstance(f, Tensor) else ''}."
            )
    return factors


def check_float(name: str, x: Tensor) -> None:
    if not x.is_floating_point():
        raise ValueError(f"{name} has dtype {x.dtype}; attention needs a floating dtype (cast with .float()).")


def check_finite(name: str, x: Tensor) -> None:
    bad = ~torch.isfinite(x)
    if bad.any():
        raise ValueError(
            f"{name} contains {int(bad.sum())} NaN/Inf value(s) (shape {tuple(x.shape)}); "
            "clean or rescale the inputs before computing attention."
        )


def broadcast_leading(named: dict[str, Tensor]) -> torch.Size:
    """The broadcast of all leading (batch/head) dims, with an error naming the culprits."""
    try:
        return torch.broadcast_shapes(*(t.shape[:-2] for t in named.values()))
    except RuntimeError:
        shapes = ", ".join(f"{n}{tuple(t.shape)}" for n, t in named.items())
        raise ValueError(
            f"leading (batch/head) dims do not broadcast: {shapes}. Layout is [..., N, D]; "
            "make the leading dims equal or 1."
        ) from None


def check_pair(q: Tensor, k: Tensor, *, qname: str = "q", kname: str = "k") -> None:
    """Check one query/key pair: float, finite, same width, non-empty, broadcastable."""
    for n, t in ((qname, q), (kname, k)):
        if not isinstance(t, Tensor):
            raise ValueError(f"{n} must be a torch.Tensor [..., N, d], got {type(t).__name__}; wrap it with torch.as_tensor.")
        if t.dim() < 2:
            raise ValueError(f"{n} must be [..., N, d], got shape {tuple(t.shape)}.")
        check_float(n, t)
        if t.shape[-2] == 0:
            raise ValueError(f"{n} is an empty sequence (N = 0, shape {tuple(t.shape)}); pass at least one token.")
    if q.shape[-1] != k.shape[-1]:
        raise ValueError(
            f"{qname} has feature width {q.shape[-1]} but {kname} has {k.shape[-1]} "
            f"(shapes {tuple(q.shape)} and {tuple(k.shape)}); they must match."
        )
    for n, t in ((qname, q), (kname, k)):
        check_finite(n, t)


def check_factor_lists(qs: list[Tensor], ks: list[Tensor]) -> None:
    if len(qs) != len(ks):
        raise ValueError(
            f"qs has M={len(qs)} factor(s) but ks has M={len(ks)}; every query factor needs a key factor."
        )
    nq = {f.shape[-2] for f in qs}
    nk = {f.shape[-2] for f in ks}
    if len(nq) > 1 or len(nk) > 1:
        raise ValueError(
            f"all factors must have the same number of tokens: query factors have N in {sorted(nq)}, "
            f"key factors N in {sorted(nk)}."
        )
    seen: set[tuple[int, int]] = set()
    for m, (fq, fk) in enumerate(zip(qs, ks)):
        if (id(fq), id(fk)) in seen:  # tied factors: one check per distinct tensor pair
            continue
        seen.add((id(fq), id(fk)))
        check_pair(fq, fk, qname=f"qs[{m}]", kname=f"ks[{m}]")
    broadcast_leading({**{f"qs[{m}]": f for m, f in enumerate(qs)}, **{f"ks[{m}]": f for m, f in enumerate(ks)}})


def check_values(v: Tensor, n_keys: int) -> None:
    if v.dim() < 2 or v.shape[-2] != n_keys:
        raise ValueError(
            f"v must be [..., N, dv] with N = {n_keys} (the number of keys), got shape {tuple(v.shape)}."
        )
    check_float("v", v)
    check_finite("v", v)


def allowed_keys(
    n_queries: int,
    n_keys: int,
    *,
    causal: bool,
    key_padding_mask: Tensor | None,
    query_offset: int = 0,
    device: torch.device | None = None,
) -> Tensor | None:
    """Boolean ``[..., Nq, Nk]`` mask of the keys each query may attend to (None = all).

    Raises if any query row is left with no key at all, since its weights would be 0/0.
    """
    if query_offset < 0:
        raise ValueError(f"query_offset must be >= 0, got {query_offset}.")
    allowed = None
    if causal:
        if query_offset + n_queries > n_keys:
            raise ValueError(
                f"causal attention with {n_queries} queries at offset {query_offset} needs at least "
                f"{query_offset + n_queries} keys, got {n_keys}."
            )
        rows = torch.arange(query_offset, query_offset + n_queries, device=device)[:, None]
        allowed = torch.arange(n_keys, device=device)[None, :] <= rows
    if key_padding_mask is not None:
        check_padding_mask(key_padding_mask, n_keys, causal=causal, query_offset=query_offset, n_queries=n_queries)
        pad = key_padding_mask[..., None, :]
        allowed = pad if allowed is None else allowed & pad
    return allowed


def check_mask_leading_dims(key_padding_mask: Tensor | None, *tensors: Tensor) -> None:
    """Refuse a batch mask with fewer leading dims than the tensors it masks.

    Leading dims align from the right, so a ``[B, N]`` mask against ``[B, H, N, d]`` tensors
    would pair B with H: an error when B != H, and a silently wrong mask when B == H.
    """
    if key_padding_mask is None or key_padding_mask.dim() < 2:
        return
    lead = max(t.dim() - 2 for t in tensors)
    if key_padding_mask.dim() - 1 < lead:
        raise ValueError(
            f"key_padding_mask {tuple(key_padding_mask.shape)} has fewer leading dims than the inputs "
            f"({lead}); leading dims align from the right, so insert the missing ones, e.g. "
            "mask[:, None, :] for inputs [B, H, N, d]."
        )


def check_padding_mask(
    key_padding_mask: Tensor, n_keys: int, *, causal: bool, query_offset: int = 0, n_queries: int | None = None
) -> None:
    """O(N) check that the mask is well formed and leaves every query row some key."""
    if not isinstance(key_padding_mask, Tensor):
        raise ValueError(f"key_padding_mask must be a bool tensor [..., N], got {type(key_padding_mask).__name__}.")
    if key_padding_mask.dtype != torch.bool:
        raise ValueError(
            f"key_padding_mask must be bool (True = real token, False = padding), got {key_padding_mask.dtype}."
        )
    if key_padding_mask.shape[-1] != n_keys:
        raise ValueError(
            f"key_padding_mask has {key_padding_mask.shape[-1]} entries per row but there are {n_keys} keys."
        )
    if causal:
        # row i (global index query_offset + i) sees keys 0..i: empty iff no real key up to i
        seen = key_padding_mask.cumsum(-1) > 0
        n_queries = n_keys - query_offset if n_queries is None else n_queries
        empty = ~seen[..., query_offset : query_offset + n_queries]
    else:
        empty = ~key_padding_mask.any(-1, keepdim=True)
    if empty.any():
        raise ValueError(
            f"key_padding_mask leaves {int(empty.sum())} query row(s) with no key to attend to "
            "(a fully padded sequence, or left padding with causal=True). Drop those sequences "
            "or unmask at least one key per row."
        )


def check_normalizers(den: Tensor, *, allow_signed: bool, valid_rows: Tensor | None = None) -> None:
    """Refuse zero, negative or overflowed HLA/linear-attention normalizers.

    ``den`` holds sum_l prod_m s_il for every query row; ``valid_rows`` (bool, broadcastable)
    marks rows whose result is used.
    """
    if valid_rows is None and den.numel() and den.is_floating_point():
        # fast path, one reduction and one device sync: min/max propagate NaN
        lo, hi = torch.stack(torch.aminmax(den.detach())).tolist()
        if math.isfinite(lo) and math.isfinite(hi) and (allow_signed or lo > 0):
            return
    nonfinite = ~torch.isfinite(den)
    if valid_rows is not None:
        nonfinite = nonfinite & valid_rows
    if nonfinite.any():
        raise ValueError(
            f"{int(nonfinite.sum())} of {den.numel()} row normalizer(s) overflowed to Inf/NaN: the "
            "feature products are too large for this dtype. Rescale q/k, use float64, or a stabilised "
            "feature map (phi=exp subtracts its maximum)."
        )
    if allow_signed:
        return
    bad = den <= 0
    if valid_rows is not None:
        bad = bad & valid_rows
    if bad.any():
        zero = int((den == 0).sum()) if valid_rows is None else int(((den == 0) & valid_rows).sum())
        raise ValueError(
            f"{int(bad.sum())} of {den.numel()} row(s) have a zero or negative normalizer "
            f"sum_l prod_m s_il <= 0 ({zero} exactly zero). Negative: the factor similarities are "
            "sign-indefinite (identity features, odd M with affine factors). Zero: a row's "
            "similarities all vanish or underflow (relu of an all-negative query, exp of very "
            "negative logits). Use a strictly positive feature map (elu1, favor, or affine with an "
            "even number of tied factors), rescale q/k or use float64, or pass allow_signed=True "
            "to get the signed result."
        )
