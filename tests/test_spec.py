"""Spec strings are parsed once (hla_analysis.spec), without torch, into typed columns."""

import ast
import warnings
from pathlib import Path

import pandas as pd
import pytest

from hla_analysis.spec import SPEC_COLUMNS, add_spec_columns, normalize_spec, spec_columns
from hla_analysis.variants import list_variants, make_variant

EXTRA = ["hla:m=2,phi=affine,tied=0", "hla:m=3,phi=hedgehog,tied=0", "hla:m=4,phi=affine,shift=1",
         "hla:m=2,phi=favor,features=16", "linear:phi=affine,c=2", "power:p=3"]


@pytest.mark.parametrize("module", ["spec.py", "registry.py"])
def test_parser_modules_import_neither_torch_nor_sympy(module):
    tree = ast.parse((Path(__file__).parents[1] / "hla_analysis" / module).read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            names.add(node.module.split(".")[0])
            if node.module.startswith("hla_analysis"):
                assert node.module in ("hla_analysis.registry", "hla_analysis.spec"), node.module
    assert not names & {"torch", "sympy", "numpy"}


@pytest.mark.parametrize("spec", list_variants() + EXTRA)
def test_columns_describe_the_built_variant(spec):
    dim, heads = 6, 2
    cols = spec_columns(spec, head_dim=dim)
    assert tuple(cols) == SPEC_COLUMNS
    var = make_variant(spec).bind(dim, heads=heads)
    params = sum(p.numel() for p in var.parameters() if p.requires_grad) // heads
    assert cols["params_per_head"] == params
    assert cols["learnable"] == (params > 0)
    assert (cols["family"], cols["factors"], cols["phi"], cols["tied"]) == (var.kind, var.factors, var.phi, var.tied)
    assert cols["shift"] == var.shifted and cols["proj"] == ("proj=1" in var.spec)


def test_favor_feature_count_is_features_and_old_m_warns():
    with pytest.warns(DeprecationWarning, match="write features="):
        old = make_variant("linear:phi=favor,m=32")
    new = make_variant("linear:phi=favor,features=32")
    assert old.spec == new.spec == "linear:phi=favor,features=32"
    # hla's m stays the factor count, and favor factors can now set their feature count
    var = make_variant("hla:m=3,phi=favor,features=16,seed=2")
    assert var.factors == 3 and var.parsed.map_options == {"features": 16, "seed": 2}
    assert var.bind(4).maps[0].out_dim() == 16
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        make_variant("linear:phi=favor,features=8")  # the new spelling does not warn
    with pytest.raises(ValueError, match="gives both m= and features="):
        make_variant("linear:phi=favor,m=8,features=8")


def test_add_spec_columns_types_and_old_tables():
    table = pd.DataFrame({"variant": ["softmax", "hla:m=2,phi=affine,proj=1", "softmax"], "value": [0.0, 1.0, 2.0]})
    out = add_spec_columns(table, head_dim=4)
    assert str(out["factors"].dtype) == "Int64" and out["factors"].isna().tolist() == [True, False, True]
    assert out["proj"].tolist() == [False, True, False] and out["params_per_head"].tolist() == [0, 16, 0]
    assert add_spec_columns(out) is out  # complete tables pass through
    with pytest.raises(ValueError, match="pass head_dim"):
        add_spec_columns(table)


def test_bad_head_dim_and_spec():
    with pytest.raises(ValueError, match="head_dim must be an integer >= 1"):
        spec_columns("softmax", head_dim=0)
    with pytest.raises(ValueError, match="unknown variant family"):
        normalize_spec("flash")


@pytest.mark.parametrize("seed", ["99999999999999999999", "-1"])
def test_a_seed_torch_cannot_take_is_refused_when_parsed(seed):
    """It used to parse, then fail at the first forward with torch's 'Overflow when unpacking long'."""
    from hla_analysis.variants import make_variant

    with pytest.raises(ValueError, match=r"seed must be an integer in \[0, 2\*\*63\)"):
        make_variant(f"linear:phi=favor,seed={seed}")


def test_favor_feature_count_has_an_upper_limit():
    """features=100000000 ran for minutes and 7 GB before any error: refused at parse time now."""
    from hla_analysis.registry import MAX_FAVOR_FEATURES
    from hla_analysis.spec import normalize_spec

    assert normalize_spec(f"linear:phi=favor,features={MAX_FAVOR_FEATURES}").spec.endswith(str(MAX_FAVOR_FEATURES))
    with pytest.raises(ValueError, match=rf"features must be an integer in 1\.\.{MAX_FAVOR_FEATURES}"):
        normalize_spec(f"linear:phi=favor,features={MAX_FAVOR_FEATURES + 1}")
