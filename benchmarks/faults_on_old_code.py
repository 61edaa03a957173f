"""Run today's fault tests against the code from before the reliability work (issue 16).

Every fault test should fail on the old code -- that is what makes it a test of the fix.
The tests import helpers that did not exist then (the output lock, the manifest seal,
``checks_disabled``); this script replaces those imports by shims that do what the old
code did (no lock, no seal, checks always on) and leaves every assertion untouched.

    python benchmarks/faults_on_old_code.py            # old code = c6c3712 (end of session 2)
    python benchmarks/faults_on_old_code.py --commit REV --out benchmarks/results/faults_on_old_code.csv

Writes one row per test: its outcome on the old code and the first line of the failure.
Tests that pass on the old code are guards that the old guarantees still hold (e.g.
non-finite inputs are still caught once the checks became cheaper), not fixes.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
FILES = ("tests/test_faults.py", "tests/test_faults_store.py", "tests/test_faults_compare.py")

# import line of today's tests -> what stands in for it on the old code
SHIMS = {
    "from hla_analysis._io import exclusive_output_lock\n": (
        "import contextlib\n\n\n@contextlib.contextmanager\n"
        "def exclusive_output_lock(out, command=None):  # shim: the old code took no lock\n"
        "    out.mkdir(parents=True, exist_ok=True)\n    yield\n"
    ),
    "from hla_analysis.capture.manifest import sealed\n": (
        "def sealed(manifest):  # shim: the old manifest carried no content hash\n    return manifest\n"
    ),
    "from hla_analysis._checks import checks_disabled\n": (
        "import contextlib\n\nchecks_disabled = contextlib.nullcontext  # shim: old checks could not be turned off\n"
    ),
}


def _shimmed(text: str) -> str:
    for line, shim in SHIMS.items():
        text = text.replace(line, shim)
    return text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--commit", default="c6c3712", help="the old code (default: main at the end of session 2)")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/faults_on_old_code.csv")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        old = Path(tmp) / "old"
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(old), args.commit],
                       check=True, capture_output=True)
        try:
            for name in FILES:
                (old / name).write_text(_shimmed((ROOT / name).read_text()))
                env = dict(os.environ, PYTHONPATH=str(old), HF_HUB_OFFLINE="1", COLUMNS="1000")
                run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rA", "-p", "no:cacheprovider",
                                      "-o", "addopts=", name], cwd=old, env=env, capture_output=True, text=True)
                rows += _outcomes(name, run.stdout)
        finally:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(old)], capture_output=True)
    table = pd.DataFrame(rows, columns=["test_file", "test", "outcome_on_old_code", "first_error_line"])
    table.insert(0, "old_commit", args.commit)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp_out = args.out.with_suffix(".tmp")
    table.to_csv(tmp_out, index=False)
    tmp_out.replace(args.out)
    print(table.groupby(["test_file", "outcome_on_old_code"]).size().to_string())
    print(f"wrote {args.out}")


def _outcomes(name: str, stdout: str) -> list[tuple]:
    rows = []
    if "ERROR collecting" in stdout or re.search(r"^ERROR " + re.escape(name) + r"\s*$", stdout, re.M):
        return [(name, "(whole file)", "collection error", _first_e_line(stdout))]
    for outcome, test, rest in re.findall(r"^(PASSED|FAILED|ERROR) (\S+)(?: - (.*))?$", stdout, re.M):
        rows.append((name, test.split("::", 1)[-1], outcome.lower(), (rest or "")[:200]))
    return rows


def _first_e_line(stdout: str) -> str:
    match = re.search(r"^E\s+(.*)$", stdout, re.M)
    return match.group(1)[:200] if match else ""


if __name__ == "__main__":
    main()
