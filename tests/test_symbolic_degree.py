"""Symbolic derivations: degrees, Pade/Taylor, representability, efficient forms, cost model."""

import pytest
import sympy as sp
import torch

from hla_analysis.symbolic.cost_model import N, crossover_tokens, evaluate_costs, hla_cost, softmax_cost
from hla_analysis.symbolic.derive import derive, resolve_spec
from hla_analysis.symbolic.efficient_forms import FORMS, _matrices, efficient, materialized, prove_efficient_form
from hla_analysis.symbolic.exp_approximants import pade_exp, taylor_exp
from hla_analysis.symbolic.rational_form import derive_rational_form, t
from hla_analysis.symbolic.representability import affine_factorization
from hla_analysis.variants import list_variants, make_variant


@pytest.mark.parametrize("m", [1, 2, 3, 4, 5])
@pytest.mark.parametrize("tied", [True, False])
def test_hla_affine_degree_is_m(m, tied):
    form = derive_rational_form("hla", factors=m, phi="affine", tied=tied, options={"c": m})
    assert form.rational and (form.numerator_degree, form.denominator_degree) == (m, m)


def test_cli_examples_degrees():
    assert derive("hla", factors=3).numerator_degree == 3
    assert (derive("linear").numerator_degree, derive("linear").denominator_degree) == (1, 1)
    assert derive("softmax").rational is False
    assert derive("linear:phi=taylor").degree == 2
    ident = derive("linear:phi=identity")
    assert (ident.degree, ident.formal_numerator_degree) == (0, 1)


def test_derived_weight_equals_variant_map():
    # The derived a_1(t) evaluated at t = 1 is the variant's own attention weight.
    torch.manual_seed(0)
    q, k = torch.randn(1, 4, dtype=torch.float64), torch.randn(3, 4, dtype=torch.float64)
    scores = (q @ k.T / 2).squeeze(0)  # scale 1/sqrt(4)
    for spec in ["linear:phi=affine", "hla:m=3,phi=affine", "linear:phi=taylor", "power:p=2"]:
        form = derive(spec)
        subs = {t: 1, **{sp.Symbol(f"s_{l + 1}", real=True): float(scores[l]) for l in range(3)}}
        value = float(form.weight.xreplace(subs))
        ref = make_variant(spec).attention_map(q, k, allow_signed=True)[0, 0].item()
        # both sides are float64 (SymPy Floats carry 53 bits): each rounds at most
        # 3 keys x (M factors x (d + 2) multiply-adds) + 4 times, amplified by the cancellation
        # kappa = sum_l |n_l| / |sum_l n_l| of the denominator's per-key terms n_l
        num, _ = sp.fraction(sp.together(form.weight))
        s1 = sp.Symbol("s_1", real=True)
        terms = [float(num.xreplace({**subs, s1: float(scores[l])})) for l in range(3)]
        kappa = sum(abs(x) for x in terms) / abs(sum(terms))
        factors = form.degree or 1
        eps = float(torch.finfo(torch.float64).eps)
        assert value == pytest.approx(ref, rel=2 * (3 * factors * (4 + 2) + 4) * eps * kappa), (spec, kappa)


def test_bad_input():
    with pytest.raises(ValueError, match="unknown variant"):
        derive("nope")
    with pytest.raises(ValueError, match=">= 1"):
        resolve_spec("hla", factors=0)
    with pytest.raises(ValueError, match="too large"):
        derive_rational_form("hla", factors=30, phi="affine")
    with pytest.raises(ValueError, match="untied"):
        derive_rational_form("hla", factors=9, phi="affine", tied=False, max_degree=100)


def test_pade_and_taylor_exact():
    s = sp.Symbol("s", real=True)
    for m, n in [(1, 1), (2, 2), (3, 2), (0, 3)]:
        p, q = pade_exp(m, n)
        resid = sp.series(p - q * sp.exp(s), s, 0, m + n + 2).removeO()
        assert sp.Poly(resid, s).monoms()[-1][0] >= m + n + 1  # order of contact m+n+1
        assert all(c.is_Rational for c in sp.Poly(p * q, s).coeffs())
    assert sp.expand(taylor_exp(3) - sum(s**k / sp.factorial(k) for k in range(4))) == 0


def test_representability():
    s = sp.Symbol("s")
    yes = affine_factorization((1 + s / 3) ** 3)
    assert yes.representable and len(yes.affine_factors) == 3
    based = affine_factorization(1 + s + s**2 / 2)
    assert not based.representable and len(based.quadratic_factors) == 1 and "degree-2" in based.needs
    mixed = affine_factorization((s + 2) * (s**2 + 1))
    assert not mixed.representable and len(mixed.affine_factors) == 1
    for f in (yes, based, mixed):
        rebuilt = f.constant * sp.Mul(*f.affine_factors) * sp.Mul(*f.quadratic_factors)
        assert sp.expand(rebuilt - f.polynomial) == 0
    with pytest.raises(ValueError):
        affine_factorization(sp.Integer(3), s)


@pytest.mark.parametrize("factors", [2, 3])
@pytest.mark.parametrize("causal", [False, True])
def test_efficient_forms_equal_materialized(factors, causal):
    for form in FORMS:
        if form == "contract" and causal:
            continue
        assert prove_efficient_form(form, n=3, r=2, factors=factors, causal=causal)


def test_proof_detects_a_wrong_form():
    qs, ks, v = _matrices(3, 2, 2, 1, tied=False)
    num, _ = efficient("contract", qs, ks, v, causal=False)
    num_causal, _ = materialized(qs, ks, v, causal=True)
    assert any(sp.expand(a - b) != 0 for a, b in zip(num, num_causal))


def test_cost_model():
    f_soft, _ = softmax_cost()
    n_star = crossover_tokens([sp.Integer(17), sp.Integer(17)])
    f_hla, _ = hla_cost([17, 17])
    subs = {sp.Symbol("d", positive=True, integer=True): 16, sp.Symbol("d_v", positive=True, integer=True): 16}
    n0 = float(n_star.subs(subs))
    # n0 is the exact root rounded to float64 (relative eps) and the two quadratics are then evaluated
    # in 53-bit Floats: a few roundings each, relative to their magnitudes at n0
    scale = abs(float(f_soft.subs(subs).subs(N, n0))) + abs(float(f_hla.subs(subs).subs(N, n0)))
    assert float((f_soft - f_hla).subs(subs).subs(N, n0)) == pytest.approx(0, abs=16 * 2.0**-52 * scale)
    assert float((f_soft - f_hla).subs(subs).subs(N, 2 * n0)) > 0  # HLA cheaper beyond N*
    wan = evaluate_costs(n_tokens=32760, head_dim=128, value_dim=128, widths=[129, 129], tied=True)
    assert int(wan["hla_state_elements"]) == int(sp.binomial(130, 2)) * 129


def test_every_registered_variant_derives():
    for spec in list_variants():
        form = derive(spec)
        assert form.rational == (form.degree is not None)
