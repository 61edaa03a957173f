"""Figure: exp(s) on [-a, a] and softmax rows, approximated by degree 1..8, error vs degree.

Run: .venv/bin/python studies/exp_approximation.py  -> figures/exp_approximation.{png,csv}
"""

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402
from tqdm import tqdm  # noqa: E402

from hla_analysis._io import atomic_save_figure, atomic_write_table  # noqa: E402
from hla_analysis.numeric.exp_approximation import FAMILIES, exp_errors  # noqa: E402
from hla_analysis.numeric.softmax_rows import draw_scores, row_errors  # noqa: E402

A = 4.0  # half-width: scores of QK-normed heads mostly lie within +-4
ROWS = dict(distribution="normal", rows=256, keys=256, scale=1.5, seed=0)
OUT = Path(__file__).resolve().parents[1] / "figures" / "exp_approximation"


def main():
    scores = draw_scores(**ROWS)
    records = []
    for family in tqdm(FAMILIES, desc="families"):
        for degree in [1] if family == "linear" else range(1, 9):
            exp_target = f"exp on [-{A:g},{A:g}]"
            rows_target = f"softmax rows ({ROWS['distribution']}, sd {ROWS['scale']})"
            try:
                e = exp_errors(family, degree, a=A)
                r = row_errors(scores, family, degree)
            except ValueError as err:
                # only minimax refuses (best error below float64 resolution): record why, plot nothing
                if family != "minimax":
                    raise
                for target, metrics in ((exp_target, ("max_rel_error", "mean_rel_error")),
                                        (rows_target, ("mean_kl", "mean_tv"))):
                    for metric in metrics:
                        records.append({"target": target, "family": family, "degree": degree, "metric": metric,
                                        "value": float("nan"), "negative_weights": 0, "note": str(err)})
                continue
            for metric in ("max_rel_error", "mean_rel_error"):
                records.append({"target": exp_target, "family": family, "degree": degree,
                                "metric": metric, "value": e[metric], "negative_weights": int(not e["positive"]),
                                "note": ""})
            for metric in ("mean_kl", "mean_tv"):
                records.append({"target": rows_target, "family": family, "degree": degree, "metric": metric,
                                "value": r[metric], "negative_weights": r["negative_weights"], "note": ""})
    table = pd.DataFrame(records)
    atomic_write_table(OUT.with_suffix(".csv"), table)

    fig, axes = plt.subplots(1, 3, figsize=(16, 4.8))
    panels = [("max_rel_error", "exp(s): max relative error"), ("mean_kl", "softmax rows: mean KL(p || approx)"),
              ("mean_tv", "softmax rows: mean total variation")]
    for ax, (metric, title) in zip(axes, panels):
        sub = table[table.metric == metric]
        for family, g in sub.groupby("family", sort=False):
            finite = g[g.value.between(1e-300, 1e300)]
            ax.semilogy(finite.degree, finite.value.clip(lower=1e-16), "o-" if family != "linear" else "s",
                        label=family, ms=5)
        ax.set_title(title)
        ax.set_xlabel("degree (Pade/AAA type (n,n); M factors; polynomial degree)")
        ax.grid(True, which="both", alpha=0.3)
    axes[0].legend()
    fig.suptitle(f"Approximating exp on [-{A:g}, {A:g}] and softmax rows of {ROWS['keys']} N(0, {ROWS['scale']}^2) "
                 "scores (KL = inf rows, from negative weights, are omitted;\n"
                 "minimax = best uniform rational in relative error, "
                 "omitted where float64 cannot resolve it, see the CSV's note)")
    fig.tight_layout()
    atomic_save_figure(fig, OUT.with_suffix(".png"), dpi=110)
    print(table.pivot_table(index=["family", "degree"], columns="metric", values="value").to_string())


if __name__ == "__main__":
    main()
