"""Tied M >= 3 on the fused M = 1 kernels through symmetric power features (issue 11, item 2).

``(q.k)^M = <q^(x)M, k^(x)M>`` keeps C(r + M - 1, M) features instead of r^M; they run on the
linear-attention kernels (widths above 128 as summed 128-wide parts). Compared with the
float64 materialized reference on fresh random inputs, forward and gradients, causal and not,
with padding masks. CPU: the kernels run under TRITON_INTERPRET=1 (root conftest.py) in fp32;
CUDA: bf16 inputs and bf16 tolerances.
"""

import math
import os

import pytest
import torch

pytest.importorskip("triton")

from hla_analysis.ops import (  # noqa: E402
    hla,
    hla_attention_output,
    quadratic_dispatch,
    triton_backend,  # noqa: E402
)

CUDA = torch.cuda.is_available()
RUNNABLE = CUDA or os.environ.get("TRITON_INTERPRET") == "1"
pytestmark = pytest.mark.skipif(not RUNNABLE, reason="needs CUDA or TRITON_INTERPRET=1")
DEVICE = "cuda" if CUDA else "cpu"
DTYPE = torch.bfloat16 if CUDA else torch.float32
# fp32: each weight is a sum of C(r+M-1, M) <= 330 positive products, then a normalised sum
# over N keys: a few hundred eps; bf16: the features themselves are rounded to 8 bits
TOL = 4e-2 if CUDA else 512 * torch.finfo(torch.float32).eps


def _case(m, r, *, causal, mask, seed, n=37, dv=16):
    g = torch.Generator().manual_seed(seed)
    q = (torch.rand(2, n, r, generator=g) + 0.05).to(DEVICE, DTYPE).requires_grad_()
    k = (torch.rand(2, n, r, generator=g) + 0.05).to(DEVICE, DTYPE).requires_grad_()
    v = torch.randn(2, n, dv, generator=g).to(DEVICE, DTYPE).requires_grad_()
    kpm = None
    if mask:
        kpm = torch.rand(2, n, generator=g) > 0.3
        kpm[:, 0] = True  # every causal row keeps a key
        kpm = kpm.to(DEVICE)
    return q, k, v, kpm


@pytest.mark.parametrize("m, r", [(3, 4), (4, 6), (3, 10), (4, 8)])  # 20, 126, 220 and 330 features
@pytest.mark.parametrize("causal", [False, True])
def test_symmetric_path_matches_the_float64_reference(m, r, causal):
    q, k, v, kpm = _case(m, r, causal=causal, mask=causal, seed=10 * m + r + causal)
    out = hla([q] * m, [k] * m, v, causal=causal, key_padding_mask=kpm, backend="triton")
    assert quadratic_dispatch.last_dispatch.path == "state"
    assert triton_backend.symmetric_width([q] * m, [k] * m) == math.comb(r + m - 1, m)
    leaves = [q, k, v]
    ref_leaves = [t.detach().double().requires_grad_() for t in leaves]
    q64, k64, v64 = ref_leaves
    ref = hla_attention_output([q64] * m, [k64] * m, v64, causal=causal, key_padding_mask=kpm)
    torch.testing.assert_close(out.double(), ref, atol=TOL, rtol=TOL)
    g = torch.Generator().manual_seed(99)
    cotangent = torch.randn(out.shape, generator=g).to(DEVICE)
    got = torch.autograd.grad(out, leaves, cotangent.to(out.dtype))
    want = torch.autograd.grad(ref, ref_leaves, cotangent.double())
    for name, a, b in zip("qkv", got, want):
        scale = b.abs().max().clamp_min(1.0)
        torch.testing.assert_close(a.double() / scale, b / scale, atol=TOL, rtol=TOL, msg=f"d{name}")


def test_untied_or_wide_factors_do_not_take_the_symmetric_path():
    q, k, v, _ = _case(3, 4, causal=False, mask=False, seed=1)
    q2 = q.detach().clone()
    assert triton_backend.symmetric_width([q, q2, q], [k, k, k]) is None  # untied: not symmetric
    assert not triton_backend.usable_symmetric([q, q2, q], [k, k, k], v, causal=False, key_padding_mask=None,
                                               explicit=True)
    wide = torch.rand(2, 37, 64, device=DEVICE, dtype=DTYPE)  # C(67, 3) = 47,905 features: too many
    assert not triton_backend.usable_symmetric([wide] * 3, [wide] * 3, v, causal=False, key_padding_mask=None,
                                               explicit=True)
    with pytest.raises(ValueError, match="Triton kernels do not support"):
        hla([wide] * 3, [wide] * 3, v, backend="triton")


def test_odd_m_with_signed_factors_is_refused_as_on_the_torch_path():
    """The features of signed factors are signed by design; the weights' signs are certified
    on the factors: (q.k)^3 < 0 for some pair is refused, even where the normaliser is > 0."""
    g = torch.Generator().manual_seed(3)
    q = torch.randn(1, 24, 4, generator=g).to(DEVICE, DTYPE)
    k = torch.randn(1, 24, 4, generator=g).to(DEVICE, DTYPE)
    v = torch.randn(1, 24, 16, generator=g).to(DEVICE, DTYPE)
    with pytest.raises(ValueError, match="negative attention weights|normaliser|normalizer"):
        hla([q] * 3, [k] * 3, v, backend="triton")
    with pytest.raises(ValueError, match="negative attention weights|normaliser|normalizer"):
        hla([q] * 3, [k] * 3, v, backend="torch")
    # M = 4 is a square: signed factors give non-negative weights, and both paths agree
    out = hla([q] * 4, [k] * 4, v, backend="triton")
    ref = hla_attention_output([q.double()] * 4, [k.double()] * 4, v.double())
    torch.testing.assert_close(out.double(), ref, atol=TOL, rtol=TOL)
