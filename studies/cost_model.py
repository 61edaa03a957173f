"""Figure: the symbolic cost model (FLOPs per head against N, crossovers N*) beside the
speed-up over cuDNN softmax that the Triton kernels reached on an H200.

Run: .venv/bin/python studies/cost_model.py  -> figures/cost_model.{png,csv}

Left: forward FLOPs per head from :mod:`hla_analysis.symbolic.cost_model` (d = dv = 128, the
Wan2.1 head size), softmax against HLA of several shapes, each crossover ``N*`` marked.
Right: the FLOP ratio softmax / HLA the model predicts, and the forward-time ratio cuDNN /
Triton HLA measured (``benchmarks/gpu/results/session2/h200_session2.json``, run A; no GPU is
needed to redraw it). The measured ratio sits below the model's by the efficiency gap: cuDNN
runs at 81-91% of the bf16 peak, the HLA kernels at 14-58%.
"""

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import sympy as sp  # noqa: E402

from hla_analysis._io import atomic_save_figure, atomic_write_table  # noqa: E402
from hla_analysis.symbolic.cost_model import N, crossover_tokens, d, dv, hla_cost, r, softmax_cost  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "figures" / "cost_model"
RUN = ROOT / "benchmarks" / "gpu" / "results" / "session2" / "h200_session2.json"
HEAD = {d: 128, dv: 128}
SHAPES = [  # (label, widths, tied)
    ("HLA M=1 r=128 (linear attention)", [128], False),
    ("HLA M=2 r=32", [32, 32], False),
    ("HLA M=2 r=64", [64, 64], False),
    ("HLA M=2 r=64 tied", [64, 64], True),
    ("HLA M=2 affine, r=d+1=129", [129, 129], False),
    ("HLA M=2 affine tied, r=129", [129, 129], True),
]
GRID = np.unique(np.geomspace(1_000, 200_000, 60).astype(int))


def model_rows():
    rows = []
    f_soft = sp.lambdify(N, softmax_cost()[0].subs(HEAD))
    for n in GRID:
        rows.append(dict(source="model", method="softmax", n=int(n), metric="flops_per_head", value=float(f_soft(n))))
    for label, widths, tied in SHAPES:
        subs = {**HEAD, **({r: widths[0]} if tied else {})}
        f_hla = sp.lambdify(N, sp.sympify(hla_cost(widths, tied=tied)[0]).doit().subs(subs))
        n_star = float(sp.sympify(crossover_tokens(widths, tied=tied)).subs(subs))
        rows.append(dict(source="model", method=label, n=None, metric="crossover_tokens", value=n_star))
        for n in GRID:
            rows.append(dict(source="model", method=label, n=int(n), metric="flops_per_head", value=float(f_hla(n))))
            rows.append(dict(source="model", method=label, n=int(n), metric="flops_ratio_softmax_over_hla",
                             value=float(f_soft(n)) / float(f_hla(n))))
    return rows


def measured_rows():
    doc = json.loads(RUN.read_text())
    res = [x for x in doc["results"] if "ms" in x and x["pass"] == "fwd"]
    cudnn = {x["n"]: x["ms"] for x in res if x["method"] == "sdpa_cudnn"}
    rows = []
    for x in res:
        if x["method"] != "triton_hla" or x.get("m") != 2 or x.get("causal") or x["n"] not in cudnn:
            continue
        label = f"HLA M=2 r={x['r']}"
        rows.append(dict(source=f"H200 {RUN.name}", method=label, n=x["n"], metric="speedup_over_cudnn_fwd",
                         value=cudnn[x["n"]] / x["ms"]))
        rows.append(dict(source=f"H200 {RUN.name}", method=label, n=x["n"], metric="pct_of_peak_fwd",
                         value=x["pct_peak"]))
    return rows


def main():
    table = pd.DataFrame(model_rows() + measured_rows())
    atomic_write_table(OUT.with_suffix(".csv"), table)
    fig, (left, right) = plt.subplots(1, 2, figsize=(14, 5))
    flops = table[table.metric == "flops_per_head"]
    colors = dict(zip([s[0] for s in SHAPES], plt.rcParams["axes.prop_cycle"].by_key()["color"][1:]))
    for method, g in flops.groupby("method", sort=False):
        left.loglog(g.n, g.value, "-", lw=2.5 if method == "softmax" else 1.8, color=colors.get(method, "k"),
                    label=method + (" (d=128)" if method == "softmax" else ""))
    for _, row in table[table.metric == "crossover_tokens"].iterrows():
        left.axvline(row.value, color=colors[row.method], ls=":", lw=1)
        left.annotate(f"N*={row.value:,.0f}", (row.value, flops.value.min() * 3), rotation=90, fontsize=8,
                      color=colors[row.method], ha="right")
    for n in (32_760, 75_600):
        left.axvline(n, color="grey", alpha=0.3, lw=6)
    left.set(xlabel="tokens N", ylabel="forward FLOPs per head (model)",
             title="Cost model: HLA is cheaper than softmax right of its N* (grey: Wan2.1 lengths)")
    left.grid(True, which="both", alpha=0.3)
    left.legend(fontsize=8, loc="upper left")

    ratio = table[table.metric == "flops_ratio_softmax_over_hla"]
    for method in ("HLA M=2 r=32", "HLA M=2 r=64"):
        g = ratio[ratio.method == method]
        right.loglog(g.n, g.value, "-", color=colors[method], label=f"{method}: model FLOP ratio")
        m = table[(table.metric == "speedup_over_cudnn_fwd") & (table.method == method)].sort_values("n")
        right.loglog(m.n, m.value, "o--", color=colors[method], ms=7, label=f"{method}: measured, cuDNN / Triton HLA")
        for _, row in m.iterrows():
            right.annotate(f"{row.value:.1f}x", (row.n, row.value), textcoords="offset points", xytext=(5, -12),
                           fontsize=8, color=colors[method])
    right.axhline(1, color="k", lw=0.8)
    right.set(xlabel="tokens N", ylabel="softmax / HLA (higher: HLA faster)", xlim=(5_000, 120_000),
              title="Predicted FLOP ratio vs measured forward speed-up (H200, bf16, 12 heads)")
    right.grid(True, which="both", alpha=0.3)
    right.legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    atomic_save_figure(fig, OUT.with_suffix(".png"), dpi=110)
    print(table[table.metric.isin(["crossover_tokens", "speedup_over_cudnn_fwd"])].to_string(index=False))


if __name__ == "__main__":
    main()
