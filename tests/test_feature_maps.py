"""Feature maps give the similarities their docstrings promise."""

import math

import pytest
import torch

from hla_analysis.feature_maps import FEATURE_MAPS, make_feature_map
from hla_analysis.registry import FEATURE_MAP_REGISTRY

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
    elu = torch.nn.functional.elu
    torch.testing.assert_close(sim(make_feature_map("elu1", 5), q, k), (elu(q) + 1) @ (elu(k) + 1).T)
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
    assert set(FEATURE_MAPS) == {
        "identity", "elu1", "relu", "exp", "affine", "favor", "taylor", "cosformer", "hedgehog", "rebased"
    }


# -- every registered map: PyTorch class against its SymPy form ----------------------------
# Maps whose features are defined up to one positive constant per tensor (a shift that keeps
# exp from overflowing; row normalisation cancels it): compared after dividing by that constant.
_UP_TO_A_CONSTANT = {"exp", "favor"}


def _symbolic_features(name, x, *, angles=None, projection=None, **options):
    """The SymPy form of ``name`` evaluated row by row on float64 ``x`` [N, d]."""
    import numpy as np
    import sympy as sp

    from hla_analysis.symbolic.feature_maps import symbolic_feature_map

    d = x.shape[-1]
    xs = sp.symbols(f"x1:{d + 1}", real=True)
    angle = sp.Symbol("theta", real=True)
    extra = {"angle": angle} if FEATURE_MAP_REGISTRY[name].positional else {}
    exprs = symbolic_feature_map(name, list(xs), **options, **extra)
    subs = {sp.Symbol("epsilon", positive=True): sp.Float(1e-5)}  # torch's layer_norm eps
    if projection is not None:  # favor: the symbolic directions w_r are the torch map's rows
        subs.update({sp.Symbol(f"w{r}_{i + 1}", real=True): float(projection[r, i])
                     for r in range(projection.shape[0]) for i in range(d)})
    exprs = [sp.sympify(e).xreplace(subs) for e in exprs]
    fn = sp.lambdify([*xs, angle], exprs, "numpy")
    rows = []
    for n, row in enumerate(x.tolist()):
        theta = 0.0 if angles is None else float(angles[n])
        rows.append(np.broadcast_to(np.asarray(fn(*row, theta), dtype=float), (len(exprs),)))
    return torch.tensor(np.stack(rows), **F64)


@pytest.mark.parametrize("name", list(FEATURE_MAP_REGISTRY))
def test_every_registered_map_matches_its_symbolic_form(name):
    entry = FEATURE_MAP_REGISTRY[name]
    d, n = 3, 5
    q, k = pair(n=n, d=d, seed=7, scale=0.8)
    options = {"features": 2, "seed": 3} if "features" in entry.options else {}
    if "c" in entry.options:
        options["c"] = 3.0
    phi = make_feature_map(name, d, **options).double()
    assert isinstance(phi, FEATURE_MAPS[name]) and phi.positive == entry.positive
    positions = torch.arange(n)
    angles = (math.pi / 2) * positions.double() / n
    kw = dict(positions=positions, length=n)
    projection = getattr(phi, "projection", None)
    sym = {"c": 3} if "c" in entry.options else ({"features": 2} if "features" in entry.options else {})
    for x in (q, k):
        got = phi(x, **kw).detach()
        want = _symbolic_features(name, x, angles=angles, projection=projection, **sym)
        assert got.shape == want.shape == (n, phi.out_dim())
        if name in _UP_TO_A_CONSTANT:
            ratio = got / want
            assert (ratio > 0).all()
            want = want * ratio.flatten()[0]
        # float64 arithmetic on O(1) values: a few ulps, times the few operations per feature
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    # learnable maps: the registry's parameter count is what the module holds
    assert sum(p.numel() for p in phi.parameters()) == entry.params_per_head(d)
    assert (entry.params_per_head(d) > 0) == entry.learnable


@pytest.mark.parametrize("name", [n for n, e in FEATURE_MAP_REGISTRY.items() if e.learnable])
def test_learnable_maps_match_their_symbolic_form_away_from_init(name):
    """Fitted parameters, not only the initial ones: random values for every parameter."""
    d, n = 3, 5
    q, k = pair(n=n, d=d, seed=11, scale=0.8)
    phi = make_feature_map(name, d).double()
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in phi.parameters():
            p.copy_(torch.randn(p.shape, generator=g, **F64))
    params = {key: value.detach().tolist() for key, value in phi.named_parameters()}
    assert set(params) == {"hedgehog": {"weight"}, "rebased": {"gamma", "beta"}}[name]
    for x in (q, k):
        want = _symbolic_features(name, x, **params)
        torch.testing.assert_close(phi(x).detach(), want, rtol=1e-12, atol=1e-12)


def test_registry_names_match_both_sides():
    from hla_analysis.symbolic.feature_maps import SYMBOLIC_FEATURE_MAPS

    assert list(FEATURE_MAPS) == list(SYMBOLIC_FEATURE_MAPS) == list(FEATURE_MAP_REGISTRY)


def test_old_favor_option_name_warns():
    with pytest.warns(DeprecationWarning, match="pass features="):
        phi = make_feature_map("favor", 4, m=8)
    assert phi.out_dim() == 8


def _bound_pair(name, dtype, seed, n=7, d=16, heads=3):
    """Fresh random q, k [heads, n, d] of varied scale, and a map at random parameters."""
    g = torch.Generator().manual_seed(seed)
    scale = torch.logspace(-1, 0.5, heads, dtype=torch.float64)[:, None, None]
    q = (torch.randn(heads, n, d, generator=g, dtype=torch.float64) * scale).to(dtype)
    k = (torch.randn(heads, n + 2, d, generator=g, dtype=torch.float64) * scale).to(dtype)
    phi = make_feature_map(name, d, heads=heads).to(dtype)
    with torch.no_grad():
        for p in phi.parameters():
            p.add_(torch.randn(p.shape, generator=g, dtype=torch.float64).to(dtype) * 0.3)
    return phi, q, k


@pytest.mark.parametrize("name", [n for n, cls in FEATURE_MAPS.items() if cls.has_similarity])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_direct_similarity_equals_the_features_product(name, dtype, seed):
    """``similarity`` (no wide features) equals ``phi(q) @ phi(k)^T`` up to float rounding.

    Both sides sum products whose magnitudes are bounded by ``a = |u||w|`` (Cauchy-Schwarz;
    u, w the vectors the quadratic part squares: x for Taylor, the normed y for ReBased):
    the similarity is ``1 + s + s^2/2`` or ``s^2`` with ``|s| <= a``, and the features'
    product sums r terms, so both are within ``(r + 4) eps (1 + a + a^2/2)`` (Taylor) or
    ``(r + 4) eps a^2`` (ReBased) of the exact value.
    """
    phi, q, k = _bound_pair(name, dtype, seed)
    with torch.no_grad():
        direct = phi.similarity(q, k)
        features = phi(q) @ phi(k).transpose(-1, -2)
        u, w = (phi._normed(q), phi._normed(k)) if name == "rebased" else (q, k)
    a = u.double().norm(dim=-1)[..., :, None] * w.double().norm(dim=-1)[..., None, :]
    magnitude = a.square() if name == "rebased" else 1 + a + a.square() / 2
    tol = (phi.out_dim() + 4) * torch.finfo(dtype).eps * magnitude
    assert direct.shape == features.shape and direct.dtype == dtype
    err = (direct.double() - features.double()).abs()
    assert (err <= 2 * tol).all(), float((err / tol).max())


@pytest.mark.parametrize("name", [n for n, cls in FEATURE_MAPS.items() if cls.has_similarity])
def test_direct_similarity_is_closer_to_float64_than_the_features(name):
    """In float32 the direct form errs by ``O(d eps a^2)``, not ``O(d^2 eps a^2)``: ReBased's
    ``(q~.k~)^2`` is never negative, where the features' float32 sum can round below zero."""
    phi, q, k = _bound_pair(name, torch.float64, 5, n=40, d=32)
    with torch.no_grad():
        exact = phi.similarity(q, k)
        phi32 = phi.float()
        direct = phi32.similarity(q.float(), k.float()).double()
        u, w = (phi._normed(q), phi._normed(k)) if name == "rebased" else (q, k)
    a = u.norm(dim=-1)[..., :, None] * w.norm(dim=-1)[..., None, :]
    magnitude = a.square() if name == "rebased" else 1 + a + a.square() / 2
    # inputs rounded to float32 move a product of 4 of them by 4 eps each, plus d + 4 roundings
    tol = (32 + 8) * torch.finfo(torch.float32).eps * magnitude
    assert ((direct - exact).abs() <= tol).all()
    assert (direct >= 0).all()


def test_hedgehog_half_precision_inputs_use_float32_arithmetic():
    """bf16 inputs give the float32 map's features rounded once to bf16 (not bf16 arithmetic)."""
    torch.manual_seed(11)
    phi = make_feature_map("hedgehog", 16)
    with torch.no_grad():
        phi.weight.normal_(0, 1.0)
    x = torch.randn(5, 16).to(torch.bfloat16)
    expected = phi(x.float()).to(torch.bfloat16)
    got = phi(x)
    assert got.dtype == torch.bfloat16
    assert torch.equal(got, expected)
