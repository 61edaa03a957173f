"""The body both model-level studies share (issue 14): capture, compare, evaluate, figures.

Each study names its model, its demo settings and its variants; this module

1. reuses the run folder's capture and compare table when they exist (``make demo`` writes
   ``runs/demo``, ``studies/compare_smollm2.py`` writes ``runs/smollm2``) and otherwise
   creates them with ``hla-analysis demo`` and the study's settings (deterministic: fixed
   texts, fixed seeds; reruns reuse them);
2. runs ``hla-analysis evaluate`` (resumable: an interrupted study restarts where it stopped);
3. writes the figures with their CSVs and ``run.json`` (wall and CPU seconds, load average:
   the machine may be shared, so the load is recorded beside the times).

Every step can be rerun to re-time it: ``--fresh`` re-evaluates (the capture is kept).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "studies"))

from model_level_figures import make_figures, objective_figures  # noqa: E402

from hla_analysis._io import atomic_write_json  # noqa: E402
from hla_analysis.cli import main  # noqa: E402

# Nine variants beside softmax: usable default kernels (every row normalisable on both models)
# and the HLA forms, two of them fitted (by map KL in compare, by output MSE here). The SmolLM2
# study runs these; the MiniLM study (cheaper per swap) runs every usable default variant.
VARIANTS = ("softmax", "linear:phi=elu1", "linear:phi=relu", "linear:phi=favor,features=256", "linear:phi=taylor",
            "linear:phi=cosformer", "hla:m=2,phi=affine", "hla:m=4,phi=affine", "hla:m=2,phi=affine,proj=1",
            "hla:m=4,phi=affine,proj=1")
# The default set less the variants whose normaliser fails on MiniLM rows in `make demo`
# (identity: all rows; hla m=3 tied and fitted: 79..86%; rebased: 1.6%).
VARIANTS_ALL_USABLE = VARIANTS + ("linear:phi=hedgehog", "linear:phi=favor,features=64", "linear:phi=exp",
                                  "hla:m=2,phi=exp", "power:p=2", "power:p=4")


def _cpu() -> float:
    """CPU seconds (user + sys) of this process, all threads, and of its finished children."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def _parser(name: str, run: str, num_inputs: int, max_tokens: int, max_heldout: int, eval_tokens: int | None,
            fit_max_rows: int | None, row_stride: int, variants, joint_fits: bool,
            fit_steps: int | None) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=f"model-level study on {name} (issue 14)")
    p.add_argument("--run", default=str(ROOT / "runs" / run), metavar="DIR",
                   help=f"run folder with capture/ and results.parquet (created if missing; default runs/{run})")
    p.add_argument("--num-inputs", type=int, default=num_inputs, help="inputs to capture when the run is created")
    p.add_argument("--max-tokens", type=int, default=max_tokens, help="tokens per input when the run is created")
    p.add_argument("--train-inputs", type=int, default=None, help="fit inputs when the run is created (demo default)")
    p.add_argument("--row-stride", type=int, default=row_stride,
                   help="compare's metric row stride when the run is created")
    p.add_argument("--max-heldout", type=int, default=max_heldout, help="held-out inputs evaluated")
    p.add_argument("--eval-tokens", type=int, default=eval_tokens,
                   help="first tokens of each held-out input evaluated (default: all)")
    p.add_argument("--variants", default=";".join(variants), help="';'-separated specs")
    p.add_argument("--fits", default="auto", metavar="FILE",
                   help="fitted parameters to reuse (default auto: the .fits file compare wrote beside its table)")
    p.add_argument("--fit-max-rows", type=int, default=fit_max_rows,
                   help="training rows per input and head of the fits evaluate runs (output MSE)")
    p.add_argument("--fit-steps", type=int, default=fit_steps,
                   help="steps of the fits evaluate runs (output MSE; default: compare's)")
    p.add_argument("--joint-fits", action=argparse.BooleanOptionalAction, default=joint_fits,
                   help="fit all layers of a variant in one optimisation (output MSE; evaluate --joint-fits)")
    p.add_argument("--plain", action="store_true", help="evaluate on the plain reference path (slower)")
    p.add_argument("--figures", default=str(ROOT / "figures" / f"model_level_{name}"), metavar="DIR")
    p.add_argument("--fresh", action="store_true", help="re-evaluate even if the table exists (to re-time)")
    p.add_argument("--quiet", action="store_true")
    return p


def run_study(name: str, *, run: str, num_inputs: int, max_tokens: int, max_heldout: int, error: str,
              argv: list[str], eval_tokens: int | None = None, fit_max_rows: int | None = None,
              row_stride: int = 1, variants=VARIANTS, joint_fits: bool = True, fit_steps: int | None = None) -> int:
    """Run one model-level study end to end; ``error`` is the per-input model error metric."""
    args = _parser(name, run, num_inputs, max_tokens, max_heldout, eval_tokens, fit_max_rows,
                   row_stride, variants, joint_fits, fit_steps).parse_args(argv)
    folder, figures = Path(args.run), Path(args.figures)
    quiet = ["--quiet"] if args.quiet else []
    timing = {"load_average_start": os.getloadavg(), "cpu_cores": os.cpu_count(), "argv": argv}
    wall0, cpu0 = time.perf_counter(), _cpu()
    results = folder / "results.parquet"
    if not results.is_file():  # no demo run to reuse: make one with the study's settings
        started, cpu = time.perf_counter(), _cpu()
        train = ["--train-inputs", str(args.train_inputs)] if args.train_inputs else []
        code = main(["demo", "--model", name, "--num-inputs", str(args.num_inputs), "--max-tokens",
                     str(args.max_tokens), *train, "--variants", args.variants, "--row-stride", str(args.row_stride),
                     "--out", str(folder), "--figures", str(folder / "figures"), *quiet])
        if code:
            return code
        timing["demo_seconds"] = round(time.perf_counter() - started, 1)
        timing["demo_cpu_seconds"] = round(_cpu() - cpu, 1)
    out = folder / "model_level.parquet"
    evaluated = args.fresh or not out.is_file()
    if evaluated:
        extra = ["--fits", args.fits] if args.fits and args.fits != "none" else []
        for flag, value in (("--max-tokens", args.eval_tokens), ("--fit-max-rows", args.fit_max_rows),
                            ("--fit-steps", args.fit_steps)):
            extra += [flag, str(value)] if value is not None else []
        extra += ["--plain"] if args.plain else []
        extra += ["--joint-fits"] if args.joint_fits else []
        code = main(["evaluate", "--model", name, "--capture", str(folder / "capture"), "--results", str(results),
                     "--variants", args.variants, "--max-heldout", str(args.max_heldout), *extra, "--out", str(out),
                     "--overwrite", *quiet])  # the run folder is this study's: it replaces its own table
        if code:
            return code
    started, cpu = time.perf_counter(), _cpu()
    estimate, low, high = make_figures(out, results, figures, error=error)
    objective_figures(out, figures, error=error)
    timing["figures_seconds"] = round(time.perf_counter() - started, 1)
    timing["figures_cpu_seconds"] = round(_cpu() - cpu, 1)
    timing.update(load_average_end=os.getloadavg(), spearman=estimate, ci_low=low, ci_high=high,
                  run=str(folder), max_heldout=args.max_heldout)
    settings = json.loads(out.with_name(out.stem + ".settings.json").read_text())
    # the evaluation's own wall and CPU seconds (CPU: torch's threads included; on 2 idle cores
    # the wall time is about half of it); a resumed run counts the part after its restart
    compare = json.loads(results.with_name(results.stem + ".settings.json").read_text())
    timing.update(variants=len(settings["variants"]), heldout=settings["heldout"], tokens=settings.get("tokens"),
                  compare_row_stride=compare.get("row_stride"), given_fits=settings.get("given_fits"),
                  fit_settings=settings.get("fit_settings"), block_cache=settings.get("block_cache"),
                  blocked_lm_head=settings.get("blocked_lm_head"), torch_threads=settings.get("torch_threads"),
                  evaluate_stages=settings.get("stages"),
                  evaluate_seconds=settings.get("seconds"), evaluate_cpu_seconds=settings.get("cpu_seconds"),
                  # this process from start to end (evaluate + figures, + demo if it ran); CPU of all threads
                  study_seconds=round(time.perf_counter() - wall0, 1), study_cpu_seconds=round(_cpu() - cpu0, 1))
    if not evaluated and (figures / "run.json").is_file():  # figures redrawn only: keep the run's own timings
        before = json.loads((figures / "run.json").read_text())
        keep = ("argv", "load_average_start", "load_average_end", "study_seconds", "study_cpu_seconds",
                "demo_seconds", "demo_cpu_seconds")
        timing.update({k: before[k] for k in keep if k in before})
    atomic_write_json(figures / "run.json", timing)
    print(f"{name}: map KL vs model error Spearman {estimate:.2f} (95% CI {low:.2f}..{high:.2f}); "
          f"figures in {figures}")
    return 0
