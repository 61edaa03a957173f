"""studies/accuracy_vs_speed.py reads committed tables only: the timing run it picks must hold the
variant rows it plots, whatever later GPU runs (possibly cut short) were committed beside it."""

import importlib.util
import json
from pathlib import Path

import pytest

pytest.importorskip("matplotlib")

ROOT = Path(__file__).resolve().parents[1]


def _study():
    spec = importlib.util.spec_from_file_location("accuracy_vs_speed", ROOT / "studies" / "accuracy_vs_speed.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_newest_run_with_variant_rows_is_taken(tmp_path, monkeypatch):
    study = _study()
    chosen = study.newest_timings()
    frame = study.table(chosen)
    assert "softmax" in set(frame["variant"]) and (frame["method"] == "make_variant().forward").sum() >= 3
    assert (frame.loc[frame["variant"] == "softmax", "speedup_over_cudnn"] == 1.0).all()
    # a later run cut before its variant rows is skipped, not an error
    results = tmp_path / "benchmarks" / "gpu" / "results"
    (results / "session2").mkdir(parents=True)
    (results / "session10").mkdir()
    (results / "session2" / "public_h200.json").write_text(chosen.read_text())
    cut = {"rows": [r for r in json.loads(chosen.read_text())["rows"] if r.get("method") == "sdpa_cudnn"]}
    (results / "session10" / "public_h200.json").write_text(json.dumps(cut))
    monkeypatch.setattr(study, "ROOT", tmp_path)
    assert study.newest_timings() == results / "session2" / "public_h200.json"
    (results / "session2" / "public_h200.json").write_text(json.dumps(cut))
    with pytest.raises(SystemExit, match="no benchmarks/gpu/results/session"):
        study.newest_timings()


def test_each_variant_comes_from_the_newest_run_that_timed_it(tmp_path, monkeypatch):
    """A later run that timed only some variants replaces those; the others keep their older
    time, and every speed-up is over the cuDNN time of the row's own run."""
    study = _study()
    rows = json.loads(study.newest_timings().read_text())["rows"]
    accuracy = set(__import__("pandas").read_csv(study.ACCURACY)["variant"])
    shape = [r for r in rows if r.get("d") == 64 and r.get("n") == 32760 and not r.get("causal")
             and r.get("mode") == "fwd_nograd"]
    variants = sorted({r["spec"] for r in shape if r["method"] == "make_variant().forward"} & accuracy)
    assert len(variants) >= 2
    moved, kept = variants[0], variants[1:]
    newer = []
    for r in shape:
        if r["method"] == "sdpa_cudnn" or r["spec"] == moved:
            newer.append({**r, "ms": r["ms"] / 2})  # a faster machine: every time halved
    results = tmp_path / "benchmarks" / "gpu" / "results"
    for name, data in (("session2", shape), ("session10", newer)):
        (results / name).mkdir(parents=True)
        (results / name / "public_h200.json").write_text(json.dumps({"rows": data}))
    monkeypatch.setattr(study, "ROOT", tmp_path)
    frame = study.table(study.timing_files()).set_index("variant")
    old_ms = {r["spec"]: r["ms"] for r in shape if r["method"] == "make_variant().forward"}
    assert frame.loc[moved, "timings_file"].startswith("benchmarks/gpu/results/session10")
    assert frame.loc[moved, "forward_ms"] == pytest.approx(old_ms[moved] / 2)
    for spec in kept:
        assert frame.loc[spec, "timings_file"].startswith("benchmarks/gpu/results/session2")
        assert frame.loc[spec, "forward_ms"] == pytest.approx(old_ms[spec])
    # speed-ups against each row's own run: halving a whole run leaves its ratios unchanged
    ratio = frame["cudnn_ms"] / frame["forward_ms"]
    assert (frame["speedup_over_cudnn"] == ratio).all()
    single = study.table(results / "session2" / "public_h200.json").set_index("variant")
    assert frame.loc[moved, "speedup_over_cudnn"] == pytest.approx(single.loc[moved, "speedup_over_cudnn"])
