"""Measured rational degree: a black box ``a(t)`` sampled and fitted with AAA.

AAA with ``m`` support points is a rational function of type ``(m-1, m-1)``; the measured
degree is the smallest ``m - 1`` whose maximum error on the samples is at most
``tol * max|a|``. For a rational ``a`` of type ``(n, n)`` this is ``n`` once ``tol`` is above
rounding; for softmax it keeps growing as ``tol`` shrinks.
"""

from __future__ import annotations

import warnings

import numpy as np
from scipy.interpolate import AAA


def measured_degree(values: np.ndarray, points: np.ndarray, *, tol: float = 1e-9, max_degree: int = 40) -> int:
    """Smallest AAA degree reaching relative tolerance ``tol`` on ``(points, values)``.

    Raises
    ------
    ValueError
        ``tol <= 0``, non-finite samples, or ``tol`` not reached within ``max_degree``.

    Examples
    --------
    >>> t = np.linspace(0, 3, 400)
    >>> measured_degree((1 + t) ** 2 / (3 + t**2), t)
    2
    """
    if not np.isfinite(tol) or tol <= 0:
        raise ValueError(f"tolerance must be > 0 (e.g. 1e-9), got {tol!r}.")
    values, points = np.asarray(values, dtype=np.float64), np.asarray(points, dtype=np.float64)
    if values.shape != points.shape or values.ndim != 1:
        raise ValueError(f"points and values must be 1-D of equal length, got {points.shape} and {values.shape}.")
    if not (np.all(np.isfinite(values)) and np.all(np.isfinite(points))):
        raise ValueError("samples contain NaN/Inf; sample a(t) away from its poles.")
    scale = np.max(np.abs(values))
    if scale == 0 or np.ptp(values) <= tol * scale:
        return 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        r = AAA(points, values, rtol=tol, max_terms=max_degree + 1, clean_up=False)
    errors = np.asarray(r.errors)
    hit = np.nonzero(errors <= tol * scale)[0]
    if hit.size == 0:
        raise ValueError(
            f"tolerance {tol:g} not reached up to degree {max_degree} (best {errors.min() / scale:.2e}); "
            "loosen tol or raise max_degree."
        )
    return int(hit[0])  # errors[m-1] belongs to m support points, i.e. degree m-1


def sample_variant(variant, *, t_max: float = 3.0, samples: int = 300, tokens: int = 6, head_dim: int = 4,
                   seed: int = 0, interval=None) -> tuple[np.ndarray, np.ndarray]:
    """``a(t)`` of a registry variant: a random mix of one query row's weights, ``q -> t q``.

    Runs the variant's own ``attention_map`` in float64 on random Gaussian q/k
    (``allow_signed`` so odd affine products are measured, not refused). ``interval`` (e.g.
    ``(-np.inf, 0)``) replaces ``(0, t_max]``; on a half-line the returned points are the Möbius
    variable in [-1, 1] (:class:`~hla_analysis.numeric.intervals.Interval`), which keeps a type
    ``(n, n)`` rational of type ``(n, n)``, so the AAA degree measured on them is the degree in t.
    """
    import torch

    if t_max <= 0 or samples < 10:
        raise ValueError(f"need t_max > 0 and samples >= 10, got {t_max}, {samples}.")
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(1, head_dim, generator=gen, dtype=torch.float64)
    k = torch.randn(tokens, head_dim, generator=gen, dtype=torch.float64)
    mix = torch.randn(tokens, generator=gen, dtype=torch.float64)
    if interval is not None:
        from hla_analysis.numeric.intervals import Interval

        iv = Interval.parse(interval)
        ts = iv.sample(samples)
        ts = ts[ts != 0.0]  # t = 0 makes every row uniform, a removable but useless sample
    else:
        ts = np.linspace(t_max / samples, t_max, samples)
    with torch.no_grad():
        batch = torch.as_tensor(ts, dtype=torch.float64)[:, None, None] * q  # [T, 1, d]
        kwargs = {} if variant.kind == "softmax" else {"allow_signed": True}
        weights = variant.attention_map(batch, k.expand(len(ts), -1, -1), **kwargs)[:, 0, :]
    values = (weights @ mix).numpy()
    if interval is not None and not iv.bounded:
        return iv.to_unit(ts), values
    return ts, values


def measure_variant_degree(variant, *, tol: float = 1e-9, seeds: int = 2, **sample_kwargs) -> int:
    """Max measured degree over ``seeds`` random q/k draws (a single draw can be degenerate)."""
    if not np.isfinite(tol) or tol <= 0:
        raise ValueError(f"tolerance must be > 0 (e.g. 1e-9), got {tol!r}.")
    degrees = []
    for seed in range(seeds):
        ts, values = sample_variant(variant, seed=seed, **sample_kwargs)
        degrees.append(measured_degree(values, ts, tol=tol))
    return max(degrees)
