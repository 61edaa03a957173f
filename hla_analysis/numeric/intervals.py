"""Intervals for approximation, finite or half-infinite, and the Möbius map that makes them finite.

A half-line such as ``(-inf, 0]`` is mapped onto ``[-1, 1]`` by a Möbius transformation
``s = hi - scale * (1 - t) / (1 + t)``. A rational of type ``(m, n)`` in ``s`` composed with a
Möbius map is a rational of type at most ``(max(m, n), max(m, n))`` in ``t`` -- for the diagonal
types ``(n, n)`` exactly ``(n, n)`` -- so best approximation, AAA and measured degrees of type
``(n, n)`` carry over unchanged, and ``s = -inf`` becomes the ordinary endpoint ``t = -1``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# Where t = 0 lands, as a distance from the finite end. Any positive value gives the same best
# approximation; this one spreads the alternation points of exp(s) on (-inf, 0] (which reach
# s ~ -30 at type (8, 8)) evenly enough over [-1, 1].
HALF_LINE_SCALE = 4.0


@dataclass(frozen=True)
class Interval:
    """``[lo, hi]`` with at most one infinite end; ``to_unit``/``from_unit`` map it onto ``[-1, 1]``.

    Examples
    --------
    >>> iv = Interval.parse((-np.inf, 0.0))
    >>> iv.bounded, float(iv.from_unit(np.array([1.0]))[0]), float(iv.from_unit(np.array([-1.0]))[0])
    (False, 0.0, -inf)
    """

    lo: float
    hi: float

    def __post_init__(self):
        lo, hi = self.lo, self.hi
        if np.isnan(lo) or np.isnan(hi) or not lo < hi:
            raise ValueError(f"interval must be (lo, hi) with lo < hi, got ({lo}, {hi}).")
        if np.isinf(lo) and np.isinf(hi):
            raise ValueError("interval (-inf, inf) is not supported: give one finite end, e.g. (-inf, 0).")

    @classmethod
    def parse(cls, interval) -> "Interval":
        """From a pair of numbers (``-np.inf`` allowed) or strings such as ``("-inf", "0")``."""
        try:
            lo, hi = (float(v) for v in interval)
        except (TypeError, ValueError):
            raise ValueError(
                f"interval must be a pair (lo, hi) of numbers, e.g. (-inf, 0), got {interval!r}."
            ) from None
        return cls(lo, hi)

    @property
    def bounded(self) -> bool:
        return bool(np.isfinite(self.lo) and np.isfinite(self.hi))

    @property
    def width(self) -> float:
        return self.hi - self.lo

    def label(self) -> str:
        def fmt(v):
            return "-inf" if v == -np.inf else ("inf" if v == np.inf else f"{v:g}")
        return f"({fmt(self.lo)}, {fmt(self.hi)}]" if np.isinf(self.lo) else f"[{fmt(self.lo)}, {fmt(self.hi)}" + (
            ")" if np.isinf(self.hi) else "]")

    def from_unit(self, t: np.ndarray) -> np.ndarray:
        """Point of the interval for ``t`` in ``[-1, 1]`` (affine if bounded, Möbius otherwise)."""
        t = np.asarray(t, dtype=np.float64)
        if self.bounded:
            return 0.5 * (self.lo + self.hi) + 0.5 * self.width * t
        with np.errstate(divide="ignore"):
            if np.isinf(self.lo):
                return self.hi - HALF_LINE_SCALE * (1 - t) / (1 + t)
            return self.lo + HALF_LINE_SCALE * (1 + t) / (1 - t)

    def to_unit(self, s: np.ndarray) -> np.ndarray:
        """Inverse of :meth:`from_unit`."""
        s = np.asarray(s, dtype=np.float64)
        if self.bounded:
            return (2 * s - self.lo - self.hi) / self.width
        with np.errstate(invalid="ignore"):
            if np.isinf(self.lo):
                u = self.hi - s  # >= 0
                return np.where(np.isinf(u), -1.0, (HALF_LINE_SCALE - u) / (HALF_LINE_SCALE + u))
            u = s - self.lo
            return np.where(np.isinf(u), 1.0, (u - HALF_LINE_SCALE) / (u + HALF_LINE_SCALE))

    def sample(self, count: int) -> np.ndarray:
        """``count`` points: equispaced if bounded, equispaced in the Möbius variable otherwise.

        Unbounded: the infinite end itself is left out (its value is the limit, see :meth:`from_unit`).
        """
        t = np.linspace(-1.0, 1.0, count)
        if not self.bounded:
            t = t[1:] if np.isinf(self.lo) else t[:-1]
        return self.from_unit(t)
