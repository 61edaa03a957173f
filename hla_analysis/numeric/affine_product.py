"""The best HLA-representable weight for ``exp`` on ``[-L, 0]``: a product of ``M`` real affine factors.

An HLA weight with ``M`` affine similarities is ``w(s) = c prod_m (1 + a_m s)`` with free slopes
``a_m`` and a free scale ``c`` (a row's normaliser absorbs it): a degree-``M`` polynomial with only
real roots, positive on the interval. Its best relative error -- equal to its best normalised
error, since the class is closed under scaling -- has a closed form.

Theorem. Over every such product, ``min max_{[-L,0]} |w / e^s - 1|`` is reached by the tied
product ``c (1 + z s)^M`` with

    z* = (1 - e^{-L/M}) / L,   b* = M - 1/z*,   R = M log(M z*) - M + 1/z*,   error = tanh(R / 2),

i.e. the affine factor is the chord of ``e^{s/M}`` over ``[-L, 0]``, and ``(1 + (s - b*)/M)^M``
is the tied HLA weight with the best shift ``b*``.

Proof. (1) ``q = w^{1/M}`` is concave on the interval: with ``u = log w``,
``u'' = -sum_m (a_m / (1 + a_m s))^2 <= -(sum_m a_m / (1 + a_m s))^2 / M = -(u')^2 / M``
(Cauchy-Schwarz), which is ``(w^{1/M})'' <= 0``. (2) An error ``<= h`` means
``((1 - h) e^s)^{1/M} <= q <= ((1 + h) e^s)^{1/M}``; both bounds are convex. A concave ``q``
below a convex upper bound is separated from it by a line (hypograph and epigraph are disjoint
convex sets over the same interval, so the separating hyperplane is not vertical):
``q <= l <= ((1 + h) e^s)^{1/M}``, and ``l >= q`` keeps the lower bound. So ``l^M``, a tied
product, is as good as ``w``. (3) Within ``c (1 + z s)^M`` the log-error
``g(s) = M log(1 + z s) - s`` is concave; its range ``max g - min g`` (``error = tanh(range/2)``)
is least when ``g(-L) = g(0)``, which gives ``z*``; ``g`` peaks at ``s = b*``. The error then
equioscillates, ``-h, +h, -h`` at ``s = -L, b*, 0``: three points for the two parameters
``(c, z)``, whose members differ by a function with at most one zero, so de la Vallée Poussin
certifies it (and part (2) carries the certificate to every affine product).

On ``(-inf, 0]`` a positive product needs every ``a_m <= 0``, so it does not decay: its relative
error is infinite and its absolute error is at least 1/2 (reached by the constant 1/2).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class BestAffineProduct:
    """``scale * (1 + slope * s)^factors``: the best product of ``factors`` affine factors on ``[-length, 0]``.

    Attributes
    ----------
    factors, length : int, float
        ``M`` and ``L``.
    slope : float
        ``z* = (1 - e^{-L/M}) / L``, the common slope of the factors.
    shift : float
        ``b* = M - 1/z*``: the same weight as ``(1 + (s - b*)/M)^M`` up to scale; the error peaks there.
    scale : float
        ``c`` making the error level: ``2 / (1 + e^R)``.
    log_range : float
        ``R = max_s log(w e^{-s}) - min_s log(w e^{-s})``; it stays informative where the error rounds to 1.
    error : float
        ``tanh(R / 2)``: the best relative error, equal to the best normalised error.
    alternation : ndarray
        ``[-L, b*, 0]``, where the relative error is ``-error, +error, -error``.
    """

    factors: int
    length: float
    slope: float
    shift: float
    scale: float
    log_range: float
    error: float
    alternation: np.ndarray

    def __call__(self, s) -> np.ndarray:
        return self.scale * (1 + self.slope * np.asarray(s, dtype=np.float64)) ** self.factors


def best_affine_product(factors: int, *, length: float) -> BestAffineProduct:
    """Closed-form best approximation of ``exp`` on ``[-length, 0]`` by ``M = factors`` real affine factors.

    Raises
    ------
    ValueError
        ``factors`` not an integer >= 1, or ``length`` not finite and > 0 (on the half-line every
        positive product has infinite relative error; see the module doc).

    Examples
    --------
    >>> best = best_affine_product(1, length=4.0)
    >>> round(best.error, 4), round(best.slope * 4, 5)   # chord slope (1 - e^-4) / 4
    (0.6831, 0.98168)
    >>> best_affine_product(4, length=8.0).error < best_affine_product(2, length=8.0).error
    True
    """
    if isinstance(factors, bool) or not isinstance(factors, (int, np.integer)) or factors < 1:
        raise ValueError(f"factors must be an integer >= 1, got {factors!r}.")
    if not (isinstance(length, (int, float, np.floating, np.integer)) and math.isfinite(length) and length > 0):
        raise ValueError(f"length must be finite and > 0 (interval [-length, 0]), got {length!r}; on (-inf, 0] "
                         "every positive affine product has infinite relative error.")
    m, length = int(factors), float(length)
    x = length / m
    one_minus = -math.expm1(-x)  # 1 - e^{-L/M}, without cancellation for small L/M
    slope = one_minus / length
    shift = m - 1.0 / slope
    # R = M [log((1 - e^-x)/x) - 1 + x/(1 - e^-x)]; it cancels to ~ M x^2 / 8 for small x, so the
    # rounding of R is ~ eps * M / (x^2 / 8): negligible for the L / M >= 0.5 tabulated here
    log_range = m * (math.log(one_minus / x) - 1.0 + x / one_minus)
    error = math.tanh(log_range / 2)
    scale = 2 * math.exp(-log_range) / (1 + math.exp(-log_range))  # 2 / (1 + e^R), no overflow at large R
    return BestAffineProduct(factors=m, length=length, slope=slope, shift=shift, scale=scale,
                             log_range=log_range, error=error,
                             alternation=np.array([-length, shift, 0.0]))


def affine_product_error(slopes, *, length: float, samples: int = 20001) -> float:
    """Best relative (= normalised) error of ``c prod_m (1 + a_m s)`` on ``[-length, 0]``, sampled.

    The plain reference for :func:`best_affine_product`: it takes any slopes, untied, and
    returns 1 if a factor is not positive on the interval (relative error 1 is the infimum then).
    """
    a = np.atleast_1d(np.asarray(slopes, dtype=np.float64))
    s = np.linspace(-float(length), 0.0, samples)
    factor = 1 + a[:, None] * s[None, :]
    if np.any(factor <= 0):
        return 1.0
    log_rho = np.sum(np.log(factor), axis=0) - s
    return math.tanh((float(log_rho.max()) - float(log_rho.min())) / 2)
