"""Figures of a model-level evaluation: damage vs layers swapped, and map KL vs model error.

Reads the evaluate table and the compare table; plots only what they hold. The rank
correlation between per-layer map KL and per-layer model error (single-layer swaps, variants
fitted by map KL or not fitted, no failed normalisers) comes with a bootstrap 95% interval
over held-out inputs.
"""

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from scipy.stats import spearmanr  # noqa: E402

from hla_analysis._io import atomic_save_figure, atomic_write_table  # noqa: E402


def _model_error(table: pd.DataFrame, error: str) -> pd.DataFrame:
    per_input = table[(table.metric == error) & (table.input >= 0)].copy()
    if error == "embedding_cosine":
        per_input["value"] = 1 - per_input["value"]
    return per_input


def make_figures(evaluation: Path, results: Path, folder: Path, *, error: str, boot: int = 1000, seed: int = 0):
    table = pd.read_parquet(evaluation)
    folder.mkdir(parents=True, exist_ok=True)
    label = "1 - embedding cosine" if error == "embedding_cosine" else "next-token KL"
    per_input = _model_error(table, error)

    curve = (per_input.groupby(["variant", "objective", "swap_mode", "layer"], as_index=False)
             .agg(model_error=("value", "mean"), status=("status", lambda s: "ok" if (s == "ok").all() else s.iloc[0])))
    atomic_write_table(folder / "damage_vs_layers.csv", curve)
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), sharey=True)
    names = sorted(v for v in curve.variant.unique() if v != "softmax")
    palette = dict(zip(names, plt.get_cmap("tab20" if len(names) > 10 else "tab10").colors))
    for ax, mode in zip(axes, ("single", "cumulative")):
        for (variant, objective), g in curve[curve.swap_mode == mode].groupby(["variant", "objective"]):
            if variant == "softmax":
                continue
            style = "--" if objective == "output_mse" else "-"
            failed = (g.status != "ok").any()
            ax.plot(g.layer, g.model_error.clip(lower=1e-8), style, marker="x" if failed else "o", ms=3,
                    color=palette[variant],
                    label=f"{variant}" + (f" [{objective}]" if objective != "none" else "")
                    + (" (failed rows)" if failed else ""))
        ax.set_yscale("log")
        ax.set_xlabel("layer l" + (" (swapped alone)" if mode == "single" else " (layers 0..l swapped)"))
        ax.set_title(f"{mode} swap")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel(f"model error: {label} (held-out mean)")
    axes[1].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0)
    atomic_save_figure(fig, folder / "damage_vs_layers.png", dpi=120, bbox_inches="tight")
    plt.close(fig)

    compare = pd.read_parquet(results)
    kl = (compare[(compare.metric == "kl_mean") & (compare.split == "heldout")]
          .groupby(["variant", "layer", "input"], as_index=False)["value"].mean().rename(columns={"value": "map_kl"}))
    single = per_input[(per_input.swap_mode == "single") & per_input.objective.isin(["none", "map_kl"])
                       & (per_input.status == "ok") & (per_input.variant != "softmax")]
    joined = single.merge(kl, on=["variant", "layer", "input"]).rename(columns={"value": "model_error"})
    inputs = np.array(sorted(joined.input.unique()))
    cube = joined.pivot_table(index=["variant", "layer"], columns="input", values=["map_kl", "model_error"])

    def rho(cols):
        return spearmanr(cube["map_kl"][cols].mean(1), cube["model_error"][cols].mean(1)).statistic

    estimate = rho(list(inputs))
    rng = np.random.default_rng(seed)
    draws = [rho(list(rng.choice(inputs, len(inputs)))) for _ in range(boot)]
    low, high = np.nanpercentile(draws, [2.5, 97.5])
    points = pd.DataFrame({"map_kl": cube["map_kl"].mean(1), "model_error": cube["model_error"].mean(1)}).reset_index()
    points["spearman"], points["ci_low"], points["ci_high"], points["inputs"] = estimate, low, high, len(inputs)
    atomic_write_table(folder / "mapkl_vs_model.csv", points)
    fig, ax = plt.subplots(figsize=(7, 5))
    for variant, g in points.groupby("variant"):
        ax.scatter(g.map_kl, g.model_error.clip(lower=1e-8), s=14, label=variant, color=palette.get(variant))
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("per-layer map KL(softmax || variant), held-out mean over heads and inputs")
    ax.set_ylabel(f"model error when that layer alone is swapped: {label}")
    ax.set_title(f"Spearman {estimate:.2f} (95% bootstrap over {len(inputs)} inputs: {low:.2f}..{high:.2f})")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0)
    ax.grid(alpha=0.3)
    atomic_save_figure(fig, folder / "mapkl_vs_model.png", dpi=120, bbox_inches="tight")
    plt.close(fig)
    return estimate, low, high


def objective_figures(evaluation: Path, folder: Path, *, error: str) -> pd.DataFrame:
    """Fitted variants: model error when fitted by map KL vs by output MSE (LoLCATs), side by side.

    Writes objectives.{png,csv} (per-layer curves) and objectives_summary.csv (one row per
    variant, objective and measure) and returns the summary.
    """
    table = pd.read_parquet(evaluation)
    folder.mkdir(parents=True, exist_ok=True)
    label = "1 - embedding cosine" if error == "embedding_cosine" else "next-token KL"
    fitted = table[table.objective.isin(["map_kl", "output_mse"])]
    if fitted.empty:
        return pd.DataFrame()
    per_input = _model_error(fitted, error)
    curve = (per_input.groupby(["variant", "objective", "swap_mode", "layer"], as_index=False)
             .agg(model_error=("value", "mean"), status=("status", lambda s: "ok" if (s == "ok").all() else s.iloc[0])))
    atomic_write_table(folder / "objectives.csv", curve)
    last = fitted.layer.max()
    sets = fitted[fitted.input < 0]
    summary = []
    for (variant, objective), g in per_input.groupby(["variant", "objective"]):
        single = g[g.swap_mode == "single"]
        full = g[(g.swap_mode == "cumulative") & (g.layer == last)]
        summary += [(variant, objective, f"{label}, one layer swapped (mean over layers)", single.value.mean()),
                    (variant, objective, f"{label}, every layer swapped", full.value.mean())]
        s = sets[(sets.variant == variant) & (sets.objective == objective) & (sets.swap_mode == "cumulative")
                 & (sets.layer == last)]
        for metric in ("pairwise_spearman", "perplexity", "perplexity_original"):
            if (s.metric == metric).any():
                summary.append((variant, objective, f"{metric}, every layer swapped",
                                float(s[s.metric == metric].value.iloc[0])))
    summary = pd.DataFrame(summary, columns=["variant", "objective", "measure", "value"])
    atomic_write_table(folder / "objectives_summary.csv", summary)

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), sharey=True)
    colors = dict(zip(sorted(curve.variant.unique()), plt.rcParams["axes.prop_cycle"].by_key()["color"]))
    for ax, mode in zip(axes, ("single", "cumulative")):
        for (variant, objective), g in curve[curve.swap_mode == mode].groupby(["variant", "objective"]):
            ax.plot(g.layer, g.model_error.clip(lower=1e-8), "-" if objective == "map_kl" else "--", marker="o", ms=3,
                    color=colors[variant], label=f"{variant} [{'map KL' if objective == 'map_kl' else 'output MSE'}]")
        ax.set_yscale("log")
        ax.set_xlabel("layer l" + (" (swapped alone)" if mode == "single" else " (layers 0..l swapped)"))
        ax.set_title(f"{mode} swap; solid: fitted by map KL, dashed: by output MSE", fontsize=10)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel(f"model error: {label} (held-out mean)")
    axes[1].legend(fontsize=7, loc="lower right")
    atomic_save_figure(fig, folder / "objectives.png", dpi=120, bbox_inches="tight")
    plt.close(fig)
    return summary
