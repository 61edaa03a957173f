"""The SymPy proofs run the shipped forms of hla_analysis.ops.hla on symbols, and can fail."""

import importlib
import itertools
import math

import numpy as np
import pytest
import sympy as sp
import torch

from hla_analysis.symbolic.efficient_forms import (
    FORMS,
    STATEFUL_FORMS,
    materialized,
    prove_efficient_form,
)
from hla_analysis.symbolic.tensor import SymbolicTensor, exact_constant

# the module (hla_analysis.ops re-exports a function of the same name)
shipped = importlib.import_module("hla_analysis.ops.hla")


def _cases():
    for form in FORMS:
        for m in (1, 2, 3):
            for causal in (False, True):
                if form == "contract" and causal:
                    continue
                for chunk in (2, 3):  # n = 4: a chunk that divides n and one that leaves a short chunk
                    yield form, m, causal, chunk


@pytest.mark.parametrize("form,m,causal,chunk", list(_cases()))
def test_shipped_form_equals_materialized_map(form, m, causal, chunk):
    assert prove_efficient_form(form, n=4, r=2, factors=m, dv=1, causal=causal, chunk=chunk)


@pytest.mark.parametrize("form", STATEFUL_FORMS)
@pytest.mark.parametrize("m", [1, 2, 3])
@pytest.mark.parametrize("chunk", [1, 2, 3])
def test_initial_state_continues_the_earlier_keys(form, m, chunk):
    assert prove_efficient_form(form, n=4, r=2, factors=m, dv=1, causal=True, chunk=chunk, prior=2)


def test_initial_state_non_causal_recurrent():
    assert prove_efficient_form("recurrent", n=3, r=2, factors=2, dv=2, causal=False, prior=2)


@pytest.mark.parametrize("form,causal", [(f, c) for f in ("contract", "recurrent", "chunked", "value_modulation")
                                          for c in (False, True) if not (f == "contract" and c)])
def test_mixed_factor_widths(form, causal):
    assert prove_efficient_form(form, n=4, r=(3, 1, 2), factors=3, dv=1, causal=causal, chunk=3)


@pytest.mark.parametrize("m", [2, 3])
def test_tied_symmetric_state_with_irrational_weights(m):
    # r = 3 gives multinomial counts 2, 3 and 6: symmetric_power_features scales by their float sqrt
    assert prove_efficient_form("tied", n=3, r=3, factors=m, dv=1, causal=True, chunk=2)
    assert prove_efficient_form("tied", n=3, r=3, factors=m, dv=1, causal=False, chunk=2)


def test_leading_batch_dims_broadcast():
    """Run the shipped forms on [2, N, r] inputs (q shared over the batch) and check every batch entry."""
    n, r, m, dv = 3, 2, 2, 1
    qs = [SymbolicTensor.symbols(f"q{i}", (n, r)) for i in range(m)]
    ks = [SymbolicTensor.symbols(f"k{i}", (2, n, r)) for i in range(m)]
    v = SymbolicTensor.symbols("v", (2, n, dv))
    values = torch.cat([v, SymbolicTensor(np.full((2, n, 1), sp.Integer(1), dtype=object))], -1)
    for causal, out in ((True, shipped._chunked(qs, ks, values, chunk=2)),
                        (False, shipped._contract(qs, ks, values, block=2))):
        assert out.shape == (2, n, dv + 1)
        for b in range(2):
            num_ref, den_ref = materialized([q.to_matrix() for q in qs], [k[b].to_matrix() for k in ks],
                                            v[b].to_matrix(), causal)
            got = out[b].to_matrix()
            assert all(sp.expand(a - e) == 0 for a, e in zip([*got[:, :-1], *got[:, -1]], [*num_ref, *den_ref]))


# -- the check can fail ---------------------------------------------------------------


def _chunked_without_state(qs, ks, values, *, chunk, initial_state=None):
    """The shipped _chunked with the carried state term dropped: only the diagonal tiles remain."""
    outs = []
    for sl in shipped._blocks(ks[0].shape[-2], chunk):
        qc, kc = [q[..., sl, :] for q in qs], [k[..., sl, :] for k in ks]
        tile = qc[0] @ kc[0].transpose(-1, -2)
        for fq, fk in zip(qc[1:], kc[1:]):
            tile = tile * (fq @ fk.transpose(-1, -2))
        outs.append(tile.tril() @ values[..., sl, :])
    return torch.cat(outs, -2)


def test_proof_fails_for_a_chunked_form_without_the_state_term(monkeypatch):
    assert prove_efficient_form("chunked", n=4, factors=2, dv=1, causal=True, chunk=2)
    monkeypatch.setattr(shipped, "_chunked", _chunked_without_state)
    assert not prove_efficient_form("chunked", n=4, factors=2, dv=1, causal=True, chunk=2)
    assert not prove_efficient_form("value_modulation", n=4, factors=2, dv=1, causal=True, chunk=2)
    assert not prove_efficient_form("chunked", n=4, factors=1, dv=1, causal=True, chunk=2, prior=2)
    # one chunk holds every token: no state is carried, so the broken form is still right there
    assert prove_efficient_form("chunked", n=4, factors=2, dv=1, causal=True, chunk=4)


def test_proof_fails_for_a_contract_that_skips_the_last_key(monkeypatch):
    original = shipped._contract

    def skip_last_key(qs, ks, values, *, block):
        return original(qs, [k[..., :-1, :] for k in ks], values[..., :-1, :], block=block)

    monkeypatch.setattr(shipped, "_contract", skip_last_key)
    assert not prove_efficient_form("contract", n=3, factors=2, dv=1)


def test_proof_fails_for_tied_features_without_the_multinomial_weights(monkeypatch):
    original = shipped.symmetric_power_features

    def unweighted(x, m):  # drop sqrt(M!/alpha!): the cross terms of (q.k)^M lose their counts
        combos = list(itertools.combinations_with_replacement(range(x.shape[-1]), m))
        index = torch.tensor(combos)
        out = x[..., index[:, 0]]
        for i in range(1, m):
            out = out * x[..., index[:, i]]
        return out

    assert prove_efficient_form("tied", n=3, factors=2, dv=1, causal=True)
    monkeypatch.setattr(shipped, "symmetric_power_features", unweighted)
    assert not prove_efficient_form("tied", n=3, factors=2, dv=1, causal=True)
    monkeypatch.setattr(shipped, "symmetric_power_features", original)
    assert prove_efficient_form("tied", n=3, factors=2, dv=1, causal=True)


@pytest.mark.parametrize("kwargs,match", [
    (dict(form="fast"), "unknown form"),
    (dict(form="contract", causal=True), "non-causal"),
    (dict(form="contract", prior=1), "takes no initial state"),
    (dict(form="chunked", prior=1), "chunked with causal=True"),
    (dict(form="recurrent", n=0), "n must be"),
    (dict(form="recurrent", chunk=0), "chunk must be"),
    (dict(form="recurrent", prior=-1), "prior must be"),
    (dict(form="recurrent", r=(2, 2, 2)), "one such width per factor"),
    (dict(form="tied", r=(2, 3)), "one width"),
    (dict(form="recurrent", n=5, r=4, factors=3, dv=2), "too large"),
])
def test_bad_proof_arguments_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        prove_efficient_form(**kwargs)


# -- the adapter means what torch means -------------------------------------------------


def _ints(*shape, seed=0):
    """An integer-valued float64 tensor and the SymbolicTensor of the same values."""
    t = torch.randint(-5, 6, shape, generator=torch.Generator().manual_seed(seed)).double()
    return t, SymbolicTensor(np.array([sp.Integer(int(x)) for x in t.reshape(-1).tolist()],
                                      dtype=object).reshape(shape))


def _same(sym: SymbolicTensor, ref: torch.Tensor):
    assert tuple(sym.shape) == tuple(ref.shape)
    got = np.array([float(x) for x in sym.data.reshape(-1)], dtype=float).reshape(tuple(ref.shape))
    np.testing.assert_array_equal(got, ref.numpy())  # integer arithmetic: exact in float64


def test_adapter_shape_ops_match_torch():
    t, s = _ints(2, 3, 4)
    for op in (
        lambda x: x.unsqueeze(-1), lambda x: x.unsqueeze(-2), lambda x: x.unsqueeze(0),
        lambda x: x.flatten(-2), lambda x: x.flatten(0, 1), lambda x: x.flatten(),
        lambda x: x.unflatten(-1, (2, -1)), lambda x: x.unflatten(0, (1, 2)),
        lambda x: x.transpose(-1, -2), lambda x: x.transpose(0, 2),
        lambda x: x.tril(), lambda x: x.tril(1), lambda x: x.tril(-1),
        lambda x: x[..., 1:3, :], lambda x: x[1], lambda x: x[:, -1], lambda x: x[..., 2:, 1:2],
        lambda x: x[..., torch.tensor([0, 2, 2, 1])], lambda x: -x,
    ):
        _same(op(s), op(t))
    assert s.ndim == s.dim() == 3 and s.shape[-2] == 3


def test_adapter_arithmetic_matches_torch():
    a, sa = _ints(2, 3, 4, seed=1)
    b, sb = _ints(3, 4, seed=2)  # broadcast over the leading dim
    c, sc = _ints(2, 4, 5, seed=3)
    _same(sa * sb, a * b)
    _same(sa + sb, a + b)
    _same(sa - sb, a - b)
    _same(sa @ sc, a @ c)
    _same(sa.transpose(-1, -2) @ sb, a.transpose(-1, -2) @ b)
    _same(b * sa, b * a)  # a real tensor on the left goes through __torch_function__
    _same(b + sa, b + a)
    _same(c.transpose(-1, -2) @ sa.transpose(-1, -2), c.transpose(-1, -2) @ a.transpose(-1, -2))
    _same(sa * 2, a * 2)
    _same(3 + sa, 3 + a)
    f, sf = _ints(2, 3, 4, seed=4)
    g, sg = _ints(2, 3, 4, 5, seed=5)
    _same(torch.einsum("...nr,...nre->...ne", sf, sg), torch.einsum("...nr,...nre->...ne", f, g))
    _same(torch.cat([sa, sf], -2), torch.cat([a, f], -2))
    _same(torch.cat([sa, sf], 0), torch.cat([a, f], 0))


def test_adapter_refuses_what_it_does_not_support():
    s = SymbolicTensor.symbols("a", (2, 3))
    with pytest.raises(TypeError, match="torch.exp is not supported"):
        torch.exp(s)
    with pytest.raises(TypeError, match="not supported"):
        torch.mul(s, s)
    with pytest.raises(AttributeError, match="no 'cumsum'"):
        s.cumsum(-1)
    with pytest.raises(TypeError, match="truth value"):
        bool(s)
    with pytest.raises(TypeError, match="index"):
        s[None]
    with pytest.raises(TypeError, match="integer index"):
        s[..., torch.tensor([0.0])]
    with pytest.raises(ValueError, match="no exact form"):
        s * torch.tensor([0.1, 0.2, 0.3], dtype=torch.float64)
    with pytest.raises(TypeError, match="cannot enter"):
        s * "x"


def test_exact_constants():
    assert exact_constant(3.0) == 3 and exact_constant(-0.375) == sp.Rational(-3, 8)
    for n in (2, 3, 6, 12):
        assert exact_constant(math.sqrt(n)) == sp.sqrt(n)
        assert exact_constant(-math.sqrt(n)) == -sp.sqrt(n)
    assert exact_constant(math.sqrt(4)) == 2
    for bad in (1 / 3, math.pi, float("inf"), float("nan")):
        with pytest.raises(ValueError):
            exact_constant(bad)
