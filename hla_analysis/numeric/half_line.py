"""exp on ``[-L, 0]`` and on ``(-inf, 0]`` (where softmax rows live), by every family, on one set of axes.

Errors reported per family and degree ``M``: max absolute ``|w - e^s|`` (the error relative to a
row's largest weight ``e^0 = 1``), max relative ``|w / e^s - 1|``, the normalisation-aware
``min_c max |w / (c e^s) - 1|`` (:mod:`~hla_analysis.numeric.normalised_error`) and its
log form ``log(max rho / min rho)``, ``rho = w e^{-s}`` (normalised error = tanh(log range / 2);
the log range stays readable where the error rounds to 1 in float64).

On the half-line every relative error is infinite (exp decays faster than any rational), so
only the absolute one is finite, and only for types ``(m, n)`` with ``m <= n``: a polynomial (an
HLA product of affine factors included) is unbounded there unless it is the constant, whose
best error is 1/2. For a class closed under scaling (rationals, polynomials, affine products)
the best relative and the best normalised error coincide; on ``[-L, 0]`` the best ``(0, n)`` and
the best polynomial of degree ``n`` also coincide: ``p(s) -> 1 / p(-L - s)`` maps one class onto
the other and keeps ``max rho / min rho``.
"""

from __future__ import annotations

import math
import warnings

import numpy as np

from hla_analysis.numeric.affine_product import best_affine_product
from hla_analysis.numeric.intervals import Interval
from hla_analysis.numeric.minimax import minimax_rational
from hla_analysis.numeric.normalised_error import normalised_relative_error

FAMILIES = ("minimax_nn", "minimax_0n", "polynomial", "hla_product", "pade", "pade_0n", "aaa", "taylor",
            "hla_tied", "hla_tied_shift", "linear")
DESCRIPTIONS = {
    "minimax_nn": "best rational (M, M)",
    "minimax_0n": "best 1/q, q of degree M (type (0, M))",
    "polynomial": "best polynomial of degree M",
    "hla_product": "best HLA weight: c prod_m (1 + a_m s), M real affine factors",
    "pade": "Padé [M/M] at 0",
    "pade_0n": "Padé [0/M] at 0 (1 / Taylor of exp(-s))",
    "aaa": "AAA (M, M), least squares on samples",
    "taylor": "Taylor of degree M",
    "hla_tied": "HLA tied (1 + s/M)^M",
    "hla_tied_shift": "HLA tied (1 + (s - b)/M)^M, best shift b",
    "linear": "kernel linear attention, affine features (degree 1)",
}
METRICS = ("max_abs_error", "max_rel_error", "normalised_rel_error", "normalised_log_range")
_SAMPLES = 4001
_POLYNOMIAL_LIKE = ("polynomial", "hla_product", "taylor", "hla_tied", "hla_tied_shift", "linear")


def _check(family, degree, interval):
    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}; choose one of {FAMILIES}.")
    if isinstance(degree, bool) or not isinstance(degree, (int, np.integer)) or degree < 0:
        raise ValueError(f"degree must be an integer >= 0, got {degree!r}.")
    if family == "linear" and degree != 1:
        raise ValueError("kernel linear attention with affine features is the degree-1 family; use degree 1.")
    if family in ("hla_product", "hla_tied", "hla_tied_shift") and degree < 1:
        raise ValueError(f"{family} needs M >= 1 factors, got {degree}.")
    iv = interval if isinstance(interval, Interval) else Interval.parse(interval)
    if iv.hi != 0.0:
        raise ValueError(f"interval must end at 0 (softmax rows are exp(s - max s)), got {iv.label()}.")
    return iv


def _taylor(degree, sign=1.0):
    coef = [sign**k / math.factorial(k) for k in range(degree + 1)]
    return lambda s: np.polynomial.polynomial.polyval(np.asarray(s, dtype=float), coef)


def _aaa(degree, iv):
    from scipy.interpolate import AAA

    s = iv.sample(2001)
    t = iv.to_unit(s)  # on a half-line the Möbius variable keeps type (M, M) and reaches s = -inf
    t, f = (np.concatenate([[-1.0], t]), np.concatenate([[0.0], np.exp(s)])) if not iv.bounded else (t, np.exp(s))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # rtol not reached: expected at low degree
        r = AAA(t, f, rtol=0.0, max_terms=degree + 1, clean_up=False)
    return lambda x: np.real(r(iv.to_unit(np.asarray(x, dtype=float))))


_LOOSE_RTOL = 2e-2  # second try where the exchange stalls: the bracket below stays a certificate, only wider


def _minimax(degree, iv, **types):
    """Best rational of the type on ``iv`` and a note; a stalled exchange is retried at a looser rtol."""
    try:
        return minimax_rational(np.exp, degree, interval=iv, **types), ""
    except ValueError as err:
        if "did not level" not in str(err):
            raise
        r = minimax_rational(np.exp, degree, interval=iv, rtol=_LOOSE_RTOL, **types)
        return r, (f"levelled only to spread {r.spread:.1e}: best error in [{r.min_extremum:.4g}, "
                   f"{r.max_error:.4g}] (de la Vallee Poussin)")


def approximant(family: str, degree: int, *, interval):
    """``(w, note)``: a vectorised approximant of exp of the family on the interval (None if unbounded there).

    ``w`` may be a :class:`~hla_analysis.numeric.minimax.MinimaxRational` or a
    :class:`~hla_analysis.numeric.affine_product.BestAffineProduct`, which carry certified errors.
    """
    iv = _check(family, degree, interval)
    if not iv.bounded and family in _POLYNOMIAL_LIKE and degree > 0:
        if family in ("polynomial", "hla_product", "linear"):
            return (lambda s: np.full_like(np.asarray(s, dtype=float), 0.5)), "unbounded unless constant: best is 1/2"
        return None, "unbounded on the half-line"
    if family == "minimax_nn":
        return _minimax(degree, iv)
    if family == "minimax_0n":
        try:
            return _minimax(degree, iv, numerator_degree=0)
        except ValueError as err:
            if not iv.bounded:
                raise
            p, _ = _minimax(degree, iv, denominator_degree=0)  # may raise in turn
            return _dual_of_polynomial(p, iv), f"by duality with the polynomial ({err})"
    if family == "polynomial":
        return _minimax(degree, iv, denominator_degree=0)
    if family in ("hla_product", "linear"):
        best = best_affine_product(degree, length=-iv.lo)
        return best, f"closed form: tied chord slope z={best.slope:.4g}, shift b={best.shift:.4g}"
    if family == "taylor":
        return _taylor(degree), ""
    if family == "pade":
        import sympy as sp

        from hla_analysis.symbolic.exp_approximants import pade_exp

        p, q = (np.array([float(c) for c in sp.Poly(e, sp.Symbol("s", real=True)).all_coeffs()])
                for e in pade_exp(degree, degree))
        return (lambda s: np.polyval(p, s) / np.polyval(q, s)), ""
    if family == "pade_0n":
        q = _taylor(degree, sign=-1.0)
        return (lambda s: 1.0 / q(s)), ""
    if family == "aaa":
        return _aaa(degree, iv), ""
    if family == "hla_tied":
        return (lambda s: (1 + np.asarray(s) / degree) ** degree), ""
    # hla_tied_shift: the normalised error is the best affine product's (b = b*, any scale)
    best = best_affine_product(degree, length=-iv.lo)
    b = best.shift
    return (lambda s: (1 + (np.asarray(s) - b) / degree) ** degree), (
        f"best shift b={b:.4g}; its relative error is of the unscaled weight (b also sets the scale)")


def _dual_of_polynomial(p, iv):
    """``c / p(-L - s)``: the best ``(0, n)`` from the best polynomial, ``c`` levelling the relative error."""
    s = iv.sample(_SAMPLES)
    log_rho = -np.log(p(iv.lo - s)) - s  # log of (1 / p(-L - s)) e^{-s}
    # level max rho and min rho about 1: c = 2 / (max rho + min rho), in logs to avoid overflow (rho ~ e^L)
    shift = -np.logaddexp(log_rho.max(), log_rho.min()) + np.log(2.0)
    return lambda x: np.exp(shift - np.log(p(iv.lo - np.asarray(x, dtype=float))))


def _log_range(ws, s):
    if not np.all(ws > 0):
        return np.inf
    log_rho = np.log(ws) - s
    return float(log_rho.max() - log_rho.min())


def family_errors(family: str, degree: int, *, interval) -> dict:
    """Absolute, relative and normalised error (and log range) of one family at one degree.

    A rational solver failure is reported as NaN with the reason in ``note``, never raised.

    Examples
    --------
    >>> e = family_errors("minimax_nn", 2, interval=(-np.inf, 0.0))
    >>> round(e["max_abs_error"], 5), e["max_rel_error"]
    (0.00736, inf)
    >>> round(family_errors("hla_product", 2, interval=(-4.0, 0.0))["normalised_rel_error"], 4)
    0.4418
    """
    iv = _check(family, degree, interval)
    row = {"family": family, "degree": int(degree), "interval": iv.label(), "L": float(-iv.lo)}
    try:
        w, note = approximant(family, degree, interval=iv)
    except ValueError as err:
        if family in ("minimax_nn", "minimax_0n", "polynomial"):
            if family != "minimax_nn" and iv.bounded and best_affine_product(degree, length=-iv.lo).error == 1.0:
                # the affine products are polynomials: their error bounds the best polynomial's (and, by
                # duality, the best (0, n)'s), and it rounds to 1
                return {**row, "max_abs_error": 1.0, "max_rel_error": 1.0, "normalised_rel_error": 1.0,
                        "normalised_log_range": np.nan, "positive": True,
                        "note": f"upper bound 1 - 2e^-R from hla_product (rounds to 1 in float64); solver: {err}"}
            return {**row, **{k: np.nan for k in METRICS}, "positive": True, "note": str(err)}
        raise
    if w is None:
        return {**row, **{k: np.inf for k in METRICS}, "positive": False, "note": note}
    s = iv.sample(_SAMPLES)
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        ws, fs = np.asarray(w(s), dtype=float), np.exp(s)
    absolute = float(np.max(np.abs(ws - fs)))
    if not iv.bounded:
        with np.errstate(over="ignore", invalid="ignore"):  # a polynomial overflows to its infinite limit
            absolute = max(absolute, float(abs(w(np.array([-1e300]))[0])))  # the limit at -inf
        return {**row, "max_abs_error": absolute, "max_rel_error": np.inf, "normalised_rel_error": np.inf,
                "normalised_log_range": np.inf, "positive": bool(np.all(ws > 0)), "note": note}
    rel = float(np.max(np.abs(ws / fs - 1)))
    finite = bool(np.all(np.isfinite(ws)))
    norm = normalised_relative_error(ws, fs) if finite else 1.0
    log_range = _log_range(ws, s) if finite else np.inf
    if hasattr(w, "max_error") and w.relative:  # certified: the dense scan and refined extrema
        rel = max(rel, w.max_error)
        norm = max(norm, min(w.max_error, 1.0))
    if hasattr(w, "log_range"):  # closed form: exact, where sampling only approaches it from below
        rel = norm = w.error
        log_range = w.log_range
    return {**row, "max_abs_error": absolute, "max_rel_error": rel, "normalised_rel_error": norm,
            "normalised_log_range": log_range, "positive": bool(np.all(ws > 0)), "note": note}


def needed_degree(family: str, *, interval, tol: float, max_degree: int = 8) -> float:
    """Smallest degree ``M <= max_degree`` whose normalised error on ``[-L, 0]`` is ``<= tol`` (inf if none).

    A best error that float64 cannot resolve (below :data:`~hla_analysis.numeric.minimax.MIN_ERROR`)
    counts as reached for ``tol >= MIN_ERROR``.

    Examples
    --------
    >>> needed_degree("minimax_nn", interval=(-8.0, 0.0), tol=1e-3)
    4
    >>> needed_degree("hla_product", interval=(-8.0, 0.0), tol=1e-3)
    inf
    """
    from hla_analysis.numeric.minimax import MIN_ERROR

    iv = _check(family, 1, interval)
    if not iv.bounded:
        raise ValueError("the normalised error is infinite on a half-line; give a finite interval, e.g. (-16, 0).")
    if not (np.isfinite(tol) and 0 < tol < 1):
        raise ValueError(f"tol must be in (0, 1), got {tol!r}.")
    for degree in [1] if family == "linear" else range(1, max_degree + 1):
        e = family_errors(family, degree, interval=iv)
        value = e["normalised_rel_error"]
        if value <= tol or (np.isnan(value) and "cannot resolve" in e["note"] and tol >= MIN_ERROR):
            return degree
    return np.inf
