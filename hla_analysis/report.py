"""Figures of a comparison: each PNG is saved beside the CSV of the numbers it shows.

Every figure reads tables and recomputes nothing. The heatmap and factor-count figures
read the results table (and its typed spec columns); the attention-map and monotonicity
figures read the raw weights of one head, which ``compare`` wrote beside the results
(:mod:`hla_analysis.figure_tables`).
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from hla_analysis._io import atomic_save_figure, atomic_write_table  # noqa: E402
from hla_analysis.figure_tables import load_figure_tables  # noqa: E402
from hla_analysis.spec import add_spec_columns  # noqa: E402

_CSV_POINTS = 1500  # scatter points per variant kept in a figure's CSV (< 1 MB in all)
_CSV_SEED = 0
_MAX_FAILED = 0.01  # a variant counts as "best" only if at most 1% of its rows failed


def sample_scatter(table: pd.DataFrame, *, by: str = "variant", points: int = _CSV_POINTS,
                   seed: int = _CSV_SEED) -> pd.DataFrame:
    """At most ``points`` rows per ``by`` group, drawn uniformly with a fixed seed.

    The figure plots every point; its CSV keeps this sample, and says so in a ``sample``
    column (``"k/n seed s"``: k of n points, uniform), so the file stays small.
    """
    parts = []
    for _, group in table.groupby(by, sort=False):
        n = len(group)
        keep = group.sample(n=min(points, n), random_state=seed).sort_index() if n > points else group
        parts.append(keep.assign(sample=f"{len(keep)}/{n} seed {seed}"))
    return pd.concat(parts, ignore_index=True)


def _save(fig, table: pd.DataFrame, out_dir: Path, name: str) -> Path:
    atomic_save_figure(fig, out_dir / f"{name}.png", dpi=130, bbox_inches="tight")
    plt.close(fig)
    atomic_write_table(out_dir / f"{name}.csv", table)
    return out_dir / f"{name}.png"


def _heldout_head_kl(results: pd.DataFrame) -> pd.DataFrame:
    held = results[(results["split"] == "heldout") & (results["metric"] == "kl_mean")]
    return held.groupby(["variant", "layer", "head"], as_index=False)["value"].mean()


def kl_heatmaps(results: pd.DataFrame, out_dir: Path, *, name: str = "kl_heatmaps") -> Path:
    """Layer x head heatmaps of held-out KL: best linear variant and HLA with M = 2, 3, 4."""
    results = add_spec_columns(results)
    per_head = _heldout_head_kl(results)
    means = per_head.groupby("variant")["value"].mean()
    failed = results[(results["split"] == "heldout") & (results["metric"] == "failed_fraction")]
    failed = failed.groupby("variant")["value"].mean()
    specs = results.drop_duplicates("variant").set_index("variant")

    def best(family_name: str, factors: int) -> str | None:
        # a variant whose rows mostly fail has a small KL over the few rows left: prefer
        # reliable ones, and show an unreliable family only with its failure rate in the title
        members = specs.index[(specs["family"] == family_name) & (specs["factors"] == factors).fillna(False)]
        family = means[means.index.isin(members)].dropna()
        reliable = family[failed.reindex(family.index).fillna(1.0) <= _MAX_FAILED]
        pool = reliable if len(reliable) else family
        return pool.idxmin() if len(pool) else None

    panels = []
    for family_name, factors, label in (("linear", 1, "best linear"), ("hla", 2, "best HLA, M=2"),
                                        ("hla", 3, "best HLA, M=3"), ("hla", 4, "best HLA, M=4")):
        variant = best(family_name, factors)
        if variant is not None:
            note = f", {failed.get(variant, 0):.0%} rows failed" if failed.get(variant, 0) > _MAX_FAILED else ""
            panels.append((variant, f"{label}\n{variant}\nmean {means[variant]:.3f} nats{note}"))
    if not panels:
        raise ValueError("the results hold no linear or HLA variant with a finite KL to plot.")
    chosen = per_head[per_head["variant"].isin([v for v, _ in panels])]
    vmax = float(np.nanpercentile(chosen["value"], 98))
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 4.0), squeeze=False)
    cmap = plt.get_cmap("magma_r").with_extremes(bad="#9ecae1")
    for ax, (variant, title) in zip(axes[0], panels):
        grid = chosen[chosen["variant"] == variant].pivot(index="layer", columns="head", values="value")
        im = ax.imshow(np.ma.masked_invalid(grid.to_numpy()), cmap=cmap, vmin=0, vmax=vmax, aspect="auto")
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("head")
        ax.set_ylabel("layer")
        ax.set_xticks(range(grid.shape[1]))
        ax.set_yticks(range(grid.shape[0]))
        ax.tick_params(labelsize=7)
    fig.colorbar(im, ax=axes[0].tolist(), label="held-out row KL(softmax || variant), nats")
    fig.suptitle("Per-head row KL(softmax || variant) on held-out inputs; best = lowest mean KL, preferring "
                 "variants with <= 1% failed rows (blue: every row of the head failed)", fontsize=10, y=1.07)
    return _save(fig, chosen.rename(columns={"value": "kl_mean_heldout"}), out_dir, name)


def error_vs_factors(results: pd.DataFrame, out_dir: Path, *, name: str = "error_vs_factors") -> Path:
    """Held-out KL against the number of HLA factors M, per layer, tied vs fitted.

    A point whose rows failed on more than 1% (negative weights or normalizer) is drawn as a
    hollow cross: its KL covers only the surviving rows and is not comparable.
    """
    results = add_spec_columns(results)
    held = results[(results["split"] == "heldout") & (results["family"] == "hla") & (results["phi"] == "affine")]
    if held.empty:
        raise ValueError("the results hold no affine HLA variants (hla:m=M,phi=affine[,proj=1]).")
    fitted = held["proj"] | ~held["tied"]
    held = held.assign(M=held["factors"].astype(int), family=np.where(fitted, "fitted", "tied (1+s/M)^M"))
    per_head = held.pivot_table(index=["variant", "M", "family", "layer", "head"], columns="metric",
                                values="value").reset_index()
    table = per_head.groupby(["family", "M", "layer"], as_index=False).agg(
        median_head_kl_heldout=("kl_mean", "median"), failed_fraction=("failed_fraction", "mean")
    )
    fig, axes = plt.subplots(1, 2, figsize=(10.5, 3.8), sharey=True)
    layers = sorted(table["layer"].unique())
    cmap = plt.cm.viridis
    norm = matplotlib.colors.Normalize(vmin=min(layers), vmax=max(max(layers), min(layers) + 1))
    for ax, family in zip(axes, ["tied (1+s/M)^M", "fitted"]):
        part = table[table["family"] == family]
        for layer in layers:
            rows = part[part["layer"] == layer].sort_values("M")
            color = cmap(norm(layer))
            ok = rows["failed_fraction"] <= _MAX_FAILED
            ax.plot(rows["M"][ok], rows["median_head_kl_heldout"][ok], "o-", color=color, ms=4, lw=1)
            ax.plot(rows["M"][~ok], rows["median_head_kl_heldout"][~ok], "x", color=color, ms=6, alpha=0.7)
        ax.set_yscale("log")
        ax.set_xlabel("number of factors M")
        ax.set_title(f"HLA, {family}", fontsize=10)
        ax.set_xticks(sorted(table["M"].unique()))
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("median over heads of held-out KL (nats)")
    fig.colorbar(matplotlib.cm.ScalarMappable(norm=norm, cmap=cmap), ax=axes.tolist(), label="layer")
    fig.suptitle("Error vs number of factors M, one line per layer (x: > 1% of rows failed, "
                 "KL over surviving rows only)", fontsize=10)
    return _save(fig, table, out_dir, name)


def _one_head(table: pd.DataFrame) -> tuple[pd.DataFrame, int, int, int]:
    first = table.iloc[0]
    return table, int(first["layer"]), int(first["head"]), int(first["input"])


def attention_maps(maps: pd.DataFrame, out_dir: Path, *, name: str = "attention_maps") -> Path:
    """One head's map under softmax, linear (elu+1) and HLA M = 2, 3, 4 on the same tokens.

    ``maps`` is the ``figure_maps`` table: rows were normalised over the whole sequence and
    the top-left block is shown.
    """
    maps, layer, head, input_index = _one_head(maps)
    shown = []
    for spec, part in maps.groupby("variant", sort=False):
        grid = part.pivot(index="query", columns="key", values="weight").to_numpy()
        shown.append((spec, grid))
    vmax = float(shown[0][1].max())
    # one colour scale for all panels; weights < 0 (signed variants) show red, > softmax's max white
    cmap = plt.get_cmap("viridis").with_extremes(under="red", over="white")
    fig, axes = plt.subplots(1, len(shown), figsize=(3.2 * len(shown), 3.4))
    for ax, (spec, attn) in zip(axes, shown):
        im = ax.imshow(attn, cmap=cmap, vmin=0.0, vmax=vmax)
        negative = float((attn < 0).mean())
        ax.set_title(spec + (f"\n{negative:.0%} weights < 0 (red)" if negative else ""), fontsize=9)
        ax.set_xlabel("key")
    axes[0].set_ylabel("query")
    fig.colorbar(im, ax=axes.tolist(), label="attention weight", shrink=0.8, extend="both")
    fig.suptitle(f"layer {layer}, head {head}, input {input_index}: the first {shown[0][1].shape[0]} queries and keys "
                 f"of {int(maps['keys'].iloc[0])} tokens (rows normalised over all keys)", fontsize=10)
    return _save(fig, maps[["variant", "query", "key", "weight"]], out_dir, name)


def monotonicity(points: pd.DataFrame, out_dir: Path, *, name: str = "monotonicity") -> Path:
    """Weight against the logit q.k for one head: softmax is monotone in it, approximations may not be."""
    points, layer, head, input_index = _one_head(points)
    groups = list(points.groupby("variant", sort=False))
    fig, axes = plt.subplots(1, len(groups), figsize=(3.2 * len(groups), 3.2), sharex=True)
    for ax, (spec, part) in zip(axes, groups):
        ax.scatter(part["score"], part["weight_times_row_len"], s=1, alpha=0.15, rasterized=True)
        ax.set_yscale("symlog", linthresh=1e-2)
        ax.set_title(spec, fontsize=9)
        ax.set_xlabel("logit s = scale q.k")
    axes[0].set_ylabel("weight x row length")
    fig.suptitle(f"monotonicity in q.k: layer {layer}, head {head}, input {input_index}", fontsize=10)
    return _save(fig, sample_scatter(points[["variant", "score", "weight_times_row_len"]]), out_dir, name)


def comparison_figures(results: pd.DataFrame, tables, out_dir: str | Path) -> list[Path]:
    """All four comparison figures, from tables only.

    ``tables`` is the results file ``compare`` wrote (its figure tables sit beside it) or
    the mapping :func:`~hla_analysis.figure_tables.load_figure_tables` returns.
    """
    out_dir = Path(out_dir)
    if not isinstance(tables, dict):
        tables = load_figure_tables(tables)
    return [kl_heatmaps(results, out_dir), error_vs_factors(results, out_dir),
            attention_maps(tables["maps"], out_dir), monotonicity(tables["monotonicity"], out_dir)]
