"""The comparison runner on a real (small) MiniLM capture: complete, honest, resumable."""

import math

import pandas as pd
import pytest
import torch

import hla_analysis.compare as compare_module
from hla_analysis.capture import capture, load_capture
from hla_analysis.cli import main
from hla_analysis.compare import METRICS, load_results, resolve_variants, run_comparison, summarize
from hla_analysis.fit import FitConfig, fit_variant
from hla_analysis.metrics import head_metrics
from hla_analysis.swap.fits import load_fits
from hla_analysis.variants import list_variants, make_variant

FAST_FIT = FitConfig(steps=3)


@pytest.fixture(scope="module")
def small_capture(tmp_path_factory):
    # 3 packed inputs of 24 tokens: two fit, one held out... the default split takes 1
    out = tmp_path_factory.mktemp("cmp") / "cap"
    capture("minilm", out=out, num_inputs=3, max_tokens=24, progress=False)
    return out


@pytest.fixture(scope="module")
def default_results(small_capture, tmp_path_factory):
    out = tmp_path_factory.mktemp("res") / "results.parquet"
    return run_comparison(small_capture, out=out, variants="default", fit=FAST_FIT, progress=False), out


def test_table_has_every_variant_metric_head_and_input(default_results, small_capture):
    table, out = default_results
    cap = load_capture(small_capture)
    assert list(table.columns[:7]) == ["input", "layer", "head", "variant", "split", "metric", "value"]
    expected = cap.num_inputs * cap.num_layers * cap.num_heads * len(list_variants()) * len(METRICS)
    assert len(table) == expected
    assert set(table["variant"]) == set(list_variants())
    assert set(table["metric"]) == set(METRICS)
    assert not table.duplicated(["input", "layer", "head", "variant", "metric"]).any()
    # the file on disk is the same table; settings and fit logs sit beside it
    pd.testing.assert_frame_equal(load_results(out), table)
    assert out.with_name("results.fits.csv").exists() and out.with_name("results.settings.json").exists()
    assert not out.with_name("results.parquet.parts").exists()


def test_split_is_by_input_and_summary_uses_heldout_only(default_results):
    table, _ = default_results
    assert set(table.loc[table["input"] == 0, "split"]) == {"train"}
    assert set(table.loc[table["input"] > 0, "split"]) == {"heldout"}
    summary = summarize(table)
    held = table[(table["split"] == "heldout") & (table["metric"] == "kl_mean")]
    for variant in ("hla:m=2,phi=affine", "linear:phi=hedgehog"):
        assert summary.loc[variant, "kl_mean"] == pytest.approx(held[held["variant"] == variant]["value"].mean())
    assert summary.loc["softmax", "kl_mean"] == pytest.approx(0, abs=1e-6)
    assert summary.loc["linear:phi=hedgehog", "params_per_head"] == 32 * 32


def test_failures_are_counted_not_averaged(default_results):
    table, _ = default_results
    # identity features are sign-indefinite: real q.k < 0 rows give non-positive normalizers
    ident = table[table["variant"] == "linear:phi=identity"].pivot_table(
        index=["input", "layer", "head"], columns="metric", values="value", dropna=False
    )
    assert (ident["failed_fraction"] > 0).any()
    everything_failed = ident["failed_fraction"] == 1
    assert ident.loc[everything_failed, "kl_mean"].isna().all()
    assert ident.loc[~everything_failed, "kl_mean"].notna().all()
    # odd M with affine factors gives negative weights on real activations: flagged as well
    odd = table[(table["variant"] == "hla:m=3,phi=affine") & (table["metric"] == "failed_fraction")]
    assert odd["value"].max() > 0


def test_metrics_match_a_plain_full_matrix_computation(default_results, small_capture):
    table, _ = default_results
    cap = load_capture(small_capture)
    d = cap.get(2, 1)
    spec, head = "hla:m=4,phi=affine", 5
    p = make_variant("softmax").attention_map(d["q"][head], d["k"][head], scale=d["scale"])
    p_hat = make_variant(spec).attention_map(d["q"][head], d["k"][head], scale=d["scale"])
    scores = d["q"][head] @ d["k"][head].T * d["scale"]
    want = head_metrics(p, p_hat, v=d["v"][head], scores=scores)
    rows = table[(table["input"] == 1) & (table["layer"] == 2) & (table["head"] == head) & (table["variant"] == spec)]
    got = dict(zip(rows["metric"], rows["value"]))
    for name in ("kl_mean", "kl_max", "js_mean", "tv_mean", "frobenius_rel", "output_rel", "topk_recall_mean"):
        assert got[name] == pytest.approx(want[name], rel=1e-5, abs=1e-7), name


def test_fitting_reduces_training_loss_and_starts_from_the_tied_variant(small_capture):
    cap = load_capture(small_capture)
    d = cap.get(1, 0)
    batch = {k: d[k] for k in ("q", "k", "scale", "causal")}
    for spec in ("linear:phi=hedgehog", "hla:m=2,phi=affine,proj=1"):
        var = make_variant(spec).bind(cap.head_dim, heads=cap.num_heads)
        result = fit_variant(var, [batch], config=FitConfig(steps=15))
        assert result.final_loss < result.initial_loss
        assert len(result.losses) == 16
    tied = fit_variant(make_variant("hla:m=2,phi=affine").bind(cap.head_dim, heads=cap.num_heads), [batch])
    proj = fit_variant(make_variant("hla:m=2,phi=affine,proj=1").bind(cap.head_dim, heads=cap.num_heads), [batch],
                       config=FitConfig(steps=0))
    assert proj.initial_loss == pytest.approx(tied.initial_loss, rel=1e-6)


def test_fitting_is_deterministic(small_capture):
    cap = load_capture(small_capture)
    d = cap.get(0, 0)
    batch = {k: d[k] for k in ("q", "k", "scale", "causal")}
    runs = [
        fit_variant(make_variant("linear:phi=rebased").bind(cap.head_dim, heads=cap.num_heads), [batch],
                    config=FitConfig(steps=4)).losses
        for _ in range(2)
    ]
    assert runs[0] == runs[1]


def test_resume_after_interruption(small_capture, tmp_path, monkeypatch):
    variants = "softmax;hla:m=2,phi=affine"
    fresh = run_comparison(small_capture, out=tmp_path / "fresh.csv", variants=variants, fit=FAST_FIT, progress=False)
    real = compare_module._layer_rows
    calls = []
    crash_at = [3]

    def counting(cap, layer, *args, **kwargs):
        calls.append(layer)
        if layer in crash_at:
            raise KeyboardInterrupt
        return real(cap, layer, *args, **kwargs)

    monkeypatch.setattr(compare_module, "_layer_rows", counting)
    out = tmp_path / "resumed.csv"
    with pytest.raises(KeyboardInterrupt):
        run_comparison(small_capture, out=out, variants=variants, fit=FAST_FIT, progress=False)
    assert not out.exists()  # no half-written table that looks whole
    assert sorted(p.name for p in out.with_name("resumed.csv.parts").glob("layer_*")) == [
        f"layer_{i:03d}.parquet" for i in range(3)
    ]
    calls.clear()
    crash_at.clear()
    resumed = run_comparison(small_capture, out=out, variants=variants, fit=FAST_FIT, progress=False)
    assert calls == [3, 4, 5]  # finished layers were not recomputed
    pd.testing.assert_frame_equal(resumed.reset_index(drop=True), fresh.reset_index(drop=True))
    # a rerun with other settings refuses to mix in the old parts
    (out.with_name("resumed.csv.parts")).mkdir()
    compare_module.atomic_write_json(out.with_name("resumed.csv.parts") / "settings.json", {"key": "other"})
    with pytest.raises(ValueError, match="other settings"):
        run_comparison(small_capture, out=out, variants=variants, fit=FAST_FIT, progress=False)


def test_bad_input(small_capture, tmp_path):
    with pytest.raises(ValueError, match="unknown variant family 'flash'"):
        resolve_variants("softmax;flash")
    with pytest.raises(ValueError, match="no variants"):
        resolve_variants(" ; ")
    with pytest.raises(ValueError, match=".parquet or .csv"):
        run_comparison(small_capture, out=tmp_path / "r.json", progress=False)
    with pytest.raises(ValueError, match=r"train_inputs \(--train-inputs\) must be between 1 and 2"):
        run_comparison(small_capture, out=tmp_path / "r.csv", train_inputs=3, progress=False)
    with pytest.raises(FileNotFoundError, match="run `hla-analysis compare` first"):
        load_results(tmp_path / "missing.parquet")
    (tmp_path / "other.csv").write_text("a,b\n1,2\n")
    with pytest.raises(ValueError, match="not an hla-analysis results table"):
        load_results(tmp_path / "other.csv")


def test_cli_compare_and_summary(small_capture, tmp_path, capsys):
    out = tmp_path / "cli.parquet"
    rc = main(["compare", "--capture", str(small_capture), "--variants", "softmax", "hla:m=4,phi=affine",
               "--out", str(out), "--fit-steps", "2", "--quiet"])
    assert rc == 0 and out.exists()
    assert main(["summary", str(out)]) == 0
    text = capsys.readouterr().out
    assert "hla:m=4,phi=affine" in text and "held-out" in text
    assert main(["compare", "--capture", str(small_capture), "--variants", "hla:m=zero", "--out", str(out)]) == 1
    assert "must be int" in capsys.readouterr().err
    assert not math.isnan(summarize(load_results(out)).loc["hla:m=4,phi=affine", "kl_mean"])


def test_cli_errors_are_one_line(small_capture, tmp_path, capsys):
    assert main(["summary", str(small_capture)]) == 1  # a directory, not a table
    assert "no results table" in capsys.readouterr().err
    notes = tmp_path / "notes.md"
    notes.write_text("# not a table\n")
    assert main(["summary", str(notes)]) == 1
    assert "not a results table" in capsys.readouterr().err
    broken = tmp_path / "broken.parquet"
    broken.write_bytes(b"PAR1 garbage")
    assert main(["summary", str(broken)]) == 1
    assert "cannot read" in capsys.readouterr().err
    # demo refuses bad settings before it spends time capturing
    assert main(["demo", "--out", str(tmp_path / "d"), "--variants", "flash", "--quiet"]) == 1
    assert "unknown variant family 'flash'" in capsys.readouterr().err
    assert not (tmp_path / "d" / "capture").exists()


def test_stacking_inputs_does_not_change_numbers(small_capture, tmp_path, monkeypatch):
    variants = "softmax;hla:m=2,phi=affine;linear:phi=elu1"
    stacked = run_comparison(small_capture, out=tmp_path / "a.csv", variants=variants, fit=FAST_FIT, progress=False)
    monkeypatch.setattr(compare_module, "_MAP_ELEMENTS", 1)  # forces one input per evaluation
    single = run_comparison(small_capture, out=tmp_path / "b.csv", variants=variants, fit=FAST_FIT, progress=False)
    pd.testing.assert_frame_equal(stacked, single, rtol=1e-5, atol=1e-7)


def test_helper_processes_give_the_same_table(small_capture, tmp_path, monkeypatch):
    """Layers split over helper processes give this process's table, bit for bit, at one thread each."""
    variants = "softmax;hla:m=2,phi=affine,proj=1;linear:phi=elu1"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # both runs then reduce in the same order (one thread per process)
    try:
        alone = run_comparison(small_capture, out=tmp_path / "alone.parquet", variants=variants, fit=FAST_FIT,
                               progress=False, workers=1)
        real_claim, mine = compare_module._claim, []

        def evens_only(parts, layer):  # this process takes even layers: the helper must do the odd ones
            if layer % 2 or not real_claim(parts, layer):
                return False
            mine.append(layer)
            return True

        monkeypatch.setattr(compare_module, "_claim", evens_only)
        split = run_comparison(small_capture, out=tmp_path / "split.parquet", variants=variants, fit=FAST_FIT,
                               progress=False, workers=2)
    finally:
        torch.set_num_threads(threads)
    assert mine == [0, 2, 4] and sorted(split["layer"].unique()) == list(range(6))
    pd.testing.assert_frame_equal(alone, split)
    fits = [load_fits(compare_module.fits_path(tmp_path / f"{name}.parquet")) for name in ("alone", "split")]
    assert fits[0].keys() == fits[1].keys() and len(fits[0]) > 0
    assert all(torch.equal(fits[0][key], fits[1][key]) for key in fits[0])
    assert not (tmp_path / "split.parquet.parts").exists()


def test_a_helpers_error_is_raised_as_ours(small_capture, tmp_path, monkeypatch):
    start = compare_module._LayerHelpers.start

    def edit_settings_first(self):  # the helper then reads settings that do not match their key
        settings = self.parts / "settings.json"
        settings.write_text(settings.read_text().replace('"block_rows": 256', '"block_rows": 128'))
        start(self)

    monkeypatch.setattr(compare_module._LayerHelpers, "start", edit_settings_first)
    monkeypatch.setattr(compare_module, "_claim", lambda parts, layer: False)  # the helper does every layer
    out = tmp_path / "r.parquet"
    with pytest.raises(ValueError, match="does not match its own key"):
        run_comparison(small_capture, out=out, variants="softmax", progress=False, workers=2)
    assert not out.exists() and not list(out.with_name("r.parquet.parts").glob("layer_*"))


def test_a_helper_stops_when_its_parent_ends(small_capture, tmp_path):
    """A helper whose parent died (its stdin pipe reads EOF) exits instead of writing on."""
    import json
    import subprocess
    import sys

    config = compare_module.CompareConfig(variants=("softmax",), train_inputs=1)
    parts = tmp_path / "r.parquet.parts"
    parts.mkdir()
    (parts / "settings.json").write_text(json.dumps({**config.as_dict(), "key": config.key()}))
    proc = subprocess.Popen([sys.executable, "-m", "hla_analysis._compare_helper", str(small_capture), str(parts)],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdin.close()  # what the parent's death does to the pipe
    assert proc.wait(timeout=120) == 3


def test_workers_must_be_auto_or_a_positive_integer(small_capture, tmp_path, capsys):
    for bad in (0, -1, 1.5, "two", True):
        with pytest.raises(ValueError, match=r"workers \(--workers\) must be 'auto' or an integer >= 1"):
            run_comparison(small_capture, out=tmp_path / "r.csv", variants="softmax", progress=False, workers=bad)
    with pytest.raises(SystemExit) as exit_info:
        main(["compare", "--capture", str(small_capture), "--out", str(tmp_path / "r.csv"), "--workers", "x"])
    assert exit_info.value.code == 2
    assert "expected 'auto' or an integer" in capsys.readouterr().err


def test_fit_loss_skips_rows_without_a_distribution():
    from hla_analysis.fit import row_kl_loss
    from hla_analysis.ops import softmax_attention_map

    g = torch.Generator().manual_seed(3)
    q, k = torch.randn(6, 4, generator=g), torch.randn(6, 4, generator=g)
    q[2] = -q[2].abs() - 1  # relu(q_2) = 0: row 2 has a zero normalizer
    k = k.abs()
    batch = {"q": q, "k": k, "scale": 0.5, "causal": False}
    var = make_variant("linear:phi=relu")
    target = softmax_attention_map(q, k, scale=0.5)
    loss = row_kl_loss(var, [batch], [target])
    keep = [0, 1, 3, 4, 5]
    expect = row_kl_loss(var, [{**batch, "q": q[keep]}], [target[keep]])
    assert torch.isfinite(loss) and float(loss) == pytest.approx(float(expect), rel=1e-6)


def test_figures_read_the_table_and_save_their_numbers(default_results, small_capture, tmp_path):
    from hla_analysis.report import comparison_figures

    table, out = default_results
    paths = comparison_figures(table, out, tmp_path)  # the figure tables compare wrote beside the results
    assert sorted(p.name for p in paths) == [
        "attention_maps.png", "error_vs_factors.png", "kl_heatmaps.png", "monotonicity.png"]
    for p in paths:
        assert p.stat().st_size > 10_000 and p.with_suffix(".csv").exists()
    heat = pd.read_csv(tmp_path / "kl_heatmaps.csv")
    held = table[(table["split"] == "heldout") & (table["metric"] == "kl_mean")]
    row = heat.iloc[0]
    expect = held[(held["variant"] == row["variant"]) & (held["layer"] == row["layer"]) & (held["head"] == row["head"])]
    assert row["kl_mean_heldout"] == pytest.approx(expect["value"].mean())
    maps = pd.read_csv(tmp_path / "attention_maps.csv")
    # shown rows are the real rows (normalised over every key), cropped to the first keys
    sums = maps[maps["variant"] == "softmax"].groupby("query")["weight"].sum().to_numpy()
    assert (sums <= 1 + 1e-5).all() and (sums > 0).all()


def test_shift_starts_below_every_training_logit(small_capture):
    cap = load_capture(small_capture)
    d = cap.get(3, 0)
    batch = {k: d[k] for k in ("q", "k", "scale", "causal")}
    var = make_variant("hla:m=4,phi=affine,shift=1").bind(cap.head_dim, heads=cap.num_heads)
    fit_variant(var, [batch], config=FitConfig(steps=0, row_stride=1))
    scores = batch["q"] @ batch["k"].transpose(-1, -2) * batch["scale"]
    torch.testing.assert_close(var.shift.detach().flatten(), scores.flatten(-2).amin(-1))
    # every factor 1 + (s - b)/4 >= 1, so the weight is increasing in the logit in every row
    with torch.no_grad():
        w = var.attention_map(batch["q"], batch["k"], scale=batch["scale"])
    order = scores.argsort(-1)
    assert (w.gather(-1, order).diff(dim=-1) >= -1e-7).all()


@pytest.mark.slow
def test_table_matches_the_expected_fixture(tmp_path):
    """The runner reproduces the table the pre-one-pass runner wrote on the fixed capture.

    Maps are float32 over N = 20 keys and every sum is accumulated in float64, so two
    correct orderings of the same arithmetic differ by a few float32 ulps per entry, times
    the conditioning of the logs and ratios (a few tens): rel 1e-4 covers that with margin.
    Counts (failed, floored rows) are whole numbers and must match exactly.

    Fitted variants are compared with the fixture only for their rows: Adam's first steps move
    each parameter by about ``lr * sign(gradient)``, so a gradient component that rounds to
    the other sign on another CPU (other BLAS kernels) moves by ``2 lr`` -- rounding becomes
    an O(lr) change of the fitted map, not an O(eps) one. Their values are checked instead
    against the same runner with each fitted variant alone, on this machine
    (``test_fitted_variants_do_not_depend_on_the_other_variants``).
    """
    from pathlib import Path

    from compare_fixture import FIXTURE_BLOCK_ROWS, FIXTURE_FIT, FIXTURE_KW, FIXTURE_TEXTS, FIXTURE_VARIANTS

    from hla_analysis.spec import SPEC_COLUMNS, spec_columns

    expected = pd.read_parquet(Path(__file__).parent / "data" / "compare_expected.parquet")
    # the fixture predates favor's features= (issue 17): compare under the canonical names
    with pytest.warns(DeprecationWarning, match="features="):
        canonical = {spec: make_variant(spec).spec for spec in FIXTURE_VARIANTS}
    expected["variant"] = expected["variant"].map(canonical)
    cap = capture("minilm", out=tmp_path / "cap", texts=FIXTURE_TEXTS, progress=False, **FIXTURE_KW)
    got = run_comparison(cap, out=tmp_path / "r.parquet", variants=list(canonical.values()), fit=FIXTURE_FIT,
                         block_rows=FIXTURE_BLOCK_ROWS, progress=False)
    # the typed spec columns (issue 17) are new; every row carries its variant's
    assert set(SPEC_COLUMNS) <= set(got.columns)
    head_dim = load_capture(cap).head_dim
    for spec, rows in got.groupby("variant"):
        want = spec_columns(spec, head_dim=head_dim)
        have = rows[list(SPEC_COLUMNS)].drop_duplicates()
        assert len(have) == 1, spec
        have = {k: (None if pd.isna(v) else v) for k, v in have.iloc[0].to_dict().items()}
        assert have == want, spec
    key = ["input", "layer", "head", "variant", "metric"]
    merged = expected.merge(got, on=key, suffixes=("_want", "_got"), how="outer", indicator=True)
    assert (merged["_merge"] == "both").all(), "the table has other rows than the fixture"
    assert (merged["split_want"] == merged["split_got"]).all()
    assert (merged["params_per_head_want"] == merged["params_per_head_got"]).all()
    want, have = merged["value_want"].to_numpy(), merged["value_got"].to_numpy()
    assert (pd.isna(want) == pd.isna(have)).all()
    fitted = merged["variant"].map(lambda spec: spec_columns(spec, head_dim=head_dim)["learnable"]).to_numpy()
    assert fitted.any() and not fitted.all()
    ok = pd.isna(want) | fitted | (abs(want - have) <= 1e-6 + 1e-4 * abs(want))
    assert ok.all(), merged.loc[~ok, [*key, "value_want", "value_got"]].head(10).to_string()


def test_fitted_variants_do_not_depend_on_the_other_variants(small_capture, tmp_path):
    """One pass with every variant gives each fitted variant the numbers it gets alone.

    Same machine, same fits (same batches and seed), same per-block arithmetic: the values
    agree to float32 rounding of the maps times the conditioning of the logs (rel 1e-5).
    """
    from hla_analysis.fit import FitConfig

    fitted = ["hla:m=2,phi=affine,proj=1", "linear:phi=rebased"]
    kw = dict(fit=FitConfig(steps=3), block_rows=8, progress=False)
    together = run_comparison(small_capture, out=tmp_path / "all.parquet",
                              variants=["softmax", "linear:phi=elu1", *fitted, "hla:m=2,phi=affine"], **kw)
    key = ["input", "layer", "head", "variant", "metric"]
    for spec in fitted:
        alone = run_comparison(small_capture, out=tmp_path / f"{spec.replace(':', '_')}.parquet", variants=[spec], **kw)
        merged = alone.merge(together[together["variant"] == spec], on=key, suffixes=("_alone", "_together"))
        assert len(merged) == len(alone) > 0
        a, b = merged["value_alone"].to_numpy(), merged["value_together"].to_numpy()
        assert (pd.isna(a) == pd.isna(b)).all()
        ok = pd.isna(a) | (abs(a - b) <= 1e-7 + 1e-5 * abs(a))
        assert ok.all(), merged.loc[~ok, [*key, "value_alone", "value_together"]].head().to_string()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_table_matches_cpu_table(small_capture, tmp_path):
    """Same capture, same settings: the CUDA table equals the CPU one up to float32 rounding.

    Maps are float32 on both devices with different reduction orders (and TF32 is off by
    default for matmuls): a few ulps per entry times the conditioning of the logs gives
    rel 1e-4; fits take 3 Adam steps, whose sign-normalised updates carry those ulps along.
    """
    variants = "softmax;linear:phi=elu1;hla:m=2,phi=affine;linear:phi=hedgehog;hla:m=2,phi=affine,proj=1"
    cpu = run_comparison(small_capture, out=tmp_path / "cpu.parquet", variants=variants, fit=FAST_FIT,
                         progress=False)
    gpu = run_comparison(small_capture, out=tmp_path / "gpu.parquet", variants=variants, fit=FAST_FIT,
                         device="cuda", progress=False)
    pd.testing.assert_frame_equal(cpu, gpu, rtol=1e-4, atol=1e-6)
