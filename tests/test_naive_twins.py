"""Each fused op against its plain-torch twin (``ops/triton/<op>/naive.py``): forward and gradients.

The fused op runs in fp32 (under the interpreter on CPU), its twin on fp64 copies of the same
flat inputs. Tolerances follow fp32 rounding: ``TOL_ULPS`` units of fp32 eps times the
magnitude of the compared tensor, about 1.5e-5 of it, far below what a wrong mask, state
or gradient gives (the op tests also check that the twin with the other causal flag is
rejected). The twins are checked first, in fp64, against the materialized reference.
"""

import pytest
import torch

triton = pytest.importorskip("triton")

from hla_analysis.ops import hla_attention_output  # noqa: E402
from hla_analysis.ops.triton.config import default_config  # noqa: E402
from hla_analysis.ops.triton.quadratic import naive as quadratic_naive  # noqa: E402
from hla_analysis.ops.triton.state import naive as state_naive  # noqa: E402
from hla_analysis.ops.triton.tied import naive as tied_naive  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
EPS = torch.finfo(torch.float32).eps
TOL_ULPS = 2**7  # measured errors: at most 4 eps times the magnitude
BH, R, DV = 2, 16, 16


def _rand(*shape, seed, signed=False):
    g = torch.Generator().manual_seed(seed)
    t = torch.randn(*shape, generator=g) if signed else torch.rand(*shape, generator=g)
    return t.to(DEVICE)


def _leaves(*tensors):
    return [None if t is None else t.clone().requires_grad_(True) for t in tensors]


def _tol(want):
    return TOL_ULPS * EPS * float(want.detach().abs().max())


def _agrees(got, want, what):
    got, want = got.detach().double(), want.detach()
    err, tol = float((got - want).abs().max()), _tol(want)
    assert err <= tol, f"{what}: max error {err:.3g} above {tol:.3g} (max |twin| {float(want.abs().max()):.3g})"


def _compare(op, twin, inputs, *, seed):
    """``op(*fp32 leaves)`` against ``twin(*fp64 leaves)``: outputs and gradients of a random cotangent."""
    got_in = _leaves(*inputs)
    want_in = _leaves(*(None if t is None else t.double() for t in inputs))
    got, want = op(*got_in), twin(*want_in)
    got, want = (got if isinstance(got, tuple) else (got,)), (want if isinstance(want, tuple) else (want,))
    _agrees(got[0], want[0], "output")
    for g, w in zip(got[1:], want[1:]):
        _agrees(g, w, "normaliser")
    cot = _rand(*want[0].shape, seed=seed + 1, signed=True)
    got_grads = torch.autograd.grad(got[0], [t for t in got_in if t is not None], cot)
    want_grads = torch.autograd.grad(want[0], [t for t in want_in if t is not None], cot.double())
    for i, (g, w) in enumerate(zip(got_grads, want_grads)):
        _agrees(g, w, f"gradient of input {i}")
    return want[0].detach()


def _other_flag_rejected(want, wrong):
    """The other causal flag is a different op: the tolerance must tell them apart."""
    assert float((want - wrong).abs().max()) > 100 * _tol(want)


# ---- the twins themselves, in fp64, against the materialized reference ----


@pytest.mark.parametrize("causal", [False, True])
def test_twins_match_the_materialized_reference(causal):
    n = 24
    q1, q2, k1, k2 = (_rand(BH, n, 8, seed=s).double() for s in range(4))
    v = _rand(BH, n, 5, seed=4, signed=True).double()
    ref = hla_attention_output([q1, q2], [k1, k2], v, causal=causal)
    torch.testing.assert_close(state_naive.hla(q1, q2, k1, k2, v, causal), ref, atol=1e-12, rtol=1e-10)
    ref1 = hla_attention_output([q1], [k1], v, causal=causal)
    torch.testing.assert_close(state_naive.hla(q1, None, k1, None, v, causal), ref1, atol=1e-12, rtol=1e-10)
    ref_tied = hla_attention_output([q1, q1], [k1, k1], v, causal=causal)
    torch.testing.assert_close(tied_naive.hla(q1, k1, v, causal), ref_tied, atol=1e-12, rtol=1e-10)
    packed_q, packed_k = torch.stack([q1, q2]), torch.stack([k1, k2])
    torch.testing.assert_close(quadratic_naive.hla(packed_q, packed_k, v, 1, causal), ref, atol=1e-12, rtol=1e-10)
    ref_cubed = hla_attention_output([q1] * 3, [k1] * 3, v, causal=causal)
    torch.testing.assert_close(quadratic_naive.hla(q1[None], k1[None], v, 3, causal), ref_cubed,
                               atol=1e-12, rtol=1e-10)
    num, den = quadratic_naive.quadratic_torch([q1, q2], [k1, k2], v, causal=causal, key_padding_mask=None, block=7)
    torch.testing.assert_close(num / den, ref, atol=1e-12, rtol=1e-10)


def test_state_step_twins_compose():
    """TotalState + ApplyState is the non-causal op; CausalFromState on the second half, started
    at the total state of the first, is the causal op's second half."""
    n = 20
    q1, q2, k1, k2 = (_rand(BH, n, 8, seed=10 + s).double() for s in range(4))
    v = _rand(BH, n, 5, seed=14, signed=True).double()
    s, z = state_naive.total_state(k1, k2, v)
    o, den = state_naive.apply_state(q1, q2, s, z)
    torch.testing.assert_close(o, state_naive.hla(q1, q2, k1, k2, v, False), atol=1e-12, rtol=1e-10)
    s0, z0 = state_naive.total_state(k1[:, :8], k2[:, :8], v[:, :8])
    o2, _ = state_naive.causal_from_state(*(t[:, 8:] for t in (q1, q2, k1, k2, v)), s0, z0)
    torch.testing.assert_close(o2, state_naive.hla(q1, q2, k1, k2, v, True)[:, 8:], atol=1e-12, rtol=1e-10)


# ---- fused op against twin ----


@pytest.mark.parametrize("m", [1, 2])
@pytest.mark.parametrize("causal", [False, True])
def test_state_op_matches_twin(m, causal):
    from hla_analysis.ops.triton.state.autograd import HLAFunction

    n, seed = 64, 100 + 10 * m + causal
    q1, q2, k1, k2 = (_rand(BH, n, R, seed=seed + s) for s in range(4))
    if m == 1:
        q2 = k2 = None
    v = _rand(BH, n, DV, seed=seed + 4, signed=True)
    cfg = default_config(r1=R, r2=1 if m == 1 else R, dv=DV, causal=causal, dtype=torch.float32)

    def op(q1, q2, k1, k2, v):
        return HLAFunction.apply(q1, q2, k1, k2, v, causal, False, cfg)

    def twin(q1, q2, k1, k2, v, flag=causal):
        return state_naive.hla(q1, q2, k1, k2, v, flag)

    want = _compare(op, twin, (q1, q2, k1, k2, v), seed=seed)
    _other_flag_rejected(want, twin(*(None if t is None else t.double() for t in (q1, q2, k1, k2, v)), not causal))


@pytest.mark.parametrize("m", [1, 2])
def test_state_steps_match_twins(m):
    from hla_analysis.ops.triton.state.steps import ApplyState, CausalFromState, TotalState, step_config

    n, seed = 48, 200 + m
    q1, q2, k1, k2 = (_rand(BH, n, R, seed=seed + s) for s in range(4))
    if m == 1:
        q2 = k2 = None
    v = _rand(BH, n, DV, seed=seed + 4, signed=True)
    r2 = 1 if m == 1 else R
    s0 = _rand(BH, R * r2, DV, seed=seed + 5, signed=True)
    z0 = _rand(BH, R, r2, seed=seed + 6) * n
    total_cfg = step_config(k1, k2, v, causal=False)
    causal_cfg = step_config(q1, q2, v, causal=True)

    # TotalState: a tuple out, so compare the state and the normaliser and their gradients
    got_in, want_in = _leaves(k1, k2, v), _leaves(*(None if t is None else t.double() for t in (k1, k2, v)))
    got, want = TotalState.apply(*got_in, total_cfg), state_naive.total_state(*want_in)
    cs, cz = _rand(*want[0].shape, seed=seed + 7, signed=True), _rand(*want[1].shape, seed=seed + 8, signed=True)
    for g, w, what in zip(got, want, ("S", "z")):
        _agrees(g, w, what)
    live = [t for t in got_in if t is not None]
    got_grads = torch.autograd.grad((got[0] * cs).sum() + (got[1] * cz).sum(), live)
    want_grads = torch.autograd.grad((want[0] * cs.double()).sum() + (want[1] * cz.double()).sum(),
                                     [t for t in want_in if t is not None])
    for i, (g, w) in enumerate(zip(got_grads, want_grads)):
        _agrees(g, w, f"TotalState gradient {i}")

    def apply_op(q1, q2, s, z):
        return ApplyState.apply(q1, q2, s, z, v, total_cfg)

    _compare(apply_op, state_naive.apply_state, (q1, q2, s0.abs(), z0), seed=seed)

    def from_op(q1, q2, k1, k2, v, s0, z0):
        return CausalFromState.apply(q1, q2, k1, k2, v, s0, z0, causal_cfg)

    _compare(from_op, state_naive.causal_from_state, (q1, q2, k1, k2, v, s0, z0), seed=seed)


@pytest.mark.parametrize("causal", [False, True])
def test_tied_op_matches_twin(causal):
    from hla_analysis.ops.triton.tied.autograd import TiedHLAFunction, tied_config

    n, seed = 64, 300 + causal
    q, k = _rand(BH, n, R, seed=seed), _rand(BH, n, R, seed=seed + 1)
    v = _rand(BH, n, DV, seed=seed + 2, signed=True)
    cfg = tied_config(default_config(r1=R, r2=R, dv=DV, causal=causal, dtype=torch.float32, tied=True), R)

    def op(q, k, v):
        return TiedHLAFunction.apply(q, k, v, causal, False, cfg)

    want = _compare(op, lambda q, k, v: tied_naive.hla(q, k, v, causal), (q, k, v), seed=seed)
    _other_flag_rejected(want, tied_naive.hla(q.double(), k.double(), v.double(), not causal))


@pytest.mark.parametrize("nf, pow_", [(2, 1), (1, 3)], ids=["untied-M2", "tied-M3"])
@pytest.mark.parametrize("causal", [False, True])
def test_quadratic_op_matches_twin(nf, pow_, causal):
    from hla_analysis.ops.triton.quadratic.autograd import QuadraticHLAFunction

    n, seed = 64, 400 + 10 * nf + causal
    q, k = _rand(nf, BH, n, R, seed=seed), _rand(nf, BH, n, R, seed=seed + 1)
    v = _rand(BH, n, DV, seed=seed + 2, signed=True)

    def op(q, k, v):
        return QuadraticHLAFunction.apply(q, k, v, pow_, causal, False, R, 0)

    def twin(q, k, v):
        return quadratic_naive.hla(q, k, v, pow_, causal)

    want = _compare(op, twin, (q, k, v), seed=seed)
    _other_flag_rejected(want, quadratic_naive.hla(q.double(), k.double(), v.double(), pow_, not causal))
