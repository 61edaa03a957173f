"""Whole-head attention metrics, accumulated over blocks of query rows.

Neither the reference nor the approximate ``N x N`` map is ever held whole: each block of
``R`` query rows is compared, reduced to sums, and dropped, so memory grows as ``N x R``.
:func:`head_metrics` is the same computation on full maps in one block (the plain reference
that the streaming path is tested against).

Rows that do not count
----------------------
* ``failed``: the approximation broke down on the row -- flagged by the caller (``invalid``,
  e.g. a non-positive normalizer) or detected here (NaN/Inf or negative weight on an allowed
  entry). Failed rows are excluded from every average and reported as ``failed_rows`` and
  ``failed_fraction``; the breakdown is in ``invalid_rows``, ``nonfinite_rows``, ``negative_rows``.
* ``empty``: no allowed key (only possible with a custom ``allowed`` mask); excluded, counted.
* rows left out by ``query_mask`` (e.g. padded query tokens) are not seen at all.

All averages are over the ``counted_rows`` that remain. If every row failed, the averages are
NaN and ``failed_fraction`` is 1: there is nothing to average, and the count says why.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, fields

import torch
from torch import Tensor
from tqdm.auto import tqdm

from hla_analysis._checks import allowed_keys
from hla_analysis.metrics.rows import (
    _INT_OF,
    KL_EPS,
    _centre,
    _centred_ranks,
    _check_block,
    _rank_correlation,
    _ranks_and_order,
    broadcast_allowed,
    broadcast_mask,
    check_reference,
    check_scores,
)

_SUMS = ("kl", "js", "tv", "entropy_ref", "entropy_approx", "topk_recall")
_COUNTS = (
    "rows",
    "counted_rows",
    "failed_rows",
    "invalid_rows",
    "nonfinite_rows",
    "negative_rows",
    "empty_rows",
    "kl_floored_rows",
    "spearman_rows",
)
_SQUARES = ("frobenius_diff", "frobenius_ref", "output_diff", "output_ref")


@dataclass(frozen=True)
class ReferenceRows:
    """One block of reference rows and everything about them that every approximation reuses.

    Built by :func:`reference_rows`; scored against by
    :meth:`StreamingAttentionMetrics.update_against`. The logs, entropy, top-k set, output
    and rank deviations of the reference are computed once per block here, instead of once
    per approximation.
    """

    p: Tensor  # [..., R, N], zero outside mask
    mask: Tensor | None  # bool [..., R, N]; None = every key allowed
    empty: Tensor  # bool [..., R]: no allowed key
    log_p: Tensor  # log p where p > 0, 0 elsewhere (so p * log_p = xlogy(p, p))
    support: Tensor  # bool [..., R, N]: p > 0
    entropy: Tensor  # [..., R]
    frobenius: Tensor  # [..., R]: sum p^2
    k: int
    top: Tensor  # bool [..., R, N]: p's top-k entries, every entry tied with the k-th included
    k_eff: Tensor  # [..., R]: min(k, allowed keys)
    v: Tensor | None  # [..., N, dv]
    output: Tensor | None  # [..., R, dv]: p @ v
    output_sq: Tensor | None  # [..., R]
    rank_stride: int
    # On every rank_stride-th row, in the order that sorts each row's scores (masked keys
    # last): approximations are ranked in that order too, where a good one is nearly sorted
    # already (cheaper sorts); a correlation does not depend on the order of its terms.
    scores_dev: Tensor | None  # centred ranks of the scores, permuted by rank_order
    scores_var: Tensor | None  # their float64 sums of squares
    rank_order: Tensor | None = None  # int64 [..., R / rank_stride, N]: the scores' sorting permutation
    rank_mask: Tensor | None = None  # the allowed keys in that order (None: every key)
    n_keys: int | None = None  # the head's keys, when the rows hold a causal prefix of them (None: N)


def reference_rows(
    p: Tensor,
    *,
    allowed: Tensor | None = None,
    v: Tensor | None = None,
    scores: Tensor | None = None,
    k: int = 5,
    rank_stride: int = 1,
    checked: bool = False,
    n_keys: int | None = None,
) -> ReferenceRows:
    """Check one block of reference rows and compute what every comparison against it shares.

    Parameters
    ----------
    p : Tensor
        Softmax rows ``[..., R, N]``, zero outside ``allowed``; float16/bfloat16 become float32.
    allowed, v, scores
        As in :meth:`StreamingAttentionMetrics.update`.
    k, rank_stride : int
        Must equal the settings of the accumulators that will use the reference.
    checked : bool
        ``p``, ``scores`` and ``v`` were already checked by the caller: skip those checks.
    n_keys : int, optional
        The head's number of keys when the rows hold only its first ``N`` keys: a causal block
        needs no key past its last row (every dropped key has weight zero in every row, so
        every metric is the same). Accumulators check it instead of ``N`` across blocks.

    Returns
    -------
    ReferenceRows

    Raises
    ------
    ValueError
        As :meth:`StreamingAttentionMetrics.update` does for the reference side.

    Examples
    --------
    >>> import torch
    >>> p = torch.softmax(torch.tensor([[2.0, 1.0, 0.0], [0.0, 0.0, 0.0]]), dim=-1)
    >>> ref = reference_rows(p, k=1)
    >>> acc_a, acc_b = StreamingAttentionMetrics(k=1), StreamingAttentionMetrics(k=1)
    >>> acc_a.update_against(ref, p)
    >>> acc_b.update_against(ref, torch.full((2, 3), 1 / 3))
    >>> acc_a.compute()["kl_mean"], round(acc_b.compute()["tv_mean"], 4)
    (0.0, 0.166)
    """
    _check_block("p", p)
    if p.dim() < 2:
        raise ValueError(f"p {tuple(p.shape)} must be a row block [..., R, N].")
    if n_keys is not None and (isinstance(n_keys, bool) or not isinstance(n_keys, int) or n_keys < p.shape[-1]):
        raise ValueError(f"n_keys must be an int >= the block's {p.shape[-1]} keys, got {n_keys!r}.")
    tol = 1e-3
    if p.dtype in (torch.float16, torch.bfloat16):  # the KL floor and logs need float32 range
        p, tol = p.float(), 1e-2
    device = p.device
    mask = broadcast_allowed(allowed, p.shape, device)
    if not checked:
        check_reference(p, mask, tol=tol)
    if v is not None:
        if not isinstance(v, Tensor) or v.dim() < 2 or v.shape[-2] != p.shape[-1]:
            got = tuple(v.shape) if isinstance(v, Tensor) else type(v).__name__
            raise ValueError(f"v must be [..., N, dv] with N = {p.shape[-1]} keys, got {got}.")
        if not checked and not torch.isfinite(v).all():
            raise ValueError("v contains NaN/Inf; the output error needs finite values.")
        v = v.to(device=device, dtype=p.dtype)
    if scores is not None:
        _check_block("scores", scores)
        if scores.shape != p.shape:
            raise ValueError(f"scores has shape {tuple(scores.shape)} but the rows are {tuple(p.shape)}; "
                             "they must match.")
        scores = scores.to(device)
        if not checked:
            check_scores(scores, mask)
    every_key = allowed is None or bool(mask.all())
    mask_or_none = None if every_key else mask
    support = p > 0
    log_p = torch.log(torch.where(support, p, torch.ones((), dtype=p.dtype, device=device)))
    top, k_eff = _top_set(p, mask_or_none, k)
    output = p @ v if v is not None else None
    scores_dev = scores_var = rank_order = rank_mask = None
    if scores is not None:
        sample = slice(None, None, rank_stride)
        rank_dtype = torch.float64 if p.dtype == torch.float64 else torch.float32
        sampled = scores[..., sample, :]
        rank_mask = None if every_key else mask[..., sample, :]
        ranks, rank_order = _ranks_and_order(sampled, rank_mask, rank_dtype)
        scores_dev, scores_var = _centre(ranks, sampled, rank_mask, rank_dtype)
        scores_dev = scores_dev.gather(-1, rank_order)
        if rank_mask is not None:
            rank_mask = rank_mask.gather(-1, rank_order)
    return ReferenceRows(
        p=p, mask=mask_or_none, empty=~mask.any(-1), log_p=log_p, support=support,
        entropy=0.0 - (p * log_p).sum(-1),  # 0 - x: a one-hot row gets +0.0, not -0.0
        frobenius=p.square().sum(-1), k=k, top=top, k_eff=k_eff, v=v, output=output,
        output_sq=output.square().sum(-1) if output is not None else None,
        rank_stride=rank_stride, scores_dev=scores_dev, scores_var=scores_var, rank_order=rank_order,
        rank_mask=rank_mask, n_keys=n_keys,
    )


def _validate_pair(p: Tensor, p_hat: Tensor) -> tuple[Tensor, Tensor]:
    _check_block("p", p)
    _check_block("p_hat", p_hat)
    if p.dim() < 2 or p.shape != p_hat.shape:
        raise ValueError(
            f"p {tuple(p.shape)} and p_hat {tuple(p_hat.shape)} must be row blocks [..., R, N] of the same shape."
        )
    if p.dtype != p_hat.dtype or p.device != p_hat.device:
        raise ValueError(f"p is {p.dtype} on {p.device} but p_hat is {p_hat.dtype} on {p_hat.device}; "
                         "use one dtype and device.")
    return p, p_hat


def _kth_largest(x: Tensor, mask: Tensor | None, k: int) -> tuple[Tensor, Tensor, Tensor]:
    """Per row: the ``min(k+1, N)`` largest allowed values and indices, and ``k_eff``."""
    n = x.shape[-1]
    if mask is None:
        k_eff = torch.full(x.shape[:-1], min(k, n), dtype=torch.long, device=x.device)
    else:
        k_eff = torch.clamp(mask.sum(-1), max=k)
        x = torch.where(mask, x, torch.full((), float("-inf"), dtype=x.dtype, device=x.device))
    index = _topk_index(_nonnegative_key(x), min(k + 1, n))
    return x.gather(-1, index), index, k_eff


# Rows at least this many chunks long (of _TOPK_CHUNK keys) take the two-stage top-k.
_TOPK_CHUNK, _TOPK_MIN_CHUNKS = 8, 4


def _topk_index(keys: Tensor, kk: int) -> Tensor:
    """Indices of the ``kk`` largest ``keys`` of each row, ordered as ``torch.topk``'s values.

    Long rows take two stages (1.5x faster on CPU at N = 256): the ``kk`` chunks of
    ``_TOPK_CHUNK`` keys with the largest maxima (plus the tail past the last whole chunk)
    hold the ``kk`` largest values of the row -- an entry in any other chunk has ``kk``
    chunk maxima at least as large above it -- so a top-k over those ``kk x _TOPK_CHUNK``
    candidates picks the same values (ties may pick other indices of equal keys, which the
    callers compare by value).
    """
    n, c = keys.shape[-1], _TOPK_CHUNK
    chunks = n // c
    if chunks < _TOPK_MIN_CHUNKS * kk:
        return torch.topk(keys, kk, dim=-1).indices
    maxima = keys[..., : chunks * c].unflatten(-1, (chunks, c)).amax(-1)
    best = torch.topk(maxima, kk, dim=-1, sorted=False).indices
    candidates = (best.unsqueeze(-1) * c + torch.arange(c, device=keys.device)).flatten(-2)
    if chunks * c < n:
        tail = torch.arange(chunks * c, n, device=keys.device).expand(*candidates.shape[:-1], n - chunks * c)
        candidates = torch.cat([candidates, tail], dim=-1)
    pick = torch.topk(keys.gather(-1, candidates), kk, dim=-1).indices
    return candidates.gather(-1, pick)


def _nonnegative_key(x: Tensor) -> Tensor:
    """``x``'s bits as integers: ``topk`` on them picks as on the floats, 1.3-1.5x faster on CPU.

    Valid rows (reference rows, approximations that did not fail) are >= 0 (and -inf where
    masked); there the bit patterns order as the values, except that -0.0 sorts below +0.0
    instead of tying with it. The callers compare the picked values as floats, so such a tie
    at the k-th weight is still seen as one. Rows with a negative or NaN weight are failed
    rows, whose recall is discarded.
    """
    ints = _INT_OF.get(x.dtype)
    return x if ints is None else x.view(ints)



def _top_set(p: Tensor, mask: Tensor | None, k: int) -> tuple[Tensor, Tensor]:
    """Bool map of p's top-k entries per row (every entry tied with the k-th largest counts)."""
    values, _, k_eff = _kth_largest(p, mask, k)
    tau = values.gather(-1, torch.clamp(k_eff - 1, min=0).unsqueeze(-1))
    top = p >= tau
    return (top if mask is None else top & mask), k_eff


def _topk_recall_against(ref: ReferenceRows, q: Tensor,
                         picked: tuple[Tensor, Tensor, Tensor] | None = None) -> Tensor:
    """Top-k recall of ``q`` against the reference's top set; ties at q's k-th weight averaged.

    q's top-k takes every entry above its k-th largest weight ``t`` and ``k_eff - n_above``
    of the entries equal to ``t``; averaging over every tie-break makes the value
    deterministic. When no row has an entry equal to ``t`` outside topk's picks (no tie
    across the cut), the hits are read off the picked indices directly. ``picked``:
    ``_kth_largest(q, ref.mask, ref.k)`` if the caller has it already.
    """
    values, index, k_eff = picked if picked is not None else _kth_largest(q, ref.mask, ref.k)
    k0 = min(ref.k, q.shape[-1])
    t = values.gather(-1, torch.clamp(k_eff - 1, min=0).unsqueeze(-1))
    k_f = k_eff.to(torch.float64)
    if values.shape[-1] > k0:
        after = values.gather(-1, torch.clamp(k_eff, max=values.shape[-1] - 1).unsqueeze(-1))
        tie_across_cut = bool(((after == t).squeeze(-1) & (k_eff < values.shape[-1]) & (k_eff > 0)).any())
    else:
        tie_across_cut = False
    if not tie_across_cut:
        picked = ref.top.gather(-1, index[..., :k0])
        within = torch.arange(k0, device=q.device) < k_eff.unsqueeze(-1)
        hits = (picked & within).sum(-1).to(torch.float64)
    else:
        qm = q if ref.mask is None else torch.where(
            ref.mask, q, torch.full((), float("-inf"), dtype=q.dtype, device=q.device))
        above = qm > t
        at = qm == t
        n_above = above.sum(-1)
        n_at = at.sum(-1)
        hits = (above & ref.top).sum(-1).to(torch.float64)
        tie_hits = (at & ref.top).sum(-1).to(torch.float64)
        hits = hits + (k_eff - n_above).to(torch.float64) * tie_hits / torch.clamp(n_at, min=1)
    recall = torch.minimum(hits, k_f) / torch.clamp(k_f, min=1)
    return torch.where(k_eff > 0, recall, torch.full_like(recall, float("nan")))


@dataclass(frozen=True)
class _Terms:
    kl: Tensor
    floored: Tensor
    js: Tensor
    tv: Tensor
    entropy: Tensor
    frobenius: Tensor


# log of 0 is -inf; clamped here so that 0 * log 0 = 0 without a where (any finite value
# below log of the smallest subnormal float64, -744.4, leaves positive entries unchanged)
_LOG_ZERO = -1.0e4


# Elements of the row slabs _divergence_terms works on (1 MB of float32): its ~20
# elementwise passes then reuse cached data (measured: 1.2x faster at [2, 12, 256, 256]).
_SLAB_ELEMENTS = 2**18


def _divergence_terms(ref: ReferenceRows, q: Tensor, eps: float) -> _Terms:
    """KL, JS, TV, entropy and Frobenius rows of ``q`` against the reference, with two logs.

    ``log q`` serves the KL (floored at ``eps``, as :func:`~hla_analysis.metrics.kl_divergence_rows`),
    the entropy of ``q`` and JS; ``log m`` with ``m = (p + q) / 2`` serves JS. Elementwise
    log differences keep small divergences accurate. Computed in slabs of rows (every
    value is per row, so the slabs give the same bits as one pass).
    """
    rows = q.shape[-2]
    per_row = max(1, q[..., :1, :].numel())
    # slabs are a CPU cache optimisation; on a GPU they only multiply the kernel launches
    # (72 slabs x ~20 passes per variant and block at SmolLM2's [9, 256, 8192])
    if q.device.type == "cuda" and q.dtype == torch.float32:
        fused = _fused_divergence()
        if fused is not None:
            return _Terms(*fused(ref.p, ref.log_p, q, eps, _log_eps(eps, q.dtype)))
    step = max(1, _SLAB_ELEMENTS // per_row) if q.device.type == "cpu" else rows
    if step >= rows:
        return _divergence_slab(ref.p, ref.log_p, ref.support, q, eps)
    slabs = [_divergence_slab(ref.p[..., i : i + step, :], ref.log_p[..., i : i + step, :],
                              ref.support[..., i : i + step, :], q[..., i : i + step, :], eps)
             for i in range(0, rows, step)]
    return _Terms(*(torch.cat([getattr(t, f.name) for t in slabs], dim=-1) for f in fields(_Terms)))


def divergence_rows(p: Tensor, log_p: Tensor, q: Tensor, eps: float, log_eps: float) -> tuple[Tensor, ...]:
    """:func:`_divergence_slab` written as plain expressions, for ``torch.compile`` to fuse.

    The same arithmetic, term by term (``support`` is ``p > 0``; ``log_eps`` is ``log(eps)``
    in ``q``'s dtype). Eagerly it costs ~20 passes over memory; compiled on a GPU, Inductor
    turns it into a few row reductions that read ``p``, ``log p`` and ``q`` once.
    Returns the fields of ``_Terms`` in order.
    """
    log_q = torch.log(q).clamp_min(_LOG_ZERO)
    kl = (p * (log_p - log_q.clamp_min(log_eps))).sum(-1)
    floored = ((q < eps) & (p > 0)).any(-1)
    q_log_q = q * log_q
    log_m = ((p + q) * 0.5).log().clamp_min(_LOG_ZERO)
    js = 0.5 * (p * (log_p - log_m) + (q_log_q - q * log_m)).sum(-1)
    entropy = 0.0 - q_log_q.sum(-1)
    diff = p - q
    return kl, floored, js, 0.5 * diff.abs().sum(-1), entropy, diff.square().sum(-1)


def _fused_divergence():
    """:func:`divergence_rows` compiled (once per process), or None where compiling fails.

    CUDA and float32 only: the one place the ~20 elementwise passes of the divergence terms
    dominate (a comparison at N = 8,192 spends most of its GPU time there). A failure to
    compile (no compiler, an unsupported Triton) is remembered and the eager slabs are used.
    """
    global _FUSED
    if _FUSED is None:
        try:
            compiled = torch.compile(divergence_rows, dynamic=True)
            probe = torch.rand(2, 3, 5, device="cuda")
            compiled(probe / probe.sum(-1, keepdim=True), probe.log(), probe, 1e-8, math.log(1e-8))
            _FUSED = compiled
        except Exception as exc:  # noqa: BLE001 - any compiler failure means: use the eager form
            import warnings

            warnings.warn(f"torch.compile of the divergence metrics failed ({type(exc).__name__}: {exc}); "
                          "using the eager form (same values, slower).", stacklevel=3)
            _FUSED = False
    return _FUSED or None


_FUSED = None


def _log_eps(eps: float, dtype: torch.dtype) -> float:
    """``log(eps)`` as ``dtype`` computes it: the KL's floor for ``log q``."""
    return math.log(eps) if dtype == torch.float64 else float(torch.log(torch.tensor(eps, dtype=dtype)))


def _divergence_slab(p: Tensor, log_p: Tensor, support: Tensor, q: Tensor, eps: float) -> _Terms:
    """:func:`_divergence_terms` of one slab of rows."""
    # The same arithmetic as the plain expressions in the comments, in place where a
    # temporary can be reused: each [..., R, N] temporary is a pass over memory.
    log_q = torch.log(q).clamp_min_(_LOG_ZERO)
    work = torch.clamp_min(log_q, _log_eps(eps, q.dtype))
    kl = torch.sub(log_p, work, out=work).mul_(p).sum(-1)  # (p * (log_p - max(log_q, log_eps))).sum(-1)
    floored = (q < eps).logical_and_(support).any(-1)  # (support & (q < eps)).any(-1)
    q_log_q = q * log_q
    log_m = torch.add(p, q, out=log_q).mul_(0.5).log_().clamp_min_(_LOG_ZERO)  # log((p + q) * 0.5), floored
    js_p = torch.sub(log_p, log_m, out=work).mul_(p)  # p * (log_p - log_m)
    js_q = torch.sub(q_log_q, log_m.mul_(q), out=log_m)  # q_log_q - q * log_m
    js = 0.5 * js_p.add_(js_q).sum(-1)
    entropy = 0.0 - q_log_q.sum(-1)
    diff = torch.sub(p, q, out=q_log_q)
    return _Terms(
        kl=kl, floored=floored, js=js, tv=0.5 * torch.linalg.vector_norm(diff, ord=1, dim=-1),
        entropy=entropy, frobenius=diff.square_().sum(-1),
    )


class StreamingAttentionMetrics:
    """Accumulate reference-vs-approximation metrics of one head over blocks of query rows.

    Call :meth:`update` once per row block and :meth:`compute` at the end. Blocks may come in
    any order and size; the result does not depend on the blocking (up to float rounding).

    Parameters
    ----------
    k : int
        Top-k size for ``topk_recall_mean`` (default 5).
    batch_dims : int
        Leading dims kept apart (e.g. 1 for heads): :meth:`compute` then returns tensors of
        that shape, one value per index, instead of floats.
    rank_stride : int
        Compute ``spearman_mean`` on every ``rank_stride``-th row of each block only (its two
        sorts dominate the cost); 1 = every row.
    eps : float
        Floor for ``p_hat`` inside the KL logarithm (default ``1e-30``). Rows where ``p_hat``
        falls below it on an entry with ``p > 0`` have an infinite true KL; they enter
        ``kl_mean``/``kl_max`` with the floored (finite, lower-bound) value and are counted in
        ``kl_floored_rows``.

    Examples
    --------
    >>> import torch
    >>> p = torch.tensor([[0.5, 0.5], [1.0, 0.0]], dtype=torch.float64)
    >>> p_hat = torch.tensor([[0.25, 0.75], [0.9, 0.1]], dtype=torch.float64)
    >>> acc = StreamingAttentionMetrics(k=1)
    >>> acc.update(p[:1], p_hat[:1])
    >>> acc.update(p[1:], p_hat[1:])
    >>> out = acc.compute()
    >>> round(out["tv_mean"], 6), out["rows"], out["failed_rows"]
    (0.175, 2.0, 0.0)
    """

    def __init__(self, *, k: int = 5, eps: float = KL_EPS, batch_dims: int = 0, rank_stride: int = 1) -> None:
        if not isinstance(k, int) or isinstance(k, bool) or k < 1:
            raise ValueError(f"k must be a positive int (the number of largest weights compared), got {k!r}.")
        if not (isinstance(eps, (int, float)) and eps > 0 and math.isfinite(eps)):
            raise ValueError(f"eps must be a positive finite float (the KL floor for p_hat), got {eps!r}.")
        if not isinstance(rank_stride, int) or rank_stride < 1:
            raise ValueError(f"rank_stride must be a positive int, got {rank_stride!r}.")
        # Spearman needs two sorts per row, the dominant cost; every rank_stride-th row of a
        # block is an unbiased sample of the rows' mean correlation.
        self.rank_stride = rank_stride
        if not isinstance(batch_dims, int) or batch_dims < 0:
            raise ValueError(f"batch_dims must be a non-negative int, got {batch_dims!r}.")
        self.k = k
        self.eps = float(eps)
        # Leading dims kept apart (e.g. heads): one set of metrics per index, computed in one pass.
        self.batch_dims = batch_dims
        self._acc: dict[str, Tensor] | None = None
        self._kl_max: Tensor | None = None
        self._has_values: bool | None = None
        self._has_scores: bool | None = None
        self._n_keys: int | None = None

    def _reduce(self, x: Tensor) -> Tensor:
        """Sum over every dim but the leading ``batch_dims``."""
        return x.sum(dim=tuple(range(self.batch_dims, x.dim()))) if x.dim() > self.batch_dims else x

    def _start(self, device: torch.device, n_keys: int, has_values: bool, has_scores: bool, batch_shape=()) -> None:
        if self._acc is None:
            names = _SUMS + _COUNTS + _SQUARES + ("spearman",)
            self._acc = {n: torch.zeros(batch_shape, dtype=torch.float64, device=device) for n in names}
            self._kl_max = torch.full(batch_shape, float("-inf"), dtype=torch.float64, device=device)
            self._has_values, self._has_scores, self._n_keys = has_values, has_scores, n_keys
            return
        if n_keys != self._n_keys:
            raise ValueError(f"this block has {n_keys} keys but earlier blocks had {self._n_keys}; "
                             "stream one head at a time.")
        for name, now, before in (("v", has_values, self._has_values), ("scores", has_scores, self._has_scores)):
            if now != before:
                raise ValueError(
                    f"`{name}` was {'given' if before else 'not given'} for earlier blocks but "
                    f"{'is' if now else 'is not'} now; pass it for every block or for none."
                )

    def update(
        self,
        p: Tensor,
        p_hat: Tensor,
        *,
        allowed: Tensor | None = None,
        v: Tensor | None = None,
        scores: Tensor | None = None,
        invalid: Tensor | None = None,
        query_mask: Tensor | None = None,
        reference_checked: bool = False,
    ) -> None:
        """Add one block of rows.

        Parameters
        ----------
        p, p_hat : Tensor
            Reference (softmax) and approximate rows ``[..., R, N]``; ``p`` is zero outside
            ``allowed`` and its rows sum to 1. Leading dims are pooled as extra rows.
            float16/bfloat16 blocks are computed in float32.
        allowed : Tensor, optional
            Bool mask broadcastable to ``[..., R, N]`` (None = every key allowed).
        v : Tensor, optional
            Values ``[..., N, dv]`` (all keys, not a block) for the output error; give it for
            every block or for none.
        scores : Tensor, optional
            Logits ``[..., R, N]`` for the Spearman monotonicity metric; every block or none.
        invalid : Tensor, optional
            Bool ``[..., R]``: rows where the approximation failed (e.g. normalizer <= 0).
        query_mask : Tensor, optional
            Bool ``[..., R]``: rows to include (False = ignore the row entirely).
        reference_checked : bool
            The caller has already checked ``p``, ``scores`` and ``v`` of this block: skip
            those checks. ``p_hat`` is always checked. To score many approximations against
            one reference, build it once with :func:`reference_rows` and call
            :meth:`update_against` instead: the reference's logs, ranks and top-k are then
            computed once.

        Raises
        ------
        ValueError
            On shape/dtype mismatches, reference rows that are not probabilities on
            ``allowed``, or non-finite scores on allowed entries.
        """
        p, p_hat = _validate_pair(p, p_hat)
        ref = reference_rows(p, allowed=allowed, v=v, scores=scores, k=self.k, rank_stride=self.rank_stride,
                             checked=reference_checked)
        self.update_against(ref, p_hat, invalid=invalid, query_mask=query_mask)

    def update_against(self, ref: ReferenceRows, p_hat: Tensor, *, invalid: Tensor | None = None,
                       query_mask: Tensor | None = None) -> None:
        """Add one block of rows scored against a prepared reference (see :func:`reference_rows`).

        Same as :meth:`update` with the reference's ``p``, ``allowed``, ``v`` and ``scores``;
        ``invalid`` and ``query_mask`` as there.
        """
        p_hat = self._validate_against(ref, p_hat)
        row_shape = ref.p.shape[:-1]
        invalid_b = self._row_mask("invalid", invalid, row_shape, ref.p.device, default=False)
        include = self._row_mask("query_mask", query_mask, row_shape, ref.p.device, default=True)
        # Every check comes before the first accumulation, so a refused block leaves no trace.
        self._start(ref.p.device, ref.n_keys or ref.p.shape[-1], ref.v is not None, ref.scores_dev is not None,
                    ref.p.shape[: self.batch_dims])
        self._accumulate(ref, p_hat, invalid_b, include)

    def _validate_against(self, ref: ReferenceRows, p_hat: Tensor) -> Tensor:
        """Check ``p_hat`` against the reference and this accumulator's settings."""
        if not isinstance(ref, ReferenceRows):
            raise ValueError(f"ref must come from reference_rows(), got {type(ref).__name__}.")
        _check_block("p_hat", p_hat)
        if p_hat.dtype in (torch.float16, torch.bfloat16):
            p_hat = p_hat.float()
        if p_hat.shape != ref.p.shape or p_hat.dtype != ref.p.dtype or p_hat.device != ref.p.device:
            raise ValueError(
                f"p_hat is {tuple(p_hat.shape)} {p_hat.dtype} on {p_hat.device} but the reference rows are "
                f"{tuple(ref.p.shape)} {ref.p.dtype} on {ref.p.device}; they must match."
            )
        if (ref.k, ref.rank_stride) != (self.k, self.rank_stride):
            raise ValueError(
                f"the reference was prepared with k={ref.k}, rank_stride={ref.rank_stride} but this accumulator "
                f"uses k={self.k}, rank_stride={self.rank_stride}; prepare it with the same settings."
            )
        if ref.p.dim() < self.batch_dims + 2:
            raise ValueError(f"blocks need {self.batch_dims} batch dim(s) before [R, N], "
                             f"got shape {tuple(ref.p.shape)}.")
        return p_hat

    def _accumulate(self, ref: ReferenceRows, p_hat: Tensor, invalid_b: Tensor, include: Tensor) -> None:
        """Score the rows and add their sums; ``p_hat``'s failed rows are flagged, not scored.

        Failed rows are never cleaned: whatever they give (NaN, Inf) is dropped by the
        ``counted`` selection before any sum, and every kernel works row by row.
        """
        acc = self._acc
        assert acc is not None and self._kl_max is not None
        p, mask = ref.p, ref.mask
        q = p_hat if mask is None else torch.where(mask, p_hat, torch.zeros((), dtype=p.dtype, device=p.device))
        # Non-finite: a NaN or +-inf entry. amin propagates NaN and sees -inf; +inf (and a
        # positive NaN) is the largest weight by its bits, the first pick of the top-k
        # (which the recall uses as well): ~(x < inf) is True for NaN and +inf only.
        picked = _kth_largest(q, mask, ref.k)
        lowest = torch.amin(q, dim=-1)
        nonfinite = ~torch.isfinite(lowest) | ~(picked[0][..., 0] < float("inf"))
        negative = (lowest < 0) & ~nonfinite
        failed = invalid_b | nonfinite | negative
        counted = include & ~failed & ~ref.empty

        def add(name: str, per_row: Tensor) -> None:
            acc[name] += self._reduce(torch.where(counted, per_row.to(torch.float64), 0.0))

        terms = _divergence_terms(ref, q, self.eps)
        add("kl", terms.kl)
        self._kl_max = torch.maximum(
            self._kl_max, self._amax(torch.where(counted, terms.kl.to(torch.float64), float("-inf")))
        )
        add("js", terms.js)
        add("tv", terms.tv)
        add("entropy_ref", ref.entropy)
        add("entropy_approx", terms.entropy)
        add("topk_recall", _topk_recall_against(ref, q, picked))
        add("frobenius_diff", terms.frobenius)
        add("frobenius_ref", ref.frobenius)

        if ref.v is not None:
            add("output_diff", (ref.output - q @ ref.v).square().sum(-1))
            add("output_ref", ref.output_sq)

        if ref.scores_dev is not None:
            sample = slice(None, None, self.rank_stride)
            # in the scores' order, as the reference's ranks: the same terms, summed exactly
            q_s = q[..., sample, :].gather(-1, ref.rank_order)
            dq, vq = _centred_ranks(q_s, ref.rank_mask, ref.scores_dev.dtype)
            rho = _rank_correlation(ref.scores_dev, ref.scores_var, dq, vq)
            defined = counted[..., sample] & ~torch.isnan(rho)
            acc["spearman"] += self._reduce(torch.where(defined, rho, 0.0))
            acc["spearman_rows"] += self._reduce(defined)

        acc["rows"] += self._reduce(include)
        acc["counted_rows"] += self._reduce(counted)
        acc["failed_rows"] += self._reduce(include & failed)
        acc["invalid_rows"] += self._reduce(include & invalid_b)
        acc["nonfinite_rows"] += self._reduce(include & nonfinite)
        acc["negative_rows"] += self._reduce(include & negative)
        acc["empty_rows"] += self._reduce(include & ref.empty & ~failed)
        acc["kl_floored_rows"] += self._reduce(counted & terms.floored)

    def _amax(self, x: Tensor) -> Tensor:
        return x.amax(dim=tuple(range(self.batch_dims, x.dim()))) if x.dim() > self.batch_dims else x

    @staticmethod
    def _row_mask(name: str, m: Tensor | None, row_shape: torch.Size, device: torch.device, *, default: bool) -> Tensor:
        return broadcast_mask(name, m, row_shape, device, default=default,
                              meaning="one entry per row [..., R]", expect="one entry per row of the block")

    def compute(self) -> dict[str, float]:
        """Return metric name -> value (floats; counts are whole numbers).

        With ``batch_dims > 0`` every value is a float64 tensor of the batch shape instead
        (one entry per head, say).

        Keys: ``kl_mean, kl_max, kl_floored_rows, js_mean, tv_mean, entropy_ref_mean,
        entropy_approx_mean, topk_recall_mean, frobenius_rel, rows, counted_rows,
        failed_rows, failed_fraction, invalid_rows, nonfinite_rows, negative_rows,
        empty_rows``; plus ``output_rel`` when values were given and ``spearman_mean,
        spearman_rows`` when scores were given (``spearman_rows`` counts the rows where the
        correlation is defined).

        Raises
        ------
        ValueError
            If no row was added.
        """
        if self._acc is None or bool((self._acc["rows"] == 0).any()):
            raise ValueError("no rows were added: call update() with at least one included row first.")
        a = self._acc
        n = a["counted_rows"]
        nan = torch.full_like(n, float("nan"))

        def mean(total: Tensor, count: Tensor) -> Tensor:
            return torch.where(count > 0, total / count.clamp_min(1), nan)

        def rel(diff: Tensor, ref: Tensor) -> Tensor:
            return torch.where(ref > 0, (diff / torch.where(ref > 0, ref, 1.0)).sqrt(), nan)

        out = {f"{name}_mean": mean(a[name], n) for name in _SUMS}
        out["kl_max"] = torch.where(n > 0, self._kl_max, nan)
        out["frobenius_rel"] = rel(a["frobenius_diff"], a["frobenius_ref"])
        if self._has_values:
            out["output_rel"] = rel(a["output_diff"], a["output_ref"])
        if self._has_scores:
            out["spearman_mean"] = mean(a["spearman"], a["spearman_rows"])
            out["spearman_rows"] = a["spearman_rows"]
        for name in _COUNTS:
            if name != "spearman_rows":
                out[name] = a[name]
        out["failed_fraction"] = a["failed_rows"] / a["rows"]
        if self.batch_dims == 0:
            return {name: value.item() for name, value in out.items()}
        return {name: value.cpu() for name, value in out.items()}


def head_metrics(p: Tensor, p_hat: Tensor, *, k: int = 5, eps: float = KL_EPS, **block) -> dict[str, float]:
    """All metrics of one head from full maps (one block). See :class:`StreamingAttentionMetrics`.

    Parameters
    ----------
    p, p_hat : Tensor
        Full reference and approximate maps ``[..., N, N]`` (or any row block).
    k, eps
        As in :class:`StreamingAttentionMetrics`.
    **block
        ``allowed``, ``v``, ``scores``, ``invalid``, ``query_mask``: keyword arguments of
        :meth:`StreamingAttentionMetrics.update`.

    Returns
    -------
    dict[str, float]

    Examples
    --------
    >>> import torch
    >>> p = torch.tensor([[0.5, 0.5], [0.5, 0.5]], dtype=torch.float64)
    >>> p_hat = torch.tensor([[0.25, 0.75], [float("nan"), 1.0]], dtype=torch.float64)
    >>> m = head_metrics(p, p_hat, v=torch.eye(2, dtype=torch.float64))
    >>> m["failed_rows"], m["failed_fraction"], round(m["tv_mean"], 6)
    (1.0, 0.5, 0.25)
    >>> round(m["frobenius_rel"], 6)  # sqrt(2 * 0.25**2 / (2 * 0.5**2)) over the counted row
    0.5
    """
    acc = StreamingAttentionMetrics(k=k, eps=eps)
    acc.update(p, p_hat, **block)
    return acc.compute()


RowsFn = Callable[[slice], Tensor]


def stream_head_metrics(
    ref_rows: RowsFn,
    approx_rows: Callable[[slice], Tensor | tuple[Tensor, Tensor]],
    *,
    n_queries: int,
    v: Tensor | None = None,
    block_rows: int = 256,
    scores_rows: RowsFn | None = None,
    causal: bool = False,
    key_padding_mask: Tensor | None = None,
    allowed_rows: Callable[[slice], Tensor] | None = None,
    invalid: Tensor | Callable[[slice], Tensor] | None = None,
    query_mask: Tensor | None = None,
    k: int = 5,
    eps: float = KL_EPS,
    progress: bool = False,
) -> dict[str, float]:
    """Metrics of one head, streamed over blocks of ``block_rows`` query rows.

    Peak memory is a few ``[..., block_rows, N]`` tensors, never an ``N x N`` map.

    Parameters
    ----------
    ref_rows : callable
        ``ref_rows(rows: slice) -> [..., R, N]``: softmax rows for queries ``rows``.
    approx_rows : callable
        ``approx_rows(rows) -> [..., R, N]`` approximate rows, or a pair ``(rows, invalid)``
        with a bool ``[..., R]`` failure flag per row (e.g. normalizer <= 0).
    n_queries : int
        Number of query rows to stream over.
    v : Tensor, optional
        Values ``[..., N, dv]`` for ``output_rel``.
    block_rows : int
        Rows per block (default 256); any positive size, dividing ``n_queries`` or not.
    scores_rows : callable, optional
        ``scores_rows(rows) -> [..., R, N]`` logits for ``spearman_mean``.
    causal : bool
        Query ``i`` sees keys ``j <= i`` (rows are global indices, so blocks get offsets).
    key_padding_mask : Tensor, optional
        Bool ``[..., N]``, True = real key.
    allowed_rows : callable, optional
        ``allowed_rows(rows) -> bool [..., R, N]``, a custom mask; exclusive with ``causal``
        and ``key_padding_mask``.
    invalid : Tensor or callable, optional
        Bool ``[..., n_queries]`` or ``invalid(rows) -> [..., R]``: failed rows.
    query_mask : Tensor, optional
        Bool ``[..., n_queries]``: rows to include (e.g. ``key_padding_mask`` to skip padded
        query tokens).
    k, eps
        As in :class:`StreamingAttentionMetrics`.
    progress : bool
        Show a tqdm bar over blocks.

    Returns
    -------
    dict[str, float]
        See :meth:`StreamingAttentionMetrics.compute`.

    Raises
    ------
    ValueError
        On bad sizes, conflicting masks, or blocks of the wrong shape.

    Examples
    --------
    Softmax against itself: every divergence is 0 and recall is 1.

    >>> import torch
    >>> g = torch.Generator().manual_seed(0)
    >>> q, key = torch.randn(10, 4, generator=g), torch.randn(10, 4, generator=g)
    >>> def scores(rows):
    ...     s = q[rows] @ key.T / 2.0
    ...     i = torch.arange(rows.start, rows.stop)[:, None]
    ...     return s.masked_fill(torch.arange(10)[None, :] > i, float("-inf"))
    >>> soft = lambda rows: torch.softmax(scores(rows), dim=-1)
    >>> m = stream_head_metrics(soft, soft, n_queries=10, block_rows=3, causal=True,
    ...                         scores_rows=scores)
    >>> m["kl_max"], m["topk_recall_mean"], m["rows"], m["spearman_rows"]
    (0.0, 1.0, 10.0, 9.0)
    """
    if not isinstance(n_queries, int) or isinstance(n_queries, bool) or n_queries < 1:
        raise ValueError(f"n_queries must be a positive int, got {n_queries!r}.")
    if not isinstance(block_rows, int) or isinstance(block_rows, bool) or block_rows < 1:
        raise ValueError(f"block_rows must be a positive int (query rows per block), got {block_rows!r}.")
    if allowed_rows is not None and (causal or key_padding_mask is not None):
        raise ValueError("pass either allowed_rows (a custom mask) or causal/key_padding_mask, not both.")
    for name, m in (("invalid", invalid), ("query_mask", query_mask)):
        if isinstance(m, Tensor) and m.shape[-1] != n_queries:
            raise ValueError(f"{name} has {m.shape[-1]} entries per row block but n_queries = {n_queries}.")

    acc = StreamingAttentionMetrics(k=k, eps=eps)
    starts = range(0, n_queries, block_rows)
    for start in tqdm(starts, desc="metrics", unit="block", disable=not progress, leave=False):
        rows = slice(start, min(start + block_rows, n_queries))
        n_rows = rows.stop - rows.start
        p = ref_rows(rows)
        got = approx_rows(rows)
        p_hat, block_invalid = got if isinstance(got, tuple) else (got, None)
        for name, t in (("ref_rows", p), ("approx_rows", p_hat)):
            if not isinstance(t, Tensor) or t.dim() < 2 or t.shape[-2] != n_rows:
                shape = tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__
                raise ValueError(f"{name}({rows}) must return [..., {n_rows}, N], got {shape}.")
        if allowed_rows is not None:
            allowed = allowed_rows(rows)
        else:
            allowed = allowed_keys(
                n_rows, p.shape[-1], causal=causal, key_padding_mask=key_padding_mask,
                query_offset=rows.start, device=p.device,
            )
        bad = invalid(rows) if callable(invalid) else (invalid[..., rows] if invalid is not None else None)
        if block_invalid is not None:
            bad = block_invalid if bad is None else (bad.to(block_invalid.device) | block_invalid)
        acc.update(
            p,
            p_hat,
            allowed=allowed,
            v=v,
            scores=scores_rows(rows) if scores_rows is not None else None,
            invalid=bad,
            query_mask=query_mask[..., rows] if query_mask is not None else None,
        )
    return acc.compute()
