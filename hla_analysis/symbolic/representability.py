"""Which polynomial kernels ``p(s)`` HLA with real affine factors can represent.

``M`` real affine factors give ``c * prod_m (1 + s / r_m)``-type products, so ``p`` is
representable iff all its roots are real. A complex-conjugate root pair needs a real
quadratic factor instead: one HLA factor with a degree-2 polynomial feature map (width
``1 + d + d(d+1)/2``, like Based's Taylor map), or two complex-conjugate affine factors.
"""

from __future__ import annotations

from dataclasses import dataclass

import sympy as sp


@dataclass(frozen=True)
class AffineFactorization:
    """Answer of :func:`affine_factorization`."""

    polynomial: sp.Expr
    representable: bool
    constant: sp.Expr
    affine_factors: tuple[sp.Expr, ...]
    quadratic_factors: tuple[sp.Expr, ...]
    real_roots: tuple[sp.Expr, ...]
    complex_roots: tuple[sp.Expr, ...]
    needs: str


def affine_factorization(p: sp.Expr, var: sp.Symbol | None = None) -> AffineFactorization:
    """Write ``p(s)`` as ``constant * prod(affine factors) * prod(quadratic factors)`` over the reals.

    Affine factors are ``1 + s/a`` (or ``s`` for a root at 0) with real ``a``; quadratics
    ``1 + b s + c s^2`` come from complex-conjugate root pairs.

    Raises
    ------
    ValueError
        If ``p`` is not a non-constant polynomial with real coefficients in one variable.

    Examples
    --------
    >>> s = sp.Symbol("s")
    >>> f = affine_factorization((1 + s / 3) ** 3)
    >>> f.representable, f.affine_factors
    (True, (s/3 + 1, s/3 + 1, s/3 + 1))
    >>> g = affine_factorization(1 + s + s**2 / 2)
    >>> g.representable, g.quadratic_factors
    (False, (s**2/2 + s + 1,))
    """
    p = sp.sympify(p)
    free = sorted(p.free_symbols, key=str)
    if var is None:
        if len(free) != 1:
            raise ValueError(f"p must be a polynomial in one variable, got symbols {free}; pass var=.")
        var = free[0]
    if not p.is_polynomial(var):
        raise ValueError(f"p = {p} is not a polynomial in {var}.")
    poly = sp.Poly(p, var)
    if poly.degree() < 1:
        raise ValueError(f"p = {p} is constant; a kernel needs degree >= 1.")
    if not all(c.is_real for c in poly.all_coeffs()):
        raise ValueError(f"p = {p} has non-real coefficients.")
    real, cplx, affine, quad = [], [], [], []
    # Factor over Q first so that simple roots stay exact; only irreducible pieces of
    # degree >= 3 fall back to CRootOf (exact but opaque) and evalf'd quadratics.
    for g, mult in sp.factor_list(poly)[1]:
        g_roots = g.all_roots()
        for r in g_roots:
            if r.is_real:
                real += [r] * mult
                affine += [var if r == 0 else 1 - var / r] * mult
            elif sp.im(r).evalf() > 0:
                cplx += [r, sp.conjugate(r)] * mult
                if g.degree() == 2:
                    q = g.monic().as_expr()
                    q = sp.expand(q / q.subs(var, 0))
                else:
                    re, ab2 = sp.re(r).evalf(), (sp.Abs(r) ** 2).evalf()
                    q = 1 - 2 * re / ab2 * var + var**2 / ab2
                quad += [q] * mult
    affine = [sp.radsimp(a) if a.has(sp.sqrt) else a for a in affine]
    product = sp.Mul(*affine) * sp.Mul(*quad)
    constant = sp.nsimplify(sp.simplify(poly.LC() / sp.Poly(product, var).LC()))
    if quad:
        needs = (f"{len(quad)} complex-conjugate root pair(s): replace each pair of affine factors by one "
                 "factor with a degree-2 polynomial feature map (width 1 + d + d(d+1)/2, as in Based's "
                 "Taylor map), or by two complex-conjugate affine factors (complex features, real product).")
    else:
        needs = f"{len(affine)} real affine factor(s) (phi = [1, x/sqrt(c)] with a per-factor scale)."
    return AffineFactorization(
        polynomial=p, representable=not quad, constant=constant, affine_factors=tuple(affine),
        quadratic_factors=tuple(quad), real_roots=tuple(real), complex_roots=tuple(cplx), needs=needs,
    )
