"""exp on ``[-L, 0]`` and on ``(-inf, 0]`` (where softmax rows live), by every family, on one set of axes.

Errors reported per family and degree ``M``: max absolute ``|w - e^s|`` (the error relative to a
row's largest weight ``e^0 = 1``), max relative ``|w / e^s - 1|`` and the normalisation-aware
``min_c max |w / (c e^s) - 1|`` (:mod:`~hla_analysis.numeric.normalised_error`). On the half-line
every relative error is infinite (exp decays faster than any rational), so only the absolute
one is finite, and only for types ``(m, n)`` with ``m <= n``: a polynomial (an HLA product of
affine factors included) is unbounded there unless it is the constant, whose best error is 1/2.
"""

from __future__ import annotations

import math

import numpy as np
from scipy.optimize import minimize_scalar

from hla_analysis.numeric.intervals import Interval
from hla_analysis.numeric.minimax import minimax_rational
from hla_analysis.numeric.normalised_error import normalised_relative_error

FAMILIES = ("minimax_nn", "polynomial", "pade", "taylor", "hla_tied", "hla_tied_shift", "linear")
_SAMPLES = 4001


def _tied_best_slope(degree, iv):
    """Best ``c (1 + z s)^M`` with ``0 <= z < 1/L`` (factors positive on [-L, 0]) in normalised error."""
    s = iv.sample(_SAMPLES)
    limit = 1.0 / (-iv.lo)

    def loss(z):
        return normalised_relative_error((1 + z * s) ** degree, np.exp(s))

    res = minimize_scalar(loss, bounds=(0.0, limit * (1 - 1e-9)), method="bounded", options={"xatol": 1e-12 * limit})
    return float(res.x)


def approximant(family: str, degree: int, *, interval):
    """``(w, note)``: a vectorised approximant of exp of the family on the interval (None if unbounded there)."""
    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}; choose one of {FAMILIES}.")
    if isinstance(degree, bool) or not isinstance(degree, (int, np.integer)) or degree < 0:
        raise ValueError(f"degree must be an integer >= 0, got {degree!r}.")
    iv = interval if isinstance(interval, Interval) else Interval.parse(interval)
    if iv.hi != 0.0 or np.isinf(iv.hi):
        raise ValueError(f"interval must end at 0 (softmax rows are exp(s - max s)), got {iv.label()}.")
    polynomial_like = family in ("polynomial", "taylor", "hla_tied", "hla_tied_shift", "linear")
    if family == "linear" and degree != 1:
        raise ValueError("kernel linear attention with affine features is the degree-1 family; use degree 1.")
    if not iv.bounded and polynomial_like and degree > 0:
        if family in ("polynomial", "hla_tied_shift", "linear"):
            return (lambda s: np.full_like(np.asarray(s, dtype=float), 0.5)), "unbounded unless constant: best is 1/2"
        return None, "unbounded on the half-line"
    if family == "minimax_nn":
        return minimax_rational(np.exp, degree, interval=iv), ""
    if family == "polynomial":
        return minimax_rational(np.exp, degree, interval=iv, denominator_degree=0), ""
    if family == "taylor":
        coef = [1 / math.factorial(k) for k in range(degree + 1)]
        return (lambda s: np.polynomial.polynomial.polyval(s, coef)), ""
    if family == "pade":
        from hla_analysis.symbolic.exp_approximants import pade_exp
        import sympy as sp
        p, q = (np.array([float(c) for c in sp.Poly(e, sp.Symbol("s", real=True)).all_coeffs()])
                for e in pade_exp(degree, degree))
        return (lambda s: np.polyval(p, s) / np.polyval(q, s)), ""
    if family == "hla_tied":
        return (lambda s: (1 + np.asarray(s) / degree) ** degree), ""
    z = _tied_best_slope(degree, iv)  # hla_tied_shift, linear
    return (lambda s: (1 + z * np.asarray(s)) ** degree), f"best slope z={z:.4g} (shift b=M-1/z)"


def family_errors(family: str, degree: int, *, interval) -> dict:
    """Absolute, relative and normalised relative error of one family at one degree.

    Examples
    --------
    >>> e = family_errors("minimax_nn", 2, interval=(-np.inf, 0.0))
    >>> round(e["max_abs_error"], 5), e["max_rel_error"]
    (0.00736, inf)
    """
    iv = interval if isinstance(interval, Interval) else Interval.parse(interval)
    row = {"family": family, "degree": int(degree), "interval": iv.label(), "L": float(-iv.lo)}
    try:
        w, note = approximant(family, degree, interval=iv)
    except ValueError as err:
        if family.startswith("minimax") or family == "polynomial":
            return {**row, "max_abs_error": np.nan, "max_rel_error": np.nan, "normalised_rel_error": np.nan,
                    "positive": True, "note": str(err)}
        raise
    if w is None:
        return {**row, "max_abs_error": np.inf, "max_rel_error": np.inf, "normalised_rel_error": np.inf,
                "positive": False, "note": note}
    s = iv.sample(_SAMPLES)
    ws, fs = np.asarray(w(s), dtype=float), np.exp(s)
    absolute = float(np.max(np.abs(ws - fs)))
    if not iv.bounded:
        absolute = max(absolute, float(abs(w(np.array([-1e300]))[0])))  # the limit at -inf
    if hasattr(w, "max_error"):
        absolute = max(absolute, w.max_error) if not w.relative else absolute
    rel = float(np.max(np.abs(ws / fs - 1))) if iv.bounded else np.inf
    if hasattr(w, "max_error") and w.relative:
        rel = max(rel, w.max_error)
    norm = normalised_relative_error(ws, fs) if iv.bounded else np.inf
    return {**row, "max_abs_error": absolute, "max_rel_error": rel, "normalised_rel_error": norm,
            "positive": bool(np.all(ws > 0)), "note": note}
