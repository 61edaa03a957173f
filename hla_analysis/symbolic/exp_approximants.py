"""Exact yardsticks for ``exp``: Taylor truncations and Padé ``[m/n]`` approximants.

Softmax's weight is not rational in the score scale, so its degree is measured against
these: the Padé coefficients are solved from the Taylor coefficients with exact rationals.
"""

from __future__ import annotations

import sympy as sp

s = sp.Symbol("s", real=True)


def _check_order(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{name} must be an integer >= 0, got {value!r}.")
    if value > 40:
        raise ValueError(f"{name}={value} is too large for exact rational arithmetic here; use <= 40.")
    return value


def taylor_exp(degree: int, *, var: sp.Symbol = s) -> sp.Expr:
    """Taylor polynomial of ``exp(var)`` of the given degree, exact coefficients.

    Examples
    --------
    >>> taylor_exp(2)
    s**2/2 + s + 1
    """
    degree = _check_order("degree", degree)
    return sp.series(sp.exp(var), var, 0, degree + 1).removeO()


def pade_exp(m: int, n: int, *, var: sp.Symbol = s) -> tuple[sp.Expr, sp.Expr]:
    """Padé ``[m/n]`` approximant of ``exp(var)``: ``(P, Q)`` with ``Q(0) = 1``.

    Solved from ``P - Q * T = O(var^(m+n+1))`` where ``T`` is the Taylor polynomial.

    Examples
    --------
    >>> p, q = pade_exp(1, 1)
    >>> p, q
    (s/2 + 1, 1 - s/2)
    """
    m, n = _check_order("m", m), _check_order("n", n)
    coeffs = [sp.Rational(1, sp.factorial(k)) for k in range(m + n + 1)]
    b = sp.symbols(f"b1:{n + 1}") if n else ()
    # Coefficients m+1..m+n of Q*T vanish; they fix b (with b0 = 1).
    eqs = [coeffs[k] + sum(b[j - 1] * coeffs[k - j] for j in range(1, n + 1) if k - j >= 0)
           for k in range(m + 1, m + n + 1)]
    sol = sp.solve(eqs, b, dict=True)[0] if n else {}
    qc = [sp.Integer(1)] + [sol[bj] for bj in b]
    pc = [sum(qc[j] * coeffs[k - j] for j in range(0, min(k, n) + 1)) for k in range(m + 1)]
    P = sum(c * var**k for k, c in enumerate(pc))
    Q = sum(c * var**k for k, c in enumerate(qc))
    return sp.expand(P), sp.expand(Q)
