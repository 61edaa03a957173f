"""Every efficient HLA form equals the materialized map, for M = 1..4, causal or not."""

import itertools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from hla_analysis.ops import (
    FORMS,
    hla,
    hla_attention_map,
    hla_attention_output,
    is_tied,
    kernel_attention_output,
    linear_attention,
    symmetric_power_features,
    symmetric_state_size,
)

F64 = dict(dtype=torch.float64)
# float64 forms of <= 16 tokens, M <= 4 factors of width <= 4: every output is a ratio of
# sums of <= 16 * 4**4 rounded products of positive terms (features >= 0.1, so no
# cancellation in the normaliser), each off by <= eps relative; 2**16 eps covers those sums
# with a wide margin for the |v| mixing in the numerator, and is still ~1e-11.
EPS = torch.finfo(torch.float64).eps
TIGHT = dict(rtol=2**16 * EPS, atol=2**16 * EPS)


def positive_factors(lead, n, widths, *, gen):
    """Random positive features so that every normalizer is safely > 0."""
    qs = [torch.rand(*lead, n, r, generator=gen, **F64) + 0.1 for r in widths]
    ks = [torch.rand(*lead, n, r, generator=gen, **F64) + 0.1 for r in widths]
    return qs, ks


def forms_for(causal):
    return [f for f in FORMS if f not in ("auto", "tied") and not (causal and f == "contract")]


@pytest.mark.parametrize("m", [1, 2, 3, 4])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("chunk", [1, 3, 4, 11])
def test_forms_match_reference(m, causal, chunk):
    gen = torch.Generator().manual_seed(100 * m + chunk + causal)
    widths = [3, 2, 4, 2][:m]  # mixed factor widths
    qs, ks = positive_factors((2, 3), 11, widths, gen=gen)
    v = torch.randn(2, 3, 11, 5, generator=gen, **F64)
    ref = hla_attention_output(qs, ks, v, causal=causal)
    for form in forms_for(causal):
        out = hla(qs, ks, v, causal=causal, form=form, chunk_size=chunk)
        torch.testing.assert_close(out, ref, **TIGHT, msg=f"form={form}")


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("m", [2, 3])
def test_padding_mask(causal, m):
    gen = torch.Generator().manual_seed(7)
    qs, ks = positive_factors((2,), 9, [3] * m, gen=gen)
    v = torch.randn(2, 9, 4, generator=gen, **F64)
    mask = torch.ones(2, 9, dtype=torch.bool)
    mask[0, 6:] = False  # right padding
    mask[1, 3] = False  # a hole
    ref = hla_attention_output(qs, ks, v, causal=causal, key_padding_mask=mask)
    attn = hla_attention_map(qs, ks, causal=causal, key_padding_mask=mask)
    assert torch.all(attn[0, :, 6:] == 0) and torch.all(attn[1, :, 3] == 0)
    for form in forms_for(causal):
        out = hla(qs, ks, v, causal=causal, key_padding_mask=mask, form=form, chunk_size=4)
        torch.testing.assert_close(out, ref, **TIGHT)


def test_broadcast_over_batch_and_heads():
    gen = torch.Generator().manual_seed(3)
    q1 = torch.rand(2, 1, 6, 3, generator=gen, **F64)  # shared over heads
    k1 = torch.rand(1, 4, 6, 3, generator=gen, **F64)  # shared over batch
    q2 = torch.rand(6, 2, generator=gen, **F64)  # shared over everything
    k2 = torch.rand(2, 4, 6, 2, generator=gen, **F64)
    v = torch.randn(2, 4, 6, 5, generator=gen, **F64)
    out = hla([q1, q2], [k1, k2], v, causal=True)
    assert out.shape == (2, 4, 6, 5)
    for b, h in itertools.product(range(2), range(4)):
        expect = hla_attention_output([q1[b, 0], q2], [k1[0, h], k2[b, h]], v[b, h], causal=True)
        torch.testing.assert_close(out[b, h], expect, **TIGHT)


def test_stacked_input_equals_list():
    gen = torch.Generator().manual_seed(4)
    qs = torch.rand(3, 2, 8, 4, generator=gen, **F64)  # [B, M, N, r]
    ks = torch.rand(3, 2, 8, 4, generator=gen, **F64)
    v = torch.randn(3, 8, 2, generator=gen, **F64)
    torch.testing.assert_close(hla(qs, ks, v), hla(list(qs.unbind(-3)), list(ks.unbind(-3)), v), **TIGHT)


def test_cross_attention_lengths():
    gen = torch.Generator().manual_seed(5)
    qs, _ = positive_factors((), 4, [3, 2], gen=gen)
    _, ks = positive_factors((), 9, [3, 2], gen=gen)
    v = torch.randn(9, 3, generator=gen, **F64)
    torch.testing.assert_close(hla(qs, ks, v), hla_attention_output(qs, ks, v), **TIGHT)


@pytest.mark.parametrize("m", [2, 3, 4])
@pytest.mark.parametrize("causal", [False, True])
def test_tied_symmetric_path_equals_untied(m, causal):
    gen = torch.Generator().manual_seed(m)
    q = torch.randn(2, 10, 3, generator=gen, **F64)
    k = torch.randn(2, 10, 3, generator=gen, **F64)
    # affine features [1, x/sqrt(m)]: positive normalizers for even m; use allow_signed for odd
    fq = torch.cat([torch.ones_like(q[..., :1]), q / m**0.5], -1)
    fk = torch.cat([torch.ones_like(k[..., :1]), k / m**0.5], -1)
    v = torch.randn(2, 10, 4, generator=gen, **F64)
    assert is_tied([fq] * m, [fk] * m)
    kw = dict(causal=causal, allow_signed=True, chunk_size=4)
    tied = hla([fq] * m, [fk] * m, v, form="tied", **kw)
    untied = hla([fq] * m, [fk] * m, v, form="chunked", **kw)
    torch.testing.assert_close(tied, untied, **TIGHT)
    reference = hla_attention_output([fq] * m, [fk] * m, v, causal=causal, allow_signed=True)
    torch.testing.assert_close(tied, reference, **TIGHT)
    # equal copies (not the same object) are recognised too
    assert is_tied([fq, fq.clone()], [fk.clone(), fk])


def test_symmetric_state_is_smaller():
    x = torch.randn(5, 7, **F64)
    for m in (2, 3, 4):
        feats = symmetric_power_features(x, m)
        assert feats.shape[-1] == symmetric_state_size(7, m) < 7**m
        torch.testing.assert_close(feats @ feats.T, (x @ x.T) ** m, **TIGHT)


def test_linear_attention_is_m1():
    gen = torch.Generator().manual_seed(8)
    fq, fk = torch.rand(3, 12, 5, generator=gen, **F64), torch.rand(3, 12, 5, generator=gen, **F64)
    v = torch.randn(3, 12, 2, generator=gen, **F64)
    for causal in (False, True):
        torch.testing.assert_close(
            linear_attention(fq, fk, v, causal=causal, chunk_size=5),
            kernel_attention_output(fq, fk, v, causal=causal),
            **TIGHT,
        )


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2), (torch.float16, 2e-3)])
def test_low_precision_dtypes(dtype, tol):
    gen = torch.Generator().manual_seed(9)
    qs, ks = positive_factors((2,), 16, [4, 4], gen=gen)
    v = torch.randn(2, 16, 8, generator=gen, **F64)
    ref = hla_attention_output(qs, ks, v, causal=True)
    out = hla([q.to(dtype) for q in qs], [k.to(dtype) for k in ks], v.to(dtype), causal=True)
    assert out.dtype == dtype
    torch.testing.assert_close(out.double(), ref, rtol=tol, atol=tol)


@settings(max_examples=25, deadline=None)
@given(
    m=st.integers(1, 3),
    n=st.integers(1, 13),
    widths=st.lists(st.integers(1, 4), min_size=3, max_size=3),
    dv=st.integers(1, 4),
    heads=st.integers(1, 2),
    causal=st.booleans(),
    chunk=st.integers(1, 6),
    seed=st.integers(0, 2**16),
)
def test_property_random_shapes(m, n, widths, dv, heads, causal, chunk, seed):
    gen = torch.Generator().manual_seed(seed)
    qs, ks = positive_factors((heads,), n, widths[:m], gen=gen)
    v = torch.randn(heads, n, dv, generator=gen, **F64)
    ref = hla_attention_output(qs, ks, v, causal=causal)
    for form in forms_for(causal):
        torch.testing.assert_close(hla(qs, ks, v, causal=causal, form=form, chunk_size=chunk), ref, **TIGHT)
    attn = hla_attention_map(qs, ks, causal=causal)
    torch.testing.assert_close(attn.sum(-1), torch.ones(heads, n, **F64), **TIGHT)
    if causal:
        assert torch.all(attn.triu(1) == 0)


@pytest.mark.parametrize("form", ["contract", "recurrent", "value_modulation", "tied"])
def test_gradcheck_noncausal(form):
    gen = torch.Generator().manual_seed(11)
    m = 2
    if form == "tied":
        q = (torch.rand(5, 3, generator=gen, **F64) + 0.1).requires_grad_()
        k = (torch.rand(5, 3, generator=gen, **F64) + 0.1).requires_grad_()
        v = torch.randn(5, 2, generator=gen, **F64, requires_grad=True)
        assert torch.autograd.gradcheck(lambda q, k, v: hla([q] * m, [k] * m, v, form=form), (q, k, v))
        return
    qs, ks = positive_factors((), 5, [3, 2], gen=gen)
    v = torch.randn(5, 2, generator=gen, **F64)
    inputs = [t.requires_grad_() for t in (*qs, *ks, v)]
    assert torch.autograd.gradcheck(lambda a, b, c, d, v: hla([a, b], [c, d], v, form=form), inputs)


@pytest.mark.parametrize("form", ["recurrent", "chunked", "value_modulation"])
def test_gradcheck_causal(form):
    gen = torch.Generator().manual_seed(12)
    qs, ks = positive_factors((2,), 6, [2, 3, 2], gen=gen)
    v = torch.randn(2, 6, 2, generator=gen, **F64)
    inputs = [t.requires_grad_() for t in (*qs, *ks, v)]
    fn = lambda a, b, c, d, e, f, v: hla([a, b, c], [d, e, f], v, causal=True, form=form, chunk_size=4)  # noqa: E731
    assert torch.autograd.gradcheck(fn, inputs)


def test_gradcheck_tied_causal():
    gen = torch.Generator().manual_seed(13)
    q = (torch.rand(7, 3, generator=gen, **F64) + 0.1).requires_grad_()
    k = (torch.rand(7, 3, generator=gen, **F64) + 0.1).requires_grad_()
    v = torch.randn(7, 2, generator=gen, **F64, requires_grad=True)
    fn = lambda q, k, v: hla([q] * 3, [k] * 3, v, causal=True, form="tied", chunk_size=3)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (q, k, v))
