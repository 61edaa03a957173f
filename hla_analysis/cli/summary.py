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


def check_new_file(path, *, overwrite: bool, option: str) -> None:
    """Refuse a path that is a folder, or an existing file unless ``overwrite``: one line naming the fix."""
    from pathlib import Path

    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{option} {path} is a folder; pass a file name")
    if path.exists() and not overwrite:
        raise ValueError(f"{option} {path} already exists; choose another file, or pass --overwrite to replace it")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "summary",
        help="print the per-variant summary of a results table",
        description="Per variant, over held-out inputs: mean and worst-head row KL, output error, "
                    "total variation, top-5 recall, Spearman monotonicity and failure rate.",
        epilog="example:\n  hla-analysis summary runs/demo/results.parquet --csv runs/demo/summary.csv",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("results", metavar="FILE", help="table written by `hla-analysis compare`")
    p.add_argument("--csv", metavar="FILE", help="also write the summary as CSV (a new file, see --overwrite)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --csv file")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from hla_analysis._io import atomic_write_bytes, refuse_capture_folder
    from hla_analysis.compare import load_results, summarize

    if args.csv is not None:
        from pathlib import Path

        csv = Path(args.csv)
        if not args.csv or csv.suffix != ".csv":
            raise ValueError(f"--csv needs a file name ending in .csv, got {args.csv!r}")
        if csv.resolve() == Path(args.results).resolve():
            raise ValueError(f"--csv {csv} is the results table being summarized; choose another file")
        refuse_capture_folder(csv.parent, "--csv")  # a capture keeps only its own files
        check_new_file(csv, overwrite=args.overwrite, option="--csv")
    summary = summarize(load_results(args.results))
    print_summary(summary)
    if args.csv is not None:
        atomic_write_bytes(args.csv, summary.to_csv().encode())
    return 0
