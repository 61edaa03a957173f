"""Fault cases of the reliability audit (issue 16), one section per class.

Each test failed before its fix. Store, resume and compare faults live in
test_faults_store.py and test_faults_compare.py.
"""

import subprocess
import sys

import pytest
import torch
from torch.overrides import TorchFunctionMode

from hla_analysis._checks import checks_disabled
from hla_analysis.cli import main
from hla_analysis.ops import hla, linear_attention, softmax_attention_map, softmax_attention_output
from hla_analysis.variants import make_variant


def rand(*shape, gen=None, dtype=torch.float64):
    return torch.rand(*shape, generator=gen, dtype=dtype) + 0.1


# -- silent numbers ------------------------------------------------------------------------


@pytest.mark.parametrize("form", ["contract", "recurrent", "chunked", "value_modulation"])
def test_s1_output_overflow_from_finite_inputs_is_refused(form):
    q, k = rand(8, 4, dtype=torch.float32), rand(8, 4, dtype=torch.float32)
    v = torch.full((8, 3), 3e38)
    with pytest.raises(ValueError, match="overflowed to Inf/NaN although every input is finite"):
        hla([q], [k], v, form=form)
    with pytest.raises(ValueError, match="overflowed"):
        linear_attention(q, k, v)
    softmax_attention_output(q, k, v)  # a convex combination of finite v cannot overflow
    with pytest.raises(ValueError, match="overflowed"):
        make_variant("linear:phi=elu1").forward(q, k, v)


def signed_inputs():
    gen = torch.Generator().manual_seed(0)
    return torch.randn(16, 8, generator=gen) * 1.5, torch.randn(16, 8, generator=gen) * 1.5


def test_s2_negative_weights_under_a_positive_normalizer_are_refused():
    q, k = signed_inputs()
    var = make_variant("hla:m=3,phi=affine")
    weights, den = var.weights(q, k)
    assert (weights < 0).any() and (den > 0).all()  # the case: positive rows with negative entries
    with pytest.raises(ValueError, match="negative weights.*allow_signed=True"):
        var.attention_map(q, k)
    signed = var.attention_map(q, k, allow_signed=True)
    torch.testing.assert_close(signed, weights / den)


def test_s2_hla_output_from_possibly_signed_weights_needs_allow_signed():
    q, k = signed_inputs()
    v = torch.randn(16, 3)
    var = make_variant("hla:m=3,phi=affine")
    with pytest.raises(ValueError, match="negative attention weights.*allow_signed=True"):
        var.forward(q, k, v)
    out = var.forward(q, k, v, allow_signed=True)
    weights, den = var.weights(q, k)
    # float32 sums of 16 terms of size |w| |v|: a few eps of the largest term
    atol = 64 * torch.finfo(torch.float32).eps * float((weights.abs() / den.abs()).amax() * v.abs().amax())
    torch.testing.assert_close(out, (weights / den) @ v, atol=atol, rtol=0)
    # tied even powers are squares: no refusal, no allow_signed needed
    make_variant("hla:m=2,phi=affine").forward(q, k, v)


def test_s3_mask_with_more_leading_dims_than_inputs_is_refused():
    q, k, v = rand(8, 4), rand(8, 4), rand(8, 3)
    with pytest.raises(ValueError, match="more leading dims"):
        hla([q], [k], v, key_padding_mask=torch.ones(8, 8, dtype=torch.bool))
    with pytest.raises(ValueError, match="more leading dims"):
        softmax_attention_map(q, k, key_padding_mask=torch.ones(8, 8, dtype=torch.bool))
    with pytest.raises(ValueError, match="do not match"):
        hla([rand(1, 8, 4)], [rand(1, 8, 4)], rand(1, 8, 3), key_padding_mask=torch.ones(3, 8, dtype=torch.bool))


@pytest.mark.parametrize("spec", ["softmax", "linear:phi=elu1", "linear:phi=favor", "hla:m=2,phi=affine", "power:p=2"])
@pytest.mark.parametrize("scale", [0.0, -1.0, float("nan")])
def test_s4_zero_or_negative_scale_is_refused_everywhere(spec, scale):
    q, k, v = rand(6, 4), rand(6, 4), rand(6, 2)
    var = make_variant(spec)
    with pytest.raises(ValueError, match="scale must be a finite positive number"):
        var.attention_map(q, k, scale=scale)
    with pytest.raises(ValueError, match="scale must be a finite positive number"):
        var.forward(q, k, v, scale=scale)


# -- unclear errors ------------------------------------------------------------------------


def test_mixed_query_key_dtypes_name_the_fix():
    with pytest.raises(ValueError, match="float32 but k is torch.float64; cast both"):
        softmax_attention_map(rand(4, 2, dtype=torch.float32), rand(4, 2))
    with pytest.raises(ValueError, match="cast both"):
        hla([rand(4, 2, dtype=torch.float32)], [rand(4, 2)], rand(4, 1))


def test_zero_feature_width_is_named():
    for call in (
        lambda: softmax_attention_map(rand(4, 0), rand(4, 0)),
        lambda: hla([rand(4, 0)], [rand(4, 0)], rand(4, 1)),
        lambda: make_variant("hla:m=2").forward(rand(4, 0), rand(4, 0), rand(4, 1)),
    ):
        with pytest.raises(ValueError, match="feature width 0"):
            call()


def test_bad_mask_shapes_are_one_line_value_errors():
    q, v = rand(2, 4, 2), rand(2, 4, 1)
    with pytest.raises(ValueError, match="0-d"):
        hla([q], [q], v, key_padding_mask=torch.tensor(True))
    with pytest.raises(ValueError, match="0-d"):
        softmax_attention_map(q, q, key_padding_mask=torch.tensor(True))
    with pytest.raises(ValueError, match="do not match"):
        softmax_attention_map(q, q, key_padding_mask=torch.ones(3, 4, dtype=torch.bool))


# -- one host sync per call (issue 10, item 1) ----------------------------------------------


class CountSyncs(TorchFunctionMode):
    """Counts the calls that move a device value to the host."""

    NAMES = {"item", "tolist", "__bool__", "__int__", "__float__", "__index__", "equal"}

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if getattr(func, "__name__", "") in self.NAMES:
            self.calls.append(func.__name__)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("causal", [False, True])
def test_one_host_sync_per_call(causal):
    gen = torch.Generator().manual_seed(1)
    # widths differ: equal-shaped untied factors cost is_tied's torch.equal (form dispatch)
    q1, k1, q2, k2 = rand(2, 12, 4, gen=gen), rand(2, 12, 4, gen=gen), rand(2, 12, 3, gen=gen), rand(2, 12, 3, gen=gen)
    v = torch.randn(2, 12, 3, generator=gen, dtype=torch.float64)
    mask = torch.ones(2, 12, dtype=torch.bool)
    mask[1, 9:] = False
    x = torch.randn(2, 12, 8, generator=gen)
    for call in (
        lambda: hla([q1, q2], [k1, k2], v, causal=causal, key_padding_mask=mask),
        lambda: linear_attention(q1, k1, v, causal=causal),
        lambda: make_variant("hla:m=2,phi=affine").forward(x, x, x, causal=causal),
        lambda: make_variant("linear:phi=elu1").forward(x, x, x, causal=causal),
    ):
        with CountSyncs() as syncs:
            call()
        assert len(syncs.calls) <= 1, syncs.calls
        with checks_disabled(), CountSyncs() as syncs:
            call()
        assert not syncs.calls


@pytest.mark.parametrize("where", ["q", "k", "v", "masked_k", "masked_v", "last_k"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("causal", [False, True])
def test_nonfinite_inputs_still_caught_without_their_own_flag(where, bad, causal):
    gen = torch.Generator().manual_seed(2)
    q1, q2, k1, k2 = (rand(10, 3, gen=gen) for _ in range(4))
    v = torch.randn(10, 2, generator=gen, dtype=torch.float64)
    mask = torch.ones(10, dtype=torch.bool)
    mask[7:] = False
    target = {"q": (q2, 0), "k": (k2, 4), "v": (v, 5), "masked_k": (k1, 8), "masked_v": (v, 8), "last_k": (k2, 6)}
    tensor, row = target[where]
    tensor[row, 0] = bad
    name = {"q": "qs", "k": "ks", "masked_k": "ks", "last_k": "ks"}.get(where, "v")
    for form in ("contract", "recurrent", "chunked", "value_modulation"):
        if causal and form == "contract":
            continue
        with pytest.raises(ValueError, match=f"{name}.*NaN/Inf"):
            hla([q1, q2], [k1, k2], v, causal=causal, key_padding_mask=mask, form=form, chunk_size=3)


@pytest.mark.parametrize("spec", ["linear:phi=relu", "linear:phi=elu1", "linear:phi=favor", "hla:m=2,phi=affine"])
def test_variant_forward_catches_inf_hidden_by_the_feature_map(spec):
    q = torch.randn(6, 4)
    q[2, 1] = -float("inf")  # relu(-inf) = 0, elu(-inf) + 1 = 0: finite features
    with pytest.raises(ValueError, match="q contains 1 NaN/Inf"):
        make_variant(spec).forward(q, q.nan_to_num(neginf=0.0), torch.randn(6, 2))


# -- CLI -----------------------------------------------------------------------------------


def test_cli_failure_is_one_line_and_exit_1(capsys):
    code = main(["capture", "--model", "minilm", "--device", "bogus", "--out", "/nonexistent/dir/x"])
    err = capsys.readouterr().err
    assert code == 1
    # a user's mistake: its one line says what to fix, with no pointer to a traceback
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1 and "--debug" not in err


def test_cli_unexpected_failure_points_at_debug(capsys, monkeypatch):
    """A failure that is not a user's mistake (here a RuntimeError inside a command) is one line
    naming its type, and points at --debug for the traceback."""
    import hla_analysis.cli.variants as variants_cli

    def broken(args):
        raise RuntimeError("something inside broke")

    monkeypatch.setattr(variants_cli, "run", broken)
    code = main(["variants"])
    err = capsys.readouterr().err
    assert code == 1 and "Traceback" not in err
    assert "RuntimeError: something inside broke" in err and "--debug" in err


def test_cli_bad_usage_exits_2():
    proc = subprocess.run([sys.executable, "-m", "hla_analysis.cli", "compare", "--no-such-flag"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr


def test_cli_debug_shows_the_traceback():
    with pytest.raises(Exception):
        main(["--debug", "capture", "--model", "minilm", "--device", "bogus", "--out", "/nonexistent/dir/x"])


# -- packaging -----------------------------------------------------------------------------


def test_figure_csvs_stay_small_and_say_when_sampled():
    from pathlib import Path

    import pandas as pd

    from hla_analysis.report import sample_scatter

    figures = Path(__file__).resolve().parents[1] / "figures"
    for csv in figures.rglob("*.csv"):
        assert csv.stat().st_size < 1_000_000, f"{csv} is {csv.stat().st_size} bytes; sample it (report.sample_scatter)"
    table = pd.DataFrame({"variant": ["a"] * 50 + ["b"] * 3, "score": range(53)})
    sampled = sample_scatter(table, points=10, seed=0)
    assert list(sampled.groupby("variant").size()) == [10, 3]
    assert set(sampled["sample"]) == {"10/50 seed 0", "3/3 seed 0"}
    assert sampled.equals(sample_scatter(table, points=10, seed=0))  # fixed seed: same rows
