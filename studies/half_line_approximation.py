"""Figure: error of every family approximating exp on [-L, 0] and (-inf, 0], against degree M.

Run: python studies/half_line_approximation.py -> figures/half_line_approximation.{png,csv}
(22-31 s of CPU; 56-99 s wall on 2 shared, loaded cores). Left: absolute error on the half-line with the classical best
constants lambda_{n,n} marked; right: normalisation-aware error on [-L, 0] for each L. Every
family of :data:`hla_analysis.numeric.half_line.FAMILIES`; the best HLA product is the closed
form of :mod:`hla_analysis.numeric.affine_product` (it coincides with the tied product at the
best shift in normalised error, which the figure shows as one curve over the other).
"""

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from tqdm import tqdm  # noqa: E402

from hla_analysis._io import atomic_save_figure, atomic_write_table  # noqa: E402
from hla_analysis.numeric.half_line import DESCRIPTIONS, FAMILIES, METRICS, family_errors  # noqa: E402

LENGTHS = (4.0, 8.0, 16.0, 32.0, 64.0)
DEGREES = range(1, 9)
# Cody-Meinardus-Varga 1969 / Carpenter-Ruttan-Varga 1984 (three digits, via Trefethen's Chebfun
# example "Halphen's constant"): marked on the plot for comparison, never used as results
PUBLISHED = [0.500, 0.0668, 7.36e-3, 7.99e-4, 8.65e-5, 9.34e-6, 1.008e-6, 1.087e-7, 1.172e-8]
OUT = Path(__file__).resolve().parents[1] / "figures" / "half_line_approximation"


def main():
    rows = []
    intervals = [(-np.inf, 0.0)] + [(-L, 0.0) for L in LENGTHS]
    for iv in tqdm(intervals, desc="intervals"):
        for family in FAMILIES:
            for degree in [1] if family == "linear" else DEGREES:
                e = family_errors(family, degree, interval=iv)
                for metric in METRICS:
                    rows.append({**{k: e[k] for k in ("family", "degree", "interval", "L", "positive", "note")},
                                 "metric": metric, "value": e[metric]})
    table = pd.DataFrame(rows)
    atomic_write_table(OUT.with_suffix(".csv"), table)

    fig, axes = plt.subplots(2, 3, figsize=(16, 10), sharey=True)
    axes = axes.ravel()
    styles = dict(zip(FAMILIES, ["o-", "D-", "s-", "^-", "v--", "<--", "x:", "+:", "1:", "2-.", "*"]))
    panels = [("(-inf, 0]", "max_abs_error")] + [(f"[-{L:g}, 0]", "normalised_rel_error") for L in LENGTHS]
    for ax, (label, metric) in zip(axes, panels):
        sub = table[(table.interval == label) & (table.metric == metric)]
        for family, g in sub.groupby("family", sort=False):
            g = g[np.isfinite(g.value)]
            if len(g):
                ax.semilogy(g.degree, g.value.clip(lower=1e-16), styles[family], ms=5, lw=1.2,
                            label=f"{family}: {DESCRIPTIONS[family]}")
        if label.startswith("(-inf"):
            ax.semilogy(range(9), PUBLISHED, "k+", ms=10, mew=2, label="published lambda_nn")
        ax.set_title(f"{label}: {'absolute' if metric == 'max_abs_error' else 'normalised relative'}")
        ax.set_xlabel("degree M (type (M,M) or (0,M), polynomial degree, factors)")
        ax.grid(True, which="both", alpha=0.3)
    axes[0].set_ylabel("max error")
    axes[3].set_ylabel("max error")
    handles = {}
    for ax in axes:  # every family once, from whichever panel draws it
        for h, lab in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(lab, h)
    fig.legend(handles.values(), handles.keys(), loc="lower center", ncol=3, fontsize=8)
    fig.suptitle("exp where softmax rows live: (-inf, 0] (absolute) and [-L, 0] (normalised). A family missing from a "
                 "panel is infinite there (polynomials on the half-line) or failed (see the CSV's note)")
    fig.tight_layout(rect=(0, 0.1, 1, 0.97))
    atomic_save_figure(fig, OUT.with_suffix(".png"), dpi=100)
    print(table[table.metric.isin(["max_abs_error", "normalised_rel_error"])]
          .pivot_table(index=["metric", "interval", "family"], columns="degree", values="value", aggfunc="first")
          .to_string(float_format=lambda v: f"{v:.2e}"))


if __name__ == "__main__":
    main()
