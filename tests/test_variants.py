"""The variant registry: specs parse, maps follow the definitions, forward == map @ v."""

import pytest
import torch

from hla_analysis import list_variants, make_variant, softmax_attention_map
from hla_analysis.variants import parse_spec


def qkv(n=12, d=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(2, n, d, generator=g, dtype=torch.float64) for _ in range(3))


@pytest.mark.parametrize("spec", [s for s in list_variants() if s != "linear:phi=identity"])
@pytest.mark.parametrize("causal", [False, True])
def test_forward_equals_map_times_values(spec, causal):
    q, k, v = qkv()
    var = make_variant(spec).double()
    attn = var.attention_map(q, k, causal=causal, allow_signed=True)
    torch.testing.assert_close(attn.sum(-1), torch.ones(2, 12, dtype=torch.float64))
    out = var(q, k, v, causal=causal, allow_signed=True)
    torch.testing.assert_close(out, attn @ v, rtol=1e-9, atol=1e-9)


def test_affine_hla_is_compound_interest_of_softmax():
    q, k, _ = qkv()
    scale = 0.3
    s = scale * q @ k.transpose(-1, -2)
    for m in (1, 2, 3, 5):
        w = (1 + s / m) ** m
        expect = w / w.sum(-1, keepdim=True)
        got = make_variant(f"hla:m={m},phi=affine").attention_map(q, k, scale=scale, allow_signed=True)
        torch.testing.assert_close(got, expect)
    # (1 + s/M)^M -> exp(s): the error to softmax falls with M
    ref = softmax_attention_map(q, k, scale=scale)
    errs = [
        (make_variant(f"hla:m={m},phi=affine").attention_map(q, k, scale=scale, allow_signed=True) - ref).abs().max()
        for m in (2, 4, 8)
    ]
    assert errs[0] > errs[1] > errs[2]


def test_power_and_query_offset_blocks():
    q, k, _ = qkv()
    var = make_variant("power:p=2")
    s = q @ k.transpose(-1, -2)
    full = var.attention_map(q, k, causal=True)
    expect = (s**2).tril()
    torch.testing.assert_close(full, expect / expect.sum(-1, keepdim=True))
    # row blocks with query_offset reproduce the full causal map (cosformer uses positions)
    for spec in ("power:p=2", "linear:phi=cosformer", "softmax"):
        var = make_variant(spec)
        whole = var.attention_map(q, k, causal=True)
        blocks = ((0, 5), (5, 12))
        parts = torch.cat([var.attention_map(q[:, a:b], k, causal=True, query_offset=a) for a, b in blocks], -2)
        torch.testing.assert_close(parts, whole)
    assert make_variant("power:p=2").sign_blind and not make_variant("power:p=3").sign_blind
    assert not make_variant("hla:m=2,phi=affine").sign_blind


def test_untied_hla_starts_equal_to_tied_and_has_parameters():
    q, k, _ = qkv()
    tied, untied = make_variant("hla:m=3,phi=affine"), make_variant("hla:m=3,phi=affine,tied=0")
    torch.testing.assert_close(
        tied.attention_map(q, k, allow_signed=True), untied.attention_map(q, k, allow_signed=True).to(torch.float64)
    )
    assert sum(p.numel() for p in untied.parameters()) == 3 * 8 * 8
    assert sum(p.numel() for p in tied.parameters()) == 0
    shared = make_variant("hla:m=3,phi=affine,proj=1")
    torch.testing.assert_close(shared.attention_map(q, k, allow_signed=True).double(),
                               tied.attention_map(q, k, allow_signed=True))
    assert sum(p.numel() for p in shared.parameters()) == 8 * 8  # Hedgehog's budget
    feats = shared.features(q.float(), k.float())[0]
    assert shared.tied and feats[0] is feats[2]


def test_spec_parsing_and_errors():
    assert parse_spec("hla:m=3, phi=exp") == ("hla", {"m": 3, "phi": "exp"})
    assert make_variant("hla").spec == "hla:m=2,phi=affine"
    assert make_variant("linear").spec == "linear:phi=elu1"
    with pytest.raises(ValueError, match="unknown variant family 'flash'"):
        make_variant("flash")
    with pytest.raises(ValueError, match="no option 'p'"):
        make_variant("hla:p=2")
    with pytest.raises(ValueError, match="write key=value"):
        make_variant("hla:m")
    with pytest.raises(ValueError, match="must be int"):
        make_variant("hla:m=two")
    with pytest.raises(ValueError, match="unknown feature map phi='tanh'"):
        make_variant("linear:phi=tanh")
    with pytest.raises(ValueError, match="m >= 1"):
        make_variant("hla:m=0")
    with pytest.raises(ValueError, match="limit of 8"):
        make_variant("hla:m=9")
    with pytest.raises(ValueError, match="non-empty string"):
        make_variant("")
    with pytest.raises(ValueError, match="given twice"):
        make_variant("hla:m=2,m=3")
    with pytest.raises(ValueError, match="write key=value"):
        make_variant("hla:m=2,,phi=affine")
    for bad in ("hla:m=2,c=0", "hla:m=2,c=-1", "hla:m=2,c=nan"):
        with pytest.raises(ValueError, match="finite number > 0"):
            make_variant(bad)
    with pytest.raises(ValueError, match="phi=elu1 does not take m"):
        make_variant("linear:phi=elu1,m=3")
    with pytest.raises(ValueError, match=r"features must be an integer in 1\.\.65536"):
        make_variant("linear:phi=favor,features=0")
    with pytest.raises(ValueError, match="must be a torch.Tensor"):
        make_variant("hla:m=2").attention_map([[1.0]], [[1.0]])
    with pytest.raises(ValueError, match=r"\[\.\.\., N, d\]"):
        make_variant("hla:m=2").attention_map(torch.randn(4), torch.randn(4))
    var = make_variant("hla:m=2")
    var.attention_map(*list(qkv(d=8))[:2])
    with pytest.raises(ValueError, match="built for head dim 8, got 4"):
        var.attention_map(torch.randn(3, 4), torch.randn(3, 4))


@pytest.mark.parametrize(
    "spec", ["linear:phi=hedgehog", "linear:phi=rebased", "hla:m=2,phi=affine,tied=0", "hla:m=3,phi=affine,proj=1"]
)
def test_per_head_parameters_match_separate_variants(spec):
    q, k, _ = qkv()  # [2 heads, N, d]
    batched = make_variant(spec).bind(8, heads=2).double()
    singles = [make_variant(spec).bind(8).double() for _ in range(2)]
    with torch.no_grad():
        for p in batched.parameters():
            p.add_(torch.randn_like(p) * 0.1)
        for h, single in enumerate(singles):
            for p_single, p_batched in zip(single.parameters(), batched.parameters()):
                p_single.copy_(p_batched[h].reshape(p_single.shape))
    got = batched.attention_map(q, k, allow_signed=True)
    for h, single in enumerate(singles):
        torch.testing.assert_close(got[h], single.attention_map(q[h], k[h], allow_signed=True))


def test_cli_lists_every_default_variant(capsys):
    from hla_analysis.cli import main

    assert main(["variants"]) == 0
    out = capsys.readouterr().out
    for spec in list_variants():
        assert spec in out
    power_line = next(line for line in out.splitlines() if line.startswith("power:p=2 "))
    assert power_line.split()[-1] == "True"  # sign-blind column


def test_shifted_affine_factors():
    q, k, _ = qkv()
    var = make_variant("hla:m=4,phi=affine,shift=1").bind(8, heads=2).double()
    torch.testing.assert_close(var.attention_map(q, k), make_variant("hla:m=4,phi=affine").attention_map(q, k))
    with torch.no_grad():
        var.shift.copy_(torch.tensor([-3.0, 2.0], dtype=torch.float64).view(2, 1, 1))
    s = q @ k.transpose(-1, -2) / 8**0.5
    w = (1 + (s - var.shift) / 4) ** 4
    torch.testing.assert_close(var.attention_map(q, k), w / w.sum(-1, keepdim=True))
    v = torch.randn(2, 12, 3, dtype=torch.float64)
    torch.testing.assert_close(var(q, k, v), var.attention_map(q, k) @ v)  # still tied: symmetric state
    with pytest.raises(ValueError, match="shift=1 needs affine"):
        make_variant("hla:m=2,phi=exp,shift=1")


def test_make_variant_returns_the_family_class():
    from hla_analysis.variants import KernelVariant, PowerVariant, SoftmaxVariant, Variant

    for spec, cls in (("softmax", SoftmaxVariant), ("linear:phi=elu1", KernelVariant),
                      ("hla:m=2,phi=affine", KernelVariant), ("power:p=2", PowerVariant)):
        var = make_variant(spec)
        assert type(var) is cls and isinstance(var, Variant) and var.kind == spec.split(":")[0]
    # one untied factor still applies its own projection (not the tied single-map path)
    var = make_variant("hla:m=1,phi=affine,tied=0").bind(4).double()
    with torch.no_grad():
        var.proj[0].copy_(torch.diag(torch.tensor([2.0, 1.0, 1.0, 1.0])))
    q, k = torch.randn(3, 4, dtype=torch.float64), torch.randn(3, 4, dtype=torch.float64)
    w, _ = var.weights(q, k, scale=1.0)
    qw, kw = q.clone(), k.clone()
    qw[:, 0] *= 2
    kw[:, 0] *= 2
    torch.testing.assert_close(w, 1 + qw @ kw.T)


def _random_qk(dtype, seed, heads=3, n=9, d=8):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(2, heads, n, d, generator=g, dtype=torch.float64).to(dtype)
    k = torch.randn(2, heads, n + 3, d, generator=g, dtype=torch.float64).to(dtype)
    return q, k


TIED = [s for s in list_variants() if s != "softmax"] + ["hla:m=3,phi=relu", "hla:m=2,phi=affine,shift=1"]


@pytest.mark.parametrize("spec", TIED + ["hla:m=2,phi=affine,tied=0", "hla:m=2,phi=taylor", "hla:m=3,phi=rebased"])
@pytest.mark.parametrize("causal", [False, True])
def test_weights_match_hla_weights_of_the_features(spec, causal):
    """``Variant.weights`` (one matmul for tied factors, direct Taylor/ReBased similarity) equals
    ``hla_weights`` on the variant's features: bit for bit through the features, and within
    float rounding where a direct similarity replaces them (bound: eps times the sum of the
    absolute terms, |s|^M-sized, times the number of roundings)."""
    from hla_analysis.feature_maps import FEATURE_MAPS
    from hla_analysis.ops import hla_weights

    for dtype in (torch.float32, torch.float64):
        for seed in (0, 1):
            q, k = _random_qk(dtype, seed)
            var = make_variant(spec).bind(8, heads=3).to(dtype)
            with torch.no_grad():
                for p in var.parameters():  # away from the initial values
                    p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(seed), dtype=dtype) * 0.1)
                kw = dict(scale=0.4, causal=causal, query_offset=3)
                w, den = var.weights(q[..., 3:, :], k, **kw)
                qs, ks = var.features(q[..., 3:, :], k, scale=0.4, query_offset=3)
                w0, den0 = hla_weights(qs, ks, causal=causal, query_offset=3)
            direct = var.phi is not None and FEATURE_MAPS[var.phi].has_similarity
            if not direct:
                assert torch.equal(w, w0) and torch.equal(den, den0), spec
                continue
            # |terms| of one factor's product are bounded by the product of the features' norms
            a = qs[0].double().norm(dim=-1)[..., :, None] * ks[0].double().norm(dim=-1)[..., None, :]
            m = var.factors
            tol = m * (qs[0].shape[-1] + 4) * torch.finfo(dtype).eps * a ** m
            assert ((w.double() - w0.double()).abs() <= tol).all(), spec
            row_tol = tol.sum(-1, keepdim=True) * (1 + k.shape[-2] * torch.finfo(dtype).eps)
            assert ((den.double() - den0.double()).abs() <= row_tol).all(), spec


@pytest.mark.parametrize("spec", ["linear:phi=rebased", "hla:m=2,phi=affine,proj=1", "power:p=3"])
def test_weights_gradients_match_the_features_path(spec):
    """The fits differentiate ``weights``: its gradients equal those through the features (float64)."""
    from hla_analysis.ops import hla_weights

    q, k = _random_qk(torch.float64, 3)
    q.requires_grad_(True)
    grads = []
    for through_features in (False, True):
        var = make_variant(spec).bind(8, heads=3).double()
        if through_features:
            qs, ks = var.features(q, k, scale=0.4)
            w, den = hla_weights(qs, ks, causal=True)
        else:
            w, den = var.weights(q, k, scale=0.4, causal=True)
        loss = (w / den).square().sum() + den.log().sum()
        params = [q, *var.parameters()]
        grads.append(torch.autograd.grad(loss, params))
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_only_softmax_is_the_reference():
    """The comparison scores the reference family by the family's own flag, not its name."""
    assert [s for s in list_variants() if make_variant(s).is_reference] == ["softmax"]


def test_every_positive_variant_runs_its_forward_on_signed_inputs():
    """A variant that is positive by construction takes its forward on any q, k: Taylor's
    and ReBased's features have negative entries but their weights cannot be negative, so
    the feature-sign certificate must not refuse them. The output equals the map times v
    (float32 sums over N keys: a few eps32 times N relative). Variants that are not positive
    still get the refusal, named for what it is."""
    g = torch.Generator().manual_seed(11)
    q, k = torch.randn(2, 3, 24, 8, generator=g), torch.randn(2, 3, 24, 8, generator=g)
    v = torch.randn(2, 3, 24, 5, generator=g)
    checked = 0
    for spec in list_variants():
        variant = make_variant(spec)
        if variant.is_reference or not variant.positive:
            continue
        with torch.no_grad():
            out = variant.forward(q, k, v)
            # weights() forms ReBased's (q~.k~)^2 directly: its float32 features cancel and can
            # sum to a tiny negative weight, which attention_map would refuse
            weights, den = variant.weights(q, k)
            want = (weights / den) @ v
        tol = 8 * 24 * torch.finfo(torch.float32).eps
        torch.testing.assert_close(out, want, rtol=tol, atol=tol * float(v.abs().max()), msg=spec)
        checked += 1
    assert checked >= 10
    for spec in ("linear:phi=taylor", "linear:phi=rebased"):
        assert make_variant(spec).positive
    with pytest.raises(ValueError, match="untied factors"):
        make_variant("hla:m=2,phi=affine,tied=0").forward(q, k, v)
