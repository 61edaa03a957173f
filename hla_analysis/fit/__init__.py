"""Fit the learnable parts of attention variants to softmax, per head.

Every fitted variant gets the same treatment: Adam, the same number of steps and learning
rate, deterministic seeds, and the loss that attention transfer (Hedgehog, LoLCATs) uses:
the row KL divergence ``KL(softmax || approx)``, i.e. the cross-entropy of the weights up to
the softmax entropy (Adam with cosine decay; defaults in :class:`FitConfig`). Parameters are
per head (:meth:`Variant.bind` with ``heads``), so one fit covers a whole layer. The
parameter count per head is reported, so tables can show the budget beside the score.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch
from torch import Tensor

from hla_analysis._checks import check_batch, query_positions
from hla_analysis.fit.adam import CosineAdam
from hla_analysis.ops import softmax_attention_map
from hla_analysis.variants import Variant

# Weights below this are treated as this inside log(): signed variants (odd M with affine
# factors) can produce negative weights, where the KL is undefined.
_LOG_FLOOR = 1e-12


@dataclass(frozen=True)
class FitConfig:
    """Optimiser settings, identical for every fitted variant."""

    steps: int = 40
    lr: float = 0.01
    seed: int = 0
    # Non-causal fits use every row_stride-th query row (against all keys): rows are
    # interchangeable training examples, and the cost falls by the same factor.
    row_stride: int = 4
    # At most this many training query rows per input and head (after row_stride), taken as
    # 8 contiguous runs spread evenly over the sequence: a step then costs O(max_rows x N)
    # per head instead of O(N^2), so long inputs (N = 8,192 .. 32,760) fit in bounded time.
    # Inputs of up to 4 x 512 tokens (non-causal) or 512 tokens (causal) are not capped.
    max_rows: int = 512
    # "map_kl": row KL of the weights (Hedgehog); "output_mse": attention-output MSE against
    # softmax's output on the same values (LoLCATs' attention transfer).
    objective: str = "map_kl"

    def __post_init__(self):
        if self.objective not in _OBJECTIVES:
            raise ValueError(f"objective must be one of {', '.join(_OBJECTIVES)}, got {self.objective!r}.")
        if self.steps < 0:
            raise ValueError(f"steps (--fit-steps) must be >= 0, got {self.steps}.")
        if self.row_stride < 1:
            raise ValueError(f"the fits' row_stride must be >= 1, got {self.row_stride}.")
        if self.max_rows < _RUNS:
            raise ValueError(f"max_rows (--fit-max-rows) must be >= {_RUNS} (training rows per input and head), "
                             f"got {self.max_rows}.")
        if not self.lr > 0:
            raise ValueError(f"lr (--fit-lr) must be > 0, got {self.lr}.")

    def as_dict(self) -> dict:
        out = asdict(self)
        if self.objective == "map_kl":
            del out["objective"]  # the default keeps the keys of earlier runs (resume) unchanged
        return out


@dataclass
class FitResult:
    """Training-loss history of one fit and the parameter budget per head."""

    losses: list[float] = field(default_factory=list)
    params_per_head: int = 0

    @property
    def initial_loss(self) -> float:
        return self.losses[0] if self.losses else float("nan")

    @property
    def final_loss(self) -> float:
        return self.losses[-1] if self.losses else float("nan")


def is_learnable(variant: Variant) -> bool:
    """Whether the variant has parameters to fit: read from its parsed spec (the map registry)."""
    return variant.parsed.learnable


def row_kl_loss(variant: Variant, batches: list[dict], targets: list[Tensor]) -> Tensor:
    """Mean row ``KL(p || p_hat)`` over every batch, head and query row.

    Signed variants (odd M with affine factors) can give negative weights, where the KL is
    undefined: they enter the log floored, and their total negative mass is added to the
    loss so that the gradient pushes them back towards valid distributions. Rows whose
    normalizer is not a positive finite number (e.g. an early causal row whose few
    similarities all vanish) carry no distribution at all: they are left out of the mean,
    as the evaluation leaves them out and counts them.
    """
    return _mean_loss(variant, batches, [(p, torch.log(p.clamp_min(_LOG_FLOOR))) for p in targets], "map_kl")


def _row_kl(variant: Variant, batch: dict, p: Tensor, log_p: Tensor) -> tuple[Tensor, Tensor]:
    """Per-row loss of :func:`row_kl_loss` and the rows that count (``log_p`` precomputed)."""
    weights, den = variant.weights(batch["q"], batch["k"], scale=batch["scale"], causal=batch["causal"],
                                   query_offset=batch.get("query_offset", 0))
    valid = (den > 0) & torch.isfinite(den)
    p_hat = weights / torch.where(valid, den, torch.ones_like(den))
    log_ratio = log_p - torch.log(p_hat.clamp_min(_LOG_FLOOR))
    row_loss = (p * log_ratio).sum(-1)
    if not variant.positive:  # the negative mass of a positive variant is exactly 0
        row_loss = row_loss + (-p_hat).clamp_min(0).sum(-1)
    return row_loss, valid.squeeze(-1) & torch.isfinite(row_loss)


def output_mse_loss(variant: Variant, batches: list[dict], targets: list[Tensor]) -> Tensor:
    """Mean squared error between the variant's attention output and softmax's (LoLCATs).

    ``targets`` are softmax outputs ``[..., N, dv]`` on each batch's ``v``. Rows whose
    normalizer is not a positive finite number are left out, as in :func:`row_kl_loss`.
    """
    return _mean_loss(variant, batches, [(target, None) for target in targets], "output_mse")


def _mean_loss(variant: Variant, batches: list[dict], targets: list[tuple], objective: str) -> Tensor:
    """Mean of :func:`_loss_sums` over every batch (one graph: the caller calls backward)."""
    total, count = 0.0, 0
    for batch, target in zip(batches, targets):
        block_sum, block_count = _loss_sums(variant, batch, target, objective)
        total, count = total + block_sum, count + block_count
    return total / _count(count, variant)


_OBJECTIVES = ("map_kl", "output_mse")


def _init_shift(variant: Variant, batches: list[dict]) -> None:
    """Start a logit shift at each head's smallest training logit.

    Factors ``1 + (s - b)/c`` are then >= 1 on every logit seen, so the weight starts
    monotone in q.k; a shift of tens of logits is beyond what a few Adam steps could travel.
    Logits are formed one row block at a time (memory ``N x block``, never ``N x N``).
    """
    lowest = None
    for b in batches:
        for block in _row_blocks(b):
            scores = (block["q"] @ block["k"].transpose(-1, -2)) * block["scale"]
            if block["causal"]:
                rows = _block_positions(block)[:, None]
                future = torch.arange(scores.shape[-1], device=scores.device)[None, :] > rows
                scores = scores.masked_fill(future, float("inf"))
            low = scores.flatten(-2).amin(-1)  # [..., H]
            low = low.reshape(-1, low.shape[-1]).amin(0) if low.dim() > 1 else low
            lowest = low if lowest is None else torch.minimum(lowest, low)
    with torch.no_grad():
        variant.shift.copy_(lowest.reshape(variant.shift.shape).to(variant.shift.dtype))


def _subsample_rows(batch: dict, stride: int) -> dict:
    """Every ``stride``-th query row of a non-causal batch, each keeping its own position."""
    if batch["causal"] or stride == 1:
        return batch  # causal rows are not interchangeable: row i sees i + 1 keys
    q = batch["q"]
    positions = query_positions(batch.get("query_offset", 0), q.shape[-2], q.device)[::stride]
    return {**batch, "q": q[..., ::stride, :], "query_offset": positions}


# contiguous runs of rows a capped input is sampled in (see FitConfig.max_rows)
_RUNS = 8


def _cap_rows(batch: dict, max_rows: int) -> list[dict]:
    """At most ``max_rows`` query rows of a batch, as ``_RUNS`` contiguous runs spread evenly.

    Causal runs stay batches of their own, each with its ``query_offset``: a run then needs the
    keys up to its last row only (see :func:`_causal_horizon`). Non-causal runs form one batch,
    their rows side by side and ``query_offset`` a 1-D tensor of each row's position (positional
    feature maps need it), so a step treats them in one block instead of one per run. A batch
    with ``max_rows`` rows or fewer is returned whole, unchanged.
    """
    q = batch["q"]
    n = q.shape[-2]
    if n <= max_rows:
        return [batch]
    size, offset = max_rows // _RUNS, batch.get("query_offset", 0)
    starts = [(i * (n - size)) // (_RUNS - 1) for i in range(_RUNS)]
    if batch["causal"]:
        return [{**batch, "q": q[..., s : s + size, :], "query_offset": offset + s} for s in starts]
    rows = torch.cat([torch.arange(s, s + size) for s in starts])
    positions = query_positions(offset, n)[rows.to(offset.device) if isinstance(offset, Tensor) else rows]
    return [{**batch, "q": q.index_select(-2, rows.to(q.device)), "query_offset": positions.to(q.device)}]


def _causal_horizon(block: dict, variant: Variant) -> dict:
    """A causal block with the keys its rows cannot see dropped (same weights, less work).

    Row ``i`` attends to keys ``0..i``, so a block whose last row is at ``offset + rows - 1``
    needs no key past it: early rows of long inputs then cost a fraction of ``N``. Kept whole
    when the variant's features depend on the sequence length (cosFormer), or the offsets are
    a tensor.
    """
    offset = block.get("query_offset", 0)
    if not block["causal"] or isinstance(offset, Tensor) or variant.reads_all_keys:
        return block
    horizon = offset + block["q"].shape[-2]
    if horizon >= block["k"].shape[-2]:
        return block
    out = {**block, "k": block["k"][..., :horizon, :]}
    if "v" in block:
        out["v"] = block["v"][..., :horizon, :]
    return out


def _block_positions(block: dict) -> Tensor:
    """The global positions of a block's query rows (see :func:`_cap_rows`)."""
    q = block["q"]
    return query_positions(block.get("query_offset", 0), q.shape[-2], q.device)


# Elements of one [..., rows, N] map of a fit's row block: the fit's memory is a few such
# maps (autograd keeps the block's intermediates until its backward), whatever N is.
FIT_MAP_ELEMENTS = 2**22
# On a GPU blocks are this many times larger: each block recomputes the key features of all
# N keys, so at N = 32,760 blocks of a few rows would spend the fit on them.
_GPU_BLOCK_FACTOR = 16


def _map_budget(device: torch.device) -> int:
    return FIT_MAP_ELEMENTS * (_GPU_BLOCK_FACTOR if device.type == "cuda" else 1)


def _row_blocks(batch: dict, map_elements: int | None = None) -> list[dict]:
    """Split a batch's query rows into blocks whose ``[..., rows, N]`` maps stay within budget.

    Each block carries its ``query_offset`` (the causal mask and positions need it); a batch
    that fits the budget is returned whole, unchanged.
    """
    q, k = batch["q"], batch["k"]
    n_rows, n_keys = q.shape[-2], k.shape[-2]
    per_row = max(1, q[..., :1, :1].numel()) * n_keys
    rows = max(1, (map_elements or _map_budget(q.device)) // per_row)
    if rows >= n_rows:
        return [batch]
    offset = batch.get("query_offset", 0)

    def at(s: int):
        return offset[s : s + rows] if isinstance(offset, Tensor) else offset + s

    return [{**batch, "q": q[..., s : s + rows, :], "query_offset": at(s)} for s in range(0, n_rows, rows)]


def fit_variant(variant: Variant, batches: list[dict], *, config: FitConfig = FitConfig()) -> FitResult:
    """Fit ``variant`` to softmax on ``batches`` (all heads of one layer at once).

    The loss is formed one block of query rows at a time, with a backward per block, so
    memory stays at a few ``[..., block_rows, N]`` maps (see ``FIT_MAP_ELEMENTS``) however
    long the inputs are. The gradient is the same as that of the whole mean (up to float
    rounding), since the number of rows that count does not depend on the parameters'
    values through any differentiable path.

    Parameters
    ----------
    variant : Variant
        Bound with ``heads`` (``variant.bind(d, heads=H)``) to fit every head separately.
    batches : list of dict
        Training inputs, each with ``q``, ``k`` (``[H, N, d]``), ``scale`` and ``causal``.
    config : FitConfig
        Steps, learning rate, seed.

    Returns
    -------
    FitResult
        ``losses`` holds the training loss before each step and after the last one.

    Examples
    --------
    >>> from hla_analysis.variants import make_variant
    >>> g = torch.Generator().manual_seed(0)
    >>> batch = {"q": torch.randn(2, 16, 4, generator=g) * 2, "k": torch.randn(2, 16, 4, generator=g) * 2,
    ...          "scale": 0.5, "causal": False}
    >>> var = make_variant("linear:phi=hedgehog").bind(4, heads=2)
    >>> result = fit_variant(var, [batch], config=FitConfig(steps=20))
    >>> result.final_loss < result.initial_loss, result.params_per_head
    (True, 16)
    """
    if not batches:
        raise ValueError("fit_variant needs at least one training input; got none.")
    batches = [_subsample_rows(b, config.row_stride) for b in batches]
    batches = [run for b in batches for run in _cap_rows(b, config.max_rows)]
    if config.objective == "output_mse" and any("v" not in b for b in batches):
        raise ValueError("objective='output_mse' needs the values: give every batch a 'v' tensor [H, N, dv].")
    if getattr(variant, "shift", None) is not None:
        _init_shift(variant, batches)
    params = [p for p in variant.parameters() if p.requires_grad]
    heads = variant.heads or 1
    result = FitResult(params_per_head=sum(p.numel() for p in params) // heads)
    blocks = [_causal_horizon(block, variant) for b in batches for block in _row_blocks(b)]
    # Targets are kept across steps while all of them together stay within a few block maps;
    # beyond that (long inputs) they are recomputed per block and step, so that they never
    # pile up to N x N.
    keep = sum(b["q"][..., :1].numel() * b["k"].shape[-2] for b in blocks) <= 2 * _map_budget(blocks[0]["q"].device)
    targets = [_target(b, config.objective) for b in blocks] if keep else None

    def loss_and_backward(backward: bool) -> Tensor:
        """The loss over every block; with ``backward`` its gradient lands in ``.grad``."""
        if keep and len(blocks) == 1 and backward:
            # one block: the plain mean and one backward, exactly as a single graph
            loss = _loss_sums(variant, blocks[0], targets[0], config.objective)
            loss = loss[0] / _count(loss[1], variant)
            if torch.isfinite(loss):
                loss.backward()
            return loss.detach()
        total, count = 0.0, 0
        for i, block in enumerate(blocks):
            target = targets[i] if keep else None  # None: recomputed inside the block's check batch
            block_sum, block_count, finite = _loss_sums_read(variant, block, target, config.objective)
            if backward and block_count and finite:
                block_sum.backward()
            total, count = total + block_sum.detach(), count + block_count
        count = _count(count, variant)
        if backward:
            for p in params:
                if p.grad is not None:
                    p.grad.div_(count)
        return total / count

    if not params:
        with torch.no_grad():
            result.losses.append(float(loss_and_backward(False)))
        return result
    torch.manual_seed(config.seed)
    # Adam with cosine decay (late steps refine instead of oscillating around the minimum);
    # torch.optim's arithmetic without its one-time torch._dynamo import (see fit/adam.py)
    optimiser = CosineAdam(params, lr=config.lr, steps=config.steps)
    for _ in range(config.steps):
        optimiser.zero_grad()
        loss = loss_and_backward(True)
        if not torch.isfinite(loss):
            raise ValueError(
                f"fitting {variant.spec} diverged (loss {loss.item()}); lower the learning rate (lr={config.lr})."
            )
        optimiser.step()
        result.losses.append(float(loss))
    with torch.no_grad():
        result.losses.append(float(loss_and_backward(False)))
    return result


def _target(block: dict, objective: str) -> tuple[Tensor, Tensor]:
    """Softmax rows of a block and, per objective, their floored logs or softmax's output."""
    with torch.no_grad():
        p = softmax_attention_map(block["q"], block["k"], scale=block["scale"], causal=block["causal"],
                                  query_offset=block.get("query_offset", 0))
        if objective == "output_mse":
            return p @ block["v"], p
        return p, torch.log(p.clamp_min(_LOG_FLOOR))


def _loss_sums(variant: Variant, block: dict, target: tuple[Tensor, Tensor], objective: str) -> tuple[Tensor, int]:
    """Sum of the per-row (or per-entry) losses of a block over the rows that count, and their count."""
    block_sum, count, _ = _loss_sums_read(variant, block, target, objective)
    return block_sum, count


def _loss_sums_read(variant: Variant, block: dict, target: tuple[Tensor, Tensor] | None,
                    objective: str) -> tuple[Tensor, int, bool]:
    """:func:`_loss_sums` and whether the sum is finite, read from the device in one go.

    ``target`` None: the block's targets are formed here, their checks joining the same read.

    The variant's input checks run as one batch (:func:`~hla_analysis._checks.check_batch`):
    one reduction per checked tensor instead of an elementwise isfinite, same errors. The row
    count and the sum's finiteness join that batch's one host read (on a GPU every read is a
    sync that drains the launch queue: one per block and step instead of three).
    """
    read: list[float] = []

    def keep(high: float, low: float, finite: float) -> bool:
        read.extend((high * 2**20 + low, finite))
        return True

    with check_batch() as batch:
        if target is None:
            target = _target(block, objective)
        block_sum, valid = _loss_sums_unbatched(variant, block, target, objective)
        count = valid.sum()
        # the batch reads float32: the count travels as two halves, each exact below 2^24
        batch.add_values((count // 2**20, count % 2**20, torch.isfinite(block_sum.detach())), keep, lambda: None)
    if not read:  # checks disabled, or an enclosing batch resolves later: read them here
        return block_sum, int(count), bool(torch.isfinite(block_sum))
    return block_sum, int(read[0]), bool(read[1])


def _loss_sums_unbatched(variant: Variant, block: dict, target: tuple[Tensor, Tensor],
                         objective: str) -> tuple[Tensor, Tensor]:
    """The block's loss sum over the rows that count, and the mask of those rows."""
    if objective == "output_mse":
        weights, den = variant.weights(block["q"], block["k"], scale=block["scale"], causal=block["causal"],
                                       query_offset=block.get("query_offset", 0))
        valid = (den > 0) & torch.isfinite(den)
        output = (weights / torch.where(valid, den, torch.ones_like(den))) @ block["v"]
        error = (output - target[0]).square().mean(-1)
        valid = valid.squeeze(-1) & torch.isfinite(error)
        return torch.where(valid, error, torch.zeros_like(error)).sum(), valid
    row_loss, valid = _row_kl(variant, block, *target)
    return torch.where(valid, row_loss, torch.zeros_like(row_loss)).sum(), valid


def _count(count: int, variant: Variant) -> int:
    if count == 0:
        raise ValueError(
            f"{variant.spec} has no row with a positive normalizer on the training inputs; it cannot be fitted."
        )
    return count
