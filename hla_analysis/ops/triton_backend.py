"""Bridge from :func:`hla_analysis.ops.hla` to the fused Triton kernels.

Kept apart so that the torch forms import without Triton installed; the kernels live in
:mod:`hla_analysis.ops.triton`. ``backend="auto"`` takes them for CUDA tensors only;
``backend="triton"`` also runs them through the CPU interpreter when ``TRITON_INTERPRET=1``.
"""

from __future__ import annotations

import importlib
import importlib.util
import math
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


def symmetric_width(qs, ks) -> int | None:
    """Width C(r + M - 1, M) of the symmetric power features of tied M >= 3 factors, else None.

    Tied means the same tensor objects (as :func:`hla_analysis.ops.quadratic_dispatch.choose`
    decides it): ``(q.k)^M = <q^(x)M, k^(x)M>`` keeps one feature per multiset of indices.
    """
    if len(qs) < 3 or len(ks) != len(qs) or any(q is not qs[0] for q in qs) or any(k is not ks[0] for k in ks):
        return None
    return math.comb(qs[0].shape[-1] + len(qs) - 1, len(qs))


def usable_symmetric(qs, ks, v, *, causal, key_padding_mask, explicit: bool) -> bool:
    """Whether tied M >= 3 factors can run on the M = 1 kernels through symmetric features."""
    width = symmetric_width(qs, ks)
    kernels = _kernels()
    if width is None or kernels is None or not _device_ok([qs[0], ks[0], v], explicit=explicit):
        return False
    from hla_analysis.ops.triton import split

    return width <= split.MAX_FEATURES and bool(
        kernels.supports(qs[:1], ks[:1], v, causal=causal, key_padding_mask=key_padding_mask))


def run_symmetric(qs, ks, v, *, causal, key_padding_mask, allow_signed):
    """Tied M >= 3 on the fused M = 1 kernels: ``(q.k)^M`` as a dot of symmetric power features.

    The features are built in fp32 and cast to the values' dtype; the kernels check the
    normalisers and the output. The features of sign-indefinite factors are signed by design,
    so the caller certifies the weights' signs on the factors (``check_hla_signs``).
    """
    from hla_analysis.ops.tied import symmetric_power_features

    m = len(qs)
    fq = symmetric_power_features(qs[0].float(), m).to(v.dtype)
    fk = symmetric_power_features(ks[0].float(), m).to(v.dtype)
    return _kernels().hla_triton([fq], [fk], v, causal=causal, key_padding_mask=key_padding_mask,
                                 allow_signed=allow_signed, _validated=True, _signs=False)
