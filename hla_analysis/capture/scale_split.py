"""One convention for how the softmax logit scale is split between q and k.

Softmax sees only the product ``scale * q.k``, but models split that factor differently:
BERT, ViT and Llama pass ``scale = head_dim**-0.5``; a Whisper-style encoder multiplies q
by ``head_dim**-0.5`` inside its projection and passes ``scale = 1.0``. A feature map
applied to q and k separately (FAVOR+, exp, elu+1, learned maps) is not homogeneous, so
its result would depend on that accident of implementation.

Captures therefore store every layer in one canonical form:

- ``scale`` is always ``head_dim**-0.5``;
- q of key/value group ``g`` is multiplied by ``q_factor = alpha_g * sqrt(model_scale / scale)``
  and k by ``k_factor = sqrt(model_scale / scale) / alpha_g``, with ``alpha_g`` chosen so that
  the stored q and k of the group have equal mean norms (measured on the first input);
- ``scale * q'.k' == model_scale * q.k`` exactly in real arithmetic, so softmax is unchanged,
  and ``q = q' / q_factor``, ``k = k' / k_factor`` rebuild what the model passed.

Two models that differ only in how they split the same logit factor thus store the same
q and k (up to float rounding), and every variant scores them the same.
"""

from __future__ import annotations

import math

import torch

CONVENTION = ("scale = head_dim**-0.5; q, k rescaled per key/value head to equal mean norms on the first "
              "input, logits unchanged; recorded q = stored q / q_factor[head], k = stored k / k_factor[kv head]")


def canonical_scale(head_dim: int) -> float:
    """The scale every capture stores: ``head_dim**-0.5``."""
    return float(head_dim) ** -0.5


def split_factors(q: torch.Tensor, k: torch.Tensor, model_scale: float) -> tuple[list[float], list[float]]:
    """Per-head multipliers for q and k that give the canonical split.

    Parameters
    ----------
    q : Tensor ``[Hq, N, d]``
        One input's queries as the model passed them (real tokens only).
    k : Tensor ``[Hkv, N, d]``
        Its keys, with the model's own key/value heads.
    model_scale : float
        The scale the model passed to its attention function.

    Returns
    -------
    q_factor : list of float, one per query head
    k_factor : list of float, one per key/value head
        ``q_factor[h] * k_factor[h // (Hq // Hkv)] * canonical_scale(d) == model_scale``.

    Examples
    --------
    >>> q, k = torch.randn(2, 5, 4), torch.randn(2, 5, 4)
    >>> qf, kf = split_factors(3.0 * q, k, 0.5)          # q pre-scaled by 3
    >>> qf2, kf2 = split_factors(q, k, 1.5)             # same logits, other split
    >>> torch.allclose(torch.tensor(qf) * 3, torch.tensor(qf2)), torch.allclose(torch.tensor(kf), torch.tensor(kf2))
    (True, True)
    """
    if not (math.isfinite(model_scale) and model_scale > 0):
        raise ValueError(f"the model passed attention scale {model_scale!r}; "
                         "only positive finite scales can be captured")
    heads, kv_heads, dim = q.shape[0], k.shape[0], q.shape[-1]
    groups = heads // kv_heads
    total = math.sqrt(model_scale / canonical_scale(dim))
    q_norm = q.double().norm(dim=-1).mean(dim=-1).view(kv_heads, groups).mean(dim=-1)
    k_norm = k.double().norm(dim=-1).mean(dim=-1)
    q_factor, k_factor = [], []
    for g in range(kv_heads):
        qn, kn = float(q_norm[g]), float(k_norm[g])
        alpha = math.sqrt(kn / qn) if qn > 0 and kn > 0 and math.isfinite(qn) and math.isfinite(kn) else 1.0
        q_factor.extend([alpha * total] * groups)
        k_factor.append(total / alpha)
    return q_factor, k_factor


def apply_factors(x: torch.Tensor, factors: list[float], *, head_dim: int = 1) -> torch.Tensor:
    """Multiply each head of ``x`` (heads on dimension ``head_dim``) by its factor.

    The product is formed in float64 and rounded once to ``x``'s dtype.
    """
    shape = [1] * x.ndim
    shape[head_dim] = len(factors)
    scaled = x.double() * torch.tensor(factors, dtype=torch.float64, device=x.device).view(shape)
    return scaled.to(x.dtype)
