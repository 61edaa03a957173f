"""The dispatcher's cost model against committed H200 measurements (issue 11: "dispatch never
picks a path more than 10% slower than the other on the benchmarked shapes").

``benchmarks/gpu/results/session9/public_h200.json`` times tied M = 3 and 4 (r = 8, dv = 128,
B = 1, H = 12, bf16) through ``hla()`` on both paths: the symmetric state path (by dispatch) and
the quadratic kernel (forced). For every shape and mode timed there, the path
:func:`hla_analysis.ops.quadratic_dispatch.prices` prefers must be within 10% of the faster one.
"""

import json
import re
from pathlib import Path

import pytest

from hla_analysis.ops.quadratic_dispatch import prices

RUN = Path(__file__).resolve().parents[1] / "benchmarks/gpu/results/session9/public_h200.json"


def _timed():
    rows = json.loads(RUN.read_text())["rows"]
    timed = {}
    for row in rows:
        if row["method"] != "hla()":
            continue
        match = re.fullmatch(r"M=(\d+) r=(\d+) tied( form=quadratic)?", row["spec"])
        if match and row.get("ms") and not row["causal"] and row["mode"] in ("fwd_nograd", "fwd_bwd"):
            path = "quadratic" if match[3] else row.get("path")
            timed.setdefault((int(match[1]), int(match[2]), row["n"], row["mode"]), {})[path] = row["ms"]
    return {key: paths for key, paths in timed.items() if set(paths) == {"state", "quadratic"}}


def test_the_run_holds_both_paths_of_every_shape():
    timed = _timed()
    assert {(m, n) for m, _, n, _ in timed} == {(m, n) for m in (3, 4) for n in (8192, 32760, 75600)}


@pytest.mark.parametrize("key", sorted(_timed()), ids=lambda k: f"M{k[0]}-r{k[1]}-N{k[2]}-{k[3]}")
def test_the_cost_model_picks_a_path_within_10_percent_of_the_faster(key):
    m, r, n, mode = key
    measured = _timed()[key]
    state, quad = prices([r] * m, 128, n, tied=True, causal=False, state_engine="symmetric",
                         backward=mode == "fwd_bwd")
    picked = "quadratic" if quad < state else "state"
    assert measured[picked] <= 1.10 * min(measured.values()), (picked, measured)
