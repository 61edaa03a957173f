"""Figure: measured logit spreads per head (MiniLM, SmolLM2) and the degree each family needs there.

Run: python studies/logit_spreads.py -> figures/logit_spreads.{png,csv} (captures of 4 inputs x 256
tokens are made once under runs/logit_spreads/, about 1.5 min; afterwards about 1.5 min). Needs
figures/half_line_approximation.csv (python studies/half_line_approximation.py).

Per head: the row spread max_j s_ij - min_j s_ij, and the 99th percentile over rows of the
"effective" spread max_j s_ij - s_ij over the keys that carry 99% of the row's softmax mass.
The degree a family needs for a normalised error <= TARGET is read off the half-line table at
the smallest tabulated L >= the head's effective spread (inf if none reaches it).
"""

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402

from hla_analysis._io import atomic_save_figure, atomic_write_table  # noqa: E402
from hla_analysis.capture.run import capture  # noqa: E402
from hla_analysis.capture.store import load_capture  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "figures" / "logit_spreads"
TARGET = 1e-2
MODELS = ("minilm", "smollm2")


def head_spreads(cap):
    rows = []
    for layer in range(cap.num_layers):
        full, eff = [], []
        for i in range(cap.num_inputs):
            t = cap.get(layer, i)
            logits = torch.matmul(t["q"].double(), t["k"].double().transpose(-1, -2)) * t["scale"]
            n = logits.shape[-1]
            if t["causal"]:
                logits = logits.masked_fill(~torch.ones(n, n, dtype=torch.bool).tril(), float("-inf"))
            elif t["attention_mask"] is not None:
                logits = logits.masked_fill(~t["attention_mask"], float("-inf"))
            top = logits.amax(-1, keepdim=True)
            gap = top - logits  # >= 0, inf where masked
            finite = torch.isfinite(gap)
            full.append(torch.where(finite, gap, torch.zeros_like(gap)).amax(-1))
            p = torch.softmax(logits, -1)
            order = torch.sort(gap, dim=-1)  # smallest gaps carry the most mass
            mass = torch.gather(p, -1, order.indices).cumsum(-1)
            needed = (mass < 0.99).sum(-1, keepdim=True).clamp(max=n - 1)
            eff.append(torch.gather(order.values, -1, needed).squeeze(-1))
        full, eff = torch.cat(full, -1), torch.cat(eff, -1)  # [heads, rows]
        for h in range(cap.num_heads):
            rows.append({"layer": layer, "head": h, "median_spread": float(full[h].median()),
                         "max_spread": float(full[h].max()),
                         "p99_effective_spread": float(torch.quantile(eff[h], 0.99))})
    return rows


def needed_degree(table, family, spread):
    sub = table[(table.family == family) & (table.metric == "normalised_rel_error") & (table.L >= spread)
                & np.isfinite(table.L)]
    if sub.empty:
        return np.inf
    sub = sub[sub.L == sub.L.min()]
    ok = sub[sub.value <= TARGET]
    return float(ok.degree.min()) if len(ok) else np.inf


def main():
    approx = pd.read_csv(ROOT / "figures" / "half_line_approximation.csv")
    records = []
    for model in MODELS:
        path = ROOT / "runs" / "logit_spreads" / model
        capture(model, out=path, num_inputs=4, max_tokens=256, progress=False)
        for row in head_spreads(load_capture(path)):
            for family in ("minimax_nn", "polynomial", "hla_tied_shift"):
                records.append({"model": model, **row, "family": family, "target": TARGET,
                                "needed_degree": needed_degree(approx, family, row["p99_effective_spread"])})
    table = pd.DataFrame(records)
    atomic_write_table(OUT.with_suffix(".csv"), table)

    fig, axes = plt.subplots(1, 2, figsize=(13, 4.6))
    heads = table.drop_duplicates(["model", "layer", "head"])
    for model, g in heads.groupby("model"):
        axes[0].hist(g.p99_effective_spread, bins=30, alpha=0.6, label=f"{model}: p99 effective spread")
        axes[0].hist(g.max_spread, bins=30, alpha=0.3, histtype="step", lw=2, label=f"{model}: max row spread")
    axes[0].set_xlabel("logit spread per head")
    axes[0].set_ylabel("heads")
    axes[0].legend(fontsize=8)
    sub = approx[(approx.metric == "normalised_rel_error") & np.isfinite(approx.L)
                 & approx.family.isin(["minimax_nn", "polynomial", "hla_tied_shift"])]
    for family, g in sub.groupby("family"):
        for degree in (2, 4, 8):
            d = g[g.degree == degree].sort_values("L")
            if len(d):
                axes[1].semilogy(d.L, d.value.clip(lower=1e-12), "o-", ms=3, label=f"{family} M={degree}")
    for model, g in heads.groupby("model"):
        axes[1].plot(g.p99_effective_spread, np.full(len(g), 2.0), "|", ms=14, label=f"{model} heads")
    axes[1].axhline(TARGET, color="k", ls=":", lw=1)
    axes[1].set_xscale("log")
    axes[1].set_xlabel("L (interval [-L, 0]); ticks at top: heads' p99 effective spread")
    axes[1].set_ylabel("normalised relative error")
    axes[1].legend(fontsize=6, ncol=2)
    fig.suptitle("Where real heads sit: spreads of 4 x 256-token captures, "
                 "and the error each family reaches at that L")
    fig.tight_layout()
    atomic_save_figure(fig, OUT.with_suffix(".png"), dpi=100)
    summary = table.groupby(["model", "family"]).needed_degree.describe(percentiles=[0.5, 0.9])
    print(summary.to_string())
    print(heads.groupby("model")[["median_spread", "max_spread", "p99_effective_spread"]].describe().T.to_string())


if __name__ == "__main__":
    main()
