"""Model-level evaluation on a tiny MiniLM capture: softmax faithful, statuses, resume."""

import pytest

pytest.importorskip("transformers")

from hla_analysis.capture import capture  # noqa: E402
from hla_analysis.compare import run_comparison  # noqa: E402
from hla_analysis.evaluate import run_model_evaluation  # noqa: E402

VARIANTS = "softmax;linear:phi=hedgehog;linear:phi=identity"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    cap = capture("minilm", out=root / "cap", num_inputs=5, max_tokens=16, progress=False)
    from hla_analysis.fit import FitConfig

    run_comparison(cap, out=root / "r.parquet", variants=VARIANTS, train_inputs=2, fit=FitConfig(steps=3),
                   progress=False)
    return root, cap


@pytest.mark.slow
def test_evaluate_minilm(tiny, monkeypatch):
    root, cap = tiny
    out = root / "m.csv"
    table = run_model_evaluation("minilm", capture=cap, results=root / "r.parquet", out=out, progress=False)
    assert set(table["input"][table["input"] >= 0]) == {2, 3, 4}  # held-out only
    soft = table[(table.variant == "softmax") & (table.metric == "embedding_cosine")]
    assert soft["value"].min() >= 0.99999 and (soft.status == "ok").all()
    assert set(table.swap_mode) == {"single", "cumulative"} and set(table.layer) == set(range(6))
    assert set(table[table.variant == "linear:phi=hedgehog"].objective) == {"map_kl", "output_mse"}
    ident = table[table.variant == "linear:phi=identity"]
    assert (ident.status == "normaliser_failed").any()
    assert (ident[ident.metric == "failed_fraction"]["value"] > 0).all()
    assert (root / "m.fits.safetensors").is_file()
    # resume: finished parts are read back, not recomputed
    import hla_analysis.evaluate as ev

    parts = out.with_name(out.name + ".parts")
    parts.mkdir()
    (root / "m2.csv.parts").mkdir()
    calls = []
    real = ev._run_variant
    monkeypatch.setattr(ev, "_run_variant", lambda *a, **k: calls.append(a[1]) or real(*a, **k))
    first = run_model_evaluation("minilm", capture=cap, results=root / "r.parquet", out=root / "m2.csv",
                                 variants="softmax", progress=False)
    n = len(calls)
    import shutil

    # simulate an interruption after the parts were written: keep them, rerun
    parts2 = root / "m3.csv.parts"
    monkeypatch.setattr(ev.shutil, "rmtree", lambda p: None)
    run_model_evaluation("minilm", capture=cap, results=root / "r.parquet", out=root / "m3.csv", variants="softmax",
                         progress=False)
    again = run_model_evaluation("minilm", capture=cap, results=root / "r.parquet", out=root / "m3.csv",
                                 variants="softmax", progress=False)
    assert len(calls) == n + 1 and parts2.is_dir() and len(again) == len(first)
    shutil.rmtree(parts2)


def test_cli_bad_input_is_one_line(tmp_path, capsys):
    from hla_analysis.cli import main

    code = main(["evaluate", "--model", "minilm", "--capture", str(tmp_path), "--results", str(tmp_path / "r.parquet"),
                 "--out", str(tmp_path / "m.txt")])
    err = capsys.readouterr().err
    assert code == 1 and "must end in .parquet or .csv" in err and "Traceback" not in err


def test_output_mse_objective_fits_outputs():
    import torch

    from hla_analysis.fit import FitConfig, fit_variant
    from hla_analysis.variants import make_variant

    g = torch.Generator().manual_seed(0)
    batch = {"q": torch.randn(2, 16, 4, generator=g) * 2, "k": torch.randn(2, 16, 4, generator=g) * 2,
             "v": torch.randn(2, 16, 4, generator=g), "scale": 0.5, "causal": False}
    result = fit_variant(make_variant("linear:phi=hedgehog").bind(4, heads=2), [batch],
                         config=FitConfig(steps=20, objective="output_mse"))
    assert result.final_loss < result.initial_loss
    with pytest.raises(ValueError, match="objective"):
        FitConfig(objective="mse")
    no_v = {k: v for k, v in batch.items() if k != "v"}
    with pytest.raises(ValueError, match="'v'"):
        fit_variant(make_variant("linear:phi=hedgehog").bind(4, heads=2), [no_v], config=FitConfig(objective="output_mse"))
