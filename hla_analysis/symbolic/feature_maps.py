"""Feature maps written in SymPy, so that factor similarities can be derived, not assumed.

Each map takes a list of SymPy expressions (one head vector, already multiplied by
``sqrt(scale)`` as the variants do) and returns the list of its features. Which maps exist
and which options they take comes from :mod:`hla_analysis.registry`; each entry names its
function here and its class in :mod:`hla_analysis.feature_maps`, and
``tests/test_feature_maps.py`` checks the two agree numerically, map by map.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from itertools import combinations_with_replacement

import sympy as sp

from hla_analysis.registry import FEATURE_MAP_REGISTRY

Vector = list[sp.Expr]


def _affine(x: Sequence[sp.Expr], *, c=1, **_) -> Vector:
    # [1, x / sqrt(c)]: the similarity is 1 + q.k / c; HLA uses c = M, so M tied factors
    # give (1 + s/M)^M.
    return [sp.Integer(1)] + [xi / sp.sqrt(sp.nsimplify(c)) for xi in x]


def _identity(x: Sequence[sp.Expr], **_) -> Vector:
    return list(x)


def _relu(x: Sequence[sp.Expr], **_) -> Vector:
    return [sp.Max(0, xi) for xi in x]


def _elu1(x: Sequence[sp.Expr], **_) -> Vector:
    # elu(x) + 1: x + 1 for x > 0, exp(x) otherwise.
    return [sp.Piecewise((xi + 1, xi > 0), (sp.exp(xi), True)) for xi in x]


def _exp(x: Sequence[sp.Expr], **_) -> Vector:
    return [sp.exp(xi) for xi in x]


def _taylor(x: Sequence[sp.Expr], **_) -> Vector:
    # Based's second-order Taylor features: 1, x_a, and x_a x_b with weights such that
    # phi(q).phi(k) = 1 + q.k + (q.k)^2 / 2.
    feats: Vector = [sp.Integer(1)] + list(x)
    for a, b in combinations_with_replacement(range(len(x)), 2):
        weight = sp.Rational(1, 2) if a == b else sp.Integer(1)
        feats.append(sp.sqrt(weight) * x[a] * x[b])
    return feats


def _cosformer(x: Sequence[sp.Expr], *, angle: sp.Expr, **_) -> Vector:
    # relu features re-weighted by cos / sin of the token's angle pi i / (2L).
    return [sp.Max(0, xi) * sp.cos(angle) for xi in x] + [sp.Max(0, xi) * sp.sin(angle) for xi in x]


def _softmax_vector(z: Sequence[sp.Expr]) -> Vector:
    total = sum(sp.exp(zi) for zi in z)
    return [sp.exp(zi) / total for zi in z]


def _hedgehog(x: Sequence[sp.Expr], *, weight=None, **_) -> Vector:
    # [softmax(W x), softmax(-W x)]; W (rows of the d x d matrix) defaults to its initial identity.
    z = list(x) if weight is None else [sum(w * xi for w, xi in zip(row, x)) for row in weight]
    return _softmax_vector(z) + _softmax_vector([-zi for zi in z])


def _rebased(x: Sequence[sp.Expr], *, eps=sp.Symbol("epsilon", positive=True), gamma=None, beta=None,
             **_) -> Vector:
    # (gamma * layer_norm(x) + beta)^(x)2, symmetric-packed; gamma, beta default to their initial 1 and 0.
    n = len(x)
    mean = sum(x) / n
    var = sum((xi - mean) ** 2 for xi in x) / n
    gamma = [1] * n if gamma is None else gamma
    beta = [0] * n if beta is None else beta
    y = [g * (xi - mean) / sp.sqrt(var + eps) + b for xi, g, b in zip(x, gamma, beta)]
    return [sp.sqrt(1 if a == b else 2) * y[a] * y[b] for a, b in combinations_with_replacement(range(n), 2)]


def _favor(x: Sequence[sp.Expr], *, features: int = 2, **_) -> Vector:
    # Positive random features exp(w_r.x - |x|^2/2) / sqrt(R) with symbolic directions w_r.
    sq = sum(xi**2 for xi in x) / 2
    out: Vector = []
    for r in range(features):
        w = sp.symbols(f"w{r}_1:{len(x) + 1}", real=True)
        out.append(sp.exp(sum(wi * xi for wi, xi in zip(w, x)) - sq) / sp.sqrt(features))
    return out


#: The SymPy form of every registered map, in the registry's order.
SYMBOLIC_FEATURE_MAPS: dict[str, Callable[..., Vector]] = {
    name: globals()[entry.sympy] for name, entry in FEATURE_MAP_REGISTRY.items()
}


def symbolic_feature_map(name: str, x: Sequence[sp.Expr], **options) -> Vector:
    """Apply the feature map ``name`` to the symbolic vector ``x``.

    Parameters
    ----------
    name : str
        A key of :data:`SYMBOLIC_FEATURE_MAPS` (the registry's maps; learnable ones at their
        initial parameters unless given).
    x : sequence of sympy.Expr
        The head vector (already scaled by ``sqrt(scale)``).
    **options
        Map options: ``c`` (affine), ``features`` (favor: number of random features),
        ``angle`` (cosformer: the token's angle ``pi i / 2L``), learnable parameters
        ``weight`` (hedgehog: the rows of ``W``), ``gamma`` and ``beta`` (rebased).

    Returns
    -------
    list of sympy.Expr

    Raises
    ------
    ValueError
        If ``name`` is not a known map.

    Examples
    --------
    >>> q1, q2, k1, k2 = sp.symbols("q1 q2 k1 k2")
    >>> f = symbolic_feature_map("affine", [q1, q2], c=2)
    >>> g = symbolic_feature_map("affine", [k1, k2], c=2)
    >>> sp.expand(sum(a * b for a, b in zip(f, g)))
    k1*q1/2 + k2*q2/2 + 1
    """
    if name not in SYMBOLIC_FEATURE_MAPS:
        raise ValueError(
            f"no symbolic version of feature map {name!r}; known: {sorted(SYMBOLIC_FEATURE_MAPS)}. "
            "Add one to hla_analysis/symbolic/feature_maps.py to derive its rational form."
        )
    return SYMBOLIC_FEATURE_MAPS[name](list(x), **options)
