"""Model-level damage of each variant swapped into SmolLM2-135M, beside its map KL (issue 14).

Reuses the capture, compare table and map-KL fits of studies/compare_smollm2.py run with
`--row-stride 4` (runs/smollm2: 8 inputs x 256 tokens, 2 fit inputs; without runs/smollm2 the
study creates it with those settings). Evaluates 4 held-out inputs, each its first 64 tokens
(a causal prefix: exactly what the model computes on it), every one of the 30 layers swapped
alone and as the prefix 0..l. The output-MSE fits run here, one per layer and variant, with
compare's settings (40 steps, all 256 rows of the 2 fit inputs): 60 fits, about 140 CPU s.
Writes figures/model_level_smollm2/ (as the MiniLM study) and run.json (timings per stage).

    python studies/compare_smollm2.py --row-stride 4 && python studies/model_level_smollm2.py
"""

import sys

from _model_level_common import run_study

if __name__ == "__main__":
    sys.exit(run_study("smollm2", run="smollm2", num_inputs=8, max_tokens=256, max_heldout=4, eval_tokens=64,
                       joint_fits=False, row_stride=4, error="next_token_kl", argv=sys.argv[1:]))
