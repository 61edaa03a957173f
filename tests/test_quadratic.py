"""Quadratic fused HLA (any M) against the float64 materialized reference.

CPU: the Triton kernel runs under TRITON_INTERPRET=1 (root conftest.py) in fp32; tolerances
are fp32 eps times the magnitudes (relative errors of sums of positive terms stay near eps).
CUDA: bf16 inputs, bf16 tolerances. N = 37 is never a multiple of the blocks.
"""

import os

import pytest
import torch

pytest.importorskip("triton")

from hla_analysis.ops import hla, hla_attention_output, quadratic_dispatch  # noqa: E402
from hla_analysis.ops.quadratic_dispatch import quadratic_flops, state_flops  # noqa: E402

CUDA = torch.cuda.is_available()
RUNNABLE = CUDA or os.environ.get("TRITON_INTERPRET") == "1"
pytestmark = pytest.mark.skipif(not RUNNABLE, reason="needs CUDA or TRITON_INTERPRET=1")
DEVICE = "cuda" if CUDA else "cpu"
DTYPE = torch.bfloat16 if CUDA else torch.float32
# fp32: 64 eps covers sums of a few dozen positive terms and the division; bf16: 3 ulps-ish
TOL = 3e-2 if CUDA else 64 * torch.finfo(torch.float32).eps


def _case(m, widths, *, tied, causal, mask, seed, n=37, dv=24):
    g = torch.Generator().manual_seed(seed)

    def draw(w):
        return (torch.rand(2, n, w, generator=g) + 0.05).to(DEVICE, DTYPE).requires_grad_()

    if tied:
        q, k = draw(widths[0]), draw(widths[0])
        qs, ks, leaves = [q] * m, [k] * m, [q, k]
    else:
        qs, ks = [draw(w) for w in widths], [draw(w) for w in widths]
        leaves = [*qs, *ks]
    v = torch.randn(2, n, dv, generator=g).to(DEVICE, DTYPE).requires_grad_()
    kpm = None
    if mask:
        kpm = torch.rand(2, n, generator=g) > 0.3
        kpm[:, 0] = True
        kpm = kpm.to(DEVICE)
    return qs, ks, v, kpm, leaves + [v]


@pytest.mark.parametrize(
    "m,widths,tied,causal,mask",
    [
        (3, [65] * 3, True, False, False),
        (4, [17] * 4, True, True, True),
        (6, [8] * 6, True, True, False),
        (3, [5, 20, 33], False, True, False),
        (4, [16, 9, 12, 3], False, False, True),
        (6, [4] * 6, False, True, True),
    ],
)
def test_quadratic_matches_reference(m, widths, tied, causal, mask):
    qs, ks, v, kpm, leaves = _case(m, widths, tied=tied, causal=causal, mask=mask, seed=m + 10 * causal)
    out = hla(qs, ks, v, causal=causal, key_padding_mask=kpm, form="quadratic")
    assert quadratic_dispatch.last_dispatch.path == "quadratic"
    assert quadratic_dispatch.last_dispatch.engine == "triton"
    go = torch.randn_like(out)
    grads = torch.autograd.grad(out, leaves, go)
    ref_leaves = [t.detach().double().requires_grad_() for t in leaves]
    if tied:
        rq, rk = [ref_leaves[0]] * m, [ref_leaves[1]] * m
    else:
        rq, rk = ref_leaves[:m], ref_leaves[m:2 * m]
    ref = hla_attention_output(rq, rk, ref_leaves[-1], causal=causal, key_padding_mask=kpm)
    ref_grads = torch.autograd.grad(ref, ref_leaves, go.double())
    for got, want in zip([out, *grads], [ref, *ref_grads]):
        err = float((got.detach().double() - want.detach()).norm() / want.detach().norm())
        assert err < TOL
    if kpm is not None:  # padded keys get exactly zero key gradient
        dk = grads[1] if tied else grads[m]
        assert float(dk[~kpm].abs().max()) == 0.0


def test_torch_twin_matches_reference():
    g = torch.Generator().manual_seed(3)
    qs = [torch.rand(3, 40, w, generator=g, dtype=torch.float64) for w in (4, 7, 2)]
    ks = [torch.rand(3, 40, w, generator=g, dtype=torch.float64) for w in (4, 7, 2)]
    v = torch.randn(3, 40, 5, generator=g, dtype=torch.float64)
    out = hla(qs, ks, v, causal=True, form="quadratic", backend="torch")
    assert quadratic_dispatch.last_dispatch.engine == "torch"
    ref = hla_attention_output(qs, ks, v, causal=True)
    assert torch.allclose(out, ref, rtol=1e-12, atol=1e-12)


def test_quadratic_refuses_negative_normalizer():
    q = torch.tensor([[1.0] * 16, [-1.0] * 16]).to(DEVICE, DTYPE)
    k = torch.tensor([[-1.0] * 16, [-1.0] * 16]).to(DEVICE, DTYPE) * 0.1
    v = torch.ones(2, 16, device=DEVICE, dtype=DTYPE)
    with pytest.raises(ValueError, match="negative normalizer"):
        hla([q] * 3, [k] * 3, v, form="quadratic")
    out = hla([q] * 3, [k] * 3, v, form="quadratic", allow_signed=True)
    assert out.shape == (2, 16)


def test_dispatch_costs_follow_state_size():
    # M = 4 tied at r = 65: state C(68, 4) * 129 per token beats N = 8192 tokens of tiles by far
    assert quadratic_flops([65] * 4, 128, 8192, tied=True, causal=False) < state_flops([65] * 4, 128, 8192, tied=True)
    # linear attention r = 16 at long N: the state wins
    assert state_flops([16], 128, 32760, tied=False) < quadratic_flops([16], 128, 32760, tied=False, causal=False)


def test_state_flops_match_symbolic_cost_model():
    sp = pytest.importorskip("sympy")
    from hla_analysis.symbolic.cost_model import N, dv, hla_cost, r

    for widths, tied in (([5, 7, 3], False), ([6] * 3, True)):
        flops, _ = hla_cost(widths, tied=tied)
        subs = {N: 100, dv: 32, r: widths[0]}
        want = float(sp.sympify(flops).doit().subs(subs))
        assert abs(state_flops(widths, 32, 100, tied=tied) - want) <= 1e-9 * want


@pytest.mark.parametrize("backend", ["auto", "torch"])
def test_quadratic_refuses_signed_weights_under_positive_normalisers(backend):
    """Odd M with signed features: every normaliser > 0 here, yet single weights are negative.

    The state path refused these; the quadratic path did not check signs at all (a bug).
    """
    g = torch.Generator().manual_seed(5)
    q = (torch.rand(2, 20, 16, generator=g) + 0.1).to(DEVICE, DTYPE)
    k = (torch.rand(2, 20, 16, generator=g) + 0.1).to(DEVICE, DTYPE)
    q[0, 3, 0] = -0.05  # q.k stays > 0 for every key: positive weights, but the features are signed
    k[1, 4, :] = -0.01  # one key with negative similarities: (q.k)^3 < 0 in every row of batch 1
    v = torch.randn(2, 20, 16, generator=g).to(DEVICE, DTYPE)
    with pytest.raises(ValueError, match="can give negative attention weights"):
        hla([q] * 3, [k] * 3, v, form="quadratic", backend=backend)
    out = hla([q] * 3, [k] * 3, v, form="quadratic", backend=backend, allow_signed=True)
    ref = hla_attention_output([q.double()] * 3, [k.double()] * 3, v.double(), allow_signed=True)
    assert float((out.double() - ref).norm() / ref.norm()) < TOL * 10
    # an even number of tied factors multiplies to squares: no certificate needed
    assert torch.isfinite(hla([q] * 2, [k] * 2, v, form="quadratic", backend=backend)).all()


@pytest.mark.parametrize("backend", ["auto", "torch"])
def test_quadratic_refuses_output_overflow(backend):
    g = torch.Generator().manual_seed(6)
    q, k = ((torch.rand(1, 20, 16, generator=g) + 0.1).to(DEVICE, torch.float32) for _ in range(2))
    v = torch.randn(1, 20, 16, generator=g).to(DEVICE, torch.float32)
    v[0, 2:5] = 3e38
    with pytest.raises(ValueError, match="overflowed to Inf/NaN although every input is finite"):
        hla([q] * 3, [k] * 3, v, form="quadratic", backend=backend)
