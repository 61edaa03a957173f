"""Per-row metrics between a reference attention row ``p`` and an approximation ``p_hat``.

Layout: ``p``, ``p_hat`` (and ``scores``) are blocks of attention rows ``[..., R, N]`` --
any leading batch/head dims, then ``R`` query rows, then ``N`` keys. ``allowed`` is a bool
mask broadcastable to that shape, True where a row may attend (padding and causal masks
applied). ``p`` must be zero outside ``allowed``; entries of ``p_hat`` outside ``allowed`` are
ignored (read as zero). Every function returns one value per row, shape ``[..., R]``.

Conventions, fixed once for the whole toolkit:

* natural logarithms everywhere; ``0 log 0 = 0``;
* KL(p || p_hat) is infinite when ``p_hat`` is zero where ``p`` is not. With ``eps=None`` the
  result is ``+inf`` (never NaN); with a float ``eps`` the approximate weights are floored at
  ``eps`` inside the logarithm and the affected rows are reported (``return_floored=True``), so a
  finite number is never mistaken for the true divergence;
* Jensen-Shannon is the divergence (at most ``ln 2``), not SciPy's distance (its square root);
* rows with no allowed entry give 0 for the divergences and entropies and NaN for top-k recall
  and Spearman (undefined); the streaming accumulator excludes and counts such rows;
* float16/bfloat16 rows are computed in float32.
"""

from __future__ import annotations

import torch
from torch import Tensor

#: Default floor for ``p_hat`` inside the KL logarithm: a normal float32 number, so the floored
#: value does not depend on the dtype (``-log(1e-30)`` is about 69.1 nats per unit of mass).
KL_EPS = 1e-30


# ----------------------------------------------------------------------------- input checks


def _check_block(name: str, x: Tensor) -> None:
    if not isinstance(x, Tensor):
        raise ValueError(f"{name} must be a torch.Tensor [..., R, N], got {type(x).__name__}.")
    if x.dim() < 1:
        raise ValueError(f"{name} must be a tensor [..., R, N] (or a single row [N]), got a scalar.")
    if not x.is_floating_point():
        raise ValueError(f"{name} has dtype {x.dtype}; metrics need a floating dtype (cast with .float()).")


def broadcast_mask(
    name: str, mask: Tensor | None, shape: torch.Size, device: torch.device, *, default: bool, meaning: str, expect: str
) -> Tensor:
    """Check a bool mask and broadcast it to ``shape``; ``None`` gives a constant ``default`` mask.

    ``meaning`` says what True means and ``expect`` the shape the caller should pass; both go
    into the error message.
    """
    if mask is None:
        return torch.full(shape, default, dtype=torch.bool, device=device)
    if not isinstance(mask, Tensor) or mask.dtype != torch.bool:
        got = mask.dtype if isinstance(mask, Tensor) else type(mask).__name__
        raise ValueError(f"{name} must be a bool tensor ({meaning}), got {got}.")
    try:
        return torch.broadcast_to(mask.to(device), shape)
    except RuntimeError:
        raise ValueError(
            f"{name} has shape {tuple(mask.shape)}, which does not broadcast to {tuple(shape)}; pass {expect}."
        ) from None


def broadcast_allowed(allowed: Tensor | None, shape: torch.Size, device: torch.device) -> Tensor:
    """Return ``allowed`` broadcast to ``shape`` (all True when ``allowed`` is None).

    Examples
    --------
    >>> import torch
    >>> broadcast_allowed(torch.tensor([True, False]), torch.Size([3, 2]), torch.device("cpu")).shape
    torch.Size([3, 2])
    """
    return broadcast_mask(
        "allowed", allowed, shape, device, default=True,
        meaning="True = the row may attend to that key", expect="a mask [..., R, N] matching the row block",
    )


def check_reference(p: Tensor, allowed: Tensor, *, tol: float = 1e-3) -> None:
    """Check that ``p`` is a block of probability rows supported on ``allowed``.

    ``tol`` is the accepted ``|row sum - 1|`` (use 1e-2 for rows that were float16/bfloat16).

    Raises
    ------
    ValueError
        If ``p`` has NaN/Inf or negative entries, mass outside ``allowed``, or a non-empty row
        whose sum is not 1.
    """
    if not torch.isfinite(p).all():
        raise ValueError("the reference rows p contain NaN/Inf; p must be finite softmax rows.")
    if (p < 0).any():
        raise ValueError("the reference rows p have negative entries; p must be softmax rows (>= 0).")
    outside = (p != 0) & ~allowed
    if outside.any():
        raise ValueError(
            f"the reference rows p put weight on {int(outside.sum())} masked entries; p must be zero "
            "outside `allowed` (build p with the same causal/padding mask you pass here)."
        )
    sums = p.sum(-1, dtype=torch.float64)
    nonempty = allowed.any(-1)
    bad = nonempty & ((sums - 1).abs() > tol)
    if bad.any():
        worst = float(sums[bad][0])
        raise ValueError(
            f"{int(bad.sum())} reference row(s) do not sum to 1 (e.g. {worst:.6g}); p must be "
            "probability rows (softmax weights), not scores."
        )


def check_approximation(p_hat: Tensor, allowed: Tensor) -> None:
    """Check that ``p_hat`` is finite and non-negative on ``allowed``.

    Raises
    ------
    ValueError
        Naming how many rows fail; such rows are approximation failures and belong in the
        ``invalid`` mask of :class:`~hla_analysis.metrics.StreamingAttentionMetrics`.
    """
    bad_rows = failed_approximation_rows(p_hat, allowed)
    if bad_rows.any():
        raise ValueError(
            f"{int(bad_rows.sum())} approximate row(s) have NaN/Inf or negative weights on allowed "
            "entries, so they are not probability rows. Per-row metrics are undefined there: use "
            "StreamingAttentionMetrics / head_metrics, which exclude and count such rows, or drop them."
        )


def failed_approximation_rows(p_hat: Tensor, allowed: Tensor) -> Tensor:
    """Bool ``[..., R]``: rows of ``p_hat`` with a NaN/Inf or negative weight on an allowed entry.

    Examples
    --------
    >>> import torch
    >>> p_hat = torch.tensor([[0.5, 0.5], [1.5, -0.5], [float("nan"), 1.0]])
    >>> failed_approximation_rows(p_hat, torch.ones(3, 2, dtype=torch.bool)).tolist()
    [False, True, True]
    """
    bad = allowed & (~torch.isfinite(p_hat) | (p_hat < 0))
    return bad.any(-1)


def _prepare(p: Tensor, p_hat: Tensor, allowed: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
    _check_block("p", p)
    _check_block("p_hat", p_hat)
    if p.shape != p_hat.shape:
        raise ValueError(
            f"p has shape {tuple(p.shape)} but p_hat has {tuple(p_hat.shape)}; both must be the same "
            "row block [..., R, N]."
        )
    if p.dtype != p_hat.dtype or p.device != p_hat.device:
        raise ValueError(
            f"p is {p.dtype} on {p.device} but p_hat is {p_hat.dtype} on {p_hat.device}; move both "
            "to one dtype and device."
        )
    tol = 1e-3
    if p.dtype in (torch.float16, torch.bfloat16):  # the KL floor and logs need float32 range
        p, p_hat, tol = p.float(), p_hat.float(), 1e-2
    mask = broadcast_allowed(allowed, p.shape, p.device)
    check_reference(p, mask, tol=tol)
    check_approximation(p_hat, mask)
    return p, torch.where(mask, p_hat, torch.zeros((), dtype=p_hat.dtype, device=p_hat.device)), mask


# ----------------------------------------------------------- kernels on already-checked rows
# p >= 0 is zero outside `mask`; q is finite, >= 0 and zero outside `mask`.


def _kl(p: Tensor, q: Tensor, eps: float | None) -> tuple[Tensor, Tensor]:
    support = p > 0
    if eps is None:
        zero_hit = support & (q <= 0)
        # Elementwise log differences (not sum p log p - sum p log q) keep small KLs accurate.
        terms = torch.where(support & ~zero_hit, p * (torch.log(p) - torch.log(q)), torch.zeros_like(p))
        kl = terms.sum(-1)
        hit_rows = zero_hit.any(-1)
        return torch.where(hit_rows, torch.full_like(kl, float("inf")), kl), hit_rows
    floored = support & (q < eps)
    qf = torch.clamp(q, min=eps)
    safe_p = torch.where(support, p, torch.ones_like(p))
    terms = torch.where(support, p * (torch.log(safe_p) - torch.log(qf)), torch.zeros_like(p))
    return terms.sum(-1), floored.any(-1)


def _js(p: Tensor, q: Tensor) -> Tensor:
    m = 0.5 * (p + q)
    # xlogy(0, 0) = 0, and m > 0 wherever p > 0 or q > 0.
    return 0.5 * (torch.xlogy(p, p) - torch.xlogy(p, m) + torch.xlogy(q, q) - torch.xlogy(q, m)).sum(-1)


def _tv(p: Tensor, q: Tensor) -> Tensor:
    return 0.5 * (p - q).abs().sum(-1)


def _entropy(p: Tensor) -> Tensor:
    # 0 - x rather than -x: a one-hot row gets entropy +0.0, not -0.0.
    return 0.0 - torch.xlogy(p, p).sum(-1)


def _kth_largest(x: Tensor, mask: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Per row: the k_eff-th largest allowed value, and k_eff = min(k, #allowed)."""
    n_allowed = mask.sum(-1)
    k_eff = torch.clamp(n_allowed, max=k)
    k0 = min(k, x.shape[-1])
    neg_inf = torch.full((), float("-inf"), dtype=x.dtype, device=x.device)
    top = torch.topk(torch.where(mask, x, neg_inf), k0, dim=-1).values
    idx = torch.clamp(k_eff - 1, min=0).unsqueeze(-1)
    return top.gather(-1, idx).squeeze(-1), k_eff


def _topk_recall(p: Tensor, q: Tensor, mask: Tensor, k: int) -> Tensor:
    tau, k_eff = _kth_largest(p, mask, k)
    # Entries tied with p's k-th largest weight all count as "top": any of them is a valid pick.
    good = mask & (p >= tau.unsqueeze(-1))
    t, _ = _kth_largest(q, mask, k)
    t = t.unsqueeze(-1)
    above = mask & (q > t)
    at = mask & (q == t)
    n_above = above.sum(-1)
    n_at = at.sum(-1)
    # p_hat's top-k takes all of `above` and k_eff - n_above of the entries tied at the threshold;
    # averaging over every tie-break makes the value deterministic.
    hits = (above & good).sum(-1).to(torch.float64)
    tie_hits = (at & good).sum(-1).to(torch.float64)
    hits = hits + (k_eff - n_above).to(torch.float64) * tie_hits / torch.clamp(n_at, min=1)
    k_f = k_eff.to(torch.float64)
    recall = torch.minimum(hits, k_f) / torch.clamp(k_f, min=1)
    recall = torch.where(k_eff > 0, recall, torch.full_like(recall, float("nan")))
    return recall.to(p.dtype)


def average_ranks(x: Tensor, *, allowed: Tensor | None = None) -> Tensor:
    """Ranks ``0 .. n-1`` of the allowed entries of each row, ties sharing their average rank.

    Parameters
    ----------
    x : Tensor
        ``[..., N]`` values, finite on allowed entries.
    allowed : Tensor, optional
        Bool mask broadcastable to ``x``; entries outside it get ranks ``>= n_allowed`` that
        carry no meaning.

    Returns
    -------
    Tensor
        float64 ranks, same shape as ``x`` (0-based; add 1 for SciPy's ``rankdata``).

    Examples
    --------
    >>> import torch
    >>> average_ranks(torch.tensor([3.0, 1.0, 3.0, 2.0])).tolist()
    [2.5, 0.0, 2.5, 1.0]
    """
    mask = None if allowed is None else broadcast_allowed(allowed, x.shape, x.device)
    return _ranks(x, mask, torch.float64)


def _ranks(x: Tensor, mask: Tensor | None, dtype: torch.dtype) -> Tensor:
    """Average ranks in ``dtype`` (float32 holds the half-integer ranks exactly up to 2**23 keys)."""
    return _ranks_and_order(x, mask, dtype)[0]


def _ranks_and_order(x: Tensor, mask: Tensor | None, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """Average ranks (as :func:`_ranks`) and the sorting permutation of each row (masked entries last).

    A tie group occupies sorted positions ``first..last``; its average rank is
    ``(first + last) / 2``, found with a running max/min instead of scattered sums, on the
    rows that have a tie only (the other rows' ranks are their sorted positions).
    """
    n = x.shape[-1]
    if mask is not None:  # masked entries sort last (allowed values are finite)
        x = torch.where(mask, x, torch.full((), float("inf"), dtype=x.dtype, device=x.device))
    sorted_vals, order = torch.sort(order_key(x), dim=-1)
    position = torch.arange(n, device=x.device, dtype=dtype).expand(sorted_vals.shape)
    same = sorted_vals[..., 1:] == sorted_vals[..., :-1]
    if mask is not None:
        # the masked entries (sorted last, all +inf) tie with each other, but their ranks carry
        # no meaning: only ties among allowed entries send a row down the tie path (a causal
        # block would otherwise take it on every row)
        allowed_count = mask.expand(x.shape).sum(-1, keepdim=True)
        same &= torch.arange(1, n, device=x.device) < allowed_count
    same = same.reshape(-1, max(n - 1, 1))  # rows flattened
    tied = same.any(-1)
    if n > 1 and bool(tied.any()):
        rows = tied.nonzero().squeeze(-1)
        starts = torch.ones((len(rows), n), dtype=torch.bool, device=x.device)
        starts[:, 1:] = ~same[rows]
        ends = torch.ones_like(starts)
        ends[:, :-1] = starts[:, 1:]
        index = torch.arange(n, device=x.device).expand(starts.shape)
        first = torch.where(starts, index, 0).cummax(-1).values
        last = torch.where(ends, index, n - 1).flip(-1).cummin(-1).values.flip(-1)
        position = position.reshape(-1, n).clone()
        position[rows] = (first + last).to(dtype) / 2
        position = position.reshape(sorted_vals.shape)
    return torch.empty(sorted_vals.shape, dtype=dtype, device=x.device).scatter_(-1, order, position), order


def order_key(x: Tensor) -> Tensor:
    """Integers that sort, compare and tie exactly as the float values ``x`` (NaN aside).

    IEEE floats of one sign are ordered as their bit patterns read as integers (reversed for
    negative numbers): flipping the magnitude bits of the negatives gives one increasing
    order, and adding ``+0.0`` first turns ``-0.0`` into ``+0.0`` (equal floats, equal keys).
    Integer sorts and ``topk`` skip the NaN-aware float comparator: 1.3-1.6x faster on CPU.
    float16/bfloat16 are returned unchanged (plain float order).

    Examples
    --------
    >>> import torch
    >>> x = torch.tensor([0.5, -2.0, -0.0, float("inf"), 0.0, -1e-30])
    >>> torch.equal(torch.argsort(order_key(x), stable=True), torch.argsort(x, stable=True))
    True
    """
    ints = _INT_OF.get(x.dtype)
    if ints is None:
        return x
    bits = (x + 0.0).view(ints)
    return bits ^ ((bits >> (8 * bits.element_size() - 1)) & torch.iinfo(ints).max)


_INT_OF = {torch.float32: torch.int32, torch.float64: torch.int64}


def _centred_ranks(x: Tensor, mask: Tensor | None, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """Ranks minus their row mean (0 outside ``mask``) and their float64 sum of squares."""
    return _centre(_ranks(x, mask, dtype), x, mask, dtype)


def _centre(ranks: Tensor, x: Tensor, mask: Tensor | None, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """:func:`_centred_ranks` of ``x`` from its ranks, already computed."""
    if mask is None:
        dev = ranks - (x.shape[-1] - 1) / 2  # average ranks of 0..n-1 keep their sum
    else:
        n = mask.sum(-1, keepdim=True).to(dtype)
        dev = torch.where(mask, ranks - (n - 1) / 2, torch.zeros((), dtype=dtype, device=x.device))
    return dev, dev.square().sum(-1, dtype=torch.float64)


def _rank_correlation(dx: Tensor, vx: Tensor, dy: Tensor, vy: Tensor) -> Tensor:
    """Pearson correlation of centred ranks (float64 sums); NaN where a row is constant."""
    defined = (vx > 0) & (vy > 0)
    cov = (dx * dy).sum(-1, dtype=torch.float64)
    rho = cov / torch.sqrt(torch.where(defined, vx * vy, torch.ones_like(vx)))
    return torch.where(defined, torch.clamp(rho, -1.0, 1.0), torch.full_like(rho, float("nan")))


def _spearman(x: Tensor, y: Tensor, mask: Tensor) -> Tensor:
    dtype = torch.float64 if torch.float64 in (x.dtype, y.dtype) else torch.float32
    dx, vx = _centred_ranks(x, mask, dtype)
    dy, vy = _centred_ranks(y, mask, dtype)
    return _rank_correlation(dx, vx, dy, vy).to(y.dtype)


# ------------------------------------------------------------------------ public functions


def kl_divergence_rows(
    p: Tensor,
    p_hat: Tensor,
    *,
    allowed: Tensor | None = None,
    eps: float | None = None,
    return_floored: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """Row-wise KL(p || p_hat) in nats.

    Parameters
    ----------
    p, p_hat : Tensor
        Reference and approximate rows ``[..., R, N]``.
    allowed : Tensor, optional
        Bool mask broadcastable to ``p`` (None = every entry allowed).
    eps : float, optional
        None (default): exact, ``+inf`` for rows where ``p_hat`` is 0 on an entry with ``p > 0``.
        A float: ``p_hat`` is floored at ``eps`` inside the log, which turns those rows into a
        finite lower bound of the true divergence. Either way the rows are flagged.
    return_floored : bool
        Also return the bool ``[..., R]`` mask of rows that hit ``p_hat < eps`` (or 0).

    Returns
    -------
    Tensor or (Tensor, Tensor)
        KL per row ``[..., R]``, and the flag mask if ``return_floored``.

    Raises
    ------
    ValueError
        If shapes differ, ``p`` is not probability rows on ``allowed``, or ``p_hat`` has
        NaN/Inf/negative weights on ``allowed``.

    Examples
    --------
    KL([1/2, 1/2] || [1/4, 3/4]) = 1/2 ln 2 + 1/2 ln(2/3) = 1/2 ln(4/3):

    >>> import torch
    >>> p = torch.tensor([[0.5, 0.5]], dtype=torch.float64)
    >>> q = torch.tensor([[0.25, 0.75]], dtype=torch.float64)
    >>> round(float(kl_divergence_rows(p, q)[0]), 6)
    0.143841
    >>> kl_divergence_rows(p, torch.tensor([[0.0, 1.0]], dtype=torch.float64), return_floored=True)
    (tensor([inf], dtype=torch.float64), tensor([True]))
    """
    p, q, _ = _prepare(p, p_hat, allowed)
    if eps is not None and not eps > 0:
        raise ValueError(f"eps must be a positive float (or None for the exact, possibly infinite KL), got {eps}.")
    kl, floored = _kl(p, q, eps)
    return (kl, floored) if return_floored else kl


def _pair_rows_doc(func):
    """Fill in the parameter lines (and the Parameters/Returns block) that the two-map row
    functions share: ``{pair_params}`` inside a Parameters section, or the whole ``{pair_rows}``."""
    func.__doc__ = (func.__doc__.replace("    {pair_rows}\n", _PAIR_ROWS_DOC)
                    .replace("    {pair_params}\n", _PAIR_PARAMS))
    return func


_PAIR_PARAMS = """\
    p, p_hat : Tensor
        Reference and approximate rows ``[..., R, N]``.
    allowed : Tensor, optional
        Bool mask broadcastable to ``p``.
"""
_PAIR_ROWS_DOC = f"""\
    Parameters
    ----------
{_PAIR_PARAMS}
    Returns
    -------
    Tensor
        ``[..., R]``.
"""


@_pair_rows_doc
def js_divergence_rows(p: Tensor, p_hat: Tensor, *, allowed: Tensor | None = None) -> Tensor:
    """Row-wise Jensen-Shannon divergence in nats (between 0 and ln 2).

    This is the divergence; ``scipy.spatial.distance.jensenshannon`` returns its square root.

    {pair_rows}

    Examples
    --------
    p = [1/2, 1/2], p_hat = [1/4, 3/4], m = [3/8, 5/8]:
    JS = 1/2 (1/2 ln(4/3) + 1/2 ln(4/5)) + 1/2 (1/4 ln(2/3) + 3/4 ln(6/5))
    = 1/2 (0.032269 + 0.035375) = 0.033822.

    >>> import torch
    >>> p = torch.tensor([[0.5, 0.5]], dtype=torch.float64)
    >>> q = torch.tensor([[0.25, 0.75]], dtype=torch.float64)
    >>> round(float(js_divergence_rows(p, q)[0]), 6)
    0.033822
    """
    p, q, _ = _prepare(p, p_hat, allowed)
    return _js(p, q)


@_pair_rows_doc
def total_variation_rows(p: Tensor, p_hat: Tensor, *, allowed: Tensor | None = None) -> Tensor:
    """Row-wise total variation distance ``1/2 sum_j |p_j - p_hat_j|`` over allowed entries.

    {pair_rows}

    Examples
    --------
    >>> import torch
    >>> total_variation_rows(torch.tensor([[0.5, 0.5]]), torch.tensor([[0.25, 0.75]])).tolist()
    [0.25]
    """
    p, q, _ = _prepare(p, p_hat, allowed)
    return _tv(p, q)


def entropy_rows(p: Tensor, *, allowed: Tensor | None = None) -> Tensor:
    """Row-wise Shannon entropy ``-sum_j p_j ln p_j`` (low = spiky) of approximate or exact rows.

    Parameters
    ----------
    p : Tensor
        Rows ``[..., R, N]``, finite and non-negative on ``allowed`` (they need not sum to 1, so
        this also takes approximate rows).
    allowed : Tensor, optional
        Bool mask broadcastable to ``p``; entries outside it are ignored.

    Returns
    -------
    Tensor
        ``[..., R]``.

    Examples
    --------
    H([1/4, 3/4]) = 1/4 ln 4 + 3/4 ln(4/3) = 0.346574 + 0.215762 = 0.562335; a one-hot row has 0.

    >>> import torch
    >>> h = entropy_rows(torch.tensor([[0.25, 0.75], [1.0, 0.0]], dtype=torch.float64))
    >>> round(float(h[0]), 6), float(h[1])
    (0.562335, 0.0)
    """
    _check_block("p", p)
    if p.dtype in (torch.float16, torch.bfloat16):
        p = p.float()
    mask = broadcast_allowed(allowed, p.shape, p.device)
    check_approximation(p, mask)
    return _entropy(torch.where(mask, p, torch.zeros((), dtype=p.dtype, device=p.device)))


@_pair_rows_doc
def topk_recall_rows(p: Tensor, p_hat: Tensor, *, allowed: Tensor | None = None, k: int = 5) -> Tensor:
    """Row-wise fraction of the reference's ``k`` largest weights found in ``p_hat``'s top ``k``.

    Rows with fewer than ``k`` allowed keys use ``k_eff = #allowed``. Ties are resolved
    without arbitrary choices: any entry tied with p's ``k``-th largest weight counts as a
    top-``k`` entry of ``p``, and entries of ``p_hat`` tied at its ``k``-th largest weight are
    credited by their average over all tie-breaks (e.g. a ReLU map with many zero weights).

    Parameters
    ----------
    {pair_params}
    k : int
        Number of largest weights compared (default 5).

    Returns
    -------
    Tensor
        ``[..., R]`` in ``[0, 1]``; NaN for rows with no allowed entry.

    Examples
    --------
    p's top 2 are keys {0, 1}; p_hat's top 2 are keys {1, 2}: recall 1/2.

    >>> import torch
    >>> p = torch.tensor([[0.4, 0.3, 0.2, 0.1]])
    >>> q = torch.tensor([[0.1, 0.3, 0.4, 0.2]])
    >>> topk_recall_rows(p, q, k=2).tolist()
    [0.5]
    """
    if not isinstance(k, int) or isinstance(k, bool) or k < 1:
        raise ValueError(f"k must be a positive int (the number of largest weights compared), got {k!r}.")
    p, q, mask = _prepare(p, p_hat, allowed)
    return _topk_recall(p, q, mask, k)


def spearman_rows(scores: Tensor, p_hat: Tensor, *, allowed: Tensor | None = None) -> Tensor:
    """Row-wise Spearman rank correlation between the logits ``q.k`` and the weights ``p_hat``.

    Measures monotonicity: softmax weights are an increasing function of the score, so a
    faithful approximation scores 1. Ties get average ranks (as ``scipy.stats.spearmanr``).

    Parameters
    ----------
    scores : Tensor
        ``[..., R, N]`` scores, finite on allowed entries (masked entries may be ``-inf``).
    p_hat : Tensor
        ``[..., R, N]`` approximate weights, finite on allowed entries.
    allowed : Tensor, optional
        Bool mask broadcastable to the rows.

    Returns
    -------
    Tensor
        ``[..., R]`` in ``[-1, 1]``; NaN where undefined (fewer than 2 allowed entries, or
        constant scores or weights on the row).

    Examples
    --------
    >>> import torch
    >>> s = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    >>> spearman_rows(s, torch.tensor([[0.1, 0.2, 0.3, 0.4]])).tolist()
    [1.0]
    >>> spearman_rows(s, torch.tensor([[0.4, 0.3, 0.2, 0.1]])).tolist()
    [-1.0]
    """
    _check_block("scores", scores)
    _check_block("p_hat", p_hat)
    if scores.shape != p_hat.shape:
        raise ValueError(f"scores has shape {tuple(scores.shape)} but p_hat has {tuple(p_hat.shape)}; they must match.")
    mask = broadcast_allowed(allowed, p_hat.shape, p_hat.device)
    check_scores(scores, mask)
    bad = mask & ~torch.isfinite(p_hat)
    if bad.any():
        raise ValueError(f"p_hat has {int(bad.sum())} NaN/Inf entries on allowed keys; ranks are undefined there.")
    return _spearman(scores, p_hat, mask)


def check_scores(scores: Tensor, allowed: Tensor) -> None:
    """Refuse scores that are NaN/Inf on an allowed entry (masked entries may be ``-inf``)."""
    bad = allowed & ~torch.isfinite(scores)
    if bad.any():
        raise ValueError(
            f"scores have {int(bad.sum())} NaN/Inf entries on allowed keys; pass the finite logits "
            "scale * q.k (masked entries may be -inf)."
        )
