"""Fault cases of `compare` (issue 16): resume, overwrite, locks, paths.

Each test failed before the fix it names: S7 (resume mixed captures), D1 (a user's files
overwritten), D2 (concurrent writers), and an output path that is a folder (failed after
all the work).
"""

import json

import pytest

import hla_analysis.compare as compare_module
from hla_analysis._io import exclusive_output_lock
from hla_analysis.capture import capture
from hla_analysis.cli import main
from hla_analysis.compare import run_comparison
from hla_analysis.fit import FitConfig

VARIANTS = "softmax;hla:m=2,phi=affine"
FAST = dict(variants=VARIANTS, fit=FitConfig(steps=1), progress=False)


@pytest.fixture(scope="module")
def captures(tmp_path_factory):
    root = tmp_path_factory.mktemp("faults")
    a = capture("minilm", out=root / "a", num_inputs=2, max_tokens=12, progress=False)
    b = capture("minilm", out=root / "b", num_inputs=2, max_tokens=12, progress=False,
                texts=["A different text gives a different capture of the same model.",
                       "So its layers must never be mixed into the results of the first one."])
    return a, b


def _crash_at_layer(monkeypatch, layer):
    real = compare_module._layer_rows

    def crashing(cap, at, *args, **kwargs):
        if at == layer:
            raise KeyboardInterrupt
        return real(cap, at, *args, **kwargs)

    monkeypatch.setattr(compare_module, "_layer_rows", crashing)


def _no_work(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the comparison started working before checking its output")

    monkeypatch.setattr(compare_module, "_layer_rows", refuse)


# ------------------------------------------------------------------------------- resume


def test_resume_refuses_partial_results_of_another_capture(captures, tmp_path, monkeypatch):
    a, b = captures
    out = tmp_path / "r.parquet"
    _crash_at_layer(monkeypatch, 3)
    with pytest.raises(KeyboardInterrupt):
        run_comparison(a, out=out, **FAST)
    assert len(list(out.with_name("r.parquet.parts").glob("layer_*"))) == 3
    monkeypatch.undo()
    with pytest.raises(ValueError, match="another capture"):
        run_comparison(b, out=out, **FAST)
    settings = json.loads((out.with_name("r.parquet.parts") / "settings.json").read_text())
    assert settings["capture_sha256"] == compare_module.capture_identity(a)
    # the same capture resumes
    table = run_comparison(a, out=out, **FAST)
    assert sorted(table["layer"].unique()) == list(range(6))


# ---------------------------------------------------------------------------- overwrite


def test_a_users_files_are_not_overwritten(captures, tmp_path, monkeypatch):
    a, _ = captures
    for name in ("notes.csv", "notes.fits.csv", "notes.settings.json", "notes.fits.safetensors",
                 "notes.figure_maps.csv", "notes.figure_monotonicity.csv"):
        user = tmp_path / name
        user.write_text("my own notes\n")
        _no_work(monkeypatch)
        with pytest.raises(ValueError, match="did not write"):
            run_comparison(a, out=tmp_path / "notes.csv", **FAST)
        assert user.read_text() == "my own notes\n"
        monkeypatch.undo()
        user.unlink()
    (tmp_path / "notes.csv").write_text("my own notes\n")
    run_comparison(a, out=tmp_path / "notes.csv", overwrite=True, **FAST)
    # its own results are recognised by their settings file and replaced without asking
    run_comparison(a, out=tmp_path / "notes.csv", **FAST)
    assert json.loads((tmp_path / "notes.settings.json").read_text())["tool"] == "hla-analysis compare"


def test_cli_overwrite_flag(captures, tmp_path, capsys):
    a, _ = captures
    out = tmp_path / "notes.csv"
    out.write_text("x\n")
    args = ["compare", "--capture", str(a), "--variants", "softmax", "--out", str(out), "--quiet"]
    assert main(args) == 1
    assert "--overwrite" in capsys.readouterr().err and out.read_text() == "x\n"
    assert main([*args, "--overwrite", "--fit-steps", "1"]) == 0


# -------------------------------------------------------------------------------- locks


def test_a_second_writer_into_the_same_output_is_refused(captures, tmp_path, monkeypatch):
    a, _ = captures
    out = tmp_path / "r.csv"
    with exclusive_output_lock(out.with_name("r.csv.parts"), command="compare"):
        _no_work(monkeypatch)
        with pytest.raises(ValueError, match="another hla-analysis process"):
            run_comparison(a, out=out, **FAST)
        monkeypatch.undo()
        # a different output in the same folder is not blocked
        run_comparison(a, out=tmp_path / "other.csv", **FAST)
    assert not out.exists()


# -------------------------------------------------------------------------------- paths


def test_output_paths_are_checked_before_any_work(captures, tmp_path, monkeypatch):
    a, _ = captures
    _no_work(monkeypatch)
    (tmp_path / "dir.parquet").mkdir()
    with pytest.raises(ValueError, match="is a folder"):
        run_comparison(a, out=tmp_path / "dir.parquet", **FAST)
    (tmp_path / "file").write_text("")
    with pytest.raises(ValueError, match="not a folder"):
        run_comparison(a, out=tmp_path / "file" / "r.parquet", **FAST)
    with pytest.raises(ValueError, match="is not a torch device"):
        run_comparison(a, out=tmp_path / "r.parquet", device="bogus", **FAST)


# ------------------------------------------------------ parts folders the run did not write


def test_a_users_parts_folder_is_refused_and_kept(captures, tmp_path, monkeypatch):
    """A folder named like the run's parts but holding a user's files (no settings of a run) is
    not resumed, and never removed with the parts at the end."""
    a, _ = captures
    out = tmp_path / "u.csv"
    mine = tmp_path / "u.csv.parts" / "notes.txt"
    mine.parent.mkdir()
    mine.write_text("mine")
    _no_work(monkeypatch)
    with pytest.raises(ValueError, match=r"u.csv.parts holds files but no settings.json .*notes.txt"):
        run_comparison(a, out=out, **FAST)
    assert mine.read_text() == "mine" and not out.exists()


def test_damaged_parts_are_named_with_the_fix(captures, tmp_path, monkeypatch, capsys):
    a, _ = captures
    out = tmp_path / "d.parquet"
    _crash_at_layer(monkeypatch, 2)
    with pytest.raises(KeyboardInterrupt):
        run_comparison(a, out=out, **FAST)
    monkeypatch.undo()
    parts = tmp_path / "d.parquet.parts"
    layer = parts / "layer_001.parquet"
    layer.write_bytes(layer.read_bytes()[:40])  # truncated
    with pytest.raises(ValueError, match=r"layer 1's partial results .* are damaged .*delete layer_001.parquet"):
        run_comparison(a, out=out, **FAST)
    for content in ("not json", "[1]"):
        (parts / "settings.json").write_text(content)
        code = main(["compare", "--capture", str(a), "--out", str(out), "--variants", VARIANTS, "--fit-steps", "1",
                     "--quiet"])
        err = capsys.readouterr().err
        assert code == 1 and "settings.json is damaged" in err and "Traceback" not in err, err
        assert len(err.strip().splitlines()) == 1


def test_a_run_refused_by_the_lock_leaves_the_winners_parts_alone(captures, tmp_path, monkeypatch):
    """The folder did not exist when this run looked, another run created and locked it first:
    this run is refused and must not remove what is now the other run's folder."""
    a, _ = captures
    out = tmp_path / "race.csv"
    parts = tmp_path / "race.csv.parts"

    def lost_race(folder, *, command):
        parts.mkdir()
        (parts / "settings.json").write_text(json.dumps({"key": "the other run's"}))
        raise ValueError(f"another hla-analysis process is writing to {folder}")

    monkeypatch.setattr(compare_module, "exclusive_output_lock", lost_race)
    with pytest.raises(ValueError, match="another hla-analysis process"):
        run_comparison(a, out=out, **FAST)
    assert (parts / "settings.json").exists()


def test_results_inside_a_capture_folder_are_refused(captures, tmp_path, monkeypatch, capsys):
    """A capture folder holds only its own files (or rerunning the capture refuses it): compare's
    --out and the demo's --figures may not point into one."""
    a, _ = captures
    _no_work(monkeypatch)
    with pytest.raises(ValueError, match="holds a capture, which keeps only its own files"):
        run_comparison(a, out=a / "r.csv", **FAST)
    assert not (a / "r.csv").exists() and not (a / "r.csv.parts").exists()
    code = main(["demo", "--out", str(tmp_path / "dm"), "--figures", str(tmp_path / "dm" / "capture"), "--quiet"])
    err = capsys.readouterr().err
    assert code == 1 and "where the demo keeps its capture" in err
    code = main(["demo", "--out", str(tmp_path / "dm"), "--figures", str(a), "--quiet"])
    err = capsys.readouterr().err
    assert code == 1 and "holds a capture" in err and not (tmp_path / "dm").exists()


def test_a_writer_of_the_same_stem_is_refused(captures, tmp_path, monkeypatch):
    """x.csv and x.parquet share x.settings.json and x.fits.*: while one is written, a run into
    the other is refused (one after the other, the side files' owner check refuses it)."""
    a, _ = captures
    _no_work(monkeypatch)
    with exclusive_output_lock(tmp_path / "x.parquet.parts", command="compare"):
        with pytest.raises(ValueError, match=r"writing to .*x.parquet, whose side files"):
            run_comparison(a, out=tmp_path / "x.csv", **FAST)
    assert not (tmp_path / "x.csv.parts").exists()


def test_a_side_file_changed_after_the_run_is_not_replaced(captures, tmp_path):
    """The settings file records what each output held when the run wrote it: a rerun replaces
    its own files, but not one a user has since written at a side file's name."""
    a, _ = captures
    out = tmp_path / "u.csv"
    run_comparison(a, out=out, **FAST)
    run_comparison(a, out=out, **FAST)  # its own files, unchanged: replaced without asking
    side = tmp_path / "u.figure_maps.csv"
    side.write_text("my own notes")
    with pytest.raises(ValueError, match=r"u.figure_maps.csv was changed or replaced since"):
        run_comparison(a, out=out, **FAST)
    assert side.read_text() == "my own notes"
    run_comparison(a, out=out, overwrite=True, **FAST)
    assert side.read_text() != "my own notes"
