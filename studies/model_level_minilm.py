"""Model-level damage of each variant swapped into MiniLM, beside its map KL (issue 14).

Reuses the capture and compare table of `make demo` (runs/demo), evaluates the held-out
inputs, and writes figures/model_level_minilm/{damage_vs_layers,mapkl_vs_model}.{png,csv}.

    python studies/model_level_minilm.py
"""

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "studies"))

from model_level_figures import make_figures  # noqa: E402

from hla_analysis.cli import main  # noqa: E402

VARIANTS = ("softmax;linear:phi=elu1;linear:phi=relu;linear:phi=favor,m=256;linear:phi=taylor;linear:phi=cosformer;"
            "hla:m=2,phi=affine;hla:m=3,phi=affine;hla:m=4,phi=affine;"
            "hla:m=4,phi=affine,proj=1;linear:phi=identity")

if __name__ == "__main__":
    run = ROOT / "runs" / "demo"
    out = run / "model_level.parquet"
    code = main(["evaluate", "--model", "minilm", "--capture", str(run / "capture"), "--results",
                 str(run / "results.parquet"), "--variants", VARIANTS, "--max-heldout", "8", "--out", str(out),
                 *sys.argv[1:]])
    if code == 0:
        make_figures(out, run / "results.parquet", ROOT / "figures" / "model_level_minilm", error="embedding_cosine")
    sys.exit(code)
