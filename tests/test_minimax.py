"""Minimax (rational Remez) approximants of exp: best, equioscillating, and independently checked."""

import warnings

import numpy as np
import pytest
from scipy.optimize import minimize

from hla_analysis.numeric.exp_approximation import exp_errors
from hla_analysis.numeric.minimax import minimax_rational


def _rel_err(r, x):
    return r(x) / np.exp(x) - 1


def _grid_loss(x, degree):
    """How far below a peak a grid of spacing dx can sample it: |e''| dx^2 / 8 relative to the peak,
    with the error curve ~ E T_k(unit variable), k = 2n + 1, so |e''| <= E (k^2 * 2 / width)^2."""
    dx, width = x[1] - x[0], x[-1] - x[0]
    return ((2 * degree + 1) ** 2 * 2 / width) ** 2 * dx**2 / 8


def _alternating_peaks(e, tol):
    """Peaks of |e| within tol of the max, one per sign-constant run, and whether they alternate."""
    runs = np.split(np.arange(len(e)), np.nonzero(np.diff(np.sign(e)))[0] + 1)
    peaks = [e[run[np.argmax(np.abs(e[run]))]] for run in runs]
    emax = max(abs(p) for p in peaks)
    big = [p for p in peaks if abs(p) >= (1 - tol) * emax]
    return len(big), all(np.sign(u) != np.sign(v) for u, v in zip(big, big[1:]))


@pytest.mark.parametrize("a, degrees", [(4.0, range(1, 8)), (1.0, range(1, 5))])
def test_minimax_beats_aaa_and_pade_and_equioscillates(a, degrees):
    x = np.linspace(-a, a, 200_001)  # independent of the solver's own extremum search
    for n in degrees:
        r = minimax_rational(np.exp, n, interval=(-a, a))
        e = _rel_err(r, x)
        best = np.max(np.abs(e))
        # de la Vallee Poussin bracket; max_error carries its own float64 rounding bound, and the
        # dense grid can only under-sample a peak (by _grid_loss)
        assert r.min_extremum <= best * (1 + _grid_loss(x, n)) and best <= r.max_error, n
        assert np.all(r.denominator(x) > 0) or np.all(r.denominator(x) < 0), n
        mine = exp_errors("minimax", n, a=a)["max_rel_error"]
        for other in ("aaa", "pade"):
            theirs = exp_errors(other, n, a=a)["max_rel_error"]
            assert mine <= theirs * (1 + 1e-6), (n, other, mine, theirs)
        # the alternant's extrema agree within the certified bracket's relative width (spread plus the
        # rounding bound of the evaluation, which dominates near the float64 floor), and the grid can
        # under-sample each peak by _grid_loss
        tol = (r.max_error - r.min_extremum) / r.max_error + _grid_loss(x, n)
        count, alternates = _alternating_peaks(e, tol)
        assert count >= 2 * n + 2 and alternates, (n, count)


def _epigraph_fit(n, a):
    """Type (n, n) minimax by SLSQP on p/q coefficients (q_0 = 1): min t s.t. |p/(q e^x) - 1| <= t.

    Returns the max relative error on a fine grid, best over three starts (linearised least squares,
    Pade, and the least-squares polynomial), none of which uses the Remez code.
    """
    from math import factorial

    from scipy.interpolate import pade

    x = np.linspace(-a, a, 801)

    def err(c, x=x):
        v = np.vander(x, n + 1, increasing=True)
        return (v @ c[: n + 1]) / (v[:, 1:] @ c[n + 1: 2 * n + 1] + 1) / np.exp(x) - 1

    v, ex = np.vander(x, n + 1, increasing=True), np.exp(x)
    lin = np.hstack([v / ex[:, None], -v[:, 1:]])  # p/e^x - (q - 1) = 1
    starts = [np.linalg.lstsq(lin, np.ones_like(x), rcond=None)[0]]
    # third start, pole-free where the two others are not (the linearised fit and Padé [1/1] both
    # put a pole inside [-4, 4]): Nelder-Mead on the grid's max error from the relative
    # least-squares polynomial (q = 1), refusing any q <= 0 on the grid
    poly = np.concatenate([np.linalg.lstsq(v / ex[:, None], np.ones_like(x), rcond=None)[0], np.zeros(n)])

    def pole_free_loss(c):
        return np.inf if np.any(v[:, 1:] @ c[n + 1:] + 1 <= 0) else np.max(np.abs(err(c)))

    starts.append(minimize(pole_free_loss, poly, method="Nelder-Mead",
                           options={"xatol": 1e-12, "fatol": 1e-15, "maxiter": 20000, "maxfev": 40000}).x)
    p, q = pade([1 / factorial(k) for k in range(2 * n + 1)], n, n)
    starts.append(np.concatenate([p.coef[::-1] / q.coef[-1], (q.coef[::-1] / q.coef[-1])[1:]]))
    cons = [{"type": "ineq", "fun": lambda z: z[-1] - err(z[:-1])},
            {"type": "ineq", "fun": lambda z: z[-1] + err(z[:-1])}]
    fine = np.linspace(-a, a, 200_001)
    results = []
    warnings.simplefilter("ignore", RuntimeWarning)  # SLSQP probes near poles
    for c0 in starts:
        z0 = np.append(c0, np.max(np.abs(err(c0))))
        res = minimize(lambda z: z[-1], z0, constraints=cons, method="SLSQP", options={"maxiter": 500, "ftol": 1e-15})
        results.append(np.max(np.abs(err(res.x[:-1], fine))))
    return min(results)


@pytest.mark.parametrize("n, a", [(1, 1.0), (1, 4.0), (2, 1.0)])  # SLSQP misses the (2,2) optimum on [-4,4]
def test_small_degrees_match_direct_optimisation(n, a):
    direct = _epigraph_fit(n, a)
    r = minimax_rational(np.exp, n, interval=(-a, a))
    # the best error lies in [level, max_error] (de la Vallee Poussin); the optimiser's must too
    assert r.min_extremum <= direct * (1 + _grid_loss(np.linspace(-a, a, 200_001), n)), (direct, r.min_extremum)
    # SLSQP levels the error on an 801-point grid, at most the best error; between its points the
    # error can rise by the grid loss of that grid
    assert direct <= r.max_error * (1 + _grid_loss(np.linspace(-a, a, 801), n)), (direct, r.max_error)
    assert r.max_error - r.level <= 1e-3 * r.max_error


def test_refuses_below_float64_floor_and_bad_input():
    with pytest.raises(ValueError, match="float64 cannot resolve"):
        minimax_rational(np.exp, 8, interval=(-4.0, 4.0))
    with pytest.raises(ValueError, match="float64 cannot resolve"):
        exp_errors("minimax", 8, a=4.0)
    with pytest.raises(ValueError, match="degree"):
        minimax_rational(np.exp, -1, interval=(-1.0, 1.0))
    with pytest.raises(ValueError, match="interval"):
        minimax_rational(np.exp, 2, interval=(1.0, -1.0))
    with pytest.raises(ValueError, match="one sign"):
        minimax_rational(np.sin, 2, interval=(-1.0, 1.0))


def test_absolute_error_mode_equioscillates():
    r = minimax_rational(np.exp, 3, interval=(-1.0, 1.0), relative=False)
    x = np.linspace(-1, 1, 100_001)
    e = r(x) - np.exp(x)
    count, alternates = _alternating_peaks(e, 1e-3)
    assert count >= 8 and alternates
    rel = minimax_rational(np.exp, 3, interval=(-1.0, 1.0))
    assert np.max(np.abs(e)) <= r.max_error <= np.max(np.abs(rel(x) - np.exp(x)))
