"""``hla-analysis evaluate``: swap each variant into the real model and measure what it loses."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "evaluate",
        help="swap variants into the model layer by layer; model-level error on held-out inputs",
        description="Swap every variant into one layer at a time and into layers 0..l, run the capture's "
                    "held-out inputs, and write a tidy table of embedding cosine / pairwise Spearman (encoders) "
                    "or perplexity / next-token KL (causal LMs), with the fraction of failed normaliser rows. "
                    "Learnable variants are fitted per layer by map KL and by output MSE on the training inputs "
                    "(or taken from --fits). Resumes.",
        epilog="example:\n  hla-analysis evaluate --model minilm --capture runs/demo/capture "
               "--results runs/demo/results.parquet --out runs/demo/model_level.parquet\n"
               "  ... --fits auto   # reuse the fits compare wrote beside --results",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--model", required=True, help="minilm, smollm2 or a model folder (the captured model)")
    p.add_argument("--capture", required=True, metavar="DIR",
                   help="the text capture the --results table was made from (hla-analysis capture)")
    p.add_argument("--results", required=True, metavar="FILE", help="the compare table of that capture")
    p.add_argument("--variants", nargs="+", default=["default"], metavar="SPEC",
                   help="specs (separate arguments or joined with ';') or 'default' (the compare table's list)")
    p.add_argument("--objectives", nargs="+", default=["map_kl", "output_mse"], choices=["map_kl", "output_mse"],
                   help="what the learnable variants are fitted to: the row KL of the map (Hedgehog) and/or "
                        "softmax's output (LoLCATs' MSE); default both")
    p.add_argument("--max-heldout", type=int, default=None, metavar="K", help="evaluate the first K held-out inputs")
    p.add_argument("--max-tokens", type=int, default=None, metavar="T",
                   help="evaluate the first T tokens of each held-out input")
    p.add_argument("--fits", default=None, metavar="FILE",
                   help="a .fits.safetensors (compare's, or an earlier evaluate's): use the parameters it holds "
                        "instead of refitting; only what it lacks is fitted. 'auto': the one compare wrote "
                        "beside --results, if any")
    p.add_argument("--fit-steps", type=int, default=None, metavar="S",
                   help="optimiser steps of the fits evaluate runs itself (default: the compare's)")
    p.add_argument("--fit-max-rows", type=int, default=None, metavar="R",
                   help="training query rows per input and head of the fits evaluate runs itself "
                        "(default: the compare's)")
    p.add_argument("--joint-fits", action="store_true",
                   help="fit all layers of a variant and objective in one optimisation (their heads side by side); "
                        "far less overhead than one fit per layer when the fits are small")
    p.add_argument("--plain", action="store_true",
                   help="reference path: plain full forwards, full logits (no block reuse, no blocked LM head); "
                        "slower, same numbers")
    p.add_argument("--out", required=True, metavar="FILE", help=".parquet or .csv")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing --out (and its .fits.safetensors / .settings.json) that evaluate "
                        "did not write")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from hla_analysis.evaluate import run_model_evaluation

    variants = "default" if args.variants == ["default"] else args.variants
    if args.max_heldout is not None and args.max_heldout < 2:
        raise ValueError(f"--max-heldout must be >= 2 (set-level metrics need two inputs; pairwise_spearman "
                         f"needs three), got {args.max_heldout}")
    overrides = {k: v for k, v in (("steps", args.fit_steps), ("max_rows", args.fit_max_rows)) if v is not None}
    table = run_model_evaluation(args.model, capture=args.capture, results=args.results, out=args.out,
                                 variants=variants, objectives=tuple(args.objectives),
                                 max_heldout=args.max_heldout, max_tokens=args.max_tokens, fits=args.fits,
                                 fit_overrides=overrides, joint_fits=args.joint_fits, plain=args.plain,
                                 overwrite=args.overwrite,
                                 progress=not args.quiet)
    print(f"wrote {len(table):,} rows to {args.out}")
    return 0
