"""Plain-torch twin of the tied op (:mod:`.autograd`): same flat layout, same output.

``q, k [BH, N, r]``, ``v [BH, N, dv]``; weights ``(q_i . k_j)^2 = <sym(q_i), sym(k_j)>`` with
``sym(x)`` the ``r (r + 1) / 2`` products ``x_a x_b`` (``a <= b``, times ``sqrt(2)`` off the
diagonal), i.e. the M = 1 state op (:mod:`..state.naive`) on the features ``sym``. The kernels
pack the same features in another order (:mod:`.kernels`); the order does not change the output.
"""

from __future__ import annotations

import torch

from hla_analysis.ops.triton.state import naive as state_naive


def sym(x):
    """``[..., r (r + 1) / 2]`` with ``<sym(q), sym(k)> = (q . k)^2``."""
    r = x.shape[-1]
    a, b = torch.triu_indices(r, r, device=x.device)
    weight = torch.ones(a.shape, dtype=x.dtype, device=x.device).masked_fill(a != b, 2.0**0.5)
    return x[..., a] * x[..., b] * weight


def hla(q, k, v, causal):
    """Twin of ``TiedHLAFunction.apply(q, k, v, causal, ...)``: the output ``[BH, N, dv]``."""
    return state_naive.hla(sym(q), None, sym(k), None, v, causal)
