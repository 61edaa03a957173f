"""Plain-torch twin of the state op (:mod:`.autograd`, :mod:`.steps`): same flat layout, same outputs.

Factors ``[BH, N, r]`` (``q2 = k2 = None`` for M = 1), values ``[BH, N, dv]``. The state is
written out per token: ``S_i = sum_{j <= i} kr(k_j) v_j^T`` (a cumsum; every key when not
causal) with ``kr`` the row-wise Khatri-Rao product, ``z_i = sum_{j <= i} kr(k_j)``, and
``o_i = kr(q_i) S_i / kr(q_i) . z_i``. No chunks, no splits, no checks: it computes in the
inputs' dtype (pass fp64 for a reference) and is differentiable by torch autograd.
"""

from __future__ import annotations

import torch


def kr(f1, f2):
    """Row-wise Khatri-Rao product ``[BH, N, R1 * R2]``, index ``a * R2 + b`` (``f1`` when M = 1)."""
    return f1 if f2 is None else (f1[..., :, None] * f2[..., None, :]).flatten(-2)


def numden(q1, q2, k1, k2, v, causal, s0=None, z0=None):
    """``(num [BH, N, dv], den [BH, N])``, the states started at ``(s0 [BH, R, dv], z0 [BH, R1, R2])``."""
    qf, kf = kr(q1, q2), kr(k1, k2)
    s = torch.einsum("bnr,bnd->bnrd", kf, v)  # one state term per key
    z = kf
    s, z = (s.cumsum(1), z.cumsum(1)) if causal else (s.sum(1, keepdim=True), z.sum(1, keepdim=True))
    if s0 is not None:
        s, z = s + s0[:, None], z + z0.flatten(-2)[:, None]
    return torch.einsum("bnr,bnrd->bnd", qf, s), (qf * z).sum(-1)


def hla(q1, q2, k1, k2, v, causal):
    """Twin of ``HLAFunction.apply(q1, q2, k1, k2, v, causal, ...)``: the output ``[BH, N, dv]``."""
    num, den = numden(q1, q2, k1, k2, v, causal)
    return num / den[..., None]


def total_state(k1, k2, v):
    """Twin of ``steps.TotalState``: ``(S [BH, R1 * R2, dv], z [BH, R1, R2])``."""
    k2 = torch.ones_like(k1[..., :1]) if k2 is None else k2
    return torch.einsum("bnr,bnd->brd", kr(k1, k2), v), torch.einsum("bna,bnc->bac", k1, k2)


def apply_state(q1, q2, s, z):
    """Twin of ``steps.ApplyState``: the non-causal ``(o, den)`` of queries against a given state."""
    qf = kr(q1, q2)
    den = (qf * z.flatten(-2)[:, None]).sum(-1)
    return torch.einsum("bnr,brd->bnd", qf, s) / den[..., None], den


def causal_from_state(q1, q2, k1, k2, v, s0, z0):
    """Twin of ``steps.CausalFromState``: causal ``(o, den)`` with every state started at ``(s0, z0)``."""
    num, den = numden(q1, q2, k1, k2, v, True, s0, z0)
    return num / den[..., None], den
