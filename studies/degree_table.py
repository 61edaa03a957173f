"""Table: symbolic vs measured rational degree in t for every registered variant.

Run: .venv/bin/python studies/degree_table.py  -> figures/degree_table.{png,csv}
"""

import os
import tempfile
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402
from tqdm import tqdm  # noqa: E402


from hla_analysis.numeric.degree import measure_variant_degree  # noqa: E402
from hla_analysis.symbolic.derive import derive  # noqa: E402
from hla_analysis.variants import list_variants, make_variant  # noqa: E402

TOLS = (1e-4, 1e-7, 1e-10)
OUT = Path(__file__).resolve().parents[1] / "figures" / "degree_table"


def save_atomic(path, writer):
    """Write through a temporary file in the same folder, then move it into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=path.suffix)
    os.close(fd)
    try:
        writer(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


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
    save_atomic(OUT.with_suffix(".csv"), lambda p: table.to_csv(p, index=False))
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
    save_atomic(OUT.with_suffix(".png"), lambda p: fig.savefig(p, dpi=120, format="png"))
    print(table.to_string())


if __name__ == "__main__":
    main()
