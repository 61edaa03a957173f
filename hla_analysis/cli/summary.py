"""``hla-analysis summary``: the per-variant summary of a results table."""

from __future__ import annotations

import argparse


def _fmt(x: float) -> str:
    # rounding noise must not print as "-0.0000" (a KL is never negative)
    return "0.0000" if abs(x) < 5e-5 else f"{x:.4f}"


def print_summary(summary) -> None:
    import pandas as pd

    shown = summary.rename(columns={
        "kl_mean": "KL mean", "kl_worst_head": "KL worst head", "output_rel": "output err",
        "tv_mean": "TV", "topk_recall": "top5 recall", "spearman": "spearman",
        "failed_rows": "failed rows", "params_per_head": "params/head",
    })
    with pd.option_context("display.width", 160, "display.max_columns", 20, "display.float_format", _fmt):
        print("held-out inputs only; sorted by mean row KL(softmax || variant), lower is better")
        print("'failed rows': fraction of rows with a non-positive normalizer or invalid weights,")
        print("excluded from the other columns; variants failing on > 1% of rows are listed last\n")
        print(shown.to_string(na_rep="n/a"))


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "summary",
        help="print the per-variant summary of a results table",
        description="Per variant, over held-out inputs: mean and worst-head row KL, output error, "
                    "total variation, top-5 recall, Spearman monotonicity and failure rate.",
        epilog="example: hla-analysis summary runs/demo/results.parquet --csv runs/demo/summary.csv",
    )
    p.add_argument("results", metavar="FILE", help="table written by `hla-analysis compare`")
    p.add_argument("--csv", metavar="FILE", help="also write the summary as CSV")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from hla_analysis.compare import load_results, summarize

    summary = summarize(load_results(args.results))
    print_summary(summary)
    if args.csv:
        summary.to_csv(args.csv)
    return 0
