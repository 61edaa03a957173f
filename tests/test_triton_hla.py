"""Fused Triton HLA kernels against the materialized reference.

Without CUDA the kernels run under TRITON_INTERPRET=1 (root conftest.py) in fp32 on small
shapes; N is never a multiple of the blocks, so the masked tails are exercised (the
interpreter does no bounds checks). With CUDA the same comparisons run in bf16.
"""

import os
import re

import pytest
import torch

triton = pytest.importorskip("triton")

from hla_analysis.ops import hla, hla_attention_output  # noqa: E402
from hla_analysis.ops.triton import hla_triton, supports  # noqa: E402
from hla_analysis.ops.triton.tied.kernels import _sym_tile  # noqa: E402

tl = triton.language

CUDA = torch.cuda.is_available()
RUNNABLE = CUDA or os.environ.get("TRITON_INTERPRET") == "1"
pytestmark = pytest.mark.skipif(not RUNNABLE, reason="needs CUDA or TRITON_INTERPRET=1")
DEVICE = "cuda" if CUDA else "cpu"


def _inputs(m, n, widths, dv, *, seed, dtype=torch.float32, lead=(1, 2), signed=False):
    g = torch.Generator().manual_seed(seed)

    def draw(*shape):
        t = torch.randn(*shape, generator=g) if signed else torch.rand(*shape, generator=g) + 0.05
        return t.to(DEVICE, dtype).requires_grad_()

    qs = [draw(*lead, n, widths[i]) for i in range(m)]
    ks = [draw(*lead, n, widths[i]) for i in range(m)]
    v = torch.randn(*lead, n, dv, generator=g).to(DEVICE, dtype).requires_grad_()
    return qs, ks, v


def _compare(m, causal, *, n, widths, dv=16, mask=False, seed=0, config=None, tol=None):
    qs, ks, v = _inputs(m, n, widths, dv, seed=seed)
    kpm = None
    if mask:
        kpm = torch.rand(1, 1, n, generator=torch.Generator().manual_seed(seed + 1)) > 0.3
        kpm[..., 0] = True  # every causal row keeps a key
        kpm = kpm.to(DEVICE)
    out = hla_triton(qs, ks, v, causal=causal, key_padding_mask=kpm, config=config)
    grad_out = torch.randn_like(out)
    grads = torch.autograd.grad(out, [*qs, *ks, v], grad_out)

    ref_in = [t.detach().double().requires_grad_() for t in [*qs, *ks, v]]
    ref = hla_attention_output(ref_in[:m], ref_in[m:2 * m], ref_in[-1], causal=causal, key_padding_mask=kpm)
    ref_grads = torch.autograd.grad(ref, ref_in, grad_out.double())
    tol = tol or (1e-5 if v.dtype == torch.float32 else 2e-2)
    names = ["out"] + [f"dq{i}" for i in range(m)] + [f"dk{i}" for i in range(m)] + ["dv"]
    for name, got, want in zip(names, [out, *grads], [ref, *ref_grads]):
        assert torch.isfinite(got).all(), name
        err = float((got.detach().double() - want.detach()).norm() / want.detach().norm())
        assert err < tol, f"{name}: relative error {err:.2e} >= {tol}"
    if kpm is not None:  # padded keys get exactly zero gradient
        padded = ~kpm.expand_as(v[..., 0])
        assert grads[m][padded].abs().max() == 0
        assert grads[-1][padded].abs().max() == 0


@pytest.mark.parametrize("m", [1, 2])
@pytest.mark.parametrize("causal", [False, True])
def test_matches_reference_with_gradients(m, causal):
    # N = 45: neither the 16-row blocks nor the 32-token chunks divide it
    _compare(m, causal, n=45, widths=(16, 16), seed=10 * m + causal)


def test_unequal_widths_and_padding_mask():
    _compare(2, False, n=37, widths=(32, 16), mask=True, seed=3)
    _compare(2, True, n=53, widths=(16, 32), mask=True, seed=4)


def test_split_reduction_and_both_causal_state_schedules():
    # the non-causal state summed over several token splits (partials reduced after)
    _compare(2, False, n=70, widths=(16, 16), seed=5, config=dict(SPLITS=3))
    # causal prefix states: one sequential sweep, or per-chunk sums then a scan
    _compare(2, True, n=75, widths=(16, 16), seed=6, config=dict(CAUSAL_STATE="sequential"))
    _compare(1, True, n=75, widths=(16,), seed=7, config=dict(CAUSAL_STATE="parallel"))


@pytest.mark.parametrize("config", [
    dict(PER_A=False),  # Khatri-Rao tiles of BLOCK_A rows, reshaped
    dict(PER_A=True, STATE_BA=1, STATE_TRANS=1),
    dict(PER_A=True, STATE_BA=4, STATE_TRANS=0, SPLITS=2),
    dict(PER_A=True, STATE_KERNEL="tiles"),
], ids=["tiles", "cols-ba1-trans-v", "cols-ba4-split", "cols-tile-state"])
@pytest.mark.parametrize("causal", [False, True])
def test_both_khatri_rao_schedules(config, causal):
    """Column-at-a-time and tile kernels, each against the reference (unequal widths, masked)."""
    _compare(2, causal, n=51, widths=(16, 32), mask=True, seed=20 + causal, config=config)
    if causal:
        _compare(2, True, n=75, widths=(32, 16), seed=22, config=dict(config, CAUSAL_STATE="parallel"))


@pytest.mark.parametrize("shape", [(2, 37, 16), (1, 16, 45), (3, 5, 7)])
def test_tiled_transpose_and_transpose_add(shape):
    from hla_analysis.ops.triton.state.autograd import transpose

    src = torch.randn(*shape, device=DEVICE)
    torch.testing.assert_close(transpose(src), src.transpose(1, 2), atol=0, rtol=0)
    dst = torch.randn(shape[0], shape[2], shape[1], device=DEVICE)
    want = dst + src.transpose(1, 2)
    assert transpose(src, dst) is dst
    torch.testing.assert_close(dst, want, atol=0, rtol=0)


def test_normaliser_state_on_its_own():
    """Rows of an all-ones value matrix must come out exactly 1 (numerator == normaliser)."""
    qs, ks, _ = _inputs(2, 41, (16, 16), 16, seed=8)
    ones = torch.ones(1, 2, 41, 16, device=DEVICE)
    for causal in (False, True):
        out = hla_triton(qs, ks, ones, causal=causal)
        torch.testing.assert_close(out, torch.ones_like(out), atol=1e-5, rtol=1e-5)


def test_signed_normalisers_refused_or_returned():
    qs, ks, v = _inputs(2, 33, (16, 16), 16, seed=9, signed=True)
    ref = hla_attention_output(qs, ks, v, allow_signed=True)
    den = (qs[0] @ ks[0].transpose(-1, -2) * (qs[1] @ ks[1].transpose(-1, -2))).sum(-1)
    assert (den <= 0).any(), "test needs some non-positive normaliser"
    with pytest.raises(ValueError, match=r"row\(s\) have a zero or negative normalizer"):
        hla_triton(qs, ks, v)
    out = hla_triton(qs, ks, v, allow_signed=True)
    fine = den.abs() > 1e-2 * den.abs().max()  # rows far from a pole compare closely
    torch.testing.assert_close(out[fine], ref[fine], atol=1e-3, rtol=1e-3)


def test_config_refuses_unknown_keys_and_values():
    qs, ks, v = _inputs(2, 20, (16, 16), 16, seed=13)
    with pytest.raises(ValueError, match="unknown kernel config key"):
        hla_triton(qs, ks, v, config={"STATE_TILES_T": True})  # a removed orientation
    with pytest.raises(ValueError, match=r"STATE_TRANS=3 is not one of \(0, 1\)"):
        hla_triton(qs, ks, v, config={"STATE_TRANS": 3})
    with pytest.raises(ValueError, match="must be a positive int"):
        hla_triton(qs, ks, v, config={"BLOCK_N": 0})
    for key, bad in (("BLOCK_N", True), ("CHUNK", 64.0), ("PER_A", 1), ("CAUSAL_STATE", "fast"), ("SPLITS", 0)):
        with pytest.raises(ValueError, match=f"kernel config {key}="):
            hla_triton(qs, ks, v, causal=key == "CAUSAL_STATE", config={key: bad})
    with pytest.raises(ValueError, match="unknown kernel config key"):  # the split path checks them too
        hla_triton([q[..., :15] for q in qs], [k[..., :15] for k in ks], v, config={"STATE_TILES_T": True})
    from dataclasses import FrozenInstanceError

    from hla_analysis.ops.triton import KernelConfig, default_config

    cfg = default_config(r1=16, r2=16, dv=16, causal=False, dtype=torch.float32)
    assert isinstance(cfg, KernelConfig) and cfg.replace(SPLITS=3)["SPLITS"] == 3 and cfg["SPLITS"] is None
    with pytest.raises(FrozenInstanceError):
        cfg.CHUNK = 64
    assert dict(cfg)["CHUNK"] == cfg.CHUNK and set(cfg) >= {"CHUNK", "TIED_TP", "CAUSAL_STATE"}


def test_supports_and_dispatch():
    qs, ks, v = _inputs(2, 20, (16, 16), 16, seed=11)
    assert supports(qs, ks, v, causal=False, key_padding_mask=None)
    assert not supports(qs * 2, ks * 2, v, causal=False, key_padding_mask=None)  # M = 4
    assert supports([q[..., :12] for q in qs], [k[..., :12] for k in ks], v, causal=False,
                    key_padding_mask=None)  # width 12: exact sum of split parts
    wide = torch.rand(1, 2, 20, 300, device=DEVICE)
    assert supports([wide], [wide], v, causal=False, key_padding_mask=None)  # M = 1: summed 128-wide parts
    assert not supports([wide] * 2, [wide] * 2, v, causal=False, key_padding_mask=None)  # M = 2: beyond the split
    wider = torch.rand(1, 2, 20, 4097, device=DEVICE)
    assert not supports([wider], [wider], v, causal=False, key_padding_mask=None)  # M = 1: beyond 4,096
    assert not supports(qs, ks, torch.randn(1, 2, 20, 24, device=DEVICE), causal=False, key_padding_mask=None)
    assert not supports([q.double() for q in qs], [k.double() for k in ks], v.double(), causal=False,
                        key_padding_mask=None)
    with pytest.raises(ValueError, match="does not support"):
        hla_triton(qs * 2, ks * 2, v)
    via_hla = hla(qs, ks, v, causal=True, backend="triton")
    torch.testing.assert_close(via_hla, hla_triton(qs, ks, v, causal=True))
    torch.testing.assert_close(via_hla, hla(qs, ks, v, causal=True, backend="torch"), atol=1e-5, rtol=1e-4)


def test_broadcast_leading_dims():
    qs, ks, v = _inputs(2, 30, (16, 16), 16, seed=12, lead=(2, 1))
    v2 = torch.randn(2, 3, 30, 16, device=DEVICE)
    out = hla_triton(qs, ks, v2)
    torch.testing.assert_close(out, hla_attention_output(qs, ks, v2), atol=1e-5, rtol=1e-4)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="bf16 kernels need CUDA")
@pytest.mark.parametrize("m,r,causal,n,config", [
    (2, 64, False, 1000, None), (2, 64, False, 1000, dict(PER_A=False)), (2, 128, False, 1200, None),
    (2, 32, False, 999, None), (2, 64, True, 2100, None), (2, 64, True, 2100, dict(PER_A=True)),
    (2, 32, True, 777, None), (1, 128, True, 1100, None)])
def test_bf16_on_gpu(m, r, causal, n, config):
    """Default schedules (column kernels when non-causal) and the other one, in bf16."""
    qs, ks, v = _inputs(m, n, (r, r), 128, seed=n, dtype=torch.bfloat16, lead=(2, 3))
    out = hla_triton(qs, ks, v, causal=causal, config=config)
    grads = torch.autograd.grad(out, [*qs, *ks, v], torch.ones_like(out))
    ref_in = [t.detach().double().requires_grad_() for t in [*qs, *ks, v]]
    ref = hla_attention_output(ref_in[:m], ref_in[m:2 * m], ref_in[-1], causal=causal)
    ref_grads = torch.autograd.grad(ref, ref_in, torch.ones_like(ref))
    for got, want in zip([out, *grads], [ref, *ref_grads]):
        assert float((got.detach().double() - want.detach()).norm() / want.detach().norm()) < 2e-2


# ---- widths outside {16, 32, 64, 128}: exact sums of parts (ops/triton/split.py) ----

def _affine_pair(n, d, *, seed):
    """Tied affine-like factors of width d + 1: constant first feature, signed rest."""
    g = torch.Generator().manual_seed(seed)
    q, k = (torch.cat([torch.ones(1, 2, n, 1), 0.5 * torch.randn(1, 2, n, d, generator=g)], -1) for _ in range(2))
    return q.to(DEVICE).requires_grad_(), k.to(DEVICE).requires_grad_()


def _tied_split_against_reference(q, k, *, causal, mask, seed, m2_widths, m1_widths):
    """Tied affine-shaped factors through the split: its parts' widths, then output and
    gradients against the fp64 reference; padded keys get exactly zero gradient."""
    from hla_analysis.ops.triton import split

    n = q.shape[-2]
    v = torch.randn(1, 2, n, 16, generator=torch.Generator().manual_seed(seed)).to(DEVICE).requires_grad_()
    kpm = None
    if mask:
        kpm = torch.rand(1, 1, n, generator=torch.Generator().manual_seed(seed + 1)) > 0.3
        kpm[..., 0] = True
        kpm = kpm.to(DEVICE)
    m2, m1 = split.plan([q, q], [k, k])
    assert [tuple(t.shape[-1] for t in part) for part in m2] == m2_widths
    assert [tuple(t.shape[-1] for t in part) for part in m1] == m1_widths
    out = hla_triton([q, q], [k, k], v, causal=causal, key_padding_mask=kpm)
    grad_out = torch.randn_like(out)
    grads = torch.autograd.grad(out, [q, k, v], grad_out)
    ref_in = [t.detach().double().requires_grad_() for t in (q, k, v)]
    ref = hla_attention_output([ref_in[0]] * 2, [ref_in[1]] * 2, ref_in[2], causal=causal, key_padding_mask=kpm)
    ref_grads = torch.autograd.grad(ref, ref_in, grad_out.double())
    tol = 1e-5 if not CUDA else 2e-2
    for name, got, want in zip(["out", "dq", "dk", "dv"], [out, *grads], [ref, *ref_grads]):
        err = float((got.detach().double() - want.detach()).norm() / want.detach().norm())
        assert err < tol, f"{name}: relative error {err:.2e} >= {tol}"
    if kpm is not None:
        padded = ~kpm.expand_as(v[..., 0])
        assert grads[1][padded].abs().max() == 0 and grads[2][padded].abs().max() == 0


@pytest.mark.parametrize("causal,mask", [(False, False), (True, True)])
def test_split_width_tied_affine_matches_reference(causal, mask):
    """Width d + 1 = 17, tied: (1 + a)^2 = 1 + 2a + a^2 as a 16 x 16 part plus one M = 1 part."""
    q, k = _affine_pair(37, 16, seed=30 + causal)
    _tied_split_against_reference(q, k, causal=causal, mask=mask, seed=1, m2_widths=[(16, 16, 16, 16)],
                                  m1_widths=[(32, 32)])  # 1 + 16 features, padded


@pytest.mark.parametrize("causal,mask", [(False, False), (True, True)])
def test_tied_split_runs_the_block_symmetric_state(causal, mask, monkeypatch):
    """Tied factors wider than TIED_BLOCK split into blocks A, B: parts A.A, B.B and 2 A.B (the
    block below the diagonal skipped), against the fp64 reference, gradients and padded keys
    included. At TIED_BLOCK = 16, width 33 = 1 + 16 + 16 (on a GPU, 129 = 1 + 64 + 64:
    phi=affine at d = 128)."""
    from hla_analysis.ops.triton import split

    monkeypatch.setattr(split, "TIED_BLOCK", 16)
    q, k = _affine_pair(37, 32, seed=50 + causal)
    _tied_split_against_reference(q, k, causal=causal, mask=mask, seed=3, m2_widths=[(16, 16, 16, 16)] * 3,
                                  m1_widths=[(64, 64)])  # 1 + 16 + 16 features, padded


def test_split_reads_the_block_a_map_recorded_and_ignores_it_once_written():
    """phi=affine records its x block (hla_analysis.ops.feature_blocks): the split reads that
    tensor instead of copying the strided slice, and an in-place write to the features voids it."""
    from hla_analysis.feature_maps import make_feature_map
    from hla_analysis.ops import feature_blocks
    from hla_analysis.ops.triton import split

    g = torch.Generator().manual_seed(40)
    x, y = (0.5 * torch.randn(1, 2, 29, 16, generator=g) for _ in range(2))
    v = torch.randn(1, 2, 29, 16, generator=g).to(DEVICE)
    phi = make_feature_map("affine", 16, c=2.0)
    fq, fk = phi(x.to(DEVICE)), phi(y.to(DEVICE))
    (block, part), = feature_blocks.recorded(fq).items()
    assert block == (1, 16) and torch.equal(part, fq[..., 1:])
    m2, _ = split.plan([fq, fq], [fk, fk])
    assert m2[0][0] is part and m2[0][1] is part  # the recorded tensor itself, once for both tied factors
    ref = hla_attention_output([fq.double()] * 2, [fk.double()] * 2, v.double())
    out = hla_triton([fq, fq], [fk, fk], v)
    assert float((out.double() - ref).norm() / ref.norm()) < (1e-5 if not CUDA else 2e-2)
    fq[..., 1:] *= 3.0  # the record is now stale: the split must read the written features
    assert feature_blocks.recorded(fq) is None
    m2, _ = split.plan([fq, fq], [fk, fk])
    assert torch.equal(m2[0][0], fq[..., 1:])
    ref = hla_attention_output([fq.double()] * 2, [fk.double()] * 2, v.double())
    out = hla_triton([fq, fq], [fk, fk], v)
    assert float((out.double() - ref).norm() / ref.norm()) < (1e-5 if not CUDA else 2e-2)


def test_split_width_untied_and_single_factor():
    """Mixed widths (5 padded, 17 = 1 + 16) untied and causal; one factor of width 33."""
    _compare(2, True, n=29, widths=(5, 17), seed=32)
    _compare(1, False, n=29, widths=(33,), seed=33)


def test_32_wide_factors_run_zero_padded_to_64_where_the_gpu_kernels_failed(monkeypatch):
    """Non-causal M = 2 with a 32-wide factor and dv >= 64 gave NaN/Inf or wrong rows on an H200
    (session 11): such factors are zero-padded to 64 (exact), here and in the split's parts."""
    from hla_analysis.ops.triton.state import autograd as state_autograd

    widths = []
    real = state_autograd.compute_states

    def spy(f1, f2, *args, **kwargs):
        widths.append((f1.shape[-1], None if f2 is None else f2.shape[-1]))
        return real(f1, f2, *args, **kwargs)

    monkeypatch.setattr(state_autograd, "compute_states", spy)  # every state path calls it there
    qs, ks, v = _inputs(2, 23, (64, 32), 64, seed=81)
    out = hla_triton(qs, ks, v)
    assert widths == [(64, 64)]
    ref = hla_attention_output([t.detach().double() for t in qs], [t.detach().double() for t in ks],
                               v.detach().double())
    assert float((out.detach().double() - ref).norm() / ref.norm()) < (1e-5 if not CUDA else 2e-2)
    grads = torch.autograd.grad(out.sum(), [*qs, *ks])
    assert [tuple(g.shape) for g in grads] == [tuple(t.shape) for t in (*qs, *ks)]  # the padding is cut off again
    widths.clear()
    hla_triton(qs, ks, v, causal=True)  # the causal kernels were right at 32: no padding
    assert widths and all(w == (64, 32) for w in widths)
    widths.clear()
    (q,), (k,), v16 = _inputs(1, 23, (33,), 16, seed=82)
    hla_triton([q, q], [k, k], v16)  # dv = 16: the 32-wide split part stays 32
    assert (32, 32) in widths, widths


# ---- tied factors (M = 2, qs[0] == qs[1], ks[0] == ks[1]): symmetric-state kernels ----

def _compare_tied(causal, *, n, r, dv=16, mask=False, seed=0, config=None, clone=False, tol=1e-5):
    """Tied Triton output and gradients against the fp64 reference ``hla([q, q], [k, k], v)``."""
    (q,), (k,), v = _inputs(1, n, (r,), dv, seed=seed)
    kpm = None
    if mask:
        kpm = torch.rand(1, 1, n, generator=torch.Generator().manual_seed(seed + 1)) > 0.3
        kpm[..., 0] = True
        kpm = kpm.to(DEVICE)
    qs = [q, q.detach().clone().requires_grad_()] if clone else [q, q]
    ks = [k, k.detach().clone().requires_grad_()] if clone else [k, k]
    out = hla_triton(qs, ks, v, causal=causal, key_padding_mask=kpm, config=config, tied=True)
    grad_out = torch.randn_like(out)
    leaves = [*qs, *ks, v] if clone else [q, k, v]
    grads = torch.autograd.grad(out, leaves, grad_out)

    ref_in = [t.detach().double().requires_grad_() for t in leaves]
    if clone:  # untied reference: each factor its own leaf
        ref = hla_attention_output(ref_in[:2], ref_in[2:4], ref_in[4], causal=causal, key_padding_mask=kpm)
    else:
        ref = hla_attention_output([ref_in[0]] * 2, [ref_in[1]] * 2, ref_in[2], causal=causal, key_padding_mask=kpm)
    ref_grads = torch.autograd.grad(ref, ref_in, grad_out.double())
    for i, (got, want) in enumerate(zip([out, *grads], [ref, *ref_grads])):
        assert torch.isfinite(got).all(), i
        err = float((got.detach().double() - want.detach()).norm() / want.detach().norm())
        assert err < tol, f"output/grad {i}: relative error {err:.2e} >= {tol}"
    if kpm is not None:
        padded = ~kpm.expand_as(v[..., 0])
        assert grads[-2][padded].abs().max() == 0  # key gradient
        assert grads[-1][padded].abs().max() == 0  # value gradient


@pytest.fixture
def tied_calls(monkeypatch):
    """Counts launches of the tied state builder, to prove which path ran."""
    from hla_analysis.ops.triton.tied import autograd as autograd_tied

    calls = []
    real = autograd_tied.compute_sym_states

    def spy(*args, **kwargs):
        calls.append(kwargs.get("mode"))
        return real(*args, **kwargs)

    monkeypatch.setattr(autograd_tied, "compute_sym_states", spy)
    return calls


@pytest.mark.parametrize("causal", [False, True])
def test_tied_matches_reference_with_gradients(causal, tied_calls):
    # N = 45: ragged against the 16-row blocks and 32-token chunks; r = 32 folds 17 rows
    _compare_tied(causal, n=45, r=32, seed=20 + causal)
    assert tied_calls == (["prefix", "suffix"] if causal else ["total", "total"])


def test_tied_padding_mask_and_equal_but_distinct_factors(tied_calls):
    _compare_tied(False, n=37, r=16, mask=True, seed=22)
    # clones: recognised by torch.equal; each factor gets its own (half) gradient
    _compare_tied(True, n=53, r=16, mask=True, seed=23, clone=True)
    assert len(tied_calls) == 4


def test_tied_mixed_tiles_splits_and_state_schedules(tied_calls):
    # state tiles of 2 folded rows, apply/grad tiles of 1: one state padded for both
    _compare_tied(False, n=70, r=16, seed=24, config=dict(STATE_BLOCK_C=32, SPLITS=3))
    _compare_tied(True, n=75, r=16, seed=25, config=dict(CAUSAL_STATE="sequential", GRAD_BLOCK_C=32))
    _compare_tied(True, n=75, r=16, seed=26, config=dict(CAUSAL_STATE="parallel", APPLY_BLOCK_C=32))
    assert len(tied_calls) == 6


def test_tied_detection_and_forcing(tied_calls, monkeypatch):
    import hla_analysis.ops.triton as hla_ops_triton

    (q,), (k,), v = _inputs(1, 24, (16,), 16, seed=27)
    q2 = torch.rand_like(q)
    from hla_analysis.ops.triton import factors_tied

    assert factors_tied([q, q], [k, k]) and factors_tied([q, q.clone()], [k, k])
    assert not factors_tied([q, q2], [k, k]) and not factors_tied([q], [k])
    tied = hla_triton([q, q], [k, k], v, causal=True, tied=True)
    assert tied_calls == ["prefix"]
    untied = hla_triton([q, q], [k, k], v, causal=True)  # TIED_BY_DEFAULT is off: untied kernels
    assert tied_calls == ["prefix"]
    torch.testing.assert_close(tied, untied, atol=1e-5, rtol=1e-4)
    with pytest.raises(ValueError, match="tied=True needs"):
        hla_triton([q, q2], [k, k], v, tied=True)
    monkeypatch.setattr(hla_ops_triton, "TIED_BY_DEFAULT", True)  # detection, through hla()
    # At N = 24 the cost model sends CUDA inputs to the quadratic kernel; this test is about
    # the state path's tied detection, so price the quadratic path out.
    from hla_analysis.ops import quadratic_dispatch

    monkeypatch.setattr(quadratic_dispatch, "quadratic_flops", lambda *a, **kw: float("inf"))
    from hla_analysis.ops.hla import clear_verdicts

    clear_verdicts()  # a verdict cached by an earlier test would skip the patched cost model
    via_hla = hla([q, q.clone()], [k, k], v, backend="triton")
    assert tied_calls == ["prefix", "total"]
    torch.testing.assert_close(via_hla, hla([q, q], [k, k], v, backend="torch"), atol=1e-5, rtol=1e-4)
    hla_triton([q, q2], [k, k], v)  # untied factors: untied kernels
    assert len(tied_calls) == 2


def test_tied_normaliser_on_its_own():
    """All-ones values: every row must come out 1 (numerator == normaliser)."""
    (q,), (k,), _ = _inputs(1, 41, (16,), 16, seed=28)
    ones = torch.ones(1, 2, 41, 16, device=DEVICE)
    for causal in (False, True):
        out = hla_triton([q, q], [k, k], ones, causal=causal)
        torch.testing.assert_close(out, torch.ones_like(out), atol=1e-5, rtol=1e-5)


@triton.jit
def _dump_sym_tiles(x_ptr, out_ptr, N, R: tl.constexpr, BT: tl.constexpr, TP: tl.constexpr, ROWS: tl.constexpr):
    rows = tl.arange(0, ROWS)
    ok = rows < N
    for t0 in range(0, TP, BT):
        tile = _sym_tile(x_ptr, rows, ok, t0, R, BT, ROWS)
        cols = t0 * R + tl.arange(0, BT * R)
        tl.store(out_ptr + rows[:, None] * (TP * R) + cols[None, :], tile, mask=ok[:, None])


@pytest.mark.parametrize("r,block_c", [(16, 16), (16, 32), (32, 64)])
def test_symmetric_tile_is_the_packed_square(r, block_c):
    """The on-chip tile, dumped by a tiny kernel: sym(q).sym(k) == (q.k)^2, and its entries
    are those of symmetric_power_features (up to order) plus zero padding."""
    from hla_analysis.ops.tied import symmetric_power_features
    from hla_analysis.ops.triton.tied.autograd import folded_rows

    bt, tp = folded_rows(r, block_c)
    x = torch.randn(5, r, generator=torch.Generator().manual_seed(r), dtype=torch.float32).to(DEVICE)
    packed = torch.zeros(5, tp * r, device=DEVICE)
    _dump_sym_tiles[(1,)](x, packed, 5, R=r, BT=bt, TP=tp, ROWS=8)
    want = symmetric_power_features(x.double(), 2)
    assert want.shape[-1] == r * (r + 1) // 2
    assert int((packed[0] != 0).sum()) == r * (r + 1) // 2  # random x: no accidental zeros
    nonzero = packed.double()[:, packed[0] != 0]
    torch.testing.assert_close(nonzero.sort(-1).values, want.sort(-1).values, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(packed.double() @ packed.double().T, (x.double() @ x.double().T) ** 2,
                               atol=1e-4, rtol=1e-5)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="bf16 kernels need CUDA")
@pytest.mark.parametrize("r,causal,n", [(64, False, 1000), (64, True, 2100), (32, True, 777), (128, False, 900)])
def test_tied_bf16_on_gpu(r, causal, n):
    (q,), (k,), v = _inputs(1, n, (r,), 128, seed=n, dtype=torch.bfloat16, lead=(2, 3))
    out = hla_triton([q, q], [k, k], v, causal=causal, tied=True)
    grads = torch.autograd.grad(out, [q, k, v], torch.ones_like(out))
    ref_in = [t.detach().double().requires_grad_() for t in [q, k, v]]
    ref = hla_attention_output([ref_in[0]] * 2, [ref_in[1]] * 2, ref_in[2], causal=causal)
    ref_grads = torch.autograd.grad(ref, ref_in, torch.ones_like(ref))
    for got, want in zip([out, *grads], [ref, *ref_grads]):
        assert float((got.detach().double() - want.detach()).norm() / want.detach().norm()) < 2e-2


# ---- variants on CUDA take the fused kernels (issue 10, items 2 and 4) ----

@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="bf16 kernels need CUDA")
@pytest.mark.parametrize("spec,d", [("hla:m=2,phi=affine", 64), ("hla:m=2,phi=affine", 128),
                                    ("hla:m=2,phi=affine,proj=1", 64), ("hla:m=2,phi=affine,tied=0", 64),
                                    ("linear:phi=elu1", 64), ("power:p=2", 64),
                                    ("hla:m=2,phi=exp", 32)])
@pytest.mark.parametrize("causal", [False, True])
def test_variants_fused_on_gpu(spec, d, causal):
    """make_variant(spec).forward on CUDA bf16 runs the Triton state path and matches fp64 torch."""
    from hla_analysis.ops import quadratic_dispatch
    from hla_analysis.variants import make_variant

    g = torch.Generator().manual_seed(d + causal)
    q, k, v = (torch.randn(2, 3, 700, d, generator=g) for _ in range(3))
    var = make_variant(spec).bind(d).to("cuda")
    gpu = [t.to("cuda", torch.bfloat16).requires_grad_() for t in (q, k, v)]
    signed = "tied=0" in spec  # untied affine factors are sign-indefinite: their sign check would refuse
    out = var.forward(*gpu, causal=causal, allow_signed=signed)
    assert quadratic_dispatch.last_dispatch.engine == "triton", quadratic_dispatch.last_dispatch
    grads = torch.autograd.grad(out, gpu, torch.ones_like(out))
    ref_in = [t.detach().double().requires_grad_() for t in gpu]
    var.double()
    ref = var.forward(*ref_in, causal=causal, backend="torch", allow_signed=signed)
    ref_grads = torch.autograd.grad(ref, ref_in, torch.ones_like(ref))
    # bf16 operands (eps 2^-8) summed over sign-indefinite terms: power:p=2 feeds raw q, k, so the
    # gradient sums cancel and their relative error grows (5.5e-2 seen on an H200 at 3e-2)
    tol = 1e-1 if spec.startswith("power") else 3e-2
    for got, want in zip([out, *grads], [ref, *ref_grads]):
        assert float((got.detach().double() - want.detach()).norm() / want.detach().norm()) < tol


def _feature_grad_terms(fq, fk, v, g, causal):
    """fp64 gradients of ``o = (W v) / (W 1)``, ``W = fq fk^T``, by the features, as the two
    terms the kernels compute separately and subtract: ``A`` (through the numerator,
    ``dnum = g / den``) and ``B`` (through the normaliser, ``dden = -(g . o) / den``)."""
    w = fq @ fk.transpose(-1, -2)
    keep = torch.ones_like(w).tril() if causal else torch.ones_like(w)
    w = w * keep
    den = w.sum(-1)
    o = (w @ v) / den[..., None]
    dnum = g / den[..., None]
    dden = -(g * o).sum(-1) / den
    ca = (dnum @ v.transpose(-1, -2)) * keep  # d loss / d w_ij through the numerator
    cb = dden[..., None] * keep  # through the normaliser
    return dict(dq=(ca @ fk, cb @ fk), dk=(ca.transpose(-1, -2) @ fq, cb.transpose(-1, -2) @ fq),
                dv=(w.transpose(-1, -2) @ dnum, torch.zeros_like(v)))


@pytest.mark.parametrize("causal", [False, True])
def test_hedgehog_fused_against_the_same_features(causal):
    """``linear:phi=hedgehog`` through the fused kernel, compared where the kernel works: on the
    features it is given (bf16 on CUDA, fp32 under the interpreter) against fp64 on the same
    feature values. Hedgehog's features are softmax outputs, nearly uniform over 2d entries, so
    the feature gradients are small differences ``A + B`` of two larger terms that the kernel
    computes separately (numerator and normaliser paths): the tolerance is the dtype's rounding
    times that cancellation, ``8 eps (|A| + |B|) / |A + B|``, computed from the fp64 terms.

    (On the H200 the q/k gradients through the bf16 feature map itself missed 3e-2 by 0.16 and
    0.043: torch's bf16 softmax backward of ``[softmax(z), softmax(-z)]`` cancels too, and that is
    the feature map's arithmetic, not the kernel's.)
    """
    from hla_analysis.ops import quadratic_dispatch
    from hla_analysis.variants import make_variant

    dtype = torch.bfloat16 if CUDA else torch.float32
    n, d = (700, 64) if CUDA else (45, 16)
    g = torch.Generator().manual_seed(d + causal)
    q, k, v = (torch.randn(2, 3, n, d, generator=g) for _ in range(3))
    var = make_variant("linear:phi=hedgehog").bind(d).to(DEVICE)
    with torch.no_grad():
        (fq,), (fk,) = var.features(q.to(DEVICE, dtype), k.to(DEVICE, dtype))
    leaves = [fq.detach().requires_grad_(), fk.detach().requires_grad_(), v.to(DEVICE, dtype).requires_grad_()]
    out = hla([leaves[0]], [leaves[1]], leaves[2], causal=causal, backend="triton")
    assert quadratic_dispatch.last_dispatch.engine == "triton", quadratic_dispatch.last_dispatch
    grad_out = torch.randn(out.shape, generator=g).to(DEVICE, dtype)
    grads = torch.autograd.grad(out, leaves, grad_out)
    ref_in = [t.detach().double().requires_grad_() for t in leaves]
    ref = hla_attention_output([ref_in[0]], [ref_in[1]], ref_in[2], causal=causal)
    ref_grads = torch.autograd.grad(ref, ref_in, grad_out.double())
    terms = _feature_grad_terms(*(t.detach() for t in ref_in), grad_out.double(), causal)
    eps = torch.finfo(dtype).eps
    checks = [("out", out, ref.detach(), 1.0)]
    for name, got, want in zip(("dq", "dk", "dv"), grads, ref_grads):
        a, b = terms[name]
        torch.testing.assert_close(a + b, want, rtol=1e-9, atol=1e-12)  # the split is the gradient
        checks.append((name, got, want, float((a.norm() + b.norm()) / want.norm())))
    for name, got, want, kappa in checks:
        err = float((got.detach().double() - want).norm() / want.norm())
        tol = 8 * eps * max(kappa, 1.0)
        assert err < tol, f"{name}: relative error {err:.2e} >= {tol:.2e} (cancellation {kappa:.1f})"


def test_public_checks_on_the_kernel_path():
    """hla(backend="triton") keeps every refusal: NaN input, overflowed output (plain and split
    widths), signed features; the normaliser/output check comes from the kernel's vector."""
    g = torch.Generator().manual_seed(40)
    qs = [(torch.rand(1, 2, 20, 16, generator=g) + 0.1).to(DEVICE) for _ in range(4)]
    v = torch.randn(1, 2, 20, 16, generator=g).to(DEVICE)
    torch.testing.assert_close(hla(qs[:2], qs[2:], v, backend="triton"),
                               hla(qs[:2], qs[2:], v, backend="torch"), atol=1e-5, rtol=1e-4)
    huge = v.clone()
    huge[..., 3, :] = 3e38
    with pytest.raises(ValueError, match="overflowed to Inf/NaN although every input is finite"):
        hla(qs[:2], qs[2:], huge, backend="triton")
    wide = [torch.cat([q, q[..., :1]], -1) for q in qs]  # width 17: the split path
    with pytest.raises(ValueError, match="overflowed to Inf/NaN although every input is finite"):
        hla(wide[:2], wide[2:], huge, backend="triton")
    nan = v.clone()
    nan[0, 0, 5, 2] = float("nan")
    with pytest.raises(ValueError, match="v contains 1 NaN/Inf"):
        hla(qs[:2], qs[2:], nan, backend="triton")
    signed = [q.clone() for q in qs]
    signed[0][0, 1, 3, 3] = -5.0
    with pytest.raises(ValueError, match="can give negative attention weights"):
        hla(signed[:2], signed[2:], v, backend="triton")
    assert torch.isfinite(hla(signed[:2], signed[2:], v, backend="triton", allow_signed=True)).all()


# ---- every refusal on the fused path, from the kernels' row flags (issue 10, item 1) ----

def _positive(m, n=40, r=16, dv=16, *, seed, lead=(1, 2)):
    g = torch.Generator().manual_seed(seed)
    qs = [(torch.rand(*lead, n, r, generator=g) + 0.1).to(DEVICE) for _ in range(m)]
    ks = [(torch.rand(*lead, n, r, generator=g) + 0.1).to(DEVICE) for _ in range(m)]
    v = torch.randn(*lead, n, dv, generator=g).to(DEVICE)
    return qs, ks, v


@pytest.mark.parametrize("m", [1, 2])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("where", ["qs", "ks", "v"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_fused_refuses_nan_inf_inputs_and_names_them(m, causal, where, bad):
    qs, ks, v = _positive(m, seed=50 + m)
    target = {"qs": qs[-1], "ks": ks[-1], "v": v}[where]
    target[0, 1, 7, 3] = bad
    name = "v" if where == "v" else f"{where}[{m - 1}]"
    for _ in range(2):  # the second call takes the cached verdict: the same refusal
        with pytest.raises(ValueError, match=re.escape(name) + " contains 1 NaN/Inf"):
            hla(qs, ks, v, causal=causal, backend="triton")


@pytest.mark.parametrize("m", [1, 2])
@pytest.mark.parametrize("causal", [False, True])
def test_fused_refuses_zero_and_negative_normalisers(m, causal):
    qs, ks, v = _positive(m, seed=60 + m)
    zero = [q.clone() for q in qs]
    zero[0][0, 0, 5] = 0.0  # a query row with all-zero features: normaliser exactly 0
    with pytest.raises(ValueError, match=r"1 of 80 row\(s\) have a zero or negative normalizer .*\(1 exactly zero\)"):
        hla(zero, ks, v, causal=causal, backend="triton")
    neg = [q.clone() for q in qs]
    neg[0][0, 1, 9] = -neg[0][0, 1, 9]  # a negative query row: negative normaliser
    with pytest.raises(ValueError, match="zero or negative normalizer"):
        hla(neg, ks, v, causal=causal, backend="triton")
    out = hla(neg, ks, v, causal=causal, backend="triton", allow_signed=True)
    torch.testing.assert_close(out, hla(neg, ks, v, causal=causal, backend="torch", allow_signed=True),
                               atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("side", ["query", "key"])
@pytest.mark.parametrize("m", [1, 2])
def test_fused_refuses_signed_features_under_positive_normalisers(side, m):
    """One negative feature (query side: the apply kernel's flag; key side: sign_kernel) while
    every normaliser stays positive: the weights may be negative, so the call is refused."""
    qs, ks, v = _positive(m, seed=70 + m)
    factors = qs if side == "query" else ks
    factors[-1][0, 1, 3, 2] = -0.01
    with pytest.raises(ValueError, match="can give negative attention weights"):
        hla(qs, ks, v, backend="triton")
    out = hla(qs, ks, v, backend="triton", allow_signed=True)
    torch.testing.assert_close(out, hla_attention_output(qs, ks, v), atol=1e-5, rtol=1e-4)
    # tied factors (the same objects) multiply to squares: no certificate needed
    if m == 1:
        assert torch.isfinite(hla([qs[0], qs[0]], [ks[0], ks[0]], v, backend="triton")).all()


def test_fused_signs_of_padded_keys_and_masked_rows():
    qs, ks, v = _positive(2, seed=80)
    kpm = torch.ones(1, 1, 40, dtype=torch.bool, device=DEVICE)
    kpm[..., 0] = False
    empty = torch.zeros_like(kpm)
    with pytest.raises(ValueError, match="leaves .* query row\\(s\\) with no key"):
        hla(qs, ks, v, key_padding_mask=empty, backend="triton")
    out = hla(qs, ks, v, key_padding_mask=kpm, backend="triton")
    torch.testing.assert_close(out, hla_attention_output(qs, ks, v, key_padding_mask=kpm), atol=1e-5, rtol=1e-4)
    with pytest.raises(ValueError, match="leaves .* query row\\(s\\) with no key"):  # cached verdict, fresh value check
        hla(qs, ks, v, key_padding_mask=empty, backend="triton")


@pytest.mark.parametrize("m", [1, 2])
@pytest.mark.parametrize("causal", [False, True])
def test_fused_refuses_output_overflow_from_finite_inputs(m, causal):
    qs, ks, v = _positive(m, seed=90 + m)
    huge = v.clone()
    huge[..., 3:6, :] = 3e38
    with pytest.raises(ValueError, match="overflowed to Inf/NaN although every input is finite"):
        hla(qs, ks, huge, causal=causal, backend="triton")
    with pytest.raises(ValueError, match="overflowed to Inf/NaN although every input is finite"):
        hla(qs, ks, huge, causal=causal, backend="triton", allow_signed=True)


def test_fused_no_autograd_node_without_grad_and_one_verdict_per_key():
    from hla_analysis.ops.hla import _VERDICTS, clear_verdicts

    qs, ks, v = _positive(2, seed=95)
    leaves = [t.requires_grad_() for t in (*qs, *ks, v)]
    clear_verdicts()
    with torch.no_grad():
        out = hla(qs, ks, v, backend="triton")
    assert out.grad_fn is None and len(_VERDICTS) == 1
    with torch.no_grad():
        again = hla(qs, ks, v, backend="triton")
    assert len(_VERDICTS) == 1
    torch.testing.assert_close(out, again, atol=0, rtol=0)
    with_grad = hla(qs, ks, v, backend="triton")  # grad enabled: its own verdict (costs differ)
    assert with_grad.grad_fn is not None and len(_VERDICTS) == 2
    torch.testing.assert_close(with_grad.detach(), out, atol=0, rtol=0)
    grads = torch.autograd.grad(with_grad.sum(), leaves)
    assert all(torch.isfinite(g).all() for g in grads)


def test_fused_checks_cost_one_host_read(monkeypatch):
    """A clean call reads its flags with one .item() (no .tolist(), no other sync)."""
    from hla_analysis import _checks

    qs, ks, v = _positive(2, seed=96)
    reads = []
    real = _checks.CheckBatch.resolve

    def counting(self):
        reads.append(len(self.values))
        return real(self)

    monkeypatch.setattr(_checks.CheckBatch, "resolve", counting)
    for signs in (False, True):
        q = [qs[0], qs[0]] if not signs else qs
        k = [ks[0], ks[0]] if not signs else ks
        # form="contract" pins the state path: on CUDA the cost model picks the quadratic
        # kernel at this small N, whose torch reductions (normalisers, output, signs) share the
        # one read as 3 and 7 values (session 6, H200)
        hla(q, k, v, backend="triton", form="contract")
    assert reads == [1, 1]  # one flag vector (key signs in its tail), one amin, one value read


@pytest.mark.parametrize("causal", [False, True])
def test_split_width_checks_rows_in_its_last_apply_with_one_read(causal, monkeypatch):
    """Width 17 (split into parts): the last part's apply adds the others, divides and flags each
    row, so a clean call reads one value once, and a zero or an overflowed row is still refused."""
    from hla_analysis import _checks

    qs, ks, v = _positive(1, r=17, seed=97 + causal)
    q, k = qs[0], ks[0]
    reads = []
    real = _checks.CheckBatch.resolve

    def counting(self):
        reads.append(len(self.values))
        return real(self)

    monkeypatch.setattr(_checks.CheckBatch, "resolve", counting)
    # contract / chunked pin the state path: on CUDA the cost model picks the quadratic kernel at
    # this small N, whose torch reductions share the read as 3 values (session 11, H200)
    out = hla([q, q], [k, k], v, causal=causal, backend="triton", form="chunked" if causal else "contract")
    assert reads == [1]  # the flag vector's amin: no torch pass over the normalisers or the output
    ref = hla_attention_output([q.double()] * 2, [k.double()] * 2, v.double(), causal=causal)
    assert float((out.double() - ref).norm() / ref.norm()) < (1e-5 if not CUDA else 2e-2)
    zero = q.clone()
    zero[0, 0, 5] = 0.0  # a query row with all-zero features: every part's normaliser is 0 there
    with pytest.raises(ValueError, match=r"1 of 80 row\(s\) have a zero or negative normalizer .*\(1 exactly zero\)"):
        hla([zero, zero], [k, k], v, causal=causal, backend="triton")
    huge = v.clone()
    huge[..., 3, :] = 3e38
    with pytest.raises(ValueError, match="overflowed to Inf/NaN although every input is finite"):
        hla([q, q], [k, k], huge, causal=causal, backend="triton")


def test_narrowing_cast_that_overflows_is_refused():
    """A result finite in the compute dtype that overflows in the caller's dtype is an error
    (bf16 rounds 65504 up to 65536, which is Inf in fp16)."""
    from hla_analysis.ops.triton.dtypes import narrowed

    ok = torch.tensor([1.0, -65504.0])
    assert narrowed(ok, torch.float16).dtype == torch.float16
    with pytest.raises(ValueError, match="1 of 2 output value.*overflowed to Inf when cast to torch.float16"):
        narrowed(torch.tensor([1.0, 65536.0], dtype=torch.bfloat16), torch.float16)
    # inf that was already inf is not the cast's doing
    assert torch.isinf(narrowed(torch.tensor([float("inf")]), torch.float16)).all()


@pytest.mark.skipif(CUDA or os.environ.get("TRITON_INTERPRET") != "1", reason="the interpreter's dtypes")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("m, form", [(1, "auto"), (2, "auto"), (3, "quadratic")])
def test_half_precision_inputs_run_in_fp32_under_the_interpreter(dtype, m, form):
    """The interpreter's bf16 dots are wrong (and fp16 ran as bf16): half inputs are computed in
    fp32 there and rounded once to their dtype at the end."""
    from hla_analysis.ops import hla_attention_output

    g = torch.Generator().manual_seed(3)
    q, k = (torch.rand(2, 24, 16, generator=g).to(dtype) for _ in range(2))
    v = torch.randn(2, 24, 16, generator=g).to(dtype)
    out = hla([q] * m, [k] * m, v, backend="triton" if form == "auto" else "auto", form=form)
    want = hla_attention_output([q.double()] * m, [k.double()] * m, v.double())
    eps = torch.finfo(dtype).eps
    # one rounding to the output dtype, plus fp32 sums of 24 terms (far below eps of fp16/bf16)
    assert out.dtype == dtype
    assert ((out.double() - want).abs() <= eps * want.abs() + eps * want.abs().max()).all()
