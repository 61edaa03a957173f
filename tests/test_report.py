"""Figures read tables only: report.py neither opens captures nor runs variants."""

import ast
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from hla_analysis.figure_tables import MAP_VARIANTS, figure_head, figure_table_paths, load_figure_tables

REPORT = Path(__file__).parents[1] / "hla_analysis" / "report.py"


def test_report_imports_no_capture_and_no_variant_code():
    tree = ast.parse(REPORT.read_text())
    modules = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    modules |= {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    banned = ("hla_analysis.capture", "hla_analysis.variants", "hla_analysis.ops", "torch")
    assert not [m for m in modules if m.startswith(banned)], modules
    names = {node.attr for node in ast.walk(tree) if isinstance(node, ast.Attribute)}
    assert not names & {"attention_map", "weights", "make_variant"}


def _results():
    rng = np.random.default_rng(0)
    rows = []
    for variant in ("softmax", "linear:phi=elu1", "hla:m=2,phi=affine", "hla:m=2,phi=affine,proj=1",
                    "hla:m=3,phi=affine", "linear:phi=favor,m=64"):  # an old spelling, as old tables hold
        for layer in range(2):
            for head in range(3):
                for inp, split in ((0, "train"), (1, "heldout")):
                    kl = 0.0 if variant == "softmax" else float(rng.uniform(0.1, 1))
                    if (variant, layer, head) == ("hla:m=2,phi=affine", 1, 2):
                        kl = 5.0  # the worst head of HLA M=2
                    rows += [(inp, layer, head, variant, split, "kl_mean", kl),
                             (inp, layer, head, variant, split, "failed_fraction", 0.0)]
    table = pd.DataFrame(rows, columns=["input", "layer", "head", "variant", "split", "metric", "value"])
    return table.assign(params_per_head=0)


def _figure_tables(n=6):
    maps, points = [], []
    for spec in MAP_VARIANTS:
        w = np.tril(np.full((n, n), 1.0)) / np.arange(1, n + 1)[:, None]
        i, j = np.meshgrid(range(n), range(n), indexing="ij")
        maps.append(pd.DataFrame({"variant": spec, "query": i.ravel(), "key": j.ravel(), "weight": w.ravel()}))
        points.append(pd.DataFrame({"variant": spec, "score": np.linspace(-2, 2, 30),
                                    "weight_times_row_len": np.exp(np.linspace(-2, 2, 30))}))
    where = dict(layer=1, head=2, input=1)
    return {"maps": pd.concat(maps).assign(keys=n, **where), "monotonicity": pd.concat(points).assign(**where)}


def test_figure_head_is_the_worst_m2_head_on_the_first_heldout_input():
    assert figure_head(_results()) == {"layer": 1, "head": 2, "input": 1}


def test_figures_from_tables(tmp_path):
    from hla_analysis.report import comparison_figures

    tables = _figure_tables()
    paths = comparison_figures(_results(), tables, tmp_path)
    assert [p.name for p in paths] == ["kl_heatmaps.png", "error_vs_factors.png", "attention_maps.png",
                                       "monotonicity.png"]
    assert all(p.with_suffix(".csv").exists() for p in paths)
    # error_vs_factors reads M and tied/fitted from the spec columns, here derived for an old table
    factors = pd.read_csv(tmp_path / "error_vs_factors.csv")
    assert set(zip(factors["family"], factors["M"])) == {("tied (1+s/M)^M", 2), ("tied (1+s/M)^M", 3), ("fitted", 2)}
    shown = pd.read_csv(tmp_path / "attention_maps.csv")
    pd.testing.assert_frame_equal(shown, tables["maps"][["variant", "query", "key", "weight"]].reset_index(drop=True))


def test_figure_tables_are_found_beside_the_results(tmp_path):
    results = tmp_path / "r.parquet"
    paths = figure_table_paths(results)
    assert paths["maps"].name == "r.figure_maps.parquet"
    with pytest.raises(FileNotFoundError, match="rerun `hla-analysis compare`"):
        load_figure_tables(results)
    for name, table in _figure_tables().items():
        table.to_parquet(paths[name])
    assert set(load_figure_tables(results)) == {"maps", "monotonicity"}
