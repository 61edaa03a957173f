"""Model-level damage of each variant swapped into SmolLM2-135M, beside its map KL (issue 14).

Reuses the capture and compare table of studies/compare_smollm2.py (runs/smollm2: 8 inputs x
256 tokens, 2 fit inputs) and evaluates held-out perplexity and next-token KL; without
runs/smollm2 it creates the run first. Writes figures/model_level_smollm2/ (as the MiniLM study).

    python studies/model_level_smollm2.py
"""

import sys

from _model_level_common import run_study

if __name__ == "__main__":
    sys.exit(run_study("smollm2", run="smollm2", num_inputs=8, max_tokens=256, max_heldout=2,
                       error="next_token_kl", argv=sys.argv[1:]))
