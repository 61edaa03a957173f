"""Numerics: exp approximants, softmax rows, measured degree == symbolic degree."""

import numpy as np
import pytest

from hla_analysis.numeric.degree import measure_variant_degree, measured_degree
from hla_analysis.numeric.exp_approximation import exp_errors
from hla_analysis.numeric.softmax_rows import draw_scores, row_errors
from hla_analysis.symbolic.derive import derive
from hla_analysis.variants import list_variants, make_variant

EPS = np.finfo(float).eps
# AAA (an SVD of the Loewner matrix of 300 float64 samples) reproduces an exact type-(n, n) rational
# to ~1e2-1e4 eps (sample rounding, a few eps, times the Loewner conditioning); 1e6 eps ~ 2e-10 sits
# clear above that and far below the error any lower degree leaves
RATIONAL_TOL = 1e6 * EPS


def test_measured_equals_symbolic_for_every_rational_variant():
    checked = 0
    for spec in list_variants() + ["hla:m=5,phi=affine", "linear:phi=affine"]:
        form = derive(spec)
        if form.rational:
            assert measure_variant_degree(make_variant(spec), tol=RATIONAL_TOL) == form.degree, spec
            checked += 1
    assert checked >= 8


def test_softmax_degree_grows_as_tolerance_tightens():
    var = make_variant("softmax")
    # the tightest tolerance stays 1e5 eps above the samples' rounding, so AAA resolves it
    degrees = [measure_variant_degree(var, tol=tol) for tol in (1e-2, 1e-6, 1e5 * EPS)]
    assert degrees[0] < degrees[1] < degrees[2]


def test_measured_degree_of_known_rational_and_bad_tol():
    t = np.linspace(0.01, 3, 300)
    assert measured_degree((2 + t) ** 3 / (1 + t**3 + t), t) == 3
    with pytest.raises(ValueError, match="tolerance"):
        measured_degree(t, t, tol=0)


def test_exp_errors_shrink_with_degree():
    for family in ("pade", "aaa"):
        errs = [exp_errors(family, n, a=2.0)["max_rel_error"] for n in (2, 4, 6)]
        assert errs[0] > errs[1] > errs[2]
    assert exp_errors("hla_tied", 8, a=2.0)["max_rel_error"] < exp_errors("hla_tied", 2, a=2.0)["max_rel_error"]
    with pytest.raises(ValueError):
        exp_errors("pade", 0, a=1.0)


def test_softmax_rows_report_negative_weights():
    s = draw_scores("normal", rows=16, keys=32, scale=2.0, seed=3)
    taylor1 = row_errors(s, "taylor", 1)  # 1 + s goes negative below s = -1
    assert taylor1["negative_weights"] > 0 and taylor1["mean_kl"] == np.inf
    assert row_errors(s, "pade", 6)["mean_tv"] < row_errors(s, "pade", 2)["mean_tv"]
