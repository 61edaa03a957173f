"""``hla-analysis demo``: the main job on the embedded default model, end to end."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from hla_analysis._io import refuse_capture_folder

# a file in each folder demo writes to, listing the files demo wrote there: those are its own
MARKER = "hla-analysis-demo.json"
_TOOL = "hla-analysis demo"
FIGURES = ("kl_heatmaps", "error_vs_factors", "attention_maps", "monotonicity")
FIGURE_FILES = [f"{name}{ext}" for name in FIGURES for ext in (".png", ".csv")] + ["compare_summary.csv"]


def _folder(path: Path, option: str) -> None:
    if path.exists() and not path.is_dir():
        raise ValueError(f"{option}={str(path)!r} is a file; pass a directory")


def _marker(folder: Path) -> dict:
    try:
        marker = json.loads((folder / MARKER).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return {}
    if not isinstance(marker, dict) or marker.get("tool") != _TOOL or not isinstance(marker.get("files"), list):
        return {}
    return marker


def _ours(folder: Path) -> set[str]:
    """The files demo wrote in ``folder`` and that are unchanged since (their SHA-256 as recorded;
    a file claimed but not yet recorded, a run stopped while writing it, counts as demo's)."""
    from hla_analysis._io import file_sha256

    marker = _marker(folder)
    digests = marker.get("digests") if isinstance(marker.get("digests"), dict) else {}
    ours = set()
    for name in map(str, marker.get("files", [])):
        path = folder / name
        if name in digests and path.is_file() and file_sha256(path) != digests[name]:
            continue  # changed or replaced since demo wrote it: a user's file now
        ours.add(name)
    return ours


def _check_files(folder: Path, names: list[str], *, overwrite: bool) -> None:
    """Refuse files demo is about to write that exist and that demo did not write (unless overwrite)."""
    marker = folder / MARKER
    if marker.exists() and not _marker(folder) and not overwrite:
        raise ValueError(f"{marker} exists and hla-analysis did not write it; choose another folder, "
                         "or pass --overwrite to replace it")
    ours = _ours(folder)
    foreign = [folder / n for n in names if (folder / n).exists() and n not in ours]
    changed = [p for p in foreign if p.name in map(str, _marker(folder).get("files", []))]
    if changed and not overwrite:
        raise ValueError(f"{', '.join(map(str, changed))} changed since hla-analysis demo wrote it; "
                         "choose another folder, or pass --overwrite to replace it")
    folders = [p for p in foreign if p.is_dir()]
    if folders:
        raise ValueError(f"{folders[0]} is a folder; demo writes a file there, choose another folder")
    if foreign and not overwrite:
        raise ValueError(f"{', '.join(map(str, foreign))} already exist(s) and hla-analysis did not write them; "
                         "choose another folder, or pass --overwrite to replace them")


def _claim(folder: Path, names: list[str]) -> None:
    """Record in the folder's marker that demo writes these files (before writing them)."""
    from hla_analysis._io import atomic_write_json

    marker = _marker(folder)
    files = sorted(set(map(str, marker.get("files", []))) | set(names))
    digests = {k: v for k, v in (marker.get("digests") or {}).items() if k not in names}
    atomic_write_json(folder / MARKER, {"tool": _TOOL, "files": files, "digests": digests})


def _seal(folder: Path, names: list[str]) -> None:
    """Record the SHA-256 of the files demo just wrote, so a later change to one is noticed."""
    from hla_analysis._io import atomic_write_json, file_sha256

    marker = _marker(folder)
    digests = dict(marker.get("digests") or {})
    digests.update({n: file_sha256(folder / n) for n in names if (folder / n).is_file()})
    atomic_write_json(folder / MARKER, {"tool": _TOOL, "files": marker.get("files", []), "digests": digests})


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
    p.add_argument("--overwrite", action="store_true",
                   help="replace summary.csv, figure files and the results table where demo did not write them")
    add_fit_options(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from hla_analysis import report
    from hla_analysis._io import atomic_write_bytes
    from hla_analysis.capture import capture
    from hla_analysis.cli.compare import fit_config
    from hla_analysis.cli.summary import print_summary
    from hla_analysis.compare import resolve_variants, run_comparison, summarize
    from hla_analysis.figure_tables import load_figure_tables

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
    figures = Path(args.figures) if args.figures else out / "figures"
    _folder(out, "--out")
    _folder(figures, "--figures")
    refuse_capture_folder(out, "--out")
    refuse_capture_folder(figures, "--figures")
    if figures.resolve() == (out / "capture").resolve():
        raise ValueError(f"--figures={str(figures)!r} is where the demo keeps its capture; pass another folder.")
    _check_files(out, ["summary.csv"], overwrite=args.overwrite)
    _check_files(figures, FIGURE_FILES, overwrite=args.overwrite)
    from hla_analysis.compare import _check_outputs

    # compare names the files --overwrite replaces when it runs; this early check only refuses
    _check_outputs(out / "results.parquet", overwrite=args.overwrite, announce=False)
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
                           progress=progress, overwrite=args.overwrite)
    print(f"      {time.perf_counter() - step:.0f} s")
    step = time.perf_counter()
    print(f"[3/3] figures -> {figures}")
    figures.mkdir(parents=True, exist_ok=True)
    _claim(figures, FIGURE_FILES)
    tables = load_figure_tables(results_path)  # figure tables beside the results (issue 17)
    inputs = {"attention_maps": tables["maps"], "monotonicity": tables["monotonicity"]}
    for name in FIGURES:
        figure = getattr(report, name)
        try:
            path = figure(inputs.get(name, table), figures)
        except ValueError as exc:  # e.g. --variants softmax: no HLA variant to plot
            # an earlier run's figure would sit beside figures of another table: remove it (it is
            # ours: _check_files refused files demo did not write, unless --overwrite)
            stale = [figures / f"{name}{ext}" for ext in (".png", ".csv") if (figures / f"{name}{ext}").is_file()]
            for path in stale:
                path.unlink()
            removed = f"; removed the earlier {', '.join(p.name for p in stale)}" if stale else ""
            print(f"      {name}: skipped ({exc}){removed}")
            continue
        print(f"      {path} (+ .csv)")
    print(f"      {time.perf_counter() - step:.0f} s")
    summary = summarize(table)
    _claim(out, ["summary.csv"])
    atomic_write_bytes(out / "summary.csv", summary.to_csv().encode())
    atomic_write_bytes(figures / "compare_summary.csv", summary.to_csv().encode())
    _seal(out, ["summary.csv"])
    _seal(figures, FIGURE_FILES)
    print()
    print_summary(summary)
    print(f"\ndone in {time.perf_counter() - started:.0f} s; results: {results_path}, summary: {out / 'summary.csv'}")
    return 0
