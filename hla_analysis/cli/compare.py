"""``hla-analysis compare``: every variant against softmax on a capture, one tidy table."""

from __future__ import annotations

import argparse
import textwrap


def add_fit_options(p: argparse.ArgumentParser) -> None:
    from hla_analysis.fit import FitConfig

    d = FitConfig()
    g = p.add_argument_group("fitting (identical for every learnable variant)")
    g.add_argument("--train-inputs", type=int, default=None, metavar="K",
                   help="inputs 0..K-1 fit the learnable variants, the rest are held out "
                        "(default: a quarter of the inputs, at most 4)")
    g.add_argument("--fit-steps", type=int, default=d.steps, help=f"Adam steps per fit (default {d.steps})")
    g.add_argument("--fit-lr", type=float, default=d.lr, help=f"Adam learning rate (default {d.lr})")
    g.add_argument("--seed", type=int, default=d.seed,
                   help=f"torch seed set before every fit (default {d.seed}); the built-in learnable "
                   "variants start from fixed values (identity projections, the head's lowest logit), "
                   "so their fits do not depend on it")
    g.add_argument("--fit-max-rows", type=int, default=d.max_rows, metavar="R",
                   help=f"training query rows per input and head, at most (default {d.max_rows}); "
                        "bounds a fit's cost on long inputs")


def workers_arg(text: str):
    if text == "auto":
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected 'auto' or an integer, got {text!r}") from None


def fit_config(args):
    from hla_analysis.fit import FitConfig

    return FitConfig(steps=args.fit_steps, lr=args.fit_lr, seed=args.seed, max_rows=args.fit_max_rows)


def add_command(sub: argparse._SubParsersAction, name: str, *, help: str, description: str,
                epilog: str | None = None) -> argparse.ArgumentParser:
    """A subcommand whose description is one filled paragraph and whose epilog keeps its lines."""
    return sub.add_parser(name, help=help, description=textwrap.fill(description), epilog=epilog,
                          formatter_class=argparse.RawDescriptionHelpFormatter)


def register(sub: argparse._SubParsersAction) -> None:
    p = add_command(
        sub, "compare",
        help="compare attention variants with softmax on a capture (writes a results table)",
        description=(
            "Approximate every head's softmax attention with each variant and measure the "
            "error: row KL, Jensen-Shannon, total variation, Frobenius and output error, "
            "entropy, top-k recall, Spearman monotonicity, and the fraction of rows whose "
            "normalizer is not positive. Learnable variants (Hedgehog, ReBased, HLA with "
            "proj=1) are fitted per head on the first inputs and every row of the table says "
            "whether its input was 'train' or 'heldout'. Finished layers are kept, so an "
            "interrupted run resumes."
        ),
        epilog=(
            "example:\n  hla-analysis compare --capture runs/cap --variants default --out runs/results.parquet\n"
            "  hla-analysis compare --capture runs/cap --variants 'softmax;hla:m=2,phi=affine' --out r.csv"
        ),
    )
    p.add_argument("--capture", required=True, metavar="DIR", help="capture directory (hla-analysis capture)")
    p.add_argument("--variants", nargs="+", default=["default"], metavar="SPEC",
                   help="variant specs as separate arguments or joined with ';' (specs contain commas), "
                        "or 'default', the registry's default set (the default; see `hla-analysis variants`)")
    p.add_argument("--out", required=True, metavar="FILE", help="results table, .parquet or .csv")
    p.add_argument("--block-rows", type=int, default=256, help="query rows per streamed block (memory ~ N x this)")
    p.add_argument("--row-stride", type=int, default=1, metavar="S",
                   help="score every S-th query row only (a sample; S times cheaper). Default 1: all rows")
    p.add_argument("--device", default="cpu", help="torch device for maps, metrics and fits (default cpu; e.g. cuda)")
    p.add_argument("--workers", default="auto", type=workers_arg, metavar="N",
                   help="CPU processes computing layers side by side, sharing the threads (default auto: "
                        "one per thread for captures worth it; 1 on a GPU)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing --out (and its .fits.csv/.fits.safetensors/.settings.json) "
                        "that hla-analysis did not write")
    add_fit_options(p)
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from hla_analysis.cli.summary import print_summary
    from hla_analysis.compare import run_comparison, summarize

    table = run_comparison(
        args.capture, out=args.out, variants=args.variants, train_inputs=args.train_inputs,
        fit=fit_config(args), block_rows=args.block_rows, row_stride=args.row_stride, device=args.device,
        overwrite=args.overwrite, progress=not args.quiet, workers=args.workers,
    )
    print(f"wrote {len(table):,} rows to {args.out}")
    print_summary(summarize(table))
    return 0
