"""Best uniform (minimax) rational approximation of type ``(n, n)`` by a rational Remez exchange.

The approximant is kept in barycentric form
``r(x) = sum_j alpha_j / (x - t_j) / sum_j beta_j / (x - t_j)`` with ``n + 1`` support points
``t_j``; any type ``(n, n)`` rational with no pole at a ``t_j`` has this form, and it is far
better conditioned than monomial coefficients (the reason the exchange still works in float64
at ``n = 8`` on ``exp`` over ``[-4, 4]``).

Each step solves the levelled-error conditions on a reference of ``2n + 2`` points
``x_0 < ... < x_{2n+1}``: ``err(x_i) = (-1)^i h``, where ``err = (r - f) / f`` (relative, the
default) or ``r - f`` (absolute). Eliminating ``alpha`` leaves an ``(n + 1) x (n + 1)``
generalized eigenproblem in ``(beta, h)``; of its real eigenvalues the one whose denominator
keeps one sign on the interval is taken (an alternant with a pole is not an approximant). The
reference is then exchanged for the alternating extrema of the new error curve, until the
extrema are level. By the equioscillation theorem a level alternant of ``2n + 2`` points is the
unique best approximation (for non-degenerate ``f`` such as ``exp``).

Float64 limits how small an error can be resolved: the error curve is computed as
``r/f - 1`` with rounding noise near ``1e-15``, and the levelled solve loses about two more
digits (measured: for ``exp`` on ``[-4, 4]`` at ``n = 7``, best error 1.5e-11, the extrema level
only to ~1e-3 relative). Below :data:`MIN_ERROR` the "equioscillation" would be rounding noise,
so :func:`minimax_rational` raises instead of returning it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from scipy.linalg import eig, null_space
from scipy.optimize import minimize_scalar

MIN_ERROR = 1e-13  # below this (relative to max |f|) float64 cannot level the extrema; see module doc


@dataclass(frozen=True)
class MinimaxRational:
    """A type ``(n, n)`` rational in barycentric form, with how it was obtained.

    Attributes
    ----------
    support, num_weights, den_weights : ndarray
        ``t_j``, ``alpha_j``, ``beta_j`` of the barycentric form.
    reference : ndarray
        The final alternant (``2n + 2`` points).
    level : float
        ``|h|`` of the last reference solve (a lower bound on the best error, de la Vallée Poussin).
    max_error : float
        The largest error over the interval, from the final extremum search (an upper bound).
    spread : float
        ``(max - min) / max`` of ``|error|`` over the alternant: 0 for exact equioscillation.
        The best error lies in ``[level, max_error]`` when the alternant has ``2n + 2`` points.
    iterations : int
    relative : bool
        Whether ``error = (r - f) / f`` (True) or ``r - f``.
    """

    support: np.ndarray
    num_weights: np.ndarray
    den_weights: np.ndarray
    reference: np.ndarray
    level: float
    max_error: float
    spread: float
    iterations: int
    relative: bool

    @property
    def degree(self) -> int:
        return len(self.support) - 1

    def __call__(self, x) -> np.ndarray:
        return _barycentric(np.asarray(x, dtype=np.float64), self.support, self.num_weights, self.den_weights)

    def denominator(self, x) -> np.ndarray:
        """The denominator polynomial ``sum_j beta_j prod_{k != j} (x - t_k)`` (its sign shows poles)."""
        return _denominator_poly(np.asarray(x, dtype=np.float64), self.support, self.den_weights)


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


def _denominator_poly(x, t, beta):
    diff = x[..., None] - t
    terms = [beta[j] * np.prod(np.delete(diff, j, axis=-1), axis=-1) for j in range(len(t))]
    return np.sum(terms, axis=0)


def _solve_reference(f, x, fx, n, relative, a, b):
    """Levelled-error rational on the reference ``x``: returns (t, alpha, beta, h) or None."""
    t = 0.5 * (x[0:-1:2] + x[1::2])  # one support point inside each pair of reference points
    c = 1.0 / (x[:, None] - t[None, :])
    sigma = (-1.0) ** np.arange(len(x))
    w = fx if relative else np.ones_like(fx)
    # N_i = f_i D_i + sigma_i h w_i D_i with w = f (relative) or 1; N = c alpha lies in range(c),
    # so project onto its orthogonal complement: U^T diag(f) c beta = -h U^T diag(sigma w) c beta
    u = null_space(c.T)
    lhs = u.T @ (fx[:, None] * c)
    rhs = -u.T @ ((sigma * w)[:, None] * c)
    vals, vecs = eig(lhs, rhs)
    grid = np.linspace(a, b, 40 * (n + 1) + 1)
    best = None
    for h, v in zip(vals, vecs.T):
        if not np.isfinite(h) or abs(h.imag) > 1e-8 * max(1.0, abs(h)) or np.max(np.abs(v.imag)) > 1e-8 * np.max(np.abs(v)):
            continue
        h, beta = float(h.real), v.real / np.max(np.abs(v.real))
        q = _denominator_poly(np.concatenate([grid, x]), t, beta)
        if not (np.all(q > 0) or np.all(q < 0)):
            continue  # a pole in the interval
        if best is None or abs(h) < abs(best[3]):
            d = c @ beta
            alpha = np.linalg.lstsq(c, fx * d + sigma * h * w * d, rcond=None)[0]
            best = (t, alpha, beta, h)
    return best


def _error(f, relative, t, alpha, beta):
    def err(x):
        x = np.asarray(x, dtype=np.float64)
        fx = f(x)
        r = _barycentric(x, t, alpha, beta)
        return r / fx - 1.0 if relative else r - fx

    return err


def _alternating_extrema(err, x_ref, a, b, per_gap=48):
    """Signed extrema of ``err``, one per sign-constant stretch, found on a dense grid and refined."""
    nodes = np.unique(np.concatenate([[a], x_ref, [b]]))
    grid = np.unique(np.concatenate([np.linspace(lo, hi, per_gap, endpoint=False) for lo, hi in zip(nodes[:-1], nodes[1:])] + [[b]]))
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
                                      method="bounded", options={"xatol": 1e-14 * max(1.0, b - a)})
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


def minimax_rational(f: Callable[[np.ndarray], np.ndarray], degree: int, *, interval: tuple[float, float],
                     relative: bool = True, rtol: float = 1e-3, max_iterations: int = 60) -> MinimaxRational:
    """Best uniform rational approximation of type ``(degree, degree)`` to ``f`` on ``interval``.

    Parameters
    ----------
    f : callable
        Vectorised real function, smooth on the interval; nonzero there if ``relative``.
    degree : int
        ``n >= 1``: numerator and denominator degree.
    interval : (float, float)
        ``(lo, hi)`` with ``lo < hi``, finite.
    relative : bool
        Minimise ``max |r/f - 1|`` (True) or ``max |r - f|``.
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
        Bad arguments; ``f`` vanishing with ``relative=True``; no pole-free levelled solution;
        no convergence; or a best error below :data:`MIN_ERROR` (times ``max |f|`` for absolute
        error), which float64 cannot resolve -- lower the degree or widen the interval.

    Examples
    --------
    >>> r = minimax_rational(np.exp, 2, interval=(-1.0, 1.0))
    >>> r.spread < 1e-3 and 1e-5 < r.max_error < 1e-4
    True
    """
    if isinstance(degree, bool) or not isinstance(degree, (int, np.integer)) or degree < 1:
        raise ValueError(f"degree must be an integer >= 1, got {degree!r}.")
    lo, hi = (float(v) for v in interval)
    if not (np.isfinite(lo) and np.isfinite(hi) and lo < hi):
        raise ValueError(f"interval must be finite (lo, hi) with lo < hi, got {interval!r}.")
    if not 0 < rtol < 1:
        raise ValueError(f"rtol must be in (0, 1), got {rtol!r}.")
    n = int(degree)
    m = 2 * n + 2
    probe = f(np.linspace(lo, hi, 1001))
    if not np.all(np.isfinite(probe)):
        raise ValueError("f is not finite on the interval.")
    if relative and not (np.all(probe > 0) or np.all(probe < 0)):
        raise ValueError("relative error needs f of one sign on the interval; pass relative=False.")
    floor = MIN_ERROR * (1.0 if relative else float(np.max(np.abs(probe))))
    too_small = (f"float64 cannot resolve a best error this small (floor {floor:.0e}); use a lower degree "
                 "or a wider interval.")

    # Chebyshev extreme points of T_{2n+1}: where the error of a near-best approximation to an
    # entire function like exp peaks (the Padé error is ~ x^{2n+1}, its best correction ~ T_{2n+1})
    x = 0.5 * (lo + hi) - 0.5 * (hi - lo) * np.cos(np.pi * np.arange(m) / (m - 1))
    best = None
    for it in range(1, max_iterations + 1):
        sol = _solve_reference(f, x, f(x), n, relative, lo, hi)
        if sol is None:
            if best is not None and best.level < 100 * floor:
                raise ValueError(f"type ({n},{n}): the exchange broke down near error {best.level:.1e}; " + too_small)
            raise ValueError(f"no pole-free levelled rational of type ({n},{n}) on the reference at step {it}; "
                             "the exchange failed (try a lower degree or a different interval).")
        t, alpha, beta, h = sol
        if abs(h) < floor:
            raise ValueError(f"type ({n},{n}): levelled error {abs(h):.1e} < {floor:.0e}; " + too_small)
        err = _error(f, relative, t, alpha, beta)
        pts, vals = _alternating_extrema(err, x, lo, hi)
        if len(pts) < m:
            if abs(h) < 100 * floor:
                raise ValueError(f"type ({n},{n}): the error curve (level {abs(h):.1e}) lost its alternation; "
                                 + too_small)
            raise ValueError(f"error curve of type ({n},{n}) has only {len(pts)} alternating extrema (< {m}) at "
                             f"step {it}; the exchange failed.")
        pts, vals = _exchange(pts, vals, m)
        emax = float(np.max(np.abs(vals)))
        spread = float((emax - np.min(np.abs(vals))) / emax)
        current = MinimaxRational(t, alpha, beta, pts, abs(h), emax, spread, it, relative)
        if best is None or emax < best.max_error:
            best = current
        if spread < rtol:
            return current
        x = pts
    # Near the float64 floor the exchange stalls at a small spread instead of converging; the
    # best iterate is still certified within [level, max_error] (de la Vallee Poussin).
    if best.spread < 10 * rtol:
        return best
    raise ValueError(f"rational Remez of type ({n},{n}) did not level the error to rtol={rtol} in "
                     f"{max_iterations} steps (best spread {best.spread:.1e}); raise max_iterations or rtol.")
