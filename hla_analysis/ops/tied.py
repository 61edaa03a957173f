"""Tied factors: ``prod_m (q.k) = (q.k)^M`` through a symmetric state.

``(q.k)^M = <q^{(x)M}, k^{(x)M}>`` and the tensor power is symmetric, so it is enough to
keep one entry per multiset of M indices, weighted by its multinomial count: the state has
C(r+M-1, M) rows instead of r^M (the symmetric-power trick of power attention).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from functools import lru_cache

import torch
from torch import Tensor


@lru_cache(maxsize=64)
def _multisets(r: int, m: int) -> tuple[tuple[int, ...], tuple[float, ...]]:
    combos = list(itertools.combinations_with_replacement(range(r), m))
    coeffs = []
    for c in combos:
        counts = [len(list(g)) for _, g in itertools.groupby(c)]
        coeffs.append(math.factorial(m) / math.prod(math.factorial(n) for n in counts))
    return tuple(combos), tuple(coeffs)


def symmetric_state_size(r: int, m: int) -> int:
    """Entries of the symmetric M-th power of an r-vector: C(r+M-1, M).

    >>> symmetric_state_size(64, 2), 64 ** 2
    (2080, 4096)
    """
    return math.comb(r + m - 1, m)


def symmetric_power_features(x: Tensor, m: int) -> Tensor:
    """Packed features with ``f(q).f(k) == (q.k)^m``: ``[..., N, r] -> [..., N, C(r+m-1, m)]``.

    Examples
    --------
    >>> q = torch.tensor([1.0, 2.0, -1.0], dtype=torch.float64)
    >>> k = torch.tensor([0.5, 1.0, 3.0], dtype=torch.float64)
    >>> fq, fk = symmetric_power_features(q, 3), symmetric_power_features(k, 3)
    >>> fq.shape[-1], round(float(fq @ fk), 12), float((q @ k) ** 3)
    (10, -0.125, -0.125)
    """
    if m < 1:
        raise ValueError(f"the power m must be >= 1, got {m}.")
    combos, coeffs = _multisets(x.shape[-1], m)
    index = torch.tensor(combos, device=x.device)
    out = x[..., index[:, 0]]
    for i in range(1, m):
        out = out * x[..., index[:, i]]
    return out * torch.tensor(coeffs, dtype=x.dtype, device=x.device).sqrt()


def is_tied(qs: Sequence[Tensor], ks: Sequence[Tensor]) -> bool:
    """True when all query factors are equal and all key factors are equal."""

    def same(fs):
        first = fs[0]
        return all(f is first or (f.shape == first.shape and torch.equal(f, first)) for f in fs[1:])

    return same(qs) and same(ks)
