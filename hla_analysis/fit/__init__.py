"""Fit the learnable parts of attention variants to softmax, per head.

Every fitted variant gets the same treatment: Adam, the same number of steps and learning
rate, deterministic seeds, and the loss that attention transfer (Hedgehog, LoLCATs) uses:
the row KL divergence ``KL(softmax || approx)``, i.e. the cross-entropy of the weights up to
the softmax entropy (Adam with cosine decay; defaults in :class:`FitConfig`). Parameters are per head (:meth:`Variant.bind` with ``heads``), so one
fit covers a whole layer. The parameter count per head is reported, so tables can show the
budget beside the score.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch
from torch import Tensor

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
    # "map_kl": row KL of the weights (Hedgehog); "output_mse": attention-output MSE against
    # softmax's output on the same values (LoLCATs' attention transfer).
    objective: str = "map_kl"

    def __post_init__(self):
        if self.objective not in _OBJECTIVES:
            raise ValueError(f"objective must be one of {', '.join(_OBJECTIVES)}, got {self.objective!r}.")
        if self.steps < 0:
            raise ValueError(f"steps must be >= 0, got {self.steps}.")
        if self.row_stride < 1:
            raise ValueError(f"row_stride must be >= 1, got {self.row_stride}.")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}.")

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
    """Whether the variant has parameters to fit (after binding its head dim)."""
    hla_params = not variant.tied or variant.shared_proj or variant.shifted
    return variant.kind == "hla" and hla_params or variant.phi in ("hedgehog", "rebased")


def row_kl_loss(variant: Variant, batches: list[dict], targets: list[Tensor]) -> Tensor:
    """Mean row ``KL(p || p_hat)`` over every batch, head and query row.

    Signed variants (odd M with affine factors) can give negative weights, where the KL is
    undefined: they enter the log floored, and their total negative mass is added to the
    loss so that the gradient pushes them back towards valid distributions. Rows whose
    normalizer is not a positive finite number (e.g. an early causal row whose few
    similarities all vanish) carry no distribution at all: they are left out of the mean,
    as the evaluation leaves them out and counts them.
    """
    total, rows = 0.0, 0
    for batch, p in zip(batches, targets):
        weights, den = variant.weights(batch["q"], batch["k"], scale=batch["scale"], causal=batch["causal"])
        valid = (den > 0) & torch.isfinite(den)
        p_hat = weights / torch.where(valid, den, torch.ones_like(den))
        log_ratio = torch.log(p.clamp_min(_LOG_FLOOR)) - torch.log(p_hat.clamp_min(_LOG_FLOOR))
        negative_mass = (-p_hat).clamp_min(0).sum(-1)
        row_loss = (p * log_ratio).sum(-1) + negative_mass
        valid = valid.squeeze(-1) & torch.isfinite(row_loss)
        total = total + torch.where(valid, row_loss, torch.zeros_like(row_loss)).sum()
        rows += int(valid.sum())
    if rows == 0:
        raise ValueError(
            f"{variant.spec} has no row with a positive normalizer on the training inputs; it cannot be fitted."
        )
    return total / rows


def output_mse_loss(variant: Variant, batches: list[dict], targets: list[Tensor]) -> Tensor:
    """Mean squared error between the variant's attention output and softmax's (LoLCATs).

    ``targets`` are softmax outputs ``[..., N, dv]`` on each batch's ``v``. Rows whose
    normalizer is not a positive finite number are left out, as in :func:`row_kl_loss`.
    """
    total, count = 0.0, 0
    for batch, target in zip(batches, targets):
        weights, den = variant.weights(batch["q"], batch["k"], scale=batch["scale"], causal=batch["causal"])
        valid = (den > 0) & torch.isfinite(den)
        output = (weights / torch.where(valid, den, torch.ones_like(den))) @ batch["v"]
        error = (output - target).square().mean(-1)
        valid = valid.squeeze(-1) & torch.isfinite(error)
        total = total + torch.where(valid, error, torch.zeros_like(error)).sum()
        count += int(valid.sum())
    if count == 0:
        raise ValueError(
            f"{variant.spec} has no row with a positive normalizer on the training inputs; it cannot be fitted."
        )
    return total / count


_OBJECTIVES = ("map_kl", "output_mse")


def _init_shift(variant: Variant, batches: list[dict]) -> None:
    """Start a logit shift at each head's smallest training logit.

    Factors ``1 + (s - b)/c`` are then >= 1 on every logit seen, so the weight starts
    monotone in q.k; a shift of tens of logits is beyond what a few Adam steps could travel.
    """
    lowest = None
    for b in batches:
        scores = (b["q"] @ b["k"].transpose(-1, -2)) * b["scale"]
        if b["causal"]:
            n_q, n_k = scores.shape[-2:]
            future = torch.ones(n_q, n_k, dtype=torch.bool, device=scores.device).triu(n_k - n_q + 1)
            scores = scores.masked_fill(future, float("inf"))
        low = scores.flatten(-2).amin(-1)  # [..., H]
        low = low.reshape(-1, low.shape[-1]).amin(0) if low.dim() > 1 else low
        lowest = low if lowest is None else torch.minimum(lowest, low)
    with torch.no_grad():
        variant.shift.copy_(lowest.reshape(variant.shift.shape).to(variant.shift.dtype))


def _subsample_rows(batch: dict, stride: int) -> dict:
    if batch["causal"] or stride == 1:
        return batch  # causal rows are not interchangeable: row i sees i + 1 keys
    return {**batch, "q": batch["q"][..., ::stride, :]}


def fit_variant(variant: Variant, batches: list[dict], *, config: FitConfig = FitConfig()) -> FitResult:
    """Fit ``variant`` to softmax on ``batches`` (all heads of one layer at once).

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
    if getattr(variant, "shift", None) is not None:
        _init_shift(variant, batches)
    params = [p for p in variant.parameters() if p.requires_grad]
    heads = variant.heads or 1
    result = FitResult(params_per_head=sum(p.numel() for p in params) // heads)
    targets = [
        softmax_attention_map(b["q"], b["k"], scale=b["scale"], causal=b["causal"]).detach() for b in batches
    ]
    loss_of = row_kl_loss
    if config.objective == "output_mse":
        if any("v" not in b for b in batches):
            raise ValueError("objective='output_mse' needs the values: give every batch a 'v' tensor [H, N, dv].")
        targets = [(p @ b["v"]).detach() for p, b in zip(targets, batches)]
        loss_of = output_mse_loss
    if not params:
        with torch.no_grad():
            result.losses.append(float(loss_of(variant, batches, targets)))
        return result
    torch.manual_seed(config.seed)
    optimiser = torch.optim.Adam(params, lr=config.lr)
    # cosine decay: late steps refine instead of oscillating around the minimum
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimiser, T_max=max(config.steps, 1))
    for _ in range(config.steps):
        optimiser.zero_grad(set_to_none=True)
        loss = loss_of(variant, batches, targets)
        if not torch.isfinite(loss):
            raise ValueError(
                f"fitting {variant.spec} diverged (loss {loss.item()}); lower the learning rate (lr={config.lr})."
            )
        loss.backward()
        optimiser.step()
        schedule.step()
        result.losses.append(float(loss.detach()))
    with torch.no_grad():
        result.losses.append(float(loss_of(variant, batches, targets)))
    return result
