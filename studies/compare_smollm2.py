"""The same comparison on a causal LLM: SmolLM2-135M-Instruct (GQA, RoPE), shipped in a wheel.

Writes figures/smollm2/{kl_heatmaps,error_vs_factors,attention_maps,monotonicity}.{png,csv}
and figures/smollm2/compare_summary.csv; the capture and table go to runs/smollm2/.
q and k are captured after RoPE, keys/values expanded to the 9 query heads; every map is causal.

    python studies/compare_smollm2.py                   # every query row scored
    python studies/compare_smollm2.py --row-stride 4    # every 4th row (the model-level study's run)

Measured (issue 14) with --row-stride 4: 2,151 CPU s (user + sys), 49.5 min of wall on 2 cores
under load average 4..6 from other jobs; the CPU seconds put it at 18 min or more on 2 idle
cores (the split between its per-layer fits of the five learnable variants and its metrics was
not measured). The full row set (no --row-stride) was not re-timed.
"""

import sys
from pathlib import Path

from hla_analysis.cli import main

ROOT = Path(__file__).resolve().parents[1]

if __name__ == "__main__":
    sys.exit(main([
        "demo", "--model", "smollm2", "--num-inputs", "8", "--max-tokens", "256",
        "--out", str(ROOT / "runs" / "smollm2"), "--figures", str(ROOT / "figures" / "smollm2"),
        "--overwrite",  # both folders belong to this study, the committed figures included
        *sys.argv[1:],
    ]))
