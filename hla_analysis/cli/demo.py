"""``hla-analysis demo``: the main job on the embedded default model, end to end."""

from __future__ import annotations

import argparse
import time
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    from hla_analysis.cli.compare import add_command, add_fit_options

    p = add_command(
        sub, "demo",
        help="capture MiniLM, compare every default variant, write results and figures",
        description=(
            "The main job on the embedded all-MiniLM-L6-v2 (no download needed): capture q, k, v "
            "of every layer on the Python language reference text, compare every default variant "
            "with softmax (fitting the learnable ones on the first inputs), write the results "
            "table and figures, and print the per-variant summary. Every step resumes if "
            "interrupted."
        ),
    )
    p.add_argument("--out", default="runs/demo", metavar="DIR", help="output directory (default runs/demo)")
    p.add_argument("--model", default="minilm", help="model to capture (default: the embedded minilm)")
    p.add_argument("--num-inputs", type=int, default=32, help="inputs to capture (default 32)")
    p.add_argument("--max-tokens", type=int, default=256, help="tokens per input (default 256)")
    p.add_argument("--variants", nargs="+", default=["default"], metavar="SPEC",
                   help="variant specs or 'default' (see `hla-analysis variants`)")
    p.add_argument("--row-stride", type=int, default=1, metavar="S",
                   help="score every S-th query row (default 1: all rows)")
    p.add_argument("--device", default="cpu", help="torch device for capture, fits, maps and metrics (default cpu)")
    p.add_argument("--figures", metavar="DIR", help="where figures go (default OUT/figures)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    add_fit_options(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from hla_analysis.capture import capture
    from hla_analysis.cli.compare import fit_config
    from hla_analysis.cli.summary import print_summary
    from hla_analysis.compare import resolve_variants, run_comparison, summarize
    from hla_analysis.report import comparison_figures

    # check everything that can be checked before the capture spends its half minute
    resolve_variants(args.variants)
    fit_config(args)
    from hla_analysis.compare import _check_device

    _check_device(args.device)
    if args.row_stride < 1:
        raise ValueError(f"--row-stride must be >= 1, got {args.row_stride}.")
    if args.num_inputs < 2:
        raise ValueError(f"--num-inputs must be >= 2 (one to fit on, one held out), got {args.num_inputs}.")
    if args.train_inputs is not None and not 1 <= args.train_inputs < args.num_inputs:
        raise ValueError(f"--train-inputs must be between 1 and {args.num_inputs - 1}, got {args.train_inputs}.")
    out = Path(args.out)
    started = time.perf_counter()
    progress = not args.quiet
    print(f"[1/3] capturing {args.model}: {args.num_inputs} inputs x {args.max_tokens} tokens -> {out / 'capture'}")
    cap_dir = capture(args.model, out=out / "capture", num_inputs=args.num_inputs,
                      max_tokens=args.max_tokens, device=args.device, progress=progress)
    results_path = out / "results.parquet"
    step = time.perf_counter()
    print(f"      {step - started:.0f} s")
    print(f"[2/3] comparing variants -> {results_path}")
    table = run_comparison(cap_dir, out=results_path, variants=args.variants, train_inputs=args.train_inputs,
                           fit=fit_config(args), row_stride=args.row_stride, device=args.device,
                           progress=progress)
    figures = Path(args.figures) if args.figures else out / "figures"
    print(f"      {time.perf_counter() - step:.0f} s")
    step = time.perf_counter()
    print(f"[3/3] figures -> {figures}")
    for path in comparison_figures(table, results_path, figures):  # figure tables beside the results (issue 17)
        print(f"      {path} (+ .csv)")
    print(f"      {time.perf_counter() - step:.0f} s")
    summary = summarize(table)
    summary.to_csv(out / "summary.csv")
    summary.to_csv(figures / "compare_summary.csv")
    print()
    print_summary(summary)
    print(f"\ndone in {time.perf_counter() - started:.0f} s; results: {results_path}, summary: {out / 'summary.csv'}")
    return 0
