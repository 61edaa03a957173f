"""Feature maps give the similarities their docstrings promise."""

import math

import pytest
import torch

from hla_analysis.feature_maps import FEATURE_MAPS, make_feature_map

F64 = dict(dtype=torch.float64)


def pair(n=6, d=5, seed=0, scale=0.5):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g, **F64) * scale, torch.randn(n, d, generator=g, **F64) * scale


def sim(phi, q, k, **kw):
    return phi(q, **kw) @ phi(k, **kw).T


def test_affine_similarity():
    q, k = pair()
    for c in (1.0, 3.0):
        torch.testing.assert_close(sim(make_feature_map("affine", 5, c=c), q, k), 1 + q @ k.T / c)


def test_taylor_similarity_is_based_kernel():
    q, k = pair()
    s = q @ k.T
    phi = make_feature_map("taylor", 5)
    assert phi.out_dim() == 1 + 5 + 15  # symmetric-packed
    torch.testing.assert_close(sim(phi, q, k), 1 + s + s**2 / 2)


def test_elu_relu_identity():
    q, k = pair()
    torch.testing.assert_close(sim(make_feature_map("identity", 5), q, k), q @ k.T)
    torch.testing.assert_close(sim(make_feature_map("elu1", 5), q, k), (torch.nn.functional.elu(q) + 1) @ (torch.nn.functional.elu(k) + 1).T)
    torch.testing.assert_close(sim(make_feature_map("relu", 5), q, k), q.clamp_min(0) @ k.clamp_min(0).T)


def test_exp_is_stabilised_and_proportional():
    q, k = pair()
    phi = make_feature_map("exp", 5)
    big = phi(q * 200)  # exp(1000) would overflow without the shift
    assert torch.isfinite(big).all() and big.max() == 1
    # the shift is one constant per tensor, so rows are proportional to the unshifted kernel
    s = sim(phi, q, k)
    exact = torch.exp(q) @ torch.exp(k).T
    ratio = s / exact
    torch.testing.assert_close(ratio, torch.full_like(ratio, ratio[0, 0].item()))


def test_favor_is_unbiased_for_exp_and_seeded():
    q, k = pair(n=4, d=4, scale=0.4)
    a = make_feature_map("favor", 4, features=20000, seed=1)
    b = make_feature_map("favor", 4, features=20000, seed=1)
    assert torch.equal(a.projection, b.projection)
    assert not torch.equal(a.projection, make_feature_map("favor", 4, features=20000, seed=2).projection)
    assert (a(q) > 0).all()
    # row-normalised weights of FAVOR+ approach softmax weights as m grows
    approx = torch.softmax(q @ k.T, -1)
    s = sim(a, q, k)
    torch.testing.assert_close(s / s.sum(-1, keepdim=True), approx, atol=0.02, rtol=0.05)
    # orthogonal blocks: rows within a block are orthogonal directions
    assert abs(a.projection.double().mean()) < 0.01  # unbiased directions (QR sign fix)
    w = a.projection[:4].double()
    gram = (w / w.norm(dim=-1, keepdim=True)) @ (w / w.norm(dim=-1, keepdim=True)).T
    torch.testing.assert_close(gram, torch.eye(4, **F64), atol=1e-5, rtol=0)


def test_cosformer_reweighting():
    q, k = pair(n=5, d=3)
    phi = make_feature_map("cosformer", 3)
    s = sim(phi, q, k, length=5)
    i = torch.arange(5, **F64)
    expect = (q.clamp_min(0) @ k.clamp_min(0).T) * torch.cos(math.pi / 2 * (i[:, None] - i[None, :]) / 5)
    torch.testing.assert_close(s, expect)


def test_hedgehog_and_rebased_learnable():
    q, k = pair()
    hh = make_feature_map("hedgehog", 5).double()
    f = hh(q)
    assert f.shape == (6, 10) and (f > 0).all()
    torch.testing.assert_close(f[:, :5].sum(-1), torch.ones(6, **F64))
    assert sum(p.numel() for p in hh.parameters()) == 25
    rb = make_feature_map("rebased", 5).double()
    norm = torch.nn.functional.layer_norm
    torch.testing.assert_close(sim(rb, q, k), (norm(q, (5,)) @ norm(k, (5,)).T) ** 2)
    assert {n for n, _ in rb.named_parameters()} == {"gamma", "beta"}


def test_unknown_map_and_bad_options():
    with pytest.raises(ValueError, match="unknown feature map 'softplus'"):
        make_feature_map("softplus", 4)
    with pytest.raises(ValueError, match="does not take m"):
        make_feature_map("elu1", 4, m=3)
    with pytest.raises(ValueError, match="finite number > 0"):
        make_feature_map("affine", 4, c=0)
    assert set(FEATURE_MAPS) == {"identity", "elu1", "relu", "exp", "affine", "favor", "taylor", "cosformer", "hedgehog", "rebased"}

