"""Bridge from :func:`hla_analysis.ops.hla` to the fused Triton kernels.

Kept apart so that the torch forms import without Triton installed; the kernels live in
:mod:`hla_analysis.ops.triton`. ``backend="auto"`` takes them for CUDA tensors only;
``backend="triton"`` also runs them through the CPU interpreter when ``TRITON_INTERPRET=1``.
"""

from __future__ import annotations

import importlib
import importlib.util
import os


def _kernels():
    if importlib.util.find_spec("triton") is None or importlib.util.find_spec("hla_analysis.ops.triton") is None:
        return None
    return importlib.import_module("hla_analysis.ops.triton")


def _device_ok(tensors, *, explicit: bool) -> bool:
    interpreting = explicit and os.environ.get("TRITON_INTERPRET") == "1"
    return all(t.is_cuda or interpreting for t in tensors)


def usable(qs, ks, v, *, causal, key_padding_mask, explicit: bool) -> bool:
    """Whether the Triton path can run these inputs."""
    if not _device_ok([*qs, *ks, v], explicit=explicit):
        return False
    kernels = _kernels()
    return kernels is not None and bool(kernels.supports(qs, ks, v, causal=causal, key_padding_mask=key_padding_mask))


def why_not(qs, ks, v, *, causal, key_padding_mask) -> str:
    if _kernels() is None:
        return "backend='triton' needs the triton package: pip install 'hla-analysis[gpu]'."
    if not _device_ok([*qs, *ks, v], explicit=True):
        return "backend='triton' needs CUDA tensors (or TRITON_INTERPRET=1 to run the kernels on CPU)."
    return (
        f"the Triton kernels do not support these inputs (M={len(qs)}, widths "
        f"{[q.shape[-1] for q in qs]}, dtype {v.dtype}, causal={causal}); use backend='torch'."
    )


def run(qs, ks, v, *, causal, key_padding_mask, allow_signed, signs=False):
    """The kernels on validated inputs; ``signs``: also certify the factors' signs (see
    :func:`hla_analysis._checks.check_hla_signs`), on chip where the kernels can."""
    return _kernels().hla_triton(qs, ks, v, causal=causal, key_padding_mask=key_padding_mask, allow_signed=allow_signed,
                                 _validated=True, _signs=signs)
