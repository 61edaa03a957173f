"""Best uniform (minimax) rational approximation of type ``(m, n)`` by a rational Remez exchange.

The solver works in a unit variable ``t`` in ``[-1, 1]`` (:class:`~hla_analysis.numeric.intervals.Interval`:
affine for a finite interval, Möbius for a half-line such as ``(-inf, 0]``). The approximant is
kept in barycentric form ``R(t) = sum_j alpha_j / (t - t_j) / sum_j beta_j / (t - t_j)`` with
``K = max(m, n) + 1`` support points ``t_j``; the numerator and denominator degrees are cut to
``m`` and ``n`` by linear conditions on ``alpha`` and ``beta`` (the first moments
``sum_j alpha_j T_i(t_j)`` vanish). Barycentric weights are far better conditioned than monomial
coefficients (the reason the exchange still works in float64 at type (8, 8) on ``[-4, 4]``).

On a half-line a type ``(m, n)`` rational in ``s`` with ``m <= n`` is ``(1 + t)^(n - m) R(t)``
with ``R`` of type ``(m, n)`` in ``t`` (the factor is the zero at ``s = -inf``), so the exchange
runs on ``R`` with that known weight; ``m > n`` is unbounded there and refused.

Each step solves the levelled-error conditions on a reference of ``m + n + 2`` points:
``err(x_i) = (-1)^i h``, where ``err = (r - f) / f`` (relative) or ``r - f`` (absolute).
Eliminating ``alpha`` leaves an ``(n + 1) x (n + 1)`` generalized eigenproblem in ``(beta, h)``;
of its real eigenvalues the one whose denominator keeps one sign on the interval is taken (an
alternant with a pole is not an approximant). The reference is then exchanged for the
alternating extrema of the new error curve until they are level. By the equioscillation
theorem a level alternant of ``m + n + 2`` points is the unique best approximation (for
non-degenerate ``f`` such as ``exp``); de la Vallée Poussin brackets the best error between the
smallest alternant extremum and the largest error anywhere.

Float64 limits how small an error can be resolved: the error curve has rounding noise near
``1e-15`` and the levelled solve loses about two more digits (measured: for ``exp`` on
``[-4, 4]`` at ``n = 7``, best error 1.5e-11, the extrema level only to ~1e-3 relative). Below
:data:`MIN_ERROR` the "equioscillation" would be rounding noise, so :func:`minimax_rational`
raises instead of returning it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from numpy.polynomial import chebyshev
from scipy.linalg import eig, null_space
from scipy.optimize import minimize_scalar

from hla_analysis.numeric.intervals import Interval

MIN_ERROR = 1e-13  # below this (relative to max |f|) float64 cannot level the extrema; see module doc
_EPS = np.finfo(np.float64).eps
_DENSE = 4000  # points of the final dense scan behind max_error (besides the refined extrema)


@dataclass(frozen=True)
class MinimaxRational:
    """A type ``(m, n)`` rational in barycentric form (in the unit variable), with how it was obtained.

    Attributes
    ----------
    interval : Interval
        Where it approximates; ``x`` maps to the unit variable by ``interval.to_unit``.
    numerator_degree, denominator_degree : int
        The type ``(m, n)``.
    support, num_weights, den_weights : ndarray
        ``t_j``, ``alpha_j``, ``beta_j`` of the barycentric form, in the unit variable.
    reference : ndarray
        The final alternant (``m + n + 2`` points), in the original variable.
    level : float
        ``|h|`` of the last reference solve.
    min_extremum : float
        The smallest ``|error|`` over the final alternant: a lower bound on the best error
        (de la Vallée Poussin), up to the rounding of its evaluation.
    max_error : float
        The largest ``|error|`` found (refined extrema and a dense scan), plus a float64
        rounding bound of the error evaluation: an upper bound of any float64 evaluation of
        the error on the interval, up to how exactly the extremum search locates a maximum.
    spread : float
        ``(max - min) / max`` of ``|error|`` over the alternant: 0 for exact equioscillation.
    iterations : int
    relative : bool
        Whether ``error = (r - f) / f`` (True) or ``r - f``.
    """

    interval: Interval
    numerator_degree: int
    denominator_degree: int
    support: np.ndarray
    num_weights: np.ndarray
    den_weights: np.ndarray
    reference: np.ndarray
    level: float
    min_extremum: float
    max_error: float
    spread: float
    iterations: int
    relative: bool

    @property
    def degree(self) -> int:
        return max(self.numerator_degree, self.denominator_degree)

    def _weight(self, t):
        k = self.denominator_degree - self.numerator_degree
        if self.interval.bounded or k <= 0:
            return np.ones_like(t)
        return (1 + t) ** k if np.isinf(self.interval.lo) else (1 - t) ** k

    def __call__(self, x) -> np.ndarray:
        t = self.interval.to_unit(np.asarray(x, dtype=np.float64))
        return self._weight(t) * _barycentric(t, self.support, self.num_weights, self.den_weights)

    def denominator(self, x) -> np.ndarray:
        """The denominator ``sum_j beta_j prod_{k != j} (t - t_k)`` at ``t = to_unit(x)`` (its sign shows poles)."""
        t = self.interval.to_unit(np.asarray(x, dtype=np.float64))
        return _denominator_poly(t, self.support, self.den_weights)


def _barycentric(x, t, alpha, beta):
    diff = x[..., None] - t
    hit = diff == 0
    c = 1.0 / np.where(hit, 1.0, diff)
    c = np.where(hit, 0.0, c)
    out = (c @ alpha) / (c @ beta)
    # at a support point the form is 0/0-free in the limit: r(t_j) = alpha_j / beta_j
    rows, cols = np.nonzero(hit.reshape(-1, len(t)))
    flat = out.reshape(-1)
    flat[rows] = alpha[cols] / beta[cols]
    return flat.reshape(x.shape)


def _barycentric_condition(x, t, alpha, beta):
    """``sum |alpha_j c_j| / |sum alpha_j c_j|`` plus the same for beta: the cancellation in the form."""
    diff = x[..., None] - t
    c = 1.0 / np.where(diff == 0, np.inf, diff)
    with np.errstate(divide="ignore", invalid="ignore"):
        kn = np.abs(c) @ np.abs(alpha) / np.abs(c @ alpha)
        kd = np.abs(c) @ np.abs(beta) / np.abs(c @ beta)
    return np.nan_to_num(kn, nan=1.0, posinf=1e16) + np.nan_to_num(kd, nan=1.0, posinf=1e16)


def _denominator_poly(x, t, beta):
    diff = x[..., None] - t
    terms = [beta[j] * np.prod(np.delete(diff, j, axis=-1), axis=-1) for j in range(len(t))]
    return np.sum(terms, axis=0)


def _degree_cut(t, degree):
    """Orthonormal basis of the barycentric weights whose polynomial has degree <= ``degree``.

    ``sum_j w_j prod_{k != j}(x - t_k)`` has degree ``<= degree`` iff ``sum_j w_j p(t_j) = 0`` for
    every polynomial ``p`` of degree ``< K - 1 - degree`` (``K = len(t)``); Chebyshev ``p`` keep it
    well conditioned on [-1, 1].
    """
    cut = len(t) - 1 - degree
    if cut <= 0:
        return np.eye(len(t))
    moments = chebyshev.chebvander(t, cut - 1).T  # [cut, K]
    return null_space(moments)


class _Problem:
    """``f`` on the unit variable, the error's weights, and the type: what every step needs."""

    def __init__(self, f, interval: Interval, m: int, n: int, relative: bool):
        self.interval, self.m, self.n, self.relative = interval, m, n, relative
        self.k = max(m, n) + 1
        self.size = m + n + 2
        self.f_user = f
        self.weight_power = 0 if interval.bounded else n - m

    def f(self, t):
        with np.errstate(over="ignore", under="ignore"):
            return np.asarray(self.f_user(self.interval.from_unit(t)), dtype=np.float64)

    def g(self, t):
        """Known factor of the approximant (the zero at the infinite end), 1 on finite intervals."""
        if self.weight_power == 0:
            return np.ones_like(t)
        return (1 + t) ** self.weight_power if np.isinf(self.interval.lo) else (1 - t) ** self.weight_power

    def error(self, t_sup, alpha, beta):
        def err(t):
            t = np.asarray(t, dtype=np.float64)
            r = self.g(t) * _barycentric(t, t_sup, alpha, beta)
            fx = self.f(t)
            return r / fx - 1.0 if self.relative else r - fx

        return err

    def rounding_bound(self, t, t_sup, alpha, beta):
        """Float64 rounding of the error evaluation at ``t``, from the barycentric cancellation."""
        r = self.g(t) * _barycentric(t, t_sup, alpha, beta)
        fx = self.f(t)
        kappa = _barycentric_condition(t, t_sup, alpha, beta) + self.k + 4 + self.weight_power
        scale = np.abs(fx) if self.relative else 1.0
        return 8 * _EPS * (kappa * np.abs(r) + 4 * np.abs(fx)) / scale


def _solve_reference(problem: _Problem, x):
    """Levelled-error rational on the reference ``x`` (unit variable): (t, alpha, beta, h) or None."""
    m, n, size = problem.m, problem.n, problem.size
    mids = 0.5 * (x[:-1] + x[1:])
    t = mids[np.round(np.linspace(0, size - 2, problem.k)).astype(int)]
    c = 1.0 / (x[:, None] - t[None, :])
    fx, gx = problem.f(x), problem.g(x)
    sigma = (-1.0) ** np.arange(size)
    w = fx if problem.relative else np.ones_like(fx)
    num_basis, den_basis = _degree_cut(t, m), _degree_cut(t, n)
    # g_i N_i = (f_i + sigma_i h w_i) D_i with N = c B gamma, D = c C delta, each row divided by w_i:
    # (g/w)_i N_i = ((f/w)_i + sigma_i h) D_i. In relative mode that is (g/f) N = (1 + sigma h) D, every
    # row of order one however far f falls (e^-32 on [-32, 0]); undivided, the rows where f is small
    # drop below the others' rounding and the levelled solution needs a pole there. N lies in
    # range(diag(g/w) c B), so project onto its complement U: U^T diag(f/w) c C delta = -h U^T diag(sigma) c C delta
    num_cols = (gx / w)[:, None] * (c @ num_basis)
    u = null_space(num_cols.T)
    den_cols = c @ den_basis
    if u.shape[1] != den_cols.shape[1]:
        return None
    vals, vecs = eig(u.T @ ((fx / w)[:, None] * den_cols), -u.T @ (sigma[:, None] * den_cols))
    grid = np.linspace(-1.0, 1.0, 40 * problem.k + 1)
    best = None
    for h, v in zip(vals, vecs.T):
        if (not np.isfinite(h) or abs(h.imag) > 1e-8 * max(1.0, abs(h))
                or np.max(np.abs(v.imag)) > 1e-8 * np.max(np.abs(v))):
            continue
        h = float(h.real)
        beta = den_basis @ v.real
        beta = beta / np.max(np.abs(beta))
        q = _denominator_poly(np.concatenate([grid, x]), t, beta)
        if not (np.all(q > 0) or np.all(q < 0)):
            continue  # a pole in the interval
        if best is None or abs(h) < abs(best[3]):
            d = c @ beta
            gamma = np.linalg.lstsq(num_cols, (fx / w + sigma * h) * d, rcond=None)[0]
            best = (t, num_basis @ gamma, beta, h)
    return best


def _alternating_extrema(err, x_ref, per_gap=48):
    """Signed extrema of ``err`` on [-1, 1], one per sign-constant stretch, found on a dense grid and refined."""
    nodes = np.unique(np.concatenate([[-1.0], x_ref, [1.0]]))
    grid = np.unique(np.concatenate([np.linspace(lo, hi, per_gap, endpoint=False)
                                     for lo, hi in zip(nodes[:-1], nodes[1:])] + [[1.0]]))
    e = err(grid)
    pts, vals = [], []
    start = 0
    sign = np.sign(e)
    for k in range(1, len(grid) + 1):
        if k == len(grid) or (sign[k] != sign[start] and sign[k] != 0):
            seg = slice(start, k)
            i = start + int(np.argmax(np.abs(e[seg])))
            xi, ei = grid[i], e[i]
            if 0 < i < len(grid) - 1:  # interior: refine; endpoints are extrema as they stand
                s = np.sign(ei)
                res = minimize_scalar(lambda z: -s * float(err(np.array([z]))[0]), bounds=(grid[i - 1], grid[i + 1]),
                                      method="bounded", options={"xatol": 1e-14})
                if -res.fun > abs(ei):
                    xi, ei = float(res.x), -s * res.fun
            pts.append(xi)
            vals.append(ei)
            start = k
    return np.array(pts), np.array(vals)


def _exchange(pts, vals, m):
    """Keep ``m`` alternating extrema, dropping the smallest first (merging neighbours to keep alternation)."""
    pts, vals = list(pts), list(vals)
    while len(pts) > m:
        if len(pts) - m == 1:
            drop = 0 if abs(vals[0]) < abs(vals[-1]) else len(pts) - 1
            del pts[drop], vals[drop]
            continue
        i = int(np.argmin(np.abs(vals)))
        if i in (0, len(pts) - 1):
            del pts[i], vals[i]
            continue
        # removing an interior extremum leaves two same-sign neighbours: keep the larger one
        keep = i - 1 if abs(vals[i - 1]) >= abs(vals[i + 1]) else i + 1
        for j in sorted({i - 1, i, i + 1} - {keep}, reverse=True):
            del pts[j], vals[j]
    return np.array(pts), np.array(vals)


def _check_degree(name, value):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
        raise ValueError(f"{name} must be an integer >= 0, got {value!r}.")
    return int(value)


def _setup(f, degree, interval, relative, rtol, numerator_degree, denominator_degree):
    n_default = _check_degree("degree", degree)
    m = n_default if numerator_degree is None else _check_degree("numerator_degree", numerator_degree)
    n = n_default if denominator_degree is None else _check_degree("denominator_degree", denominator_degree)
    iv = interval if isinstance(interval, Interval) else Interval.parse(interval)
    if relative is None:
        relative = iv.bounded
    if not iv.bounded:
        if relative:
            raise ValueError("relative error is unbounded on an infinite interval when f decays like exp; "
                             "pass relative=False (absolute error) or a finite interval.")
        if m > n:
            raise ValueError(f"type ({m},{n}) with m > n is unbounded on the infinite interval {iv.label()}; "
                             "use numerator_degree <= denominator_degree.")
    if not 0 < rtol < 1:
        raise ValueError(f"rtol must be in (0, 1), got {rtol!r}.")
    problem = _Problem(f, iv, m, n, bool(relative))
    probe = problem.f(np.linspace(-1.0, 1.0, 1001))
    if not np.all(np.isfinite(probe)):
        raise ValueError("f is not finite on the interval.")
    if relative and not (np.all(probe > 0) or np.all(probe < 0)):
        raise ValueError("relative error needs f of one sign on the interval; pass relative=False.")
    floor = MIN_ERROR * (1.0 if relative else float(np.max(np.abs(probe))))
    return problem, floor


def _chebyshev_reference(problem):
    size = problem.size
    # Chebyshev extreme points: where the error of a near-best approximation to an entire
    # function like exp peaks (the Padé error ~ x^(m+n+1), its best correction ~ T_(m+n+1))
    x = -np.cos(np.pi * np.arange(size) / (size - 1))
    if problem.weight_power:
        # the approximant's known zero sits at the infinite end, where the error is f's limit 0:
        # start the reference just inside
        end = 0 if np.isinf(problem.interval.lo) else size - 1
        x[end] = 0.5 * (x[end] + x[end + (1 if end == 0 else -1)])
    return x



# Exponents of the map t -> 2 ((1 + t) / 2)^p - 1 that slide the Chebyshev reference towards one
# end. Where the alternation points of the best approximant crowd at one end (exp's (0, n) on the
# half-line, where they follow the decay) the levelled solution on the plain Chebyshev reference
# needs a pole and the exchange cannot start; a reference crowded the same way can. Measured:
# the half-line (0, n), 2 <= n <= 8, converge only from these. Not enough: (n, n) on [-64, 0] in
# relative error, where exp spans e^-64 ~ 1e-28 and P / Q must too, so one of P, Q spans
# >= e^32 ~ 1e14 and its barycentric sum loses ~eps e^32 ~ 2e-2 at the small end; the levelled
# system's numerator rows (g / f) span e^64 > 1 / eps. That needs extended precision (mpmath) or
# a pole-zero parametrisation; minimax_rational raises there.
_REFERENCE_WARPS = (2.0, 0.5, 3.0, 1 / 3, 4.0, 0.25)


def _initial_references(problem):
    base = _chebyshev_reference(problem)
    return [base] + [2 * ((1 + base) / 2) ** p - 1 for p in _REFERENCE_WARPS]


def _result(problem, t, alpha, beta, h, pts, vals, it):
    err = problem.error(t, alpha, beta)
    dense = np.linspace(-1.0, 1.0, _DENSE + 1)
    scan = np.concatenate([dense, pts])
    found = float(np.max(np.abs(np.concatenate([err(dense), vals]))))
    rounding = float(np.max(problem.rounding_bound(scan, t, alpha, beta)))
    small = float(np.min(np.abs(vals)))
    emax = float(np.max(np.abs(vals)))
    return MinimaxRational(
        interval=problem.interval, numerator_degree=problem.m, denominator_degree=problem.n,
        support=t, num_weights=alpha, den_weights=beta, reference=problem.interval.from_unit(pts),
        level=abs(h), min_extremum=max(small - rounding, 0.0), max_error=found + rounding,
        spread=float((emax - small) / emax) if emax > 0 else 0.0, iterations=it, relative=problem.relative,
    )


def minimax_rational(f: Callable[[np.ndarray], np.ndarray], degree: int, *, interval, relative: bool | None = None,
                     numerator_degree: int | None = None, denominator_degree: int | None = None,
                     rtol: float = 1e-3, max_iterations: int = 60) -> MinimaxRational:
    """Best uniform rational approximation of type ``(m, n)`` (default ``(degree, degree)``) to ``f``.

    Parameters
    ----------
    f : callable
        Vectorised real function, smooth on the interval; nonzero there if ``relative``; on a
        half-line it must accept ``+-inf`` and return its limit there (``np.exp(-inf) = 0``).
    degree : int
        ``>= 0``: the numerator and denominator degree unless given separately.
    interval : (float, float)
        ``(lo, hi)`` with ``lo < hi``; one end may be infinite, e.g. ``(-np.inf, 0.0)``.
    relative : bool, optional
        Minimise ``max |r/f - 1|`` (True) or ``max |r - f|`` (False). Default: relative on a
        finite interval, absolute on a half-line (where relative error is unbounded for exp).
    numerator_degree, denominator_degree : int, optional
        ``m`` and ``n`` of the type ``(m, n)``; e.g. ``denominator_degree=0`` for the best
        polynomial, ``numerator_degree=0`` for the best ``1 / q``.
    rtol : float
        Stop when the alternant's extrema agree to ``rtol`` (relative spread), in ``(0, 1)``.
    max_iterations : int
        Exchange steps before giving up.

    Returns
    -------
    MinimaxRational

    Raises
    ------
    ValueError
        Bad arguments; ``f`` vanishing with ``relative=True``; relative error or ``m > n`` on a
        half-line; no pole-free levelled solution; no convergence; or a best error below
        :data:`MIN_ERROR` (times ``max |f|`` for absolute error), which float64 cannot resolve --
        lower the degree or widen the interval.

    Examples
    --------
    >>> r = minimax_rational(np.exp, 2, interval=(-1.0, 1.0))
    >>> r.spread < 1e-3 and 1e-5 < r.max_error < 1e-4
    True
    >>> half_line = minimax_rational(np.exp, 1, interval=(-np.inf, 0.0))  # lambda_11 = 0.0668...
    >>> round(half_line.max_error, 4)
    0.0668
    """
    problem, floor = _setup(f, degree, interval, relative, rtol, numerator_degree, denominator_degree)
    first = None
    starts = _initial_references(problem)
    for x in starts:
        try:
            return _exchange_from(problem, floor, x, rtol, max_iterations)
        except _ExchangeFailed as err:
            first = first or err
    raise ValueError(f"{first} (tried {len(starts)} starting references)")


class _ExchangeFailed(ValueError):
    """The exchange broke down from this starting reference; another start may succeed."""


def _exchange_from(problem, floor, x, rtol, max_iterations):
    m, n, size = problem.m, problem.n, problem.size
    label = f"type ({m},{n})"
    too_small = (f"float64 cannot resolve a best error this small (floor {floor:.0e}); use a lower degree "
                 "or a wider interval.")
    best = None
    for it in range(1, max_iterations + 1):
        sol = _solve_reference(problem, x)
        if sol is None:
            if best is not None and abs(best[2][3]) < 100 * floor:
                raise ValueError(f"{label}: the exchange broke down near error {abs(best[2][3]):.1e}; " + too_small)
            raise _ExchangeFailed(f"no pole-free levelled rational of {label} on the reference at step {it}; "
                                  "the exchange failed (try a lower degree or a different interval)")
        t, alpha, beta, h = sol
        if abs(h) < floor:
            raise ValueError(f"{label}: levelled error {abs(h):.1e} < {floor:.0e}; " + too_small)
        pts, vals = _alternating_extrema(problem.error(t, alpha, beta), x)
        if len(pts) < size:
            if abs(h) < 100 * floor:
                raise ValueError(f"{label}: the error curve (level {abs(h):.1e}) lost its alternation; " + too_small)
            raise _ExchangeFailed(f"error curve of {label} has only {len(pts)} alternating extrema (< {size}) at "
                                  f"step {it}; the exchange failed")
        pts, vals = _exchange(pts, vals, size)
        emax = float(np.max(np.abs(vals)))
        spread = float((emax - np.min(np.abs(vals))) / emax) if emax > 0 else 0.0
        if best is None or emax < best[0]:
            best = (emax, spread, (t, alpha, beta, h, pts, vals, it))
        if spread < rtol:
            return _result(problem, t, alpha, beta, h, pts, vals, it)
        x = pts
    # Near the float64 floor the exchange stalls at a small spread instead of converging; the
    # best iterate is still certified within [min_extremum, max_error] (de la Vallee Poussin).
    if best[1] < 10 * rtol:
        return _result(problem, *best[2])
    raise _ExchangeFailed(f"rational Remez of {label} did not level the error to rtol={rtol} in "
                          f"{max_iterations} steps (best spread {best[1]:.1e}); raise max_iterations or rtol")
