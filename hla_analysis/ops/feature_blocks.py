"""Column blocks a feature map hands to the fused split path (torch only, no Triton import).

``phi=affine`` builds its features as ``cat([1, x / sqrt(c)])``. The fused kernels take widths
16..128, so the split path (:mod:`hla_analysis.ops.triton.split`) reads the ``x`` block apart
from the constant column. Reading it as a strided slice costs a copy per factor; a map that
records the block it made (:func:`record`) saves that copy. The record holds only while the
features are unchanged: an in-place write bumps the tensor's version and the record is ignored.
"""

from __future__ import annotations

from torch import Tensor


def record(t: Tensor, blocks: dict) -> Tensor:
    """Note that ``t[..., s:s + w]`` equals ``blocks[(s, w)]`` (a contiguous tensor); returns ``t``."""
    t._hla_blocks = (t._version, dict(blocks))
    return t


def recorded(t: Tensor) -> dict | None:
    """The blocks recorded for ``t``, or None (none recorded, or ``t`` written in place since)."""
    rec = getattr(t, "_hla_blocks", None)
    return None if rec is None or rec[0] != t._version else rec[1]
