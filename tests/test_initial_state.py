"""Causal HLA started from an initial state: torch forms and Triton kernels.

Starting the causal form from the state of a prefix's keys must give the rows of the whole
sequence that follow the prefix. The torch chunked and recurrent forms are checked against
that (float64), and the Triton CausalFromState (CPU interpreter, fp32) against the torch
chunked form, outputs and gradients, the initial state's included.
"""

import os

import pytest
import torch

from hla_analysis.ops.hla import _chunked, _key_state, _recurrent


def _factors(m, n, widths, dv, *, seed, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    qs = [(torch.rand(2, n, widths[i], generator=g) + 0.05).to(dtype) for i in range(m)]
    ks = [(torch.rand(2, n, widths[i], generator=g) + 0.05).to(dtype) for i in range(m)]
    v = torch.randn(2, n, dv, generator=g).to(dtype)
    return qs, ks, torch.cat([v, torch.ones_like(v[..., :1])], -1)


@pytest.mark.parametrize("m", [1, 2, 3])
@pytest.mark.parametrize("form", ["chunked", "recurrent"])
def test_torch_forms_continue_from_a_prefix_state(m, form):
    qs, ks, values = _factors(m, 23, (3, 2, 2)[:m], 4, seed=m)
    cut = 9
    whole = _chunked(qs, ks, values, chunk=5)
    initial = _key_state([k[..., :cut, :] for k in ks], values[..., :cut, :])
    rest = [[t[..., cut:, :] for t in ts] for ts in (qs, ks)]
    if form == "chunked":
        tail = _chunked(*rest, values[..., cut:, :], chunk=4, initial_state=initial)
    else:
        tail = _recurrent(*rest, values[..., cut:, :], causal=True, initial_state=initial)
    torch.testing.assert_close(tail, whole[..., cut:, :], rtol=1e-12, atol=1e-12)


INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


@pytest.mark.skipif(not (INTERPRET or torch.cuda.is_available()), reason="needs CUDA or TRITON_INTERPRET=1")
@pytest.mark.parametrize("m", [1, 2])
@pytest.mark.parametrize("schedule", [{}, {"PER_A": False}, {"CAUSAL_STATE": "parallel"}],
                         ids=["column-scan", "tile-scan", "chunk-sums"])
def test_triton_causal_from_state_matches_torch(m, schedule):
    pytest.importorskip("triton")
    from hla_analysis.ops.triton.state.steps import CausalFromState, step_config

    device = "cuda" if torch.cuda.is_available() else "cpu"
    r, dv, n = 16, 16, 45  # n not a multiple of the chunk (32 under the interpreter)
    qs, ks, values = _factors(m, n, (r, r), dv, seed=10 + m, dtype=torch.float32)
    g = torch.Generator().manual_seed(20 + m)
    # the initial state of 30 earlier positive keys, in the torch layout [BH, r1, r2 * (dv + 1)]
    pk = [torch.rand(2, 30, r, generator=g) + 0.05 for _ in range(m)]
    pv = torch.cat([torch.randn(2, 30, dv, generator=g), torch.ones(2, 30, 1)], -1)
    init = _key_state(pk, pv).requires_grad_()
    qs = [q.requires_grad_() for q in qs]
    ks = [k.requires_grad_() for k in ks]
    vv = values[..., :dv].clone().requires_grad_()

    aug = torch.cat([vv, torch.ones_like(vv[..., :1])], -1)
    ref = _chunked(qs, ks, aug, chunk=8, initial_state=init)
    ref = ref[..., :-1] / ref[..., -1:]
    grad_out = torch.randn(ref.shape, generator=g)
    leaves = [*qs, *ks, vv, init]
    ref_grads = torch.autograd.grad(ref, leaves, grad_out)

    full = init.unflatten(-1, (-1, dv + 1))  # [BH, r1, r2, dv + 1] (r2 = 1 when m = 1)
    s0 = full[..., :dv].reshape(2, -1, dv)
    z0 = full[..., dv]
    dev = lambda t: t.to(device)  # noqa: E731
    q2 = dev(qs[1]) if m == 2 else None
    k2 = dev(ks[1]) if m == 2 else None
    cfg = {**step_config(dev(qs[0]), q2, dev(vv), causal=True), **schedule}
    out, den = CausalFromState.apply(dev(qs[0]), q2, dev(ks[0]), k2, dev(vv), dev(s0), dev(z0), cfg)
    grads = torch.autograd.grad(out, leaves, grad_out.to(device))
    assert torch.all(den > 0)
    names = ["out"] + [f"dq{i}" for i in range(m)] + [f"dk{i}" for i in range(m)] + ["dv", "dS0"]
    for name, got, want in zip(names, [out, *grads], [ref, *ref_grads]):
        err = float((got.detach().cpu() - want.detach()).norm() / want.detach().norm())
        assert err < 1e-5, f"{name}: relative error {err:.2e}"
