"""Figure: what each step of accuracy costs. Held-out mean row KL of each variant on SmolLM2
against its forward time on one H200 at d = 64, N = 32,760, non-causal, under torch.no_grad().

Run: .venv/bin/python studies/accuracy_vs_speed.py [--timings JSON] -> figures/accuracy_vs_speed.{png,csv}

Both axes come from committed tables; nothing is recomputed and no GPU is needed:
- accuracy: ``figures/smollm2/compare_summary.csv`` (``studies/compare_smollm2.py``), the mean
  held-out row KL per variant and the fraction of rows whose normaliser failed;
- speed: ``benchmarks/gpu/results/session*/public_h200.json`` (``benchmarks/gpu/bench_public.py``),
  whose rows time the public calls: ``make_variant(spec).forward`` (checks included) and cuDNN
  SDPA for softmax. Each variant's time comes from the newest run that timed it (a later run
  may time only some variants), and its speed-up is over the cuDNN time of that same run.
A variant appears when both tables have it. SmolLM2's head dim is 64, the timed d.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib
import matplotlib.ticker

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

from hla_analysis._io import atomic_save_figure, atomic_write_table  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
ACCURACY = ROOT / "figures" / "smollm2" / "compare_summary.csv"
OUT = ROOT / "figures" / "accuracy_vs_speed"
SHAPE = dict(d=64, n=32760, causal=False, mode="fwd_nograd")


def timing_files() -> list[Path]:
    """The public-call timing JSONs with variant rows at the figure's shape, oldest session first
    (sessions sort by name; a run cut short before its variant rows is skipped)."""
    found = sorted((ROOT / "benchmarks" / "gpu" / "results").glob("session*/public_h200.json"),
                   key=lambda p: (len(p.parent.name), p.parent.name))
    keep = [path for path in found if not _shape_rows(path).query("method == 'make_variant().forward'").empty]
    if not keep:
        raise SystemExit("no benchmarks/gpu/results/session*/public_h200.json with variant rows at "
                         f"d={SHAPE['d']}, N={SHAPE['n']}: run benchmarks/gpu/bench_public.py on a GPU first, "
                         "or pass --timings FILE")
    return keep


def newest_timings() -> Path:
    """The latest of :func:`timing_files`."""
    return timing_files()[-1]


def _shape_rows(path: Path) -> pd.DataFrame:
    rows = pd.DataFrame(json.loads(path.read_text())["rows"])
    if rows.empty or "d" not in rows:
        return rows.iloc[0:0].assign(method=[])
    return rows[(rows["d"] == SHAPE["d"]) & (rows["n"] == SHAPE["n"]) & (rows["causal"] == SHAPE["causal"])
                & (rows["mode"] == SHAPE["mode"])
                & rows["method"].isin(["make_variant().forward", "sdpa_cudnn"])]


def speed_rows(path: Path) -> pd.DataFrame:
    """Forward times at the figure's shape, one row per spec (softmax for cuDNN SDPA), with the
    cuDNN time of the same run (``cudnn_ms``) and the file they come from."""
    keep = _shape_rows(path).copy()
    keep["variant"] = keep["spec"].where(keep["method"] != "sdpa_cudnn", "softmax")
    if keep.empty:
        raise SystemExit(f"{path} has no forward rows at d={SHAPE['d']}, N={SHAPE['n']}: "
                         "pass --timings with a bench_public.py run that covers them")
    out = keep.groupby("variant", as_index=False).agg(forward_ms=("ms", "min"), path=("path", "first"),
                                                     method=("method", "first"))
    soft = out.loc[out["variant"] == "softmax", "forward_ms"]
    out["cudnn_ms"] = float(soft.iloc[0]) if len(soft) else float("nan")
    out["timings_file"] = str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)
    return out


def table(timings) -> pd.DataFrame:
    """``timings``: one JSON, or several (oldest first): each variant from the newest that has it."""
    paths = [timings] if isinstance(timings, Path) else list(timings)
    speed = pd.concat([speed_rows(path) for path in paths]).drop_duplicates("variant", keep="last")
    accuracy = pd.read_csv(ACCURACY).rename(columns={"kl_mean": "kl_mean_heldout",
                                                     "failed_rows": "failed_fraction_heldout"})
    joined = speed.merge(accuracy[["variant", "kl_mean_heldout", "failed_fraction_heldout", "params_per_head"]],
                         on="variant", how="inner")
    joined["speedup_over_cudnn"] = joined["cudnn_ms"] / joined["forward_ms"]  # against the same run's cuDNN
    return joined.sort_values("forward_ms").reset_index(drop=True)


def plot(frame: pd.DataFrame):
    fig, ax = plt.subplots(figsize=(9, 5.2))
    soft = frame[frame["variant"] == "softmax"]
    if len(soft):  # exact: KL 0, which a log axis cannot place; drawn as the time to beat
        ms = float(soft["forward_ms"].iloc[0])
        ax.axvline(ms, color="black", ls="--", lw=1)
        # right of the line: the points' labels sit left of their points
        ax.annotate(f"softmax, cuDNN SDPA: {ms:.2f} ms (KL 0)", (ms, 0.98), xycoords=("data", "axes fraction"),
                    xytext=(4, 0), textcoords="offset points", rotation=90, ha="left", va="top", fontsize=8)
    for _, row in frame[frame["variant"] != "softmax"].iterrows():
        color = "tab:red" if row["params_per_head"] else "tab:blue"
        failing = row["failed_fraction_heldout"] > 0.01  # its KL covers the surviving rows only
        ax.scatter(row["forward_ms"], row["kl_mean_heldout"], s=60, zorder=3,
                   marker="D" if row["params_per_head"] else "o",
                   facecolors="none" if failing else color, edgecolors=color)
        label = row["variant"] + (f"\n(normaliser fails on {row['failed_fraction_heldout']:.0%} of rows)"
                                  if failing else "")
        ax.annotate(label, (row["forward_ms"], row["kl_mean_heldout"]), fontsize=7.5,
                    xytext=(-6, 4), textcoords="offset points", ha="right")
    ax.set_xscale("log")
    ax.set_yscale("log")
    for axis in (ax.xaxis, ax.yaxis):
        axis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda x, _: f"{x:g}"))
        axis.set_minor_formatter(matplotlib.ticker.FuncFormatter(lambda x, _: f"{x:g}"))
    ax.set_xlim(left=frame["forward_ms"].min() / 1.8, right=frame["forward_ms"].max() * 1.15)
    ax.set_xlabel("forward time, ms (one H200, bf16, B=1, H=12, d=dv=64, N=32,760, no_grad; public call)")
    ax.set_ylabel("held-out mean row KL vs softmax (SmolLM2)")
    ax.set_title("What each step of accuracy costs (red diamonds: fitted; hollow: KL of surviving rows only)",
                 fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    return fig


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--timings", type=Path, help="one bench_public.py JSON (default: every committed run, each "
                                                 "variant from the newest that timed it)")
    args = p.parse_args(argv)
    frame = table(args.timings.resolve() if args.timings else timing_files())
    OUT.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_table(OUT.with_suffix(".csv"), frame)
    atomic_save_figure(plot(frame), OUT.with_suffix(".png"), dpi=130)
    print(frame.to_string(index=False))


if __name__ == "__main__":
    main()
