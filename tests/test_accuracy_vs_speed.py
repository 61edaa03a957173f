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
