"""Each bad input raises a ValueError that names the problem (never a silent NaN)."""

import pytest
import torch

from hla_analysis.ops import (
    hla,
    hla_attention_map,
    kernel_attention_map,
    linear_attention,
    softmax_attention_map,
)


def rand(*shape):
    return torch.rand(*shape, dtype=torch.float64) + 0.1


def test_mismatched_factor_counts():
    with pytest.raises(ValueError, match="M=2 factor.*M=3"):
        hla([rand(4, 2)] * 2, [rand(4, 2)] * 3, rand(4, 1))


def test_mismatched_widths():
    with pytest.raises(ValueError, match="feature width 3 but ks\\[1\\] has 2"):
        hla([rand(4, 2), rand(4, 3)], [rand(4, 2), rand(4, 2)], rand(4, 1))


def test_mismatched_token_counts_between_factors():
    with pytest.raises(ValueError, match="same number of tokens"):
        hla([rand(4, 2), rand(5, 2)], [rand(4, 2), rand(4, 2)], rand(4, 1))


def test_values_length():
    with pytest.raises(ValueError, match="v must be .* N = 4"):
        hla([rand(4, 2)], [rand(4, 2)], rand(5, 1))


def test_leading_dims_do_not_broadcast():
    with pytest.raises(ValueError, match="do not broadcast"):
        hla([rand(2, 4, 2)], [rand(3, 4, 2)], rand(4, 1))


def test_stacked_tensor_too_few_dims():
    with pytest.raises(ValueError, match="stacked factors"):
        hla(rand(4, 2), rand(4, 2), rand(4, 1))


def test_empty_sequence():
    with pytest.raises(ValueError, match="empty sequence"):
        hla([rand(0, 2)], [rand(0, 2)], rand(0, 1))
    with pytest.raises(ValueError, match="empty sequence"):
        softmax_attention_map(rand(0, 2), rand(3, 2))
    with pytest.raises(ValueError, match="empty: pass at least one factor"):
        hla([], [], rand(3, 1))


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_nan_inf_inputs(bad):
    q = rand(4, 2)
    q[1, 0] = bad
    with pytest.raises(ValueError, match="1 NaN/Inf"):
        softmax_attention_map(q, rand(4, 2))
    with pytest.raises(ValueError, match="NaN/Inf"):
        hla([q], [rand(4, 2)], rand(4, 1))
    v = rand(4, 1)
    v[0, 0] = bad
    with pytest.raises(ValueError, match="v contains 1 NaN/Inf"):
        hla([rand(4, 2)], [rand(4, 2)], v)


def test_mask_that_masks_a_whole_row():
    mask = torch.tensor([[True, True, True], [False, False, False]])
    with pytest.raises(ValueError, match="1 query row|3 query row|no key to attend"):
        hla([rand(2, 3, 2)], [rand(2, 3, 2)], rand(2, 3, 1), key_padding_mask=mask)
    with pytest.raises(ValueError, match="no key to attend"):
        softmax_attention_map(rand(2, 3, 2), rand(2, 3, 2), key_padding_mask=mask)
    # left padding + causal: the first rows see only padding
    left = torch.tensor([False, False, True, True])
    with pytest.raises(ValueError, match="2 query row"):
        hla([rand(4, 2)], [rand(4, 2)], rand(4, 1), causal=True, key_padding_mask=left)
    with pytest.raises(ValueError, match="2 query row"):
        softmax_attention_map(rand(4, 2), rand(4, 2), causal=True, key_padding_mask=left)


def test_mask_with_too_few_leading_dims_is_refused():
    q = rand(2, 2, 4, 3)  # [B=2, H=2, N, d]: a [B, N] mask would silently pair B with H
    mask = torch.tensor([[True, True, True, False], [True, True, True, True]])
    with pytest.raises(ValueError, match=r"mask\[:, None, :\]"):
        hla([q], [q], rand(2, 2, 4, 1), key_padding_mask=mask)
    with pytest.raises(ValueError, match="fewer leading dims"):
        softmax_attention_map(q, q, key_padding_mask=mask)
    with pytest.raises(ValueError, match="fewer leading dims"):
        hla_attention_map([q], [q], key_padding_mask=mask)
    out = hla([q], [q], rand(2, 2, 4, 1), key_padding_mask=mask[:, None, :])
    assert out.shape == (2, 2, 4, 1)
    # one shared 1-D mask is unambiguous
    hla([q], [q], rand(2, 2, 4, 1), key_padding_mask=mask[0])


def test_mask_dtype_and_length():
    with pytest.raises(ValueError, match="must be bool"):
        hla([rand(4, 2)], [rand(4, 2)], rand(4, 1), key_padding_mask=torch.ones(4))
    with pytest.raises(ValueError, match="5 entries per row but there are 4 keys"):
        softmax_attention_map(rand(4, 2), rand(4, 2), key_padding_mask=torch.ones(5, dtype=torch.bool))


def signed_features():
    # q.k = -1 for every pair: every normalizer of the 3 rows is negative
    q = torch.tensor([[1.0, 0.0]] * 3, dtype=torch.float64)
    k = torch.tensor([[-1.0, 0.0]] * 3, dtype=torch.float64)
    return q, k


@pytest.mark.parametrize("form", ["contract", "recurrent", "chunked", "value_modulation"])
def test_nonpositive_normalizer_is_refused(form):
    q, k = signed_features()
    v = torch.ones(3, 1, dtype=torch.float64)
    with pytest.raises(ValueError, match="3 of 3 row\\(s\\) have a zero or negative normalizer.*positive feature map"):
        hla([q], [k], v, form=form)
    with pytest.raises(ValueError, match="zero or negative normalizer"):
        linear_attention(q, k, v)
    with pytest.raises(ValueError, match="zero or negative normalizer"):
        kernel_attention_map(q, k)
    # odd number of negative factors: product stays negative
    with pytest.raises(ValueError, match="zero or negative normalizer"):
        hla_attention_map([q, q, q], [k, k, k])


def test_allow_signed_returns_signed_result():
    q, k = signed_features()
    k = k.clone()
    k[0, 0] = -2.0  # weights -2, -1, -1 over a normalizer of -4
    v = torch.tensor([[1.0], [2.0], [3.0]], dtype=torch.float64)
    out = hla([q], [k], v, allow_signed=True)
    expect = (-2 * 1 - 1 * 2 - 1 * 3) / -4.0
    torch.testing.assert_close(out, torch.full((3, 1), expect, dtype=torch.float64))
    attn = hla_attention_map([q], [k], allow_signed=True)
    torch.testing.assert_close(attn[0], torch.tensor([0.5, 0.25, 0.25], dtype=torch.float64))


def test_zero_normalizer_from_relu_features():
    q = torch.tensor([[0.0, 0.0], [1.0, 1.0]], dtype=torch.float64)  # relu(q) = 0 in row 0
    k = torch.ones(2, 2, dtype=torch.float64)
    with pytest.raises(ValueError, match="1 of 2 row"):
        linear_attention(q, k, torch.ones(2, 1, dtype=torch.float64))


def test_overflow_is_reported_not_nan():
    q = torch.full((2, 2), 1e20, dtype=torch.float32)
    with pytest.raises(ValueError, match="overflowed"):
        hla([q, q, q], [q, q, q], torch.ones(2, 1), form="contract")


def test_bare_tensor_with_batched_values_is_ambiguous():
    q = rand(2, 5, 4)  # M=2 stacked factors, or one factor with a batch of 2?
    with pytest.raises(ValueError, match="read as stacked factors .* M=2"):
        hla(q, q, rand(2, 5, 3))
    assert hla([q], [q], rand(2, 5, 3)).shape == (2, 5, 3)


def test_softmax_overflow_and_bad_scale():
    with pytest.raises(ValueError, match="overflowed"):
        softmax_attention_map(1e200 * rand(3, 4), 1e200 * rand(3, 4))
    for scale in (float("nan"), float("inf"), 0.0, -1.0):
        with pytest.raises(ValueError, match="scale must be a finite positive"):
            softmax_attention_map(rand(3, 4), rand(3, 4), scale=scale)
    with pytest.raises(ValueError, match="must be a torch.Tensor"):
        softmax_attention_map([[1.0]], [[1.0]])


def test_bad_options():
    q = rand(4, 2)
    with pytest.raises(ValueError, match="unknown form"):
        hla([q], [q], rand(4, 1), form="fast")
    with pytest.raises(ValueError, match="chunk_size"):
        hla([q], [q], rand(4, 1), chunk_size=0)
    with pytest.raises(ValueError, match="unknown backend"):
        hla([q], [q], rand(4, 1), backend="cuda")
    with pytest.raises(ValueError, match="non-causal form"):
        hla([q], [q], rand(4, 1), causal=True, form="contract")
    with pytest.raises(ValueError, match="form='tied' needs"):
        hla([q, rand(4, 2)], [q, q], rand(4, 1), form="tied")
    with pytest.raises(ValueError, match="causal HLA needs as many queries as keys"):
        hla([rand(3, 2)], [q], rand(4, 1), causal=True)
    with pytest.raises(ValueError, match="floating dtype"):
        softmax_attention_map(torch.ones(2, 2, dtype=torch.long), torch.ones(2, 2, dtype=torch.long))


def test_mixed_dtypes_are_refused_not_cast_down():
    """float64 factors with float32 values were cast to float32 silently (the docstring says refused)."""
    with pytest.raises(ValueError, match="share one dtype, got float32, float64"):
        hla([rand(5, 4)], [rand(5, 4)], rand(5, 3).float())
    with pytest.raises(ValueError, match="share one dtype"):
        hla([rand(5, 4).float(), rand(5, 4)], [rand(5, 4).float(), rand(5, 4)], rand(5, 3))


@pytest.mark.parametrize("bad", [dict(causal="no"), dict(allow_signed="no"), dict(chunk_size=True)])
def test_flags_of_the_wrong_type_are_refused(bad):
    """A truthy string was taken as True (causal='no' ran causal)."""
    with pytest.raises(ValueError, match="must be"):
        hla([rand(5, 4)], [rand(5, 4)], rand(5, 3), **bad)


@pytest.mark.parametrize("m, form", [(1, "auto"), (2, "auto"), (3, "quadratic"), (1, "chunked")])
def test_a_zero_size_batch_gives_an_empty_output(m, form):
    q, v = rand(0, 5, 4).requires_grad_(), rand(0, 5, 3).requires_grad_()
    causal = form == "chunked"
    out = hla([q] * m, [q] * m, v, form=form, causal=causal)
    assert out.shape == (0, 5, 3) and out.dtype == v.dtype
    out.sum().backward()
    assert v.grad.shape == v.shape


@pytest.mark.parametrize("causal, form",
                         [(False, "auto"), (True, "chunked"), (True, "recurrent"), (False, "quadratic")])
@pytest.mark.parametrize("m, junk", [(1, -1.0), (3, -1.0), (3, 1e120)])
def test_padded_keys_features_do_not_matter(causal, form, m, junk):
    """Features of padded keys are never used: negative ones do not fail the sign certificate (odd M),
    huge ones do not overflow a product (1e120 cubed; 0 * inf is NaN), and the output equals the
    reference on the real keys."""
    from hla_analysis.ops import hla_attention_output

    g = torch.Generator().manual_seed(0)
    qs = [torch.rand(2, 9, 4, dtype=torch.float64, generator=g) for _ in range(m)]
    ks = [torch.rand(2, 9, 4, dtype=torch.float64, generator=g) for _ in range(m)]
    v = torch.randn(2, 9, 3, dtype=torch.float64, generator=g)
    mask = torch.ones(2, 9, dtype=torch.bool)
    mask[:, 6:] = False  # right padding: every query keeps a key, causal or not
    want = hla_attention_output(qs, ks, v, causal=causal, key_padding_mask=mask)
    bad = [k.clone() for k in ks]
    for k in bad:
        k[:, 6:] = junk
    out = hla(qs, bad, v, causal=causal, key_padding_mask=mask, form=form, chunk_size=4)
    assert torch.allclose(out, want, rtol=1e-12, atol=1e-12)
