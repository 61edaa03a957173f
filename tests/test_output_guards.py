"""Guards on inputs and outputs: wrong model or results for a capture, files the tool did not write."""

import pytest

pytest.importorskip("transformers")

from hla_analysis.capture import capture  # noqa: E402
from hla_analysis.cli import main  # noqa: E402
from hla_analysis.compare import run_comparison  # noqa: E402
from hla_analysis.evaluate import run_model_evaluation  # noqa: E402


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A 3-input MiniLM capture and its softmax-only comparison (no fits: fast)."""
    root = tmp_path_factory.mktemp("guards")
    cap = capture("minilm", out=root / "cap", num_inputs=3, max_tokens=12, progress=False)
    run_comparison(cap, out=root / "r.parquet", variants="softmax", train_inputs=1, progress=False)
    return root, cap


@pytest.fixture(scope="module")
def random_bert(tmp_path_factory):
    """A small random BERT saved as a model folder: a model the MiniLM capture was not made from."""
    from transformers import BertConfig, BertModel

    folder = tmp_path_factory.mktemp("bert")
    config = BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64)
    BertModel(config).save_pretrained(folder)
    return folder


def _evaluate_args(root, cap, out, *extra):
    return ["evaluate", "--model", "minilm", "--capture", str(cap), "--results", str(root / "r.parquet"),
            "--variants", "softmax", "--out", str(out), "--quiet", *extra]


def test_evaluate_refuses_other_model(tiny, random_bert, tmp_path, capsys):
    root, cap = tiny
    out = tmp_path / "m.csv"
    args = _evaluate_args(root, cap, out)
    args[args.index("minilm")] = str(random_bert)
    code = main(args)
    err = capsys.readouterr().err
    assert code == 1 and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert "is not the model the capture" in err and str(random_bert) in err and "'minilm'" in err
    # nothing was written, not even the parts folder (item 11)
    assert list(tmp_path.iterdir()) == []


def test_evaluate_bad_model_leaves_no_parts(tiny, tmp_path, capsys):
    root, cap = tiny
    args = _evaluate_args(root, cap, tmp_path / "m.csv")
    args[args.index("minilm")] = str(tmp_path / "no_such_model")
    assert main(args) == 1
    assert "Traceback" not in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_evaluate_refuses_results_of_another_capture(tiny, tmp_path):
    root, cap = tiny
    other = capture("minilm", out=tmp_path / "cap2", num_inputs=3, max_tokens=10, progress=False)
    with pytest.raises(ValueError, match="was computed on another capture") as info:
        run_model_evaluation("minilm", capture=other, results=root / "r.parquet", out=tmp_path / "m.csv",
                             variants="softmax", progress=False)
    assert str(root / "cap") in str(info.value) and "\n" not in str(info.value)
    assert not (tmp_path / "m.csv.parts").exists()


@pytest.mark.parametrize("suffix", ["", ".fits.safetensors", ".settings.json"])
def test_evaluate_refuses_user_files(tiny, tmp_path, capsys, suffix):
    root, cap = tiny
    out = tmp_path / "m.csv"
    user = out if not suffix else tmp_path / f"m{suffix}"
    user.write_text("mine")
    assert main(_evaluate_args(root, cap, out)) == 1
    err = capsys.readouterr().err
    assert "`hla-analysis evaluate` did not write it" in err and "--overwrite" in err and "Traceback" not in err
    assert user.read_text() == "mine" and not (tmp_path / "m.csv.parts").exists()
    if suffix == ".settings.json":
        # --overwrite replaces them; the run's own files are then replaced without asking
        assert main(_evaluate_args(root, cap, out, "--overwrite")) == 0
        assert user.read_text() != "mine" and out.is_file()
        assert main(_evaluate_args(root, cap, out)) == 0


def test_summary_csv_refuses_existing_file(tiny, tmp_path, capsys):
    root, _ = tiny
    user = tmp_path / "s.csv"
    user.write_text("mine")
    assert main(["summary", str(root / "r.parquet"), "--csv", str(user)]) == 1
    err = capsys.readouterr().err
    assert "already exists" in err and "--overwrite" in err and user.read_text() == "mine"
    assert main(["summary", str(root / "r.parquet"), "--csv", str(user), "--overwrite"]) == 0
    assert user.read_text().startswith("variant,")
    assert [p.name for p in tmp_path.iterdir()] == ["s.csv"]  # no temporary file left beside it


def test_summary_csv_is_not_written_into_a_capture(tmp_path, capsys):
    cap = tmp_path / "cap"
    cap.mkdir()
    (cap / "manifest.json").write_text("{}")
    results = tmp_path / "r.parquet"
    results.write_text("not read: the --csv path is refused first")
    assert main(["summary", str(results), "--csv", str(cap / "s.csv")]) == 1
    err = capsys.readouterr().err
    assert "holds a capture" in err and "--csv" in err and not (cap / "s.csv").exists()


def _demo(out, *extra):
    return ["demo", "--out", str(out), "--num-inputs", "2", "--max-tokens", "12", "--variants", "softmax",
            "--quiet", *extra]


def test_demo_refuses_user_files_before_capturing(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "summary.csv").write_text("mine")
    assert main(_demo(out)) == 1
    err = capsys.readouterr().err
    assert "summary.csv already exist(s) and hla-analysis did not write them" in err and "--overwrite" in err
    assert not (out / "capture").exists() and (out / "summary.csv").read_text() == "mine"
    figures = tmp_path / "figs"
    figures.mkdir()
    (figures / "kl_heatmaps.png").write_text("mine")
    assert main(_demo(tmp_path / "run2", "--figures", str(figures))) == 1
    assert "kl_heatmaps.png already exist(s)" in capsys.readouterr().err
    assert not (tmp_path / "run2" / "capture").exists()


def test_demo_out_is_a_file(tmp_path, capsys):
    (tmp_path / "f").write_text("x")
    assert main(_demo(tmp_path / "f")) == 1
    err = capsys.readouterr().err
    assert "is a file; pass a directory" in err and "Errno" not in err


def test_demo_softmax_only_skips_figures_and_reruns(tmp_path, capsys):
    """--variants softmax: the HLA figures are skipped with a note, the summary still printed; a rerun
    replaces demo's own files without --overwrite, and --overwrite replaces a user's."""
    out = tmp_path / "run"
    assert main(_demo(out)) == 0
    printed = capsys.readouterr().out
    assert "kl_heatmaps: skipped" in printed and "KL mean" in printed
    assert (out / "summary.csv").is_file() and (out / "figures" / "compare_summary.csv").is_file()
    assert main(_demo(out)) == 0  # its own files: replaced without asking
    (out / "figures" / "hla-analysis-demo.json").unlink()  # now they are nobody's
    assert main(_demo(out)) == 1
    assert "compare_summary.csv" in capsys.readouterr().err
    assert main(_demo(out, "--overwrite")) == 0


def test_demo_refuses_its_own_files_once_a_user_changed_them(tmp_path, capsys):
    """demo records the SHA-256 of what it wrote: a rerun replaces its files as written, but a file
    the user has since edited is theirs, refused without --overwrite (before any capture)."""
    out = tmp_path / "run"
    assert main(_demo(out)) == 0
    capsys.readouterr()
    (out / "summary.csv").write_text("my own table")
    assert main(_demo(out)) == 1
    err = capsys.readouterr().err
    assert "summary.csv changed since hla-analysis demo wrote it" in err and "--overwrite" in err
    assert (out / "summary.csv").read_text() == "my own table"
    (out / "figures" / "compare_summary.csv").write_text("mine too")
    assert main(_demo(out, "--overwrite")) == 0
    assert (out / "summary.csv").read_text().startswith("variant")
    assert main(_demo(out)) == 0  # written again by demo and recorded: its own once more


def test_capture_refuses_a_users_file_named_like_an_input(tmp_path, capsys):
    from safetensors.torch import save_file

    out = tmp_path / "cap"
    out.mkdir()
    save_file({"x": __import__("torch").zeros(2)}, str(out / "input_00000.safetensors"))
    before = (out / "input_00000.safetensors").read_bytes()
    code = main(["capture", "--model", "minilm", "--out", str(out), "--num-inputs", "2", "--max-tokens", "12",
                 "--quiet"])
    err = capsys.readouterr().err
    assert code == 1 and "not part of a capture (input_00000.safetensors)" in err
    assert (out / "input_00000.safetensors").read_bytes() == before


def test_failed_capture_removes_the_folder_it_created(tmp_path, capsys):
    out = tmp_path / "cap"
    code = main(["capture", "--model", "minilm", "--out", str(out), "--num-inputs", "2", "--max-tokens", "12",
                 "--modules", "no_such_module", "--quiet"])
    assert code == 1 and "Traceback" not in capsys.readouterr().err
    assert not out.exists()
    # a folder the user made is left in place
    out.mkdir()
    assert main(["capture", "--model", "minilm", "--out", str(out), "--num-inputs", "2", "--max-tokens", "12",
                 "--modules", "no_such_module", "--quiet"]) == 1
    assert out.is_dir()


@pytest.mark.parametrize("edit, message", [
    (lambda m: m.update(num_heads=11, kv_head_for_query_head=list(range(11))), "num_kv_heads=12 exceeds num_heads=11"),
    (lambda m: m.update(kv_head_for_query_head=[0] * 11 + [12]), "kv_head_for_query_head must list"),
    (lambda m: m.update(head_dim=16), "layer 0 has head_dim=32 but the manifest says head_dim=16"),
    (lambda m: m["layers"][0].update(scale=0.0), "layer 0 scale must be a finite number > 0"),
    (lambda m: m["layers"][0].update(heads=11, q_factor=[1.0] * 11), "layer 0 has heads=11"),
])
def test_resealed_manifest_with_inconsistent_fields_is_refused(tiny, tmp_path, capsys, edit, message):
    import json
    import shutil

    from hla_analysis.capture.manifest import sealed

    _, cap = tiny
    copy = tmp_path / "cap"
    shutil.copytree(cap, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    edit(manifest)
    (copy / "manifest.json").write_text(json.dumps(sealed({k: v for k, v in manifest.items()
                                                           if k != "manifest_sha256"})))
    code = main(["compare", "--capture", str(copy), "--variants", "softmax", "--out", str(tmp_path / "r.csv"),
                 "--quiet"])
    err = capsys.readouterr().err
    assert code == 1 and message in err and "RuntimeError" not in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("name", ["./nonexistent_folder", "runs/models/nope", "nope_org/nope_model"])
def test_capture_missing_model_folder_is_named(tmp_path, capsys, name):
    code = main(["capture", "--model", name, "--out", str(tmp_path / "cap"), "--quiet"])
    err = capsys.readouterr().err
    assert code == 1 and "Traceback" not in err and "repo id" not in err.lower()
    assert "does not exist" in err or "neither a local folder" in err
    assert name in err and not (tmp_path / "cap").exists()


def test_evaluate_names_a_missing_results_table(tmp_path):
    """A --results path that does not exist is named as such (not as a missing settings file)."""
    from hla_analysis.cli import main

    missing = tmp_path / "nosuch.parquet"
    with pytest.raises(FileNotFoundError, match="no results table at"):
        from hla_analysis.evaluate import _compare_settings

        _compare_settings(missing)
    assert main(["evaluate", "--model", "minilm", "--capture", str(tmp_path), "--results", str(missing),
                 "--out", str(tmp_path / "e.parquet")]) == 1
    assert not (tmp_path / "e.parquet").exists()


def test_summary_names_an_evaluate_table(tmp_path):
    """`summary` on evaluate's model-level table says which table it is, not which columns it lacks."""
    import pandas as pd

    from hla_analysis.compare import load_results
    from hla_analysis.evaluate import COLUMNS

    path = tmp_path / "eval.csv"
    pd.DataFrame([["m", "softmax", "map_kl", 0, 1, "single", "heldout", 0, "embedding_cosine", 1.0, "ok"]],
                 columns=COLUMNS).to_csv(path, index=False)
    with pytest.raises(ValueError, match="model-level table from `hla-analysis evaluate`"):
        load_results(path)


def test_evaluate_refuses_a_second_writer(tiny, tmp_path):
    """Two evaluates into one --out: the second fails at once (a lock in <out>.parts), leaves the
    first one's parts alone, and the output is written once the first is done."""
    from hla_analysis._io import exclusive_output_lock

    root, cap = tiny
    out = tmp_path / "m.csv"
    parts = tmp_path / "m.csv.parts"
    with exclusive_output_lock(parts, command="evaluate"):  # the first writer, still running
        (parts / "settings.json").write_text("{}")
        with pytest.raises(ValueError, match="another hla-analysis process is writing"):
            run_model_evaluation("minilm", capture=cap, results=root / "r.parquet", out=out, variants="softmax",
                                 progress=False)
        assert (parts / "settings.json").read_text() == "{}" and not out.exists()
    import shutil

    shutil.rmtree(parts)
    table = run_model_evaluation("minilm", capture=cap, results=root / "r.parquet", out=out, variants="softmax",
                                 progress=False)
    assert out.is_file() and len(table) > 0 and not parts.exists()


def test_demo_rerun_removes_figures_it_can_no_longer_make(tmp_path, capsys):
    """A rerun whose variants cannot make a figure removes that figure from the earlier run, so
    figures/ never mixes plots of two tables."""
    out = tmp_path / "run"
    figures = out / "figures"
    assert main(_demo(out)[:-2] + ["softmax", "hla:m=2,phi=affine", "--quiet"]) == 0
    assert (figures / "kl_heatmaps.png").is_file() and (figures / "kl_heatmaps.csv").is_file()
    capsys.readouterr()
    assert main(_demo(out)) == 0
    printed = capsys.readouterr().out
    assert "kl_heatmaps: skipped" in printed and "removed the earlier kl_heatmaps.png" in printed
    assert not (figures / "kl_heatmaps.png").exists() and not (figures / "kl_heatmaps.csv").exists()


def test_same_stem_outputs_do_not_take_each_others_side_files(tiny, tmp_path, capsys):
    """x.csv and x.parquet share x.settings.json: a run for one never takes the other's side files
    (or a user's x.csv) as its own."""
    root, cap = tiny
    (tmp_path / "x.csv").write_text("my own spreadsheet")
    run_comparison(cap, out=tmp_path / "x.parquet", variants="softmax", train_inputs=1, progress=False)
    code = main(["compare", "--capture", str(cap), "--variants", "softmax", "--train-inputs", "1",
                 "--out", str(tmp_path / "x.csv"), "--quiet"])
    err = capsys.readouterr().err
    assert code == 1 and "belongs to" in err and "x.parquet" in err and "Traceback" not in err
    assert (tmp_path / "x.csv").read_text() == "my own spreadsheet"
    # evaluate reads the settings beside a table only when they name that table
    (tmp_path / "x.csv").unlink()
    with pytest.raises(ValueError, match="belongs to .*x.parquet"):
        run_model_evaluation("minilm", capture=cap, results=tmp_path / "x.csv", out=tmp_path / "e.csv",
                             variants="softmax", progress=False)
    # the owner itself reruns without --overwrite
    run_comparison(cap, out=tmp_path / "x.parquet", variants="softmax", train_inputs=1, progress=False)


def test_compare_runs_on_a_bfloat16_capture(tmp_path):
    """A --dtype bfloat16 capture compares end to end, figure tables included (numpy has no bfloat16)."""
    import math

    cap = capture("minilm", out=tmp_path / "cap", num_inputs=2, max_tokens=12, dtype="bfloat16", progress=False)
    out = tmp_path / "r.csv"
    table = run_comparison(cap, out=out, variants="softmax;hla:m=2,phi=affine", train_inputs=1, progress=False)
    assert (tmp_path / "r.settings.json").is_file() and not (tmp_path / "r.csv.parts").exists()
    kl = table.loc[(table["variant"] == "hla:m=2,phi=affine") & (table["metric"] == "kl_mean"), "value"]
    assert len(kl) and all(math.isfinite(v) and v >= 0 for v in kl)


@pytest.mark.parametrize("damage", ["missing", "truncated"])
def test_compare_checks_capture_files_first_and_leaves_nothing(tiny, tmp_path, capsys, damage):
    """A missing or truncated input file is named before any work, and the run leaves no parts."""
    import shutil

    root, cap = tiny
    copy = tmp_path / "cap"
    shutil.copytree(cap, copy)
    victim = copy / "input_00002.safetensors"
    if damage == "missing":
        victim.unlink()
    else:
        victim.write_bytes(victim.read_bytes()[:100])
    out = tmp_path / "r.csv"
    assert main(["compare", "--capture", str(copy), "--variants", "softmax", "--out", str(out), "--quiet"]) == 1
    err = capsys.readouterr().err
    assert "input_00002.safetensors" in err and ("missing" in err or "truncated" in err) and "Traceback" not in err
    assert not (tmp_path / "r.csv.parts").exists() and not out.exists()


def test_outputs_that_are_the_commands_own_inputs_are_refused(tiny, tmp_path, capsys):
    """summary --csv onto its own results table (or a non-.csv side file), and evaluate --out onto
    the stem of the --results it reads, are refused even with --overwrite."""
    import shutil

    root, cap = tiny
    table = tmp_path / "r.csv"
    from hla_analysis.compare import load_results

    load_results(root / "r.parquet").to_csv(table, index=False)
    before = table.read_bytes()
    for csv, message in ((table, "is the results table being summarized"), (tmp_path / "r.settings.json", ".csv"),
                         ("", "needs a file name")):
        assert main(["summary", str(table), "--csv", str(csv), "--overwrite"]) == 1
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err, err
    assert table.read_bytes() == before
    shutil.copy(root / "r.parquet", tmp_path / "x.parquet")
    for out in ("x.parquet", "x.csv"):
        args = _evaluate_args(root, cap, tmp_path / out, "--overwrite")
        args[args.index("--results") + 1] = str(tmp_path / "x.parquet")
        assert main(args) == 1
        err = capsys.readouterr().err
        assert "shares its name stem with --results" in err, err


def test_an_unwritable_path_is_one_line_naming_it(tiny, tmp_path, capsys):
    root, _ = tiny
    blocker = tmp_path / "file.txt"
    blocker.write_text("a file, not a folder")
    assert main(["summary", str(root / "r.parquet"), "--csv", str(blocker / "s.csv")]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert "cannot use" in err and "file.txt" in err and "choose another location" in err, err


def _no_model_load(monkeypatch):
    """Make loading any model fail the test: the checks under test must come before it."""
    import hla_analysis.capture.run as run

    def load_model(*args, **kwargs):
        raise AssertionError("the model was loaded before the output path was checked")

    monkeypatch.setattr(run, "load_model", load_model)


def _unwritable(monkeypatch, folder):
    """``os.access`` says ``folder`` is not writable (as for a user without write permission; the
    tests may run as root, for whom chmod does not take write permission away)."""
    import os

    real = os.access
    monkeypatch.setattr(os, "access", lambda p, mode, **k: False if os.path.realpath(p) == os.path.realpath(folder)
                        else real(p, mode, **k))


@pytest.mark.parametrize("case, message", [
    ("file", "is a file; pass a directory"),
    ("under_file", "file.txt is a file, not a folder; pass a path below a folder"),
    ("unwritable", "ro is not writable by this user; pass a folder you can write to"),
    ("in_capture", "lies inside the capture"),
    ("in_partial_capture", "lies inside the capture"),
    ("foreign_files", "already holds files that are not part of a capture (notes.txt)"),
])
def test_capture_checks_its_output_path_before_loading_the_model(tmp_path, capsys, monkeypatch, case, message):
    _no_model_load(monkeypatch)
    (tmp_path / "file.txt").write_text("a file, not a folder")
    (tmp_path / "ro").mkdir()
    for name, manifest in (("cap", "manifest.json"), ("part", "manifest.partial.json")):
        (tmp_path / name).mkdir()
        (tmp_path / name / manifest).write_text("{}")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "notes.txt").write_text("mine")
    out = {"file": tmp_path / "file.txt", "under_file": tmp_path / "file.txt" / "cap",
           "unwritable": tmp_path / "ro" / "cap", "in_capture": tmp_path / "cap" / "sub" / "cap",
           "in_partial_capture": tmp_path / "part" / "cap", "foreign_files": tmp_path / "full"}[case]
    if case == "unwritable":
        _unwritable(monkeypatch, tmp_path / "ro")
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    code = main(["capture", "--model", "minilm", "--out", str(out), "--num-inputs", "1", "--max-tokens", "8",
                 "--quiet"])
    err = capsys.readouterr().err
    assert code == 1 and message in err and "was loaded" not in err, err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before  # nothing created


def _replaced_lines(err: str) -> dict[str, str]:
    """``{file: line}`` of the stderr lines that name a file --overwrite replaces."""
    lines = [line for line in err.splitlines() if line.startswith("--overwrite: will replace ")]
    named = {line.split(" ")[3]: line for line in lines}
    assert len(named) == len(lines), lines  # one line per file
    return named


def test_overwrite_names_each_file_it_replaces(tiny, tmp_path, capsys):
    """--overwrite replaces an earlier run's side files (those its settings file records) and a
    user's file: each is named on stderr, one line each, saying who wrote it; none otherwise."""
    import json

    root, cap = tiny
    out = tmp_path / "r.parquet"
    args = ["compare", "--capture", str(cap), "--variants", "softmax", "--train-inputs", "1", "--out", str(out),
            "--quiet"]
    assert main(args) == 0
    capsys.readouterr()
    recorded = json.loads((tmp_path / "r.settings.json").read_text())["files"]
    written = sorted(str(tmp_path / name) for name in recorded) + [str(tmp_path / "r.settings.json")]
    assert len(written) >= 3 and all(__import__("os").path.isfile(p) for p in written)
    assert main(args + ["--overwrite"]) == 0
    named = _replaced_lines(capsys.readouterr().err)
    assert sorted(named) == sorted(written), named
    assert all("an earlier `hla-analysis compare` run wrote it" in line for line in named.values())
    # a rerun without --overwrite replaces its own files as before, naming none
    assert main(args) == 0
    assert _replaced_lines(capsys.readouterr().err) == {}
    # a user's file in place of one of them is named as such
    (tmp_path / "r.settings.json").write_text("{}")
    assert main(args + ["--overwrite"]) == 0
    named = _replaced_lines(capsys.readouterr().err)
    assert sorted(named) == sorted(written)
    assert "`hla-analysis compare` did not write it" in named[str(tmp_path / "r.settings.json")]
    # evaluate names the files it replaces in the same way
    ev_args = _evaluate_args(root, cap, tmp_path / "m.csv")
    assert main(ev_args) == 0
    capsys.readouterr()
    assert main(ev_args + ["--overwrite"]) == 0
    named = _replaced_lines(capsys.readouterr().err)
    assert sorted(named) == sorted(str(tmp_path / n) for n in ("m.csv", "m.fits.safetensors", "m.settings.json"))
    assert all("an earlier `hla-analysis evaluate` run wrote it" in line for line in named.values())
