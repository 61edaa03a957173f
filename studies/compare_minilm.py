"""Figures of the main comparison on the embedded MiniLM (the same pipeline as `make demo`).

Writes figures/kl_heatmaps, error_vs_factors, attention_maps, monotonicity (.png + .csv)
and figures/compare_summary.csv; the capture and full table go to runs/minilm/. Both folders
belong to this study, so it replaces its earlier outputs there (``--overwrite``), including
the committed figures, which demo's claim file does not list.

    python studies/compare_minilm.py
"""

import sys
from pathlib import Path

from hla_analysis.cli import main

ROOT = Path(__file__).resolve().parents[1]

if __name__ == "__main__":
    sys.exit(main(["demo", "--out", str(ROOT / "runs" / "minilm"), "--figures", str(ROOT / "figures"), "--overwrite",
                   *sys.argv[1:]]))
