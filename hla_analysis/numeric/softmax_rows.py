"""Softmax rows approximated by kernel families: row KL and total variation.

A row of scores ``s_1..s_n`` becomes ``w_j = kappa(s_j - c) / sum_l kappa(s_l - c)`` with
``kappa`` an approximant of ``exp`` fitted on ``[-a, a]``; ``c`` is the row's mid-range and
``a`` its half-range, since softmax ignores shifts. ``KL(softmax || w)`` needs ``w > 0``: a
row with a zero or negative weight gets ``kl = inf`` and ``negative_weights > 0`` -- the
failure is reported, never averaged away.
"""

from __future__ import annotations

import numpy as np
from scipy.special import softmax

from hla_analysis.numeric.exp_approximation import approximant


def draw_scores(distribution: str, *, rows: int, keys: int, scale: float = 1.0, seed: int = 0) -> np.ndarray:
    """Score rows ``[rows, keys]`` from ``normal``, ``uniform`` or ``laplace`` with spread ``scale``.

    Captured scores (issue 4) are passed to :func:`row_errors` directly instead.
    """
    if rows < 1 or keys < 2:
        raise ValueError(f"need rows >= 1 and keys >= 2, got rows={rows}, keys={keys}.")
    if not np.isfinite(scale) or scale <= 0:
        raise ValueError(f"scale must be > 0, got {scale}.")
    rng = np.random.default_rng(seed)
    draw = {
        "normal": lambda: rng.normal(0.0, scale, (rows, keys)),
        "uniform": lambda: rng.uniform(-scale, scale, (rows, keys)),
        "laplace": lambda: rng.laplace(0.0, scale, (rows, keys)),
    }
    if distribution not in draw:
        raise ValueError(f"unknown distribution {distribution!r}; choose one of {sorted(draw)}.")
    return draw[distribution]()


def row_errors(scores: np.ndarray, family: str, degree: int) -> dict:
    """Mean/max row KL(softmax || approx) and total variation for one family and degree.

    Examples
    --------
    >>> s = draw_scores("normal", rows=8, keys=16, seed=1)
    >>> e = row_errors(s, "pade", 4)
    >>> e["mean_tv"] < 1e-3
    True
    """
    scores = np.asarray(scores, dtype=np.float64)
    if scores.ndim != 2 or scores.shape[1] < 2:
        raise ValueError(f"scores must be [rows, keys] with keys >= 2, got shape {scores.shape}.")
    if not np.all(np.isfinite(scores)):
        raise ValueError("scores contain NaN/Inf; clean them first.")
    hi, lo = scores.max(1, keepdims=True), scores.min(1, keepdims=True)
    a = max(float(((hi - lo) / 2).max()), 1e-6)
    kappa = approximant(family, degree, a=a)
    centred = scores - (hi + lo) / 2
    raw = kappa(centred.ravel()).reshape(scores.shape)
    p = softmax(scores, axis=1)
    w = raw / raw.sum(1, keepdims=True)
    bad = (raw <= 0).sum(1)
    tv = 0.5 * np.abs(p - w).sum(1)
    with np.errstate(divide="ignore", invalid="ignore"):
        kl = np.where(bad == 0, np.maximum((p * (np.log(p) - np.log(np.where(w > 0, w, 1)))).sum(1), 0.0), np.inf)
    return {
        "family": family, "degree": int(degree), "rows": scores.shape[0], "keys": scores.shape[1],
        "mean_kl": float(kl.mean()), "max_kl": float(kl.max()),
        "mean_tv": float(tv.mean()), "max_tv": float(tv.max()),
        "negative_weights": int(bad.sum()),
    }
