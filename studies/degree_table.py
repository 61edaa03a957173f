"""Table: symbolic vs measured rational degree in t for every registered variant.

Run: .venv/bin/python studies/degree_table.py  -> figures/degree_table.{png,csv}
"""

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402
from tqdm import tqdm  # noqa: E402

from hla_analysis._io import atomic_save_figure, atomic_write_table  # noqa: E402
from hla_analysis.numeric.degree import measure_variant_degree  # noqa: E402
from hla_analysis.symbolic.derive import derive  # noqa: E402
from hla_analysis.variants import list_variants, make_variant  # noqa: E402

TOLS = (1e-4, 1e-7, 1e-10)
OUT = Path(__file__).resolve().parents[1] / "figures" / "degree_table"


def main():
    rows = []
    for spec in tqdm(list_variants() + ["hla:m=5,phi=affine", "hla:m=2,phi=taylor"], desc="variants"):
        form = derive(spec)
        var = make_variant(spec)
        row = {"variant": spec, "rational": form.rational, "symbolic_degree": form.degree}
        for tol in TOLS:
            row[f"measured@{tol:g}"] = measure_variant_degree(var, tol=tol)
        row["match"] = (row[f"measured@{TOLS[-1]:g}"] == form.degree) if form.rational else None
        row["note"] = form.note.split(" (decided")[0]
        rows.append(row)
    table = pd.DataFrame(rows).astype({"symbolic_degree": "Int64"})
    atomic_write_table(OUT.with_suffix(".csv"), table)
    shown = table.drop(columns=["note"]).astype(object).where(table.drop(columns=["note"]).notna(), "-").astype(str)
    fig, ax = plt.subplots(figsize=(11, 0.26 * len(shown) + 0.8))
    ax.axis("off")
    cell = ax.table(cellText=shown.values, colLabels=list(shown.columns), loc="center", cellLoc="center")
    cell.auto_set_font_size(False)
    cell.set_fontsize(8.5)
    cell.auto_set_column_width(list(range(len(shown.columns))))
    ax.set_title("Rational degree of a(t) (q -> t q): derived with SymPy vs measured with AAA at three tolerances",
                 fontsize=10)
    fig.tight_layout()
    atomic_save_figure(fig, OUT.with_suffix(".png"), dpi=120)
    print(table.to_string())


if __name__ == "__main__":
    main()
