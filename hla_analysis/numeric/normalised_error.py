"""Normalisation-aware error: softmax rows divide by their sum, so ``exp`` matters only up to a constant.

``err(w) = min_{c > 0} max_s |w(s) / (c e^s) - 1|``. With ``rho(s) = w(s) e^{-s} > 0`` the best
``c`` is ``(max rho + min rho) / 2`` and the error is ``(max rho - min rho) / (max rho + min rho)``;
a weight that is zero or negative somewhere gets 1 (the infimum, approached as ``c -> inf``)
and should be reported as a positivity failure beside it.
"""

from __future__ import annotations

import numpy as np


def normalised_relative_error(weights: np.ndarray, target: np.ndarray) -> float:
    """``min_c max |w / (c f) - 1|`` over samples ``w = weights``, ``f = target > 0``.

    Examples
    --------
    >>> s = np.linspace(-4, 0, 101)
    >>> round(normalised_relative_error(2 * np.exp(s), np.exp(s)), 12)  # a constant factor costs nothing
    0.0
    >>> (round(normalised_relative_error(1 + s / 8, np.exp(s)), 3)
    ...  < round(float(np.max(np.abs((1 + s / 8) / np.exp(s) - 1))), 3))
    True
    """
    w, f = np.asarray(weights, dtype=np.float64), np.asarray(target, dtype=np.float64)
    if w.shape != f.shape or w.size == 0:
        raise ValueError(f"weights and target must be non-empty and of equal shape, got {w.shape} and {f.shape}.")
    if not (np.all(np.isfinite(w)) and np.all(np.isfinite(f)) and np.all(f > 0)):
        raise ValueError("need finite weights and a finite, positive target (sample inside the interval).")
    rho = w / f
    lo, hi = float(rho.min()), float(rho.max())
    if lo <= 0:
        return 1.0
    return (hi - lo) / (hi + lo)
