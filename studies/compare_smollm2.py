"""The same comparison on a causal LLM: SmolLM2-135M-Instruct (GQA, RoPE), shipped in a wheel.

Writes figures/smollm2/{kl_heatmaps,error_vs_factors,attention_maps,monotonicity}.{png,csv}
and figures/smollm2/compare_summary.csv; the capture and table go to runs/smollm2/.
q and k are captured after RoPE, keys/values expanded to the 9 query heads; every map is causal.

    python studies/compare_smollm2.py            # about 5 minutes on 2 CPU cores
"""

import sys
from pathlib import Path

from hla_analysis.cli import main

ROOT = Path(__file__).resolve().parents[1]

if __name__ == "__main__":
    sys.exit(main([
        "demo", "--model", "smollm2", "--num-inputs", "8", "--max-tokens", "256",
        "--out", str(ROOT / "runs" / "smollm2"), "--figures", str(ROOT / "figures" / "smollm2"),
        *sys.argv[1:],
    ]))
