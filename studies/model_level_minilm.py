"""Model-level damage of each variant swapped into MiniLM, beside its map KL (issue 14).

Reuses the capture, compare table and map-KL fits of `make demo` (runs/demo: 32 inputs x 256
tokens, 4 fit inputs) and evaluates all 28 held-out inputs at full length; only the output-MSE
fits are run here. Without runs/demo it creates the run first (as `make demo` does).
Writes figures/model_level_minilm/{damage_vs_layers,mapkl_vs_model,objectives}.{png,csv} and
run.json (timings per stage). Resumable; `--fresh` re-evaluates to re-time.

    make demo && python studies/model_level_minilm.py
    python studies/model_level_minilm.py --run /tmp/mlm --num-inputs 12 --max-tokens 128 --train-inputs 4
"""

import sys

from _model_level_common import VARIANTS_ALL_USABLE, run_study

if __name__ == "__main__":
    sys.exit(run_study("minilm", run="demo", num_inputs=32, max_tokens=256, max_heldout=28,
                       error="embedding_cosine", variants=VARIANTS_ALL_USABLE, argv=sys.argv[1:]))
