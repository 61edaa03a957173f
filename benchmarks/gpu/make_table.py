"""Tidy CSV and a markdown table from the JSON files written by ``bench_hla.py``.

Usage::

    python benchmarks/gpu/make_table.py benchmarks/gpu/results/h200_part1.json \
        benchmarks/gpu/results/h200_part2.json --out benchmarks/gpu/results/h200

writes ``h200.csv`` (one row per method, shape and pass) and ``h200.md``. Percentages are
against the bf16 matmul peak measured in the same run as the row.
"""

from __future__ import annotations

import argparse
import json
import os

import pandas as pd


def label(row) -> str:
    m = row["method"]
    if m.startswith("sdpa"):
        return f"{m} (d=128, non-causal)"
    if m in ("triton_hla", "torch_hla"):
        return f"{m} M={int(row['m'])} r={int(row['r'])} {'causal' if row['causal'] else 'non-causal'}"
    if m.startswith("fla"):
        return f"{m} K={int(row['k'])} causal"
    if m.startswith("power"):
        return f"{m} d={int(row['d'])} chunk={int(row['chunk'])} causal"
    return m


def load(paths) -> pd.DataFrame:
    rows = []
    for path in paths:
        with open(path) as fh:
            doc = json.load(fh)
        for r in doc["results"]:
            if "ms" not in r or str(r["method"]).startswith("triton_hla["):
                continue
            rows.append(dict(r, source=os.path.basename(path), peak_tflops=doc["meta"]["bf16_matmul_peak_tflops"]))
    df = pd.DataFrame(rows)
    df["config"] = df.apply(label, axis=1)
    keep = ["config", "method", "n", "pass", "ms", "tflops", "pct_peak", "peak_tflops", "flops", "reps", "source"]
    return df[keep].sort_values(["config", "n", "pass"]).reset_index(drop=True)


def markdown(df: pd.DataFrame) -> str:
    cell = df.assign(v=df.apply(lambda r: f"{r.ms:.2f} ms ({r.pct_peak:.0f}%)", axis=1))
    wide = cell.pivot_table(index="config", columns=["n", "pass"], values="v", aggfunc="first")
    order = sorted(wide.index, key=lambda c: (not c.startswith("sdpa"), not c.startswith("triton"), c))
    wide = wide.loc[order]
    head = ["config"] + [f"N={n:,} {p}" for n, p in wide.columns]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, row in wide.iterrows():
        lines.append("| " + " | ".join([name] + [str(x) if isinstance(x, str) else "—" for x in row]) + " |")
    return "\n".join(lines) + "\n"


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("json", nargs="+")
    ap.add_argument("--out", required=True, help="path prefix for .csv and .md")
    args = ap.parse_args()
    df = load(args.json)
    for ext, text in ((".csv", df.to_csv(index=False)), (".md", markdown(df))):
        tmp = args.out + ext + ".tmp"
        with open(tmp, "w") as fh:
            fh.write(text)
        os.replace(tmp, args.out + ext)
    print(markdown(df))


if __name__ == "__main__":
    main()
