"""Model-level damage of each variant swapped into SmolLM2-135M, beside its map KL (issue 14).

Reuses the capture and compare table of studies/compare_smollm2.py (runs/smollm2) and writes
figures/model_level_smollm2/{damage_vs_layers,mapkl_vs_model}.{png,csv}.

    python studies/model_level_smollm2.py
"""

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "studies"))

from model_level_figures import make_figures  # noqa: E402
from model_level_minilm import VARIANTS  # noqa: E402

from hla_analysis.cli import main  # noqa: E402

if __name__ == "__main__":
    run = ROOT / "runs" / "smollm2"
    out = run / "model_level.parquet"
    code = main(["evaluate", "--model", "smollm2", "--capture", str(run / "capture"), "--results",
                 str(run / "results.parquet"), "--variants", VARIANTS, "--max-heldout", "2", "--out", str(out),
                 *sys.argv[1:]])
    if code == 0:
        make_figures(out, run / "results.parquet", ROOT / "figures" / "model_level_smollm2", error="next_token_kl")
    sys.exit(code)
