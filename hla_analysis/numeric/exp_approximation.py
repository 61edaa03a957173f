"""Approximating ``exp(s)`` on ``[-a, a]`` by degree-``n`` families, and the errors.

Degree means the rational type ``(n, n)`` or the polynomial degree ``n``: for the HLA
families it is the number of factors ``M``. Families:

* ``pade`` -- diagonal Padé ``[n/n]`` at 0 (``scipy.interpolate.pade``);
* ``aaa`` -- AAA best-effort rational of type ``(n, n)`` (``scipy.interpolate.AAA``) on a grid;
* ``minimax`` -- the best uniform rational of type ``(n, n)`` in max relative error, by rational
  Remez (:mod:`hla_analysis.numeric.minimax`); raises ``ValueError`` where float64 cannot
  resolve it (best error below 1e-13, e.g. ``n = 8`` on ``[-4, 4]``);
* ``taylor`` -- degree-``n`` Taylor truncation;
* ``hla_tied`` -- ``(1 + s/n)^n``, HLA with ``n`` tied affine factors;
* ``hla_fitted`` -- ``c0 prod_m (1 + c_m s)``, real affine factors fitted to minimise the
  relative error (HLA with ``n`` untied affine factors);
* ``linear`` -- the best affine kernel ``c0 + c1 s`` (kernel linear attention; degree 1 only).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable

import numpy as np
from scipy.interpolate import AAA, pade
from scipy.optimize import least_squares

from hla_analysis.numeric.minimax import minimax_rational

FAMILIES = ("pade", "aaa", "minimax", "taylor", "hla_tied", "hla_fitted", "linear")


def _check(degree: int, a: float) -> None:
    if isinstance(degree, bool) or not isinstance(degree, (int, np.integer)) or degree < 1:
        raise ValueError(f"degree must be an integer >= 1, got {degree!r}.")
    if not np.isfinite(a) or a <= 0:
        raise ValueError(f"the interval half-width a must be finite and > 0, got {a!r}.")


def approximant(family: str, degree: int, *, a: float, grid: int = 2001) -> Callable[[np.ndarray], np.ndarray]:
    """A vectorised approximant of ``exp`` on ``[-a, a]`` of the given family and degree.

    Raises
    ------
    ValueError
        Unknown family, degree < 1, ``a <= 0``, ``linear`` with degree != 1, or ``minimax``
        beyond float64 resolution (see :func:`~hla_analysis.numeric.minimax.minimax_rational`).

    Examples
    --------
    >>> f = approximant("hla_tied", 2, a=1.0)
    >>> float(f(np.array([1.0]))[0])
    2.25
    """
    _check(degree, a)
    x = np.linspace(-a, a, grid)
    if family == "taylor":
        coef = [1 / math.factorial(k) for k in range(degree + 1)]
        return lambda s: np.polynomial.polynomial.polyval(s, coef)
    if family == "pade":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the Hankel system is ill-conditioned by nature
            p, q = pade([1 / math.factorial(k) for k in range(2 * degree + 1)], degree, degree)
        return lambda s: p(s) / q(s)
    if family == "aaa":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # rtol not reached: expected here
            r = AAA(x, np.exp(x), rtol=0.0, max_terms=degree + 1, clean_up=False)
        return lambda s: np.real(r(s))
    if family == "minimax":
        return minimax_rational(np.exp, degree, interval=(-a, a), relative=True)
    if family == "hla_tied":
        return lambda s: (1 + s / degree) ** degree
    if family == "hla_fitted":
        start = np.full(degree, 1.0 / degree) * (1 + 0.05 * np.arange(degree))
        ex = np.exp(x)

        def residual(c):
            return np.prod(1 + c[:, None] * x[None, :], axis=0) / ex - 1

        c = least_squares(residual, start, method="lm").x
        scale = 1.0 / np.mean(np.prod(1 + c[:, None] * x[None, :], axis=0) / ex)
        return lambda s: scale * np.prod(1 + c[:, None] * np.asarray(s)[None, :], axis=0)
    if family == "linear":
        if degree != 1:
            raise ValueError("kernel linear attention is the degree-1 family; use degree=1 for 'linear'.")
        c1, c0 = np.polyfit(x, np.exp(x), 1, w=np.exp(-x))  # relative least squares
        return lambda s: c0 + c1 * s
    raise ValueError(f"unknown family {family!r}; choose one of {FAMILIES}.")


def exp_errors(family: str, degree: int, *, a: float, grid: int = 2001) -> dict:
    """Max and mean absolute and relative error of the approximant on ``[-a, a]``.

    Examples
    --------
    >>> e = exp_errors("pade", 3, a=1.0)
    >>> e["max_rel_error"] < 1e-4
    True
    """
    f = approximant(family, degree, a=a, grid=grid)
    x = np.linspace(-a, a, 4 * grid + 1)  # finer than the fitting grid
    err = np.abs(f(x) - np.exp(x))
    rel = err / np.exp(x)
    return {
        "family": family, "degree": int(degree), "a": float(a),
        "max_abs_error": float(err.max()), "mean_abs_error": float(err.mean()),
        "max_rel_error": float(rel.max()), "mean_rel_error": float(rel.mean()),
        "positive": bool(np.all(f(x) > 0)),
    }
