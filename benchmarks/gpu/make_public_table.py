"""Markdown tables from one ``bench_public.py`` JSON (the README's GPU section is made from it).

    python benchmarks/gpu/make_public_table.py benchmarks/gpu/results/session9/public_h200.json \
        --baselines benchmarks/gpu/results/session9/public_h200_baselines.json

Prints the tables (``hla()`` calls at dv = 128, variants at dv = d, tied M >= 3 on both paths,
checks on/off) and the issue targets computed from the same rows. ``--baselines`` adds fla
``chunk_linear_attn`` and ``power_retention`` rows from another run of ``bench_public.py``
beside the causal ``hla()`` rows (each ratio says which file each side came from).
"""

from __future__ import annotations

import argparse
import json
import math

import pandas as pd

NS = (8192, 32760, 75600)


def load(path):
    with open(path) as f:
        data = json.load(f)
    rows = pd.DataFrame([r for r in data["rows"] if "ms" in r])
    return data, rows


def ms(rows, method, spec, n, causal, mode, d=None):
    sel = rows[(rows.method == method) & (rows.spec == spec) & (rows.n == n) & (rows.causal == causal)
               & (rows["mode"] == mode) & ((rows.d == d) if d is not None else True)]
    return float(sel.ms.iloc[0]) if len(sel) else float("nan")


def fmt(x, ref=None):
    if math.isnan(x):
        return "n/a"
    text = f"{x:.2f} ms" if x < 100 else f"{x:.0f} ms"
    if ref is not None and not math.isnan(ref):
        text += f" ({ref / x:.1f}x)"
    return text


def table(rows, entries, ref_of):
    head = "| call | " + " | ".join(f"N={n:,} fwd | fwd+bwd" for n in NS) + " |"
    lines = [head, "|---|" + "---|---|" * len(NS)]
    for label, method, spec, causal, *d in entries:
        d = d[0] if d else None
        cells = []
        for n in NS:
            ref_f, ref_b = ref_of(spec, n, causal)
            f = ms(rows, method, spec, n, causal, "fwd_nograd", d)
            b = ms(rows, method, spec, n, causal, "fwd_bwd", d)
            cells += [fmt(f, None if method == "sdpa_cudnn" else ref_f),
                      fmt(b, None if method == "sdpa_cudnn" else ref_b)]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("json")
    parser.add_argument("--baselines", help="a bench_public.py JSON holding the fla / power_retention rows")
    args = parser.parse_args(argv)
    data, rows = load(args.json)
    peak = data["matmul_peak_tflops"]
    print(f"device {data['device']}, torch {data['torch']}, triton {data['triton']}, "
          f"bf16 matmul peak {peak:.0f} TFLOP/s\n")

    def sdpa(d):
        return lambda spec, n, causal: (ms(rows, "sdpa_cudnn", f"softmax d={d}", n, causal, "fwd_nograd"),
                                        ms(rows, "sdpa_cudnn", f"softmax d={d}", n, causal, "fwd_bwd"))

    hla_entries = [("SDPA cuDNN d=128", "sdpa_cudnn", "softmax d=128", False),
                   ("SDPA cuDNN d=128 causal", "sdpa_cudnn", "softmax d=128", True)]
    for spec in ("M=1 r=64", "M=2 r=64", "M=2 r=128"):
        for causal in (False, True):
            hla_entries.append((f"`hla()` {spec}{' causal' if causal else ''}", "hla()", spec, causal))
    print("hla() calls, dv = 128; (x) = cuDNN d=128 time / this time, same causality\n")
    print(table(rows, hla_entries, sdpa(128)))

    for d in (64, 128):
        var = rows[(rows.method == "make_variant().forward") & (rows.d == d)]
        entries = [(f"SDPA cuDNN d={d}", "sdpa_cudnn", f"softmax d={d}", False)]
        for spec in dict.fromkeys(var.spec):
            for causal in sorted(set(var[var.spec == spec].causal)):
                paths = sorted(set(var[(var.spec == spec) & (var.causal == causal)].path.dropna()))
                label = f"`{spec}`{' causal' if causal else ''} [{'/'.join(paths)}]"
                entries.append((label, "make_variant().forward", spec, causal, d))
        if d == 64:
            entries.insert(1, (f"SDPA cuDNN d={d} causal", "sdpa_cudnn", f"softmax d={d}", True))
        print(f"\nmake_variant(spec).forward, d = dv = {d}; [path taken]; (x) = cuDNN d={d} / this\n")
        print(table(rows, entries, sdpa(d)))

    tied = rows[(rows.method == "hla()") & rows.spec.str.contains(" tied")]
    if len(tied):
        print("\ntied M >= 3 through hla(), dv = 128: the path dispatch took, and form='quadratic' forced\n")
        print("| call | N=8,192 fwd | fwd+bwd | N=32,760 fwd | fwd+bwd | N=75,600 fwd | fwd+bwd |")
        print("|---|" + "---|---|" * len(NS))
        for spec in dict.fromkeys(tied.spec):
            paths = "/".join(sorted(set(tied[tied.spec == spec].path.dropna())))
            cells = [fmt(ms(rows, "hla()", spec, n, False, mode)) for n in NS for mode in ("fwd_nograd", "fwd_bwd")]
            print(f"| `hla()` {spec} [{paths}] | " + " | ".join(cells) + " |")

    if args.baselines:
        _, base = load(args.baselines)
        print("\ncausal, fwd and fwd+bwd: baselines (--baselines file) against hla() (this file); "
              "(x) = baseline time / hla() time\n")
        print("| pair | N=8,192 fwd | fwd+bwd | N=32,760 fwd | fwd+bwd | N=75,600 fwd | fwd+bwd |")
        print("|---|" + "---|---|" * len(NS))
        for label, method, bspec, hspec in (
                ("fla K=64 vs `hla()` M=1 r=64", "fla_chunk_linear_attn", "K=64", "M=1 r=64"),
                ("fla K=128 vs `hla()` M=1 r=128", "fla_chunk_linear_attn", "K=128", "M=1 r=128"),
                ("power_retention deg 2 d=64 (dv 64) vs `hla()` M=2 r=64 (dv 128)", "power_retention",
                 "deg=2 d=64 chunk=1024", "M=2 r=64")):
            cells = []
            for n in NS:
                for mode in ("fwd_nograd", "fwd_bwd"):
                    b = ms(base, method, bspec, n, True, mode)
                    h = ms(rows, "hla()", hspec, n, True, mode)
                    cells.append("n/a" if math.isnan(b) or math.isnan(h)
                                 else f"{b:.2f} vs {h:.2f} ms ({b / h:.2f}x)")
            print(f"| {label} | " + " | ".join(cells) + " |")

    over = pd.DataFrame(data.get("overhead", []))
    if len(over):
        print("\nvalue checks, forward no_grad, 20 back-to-back calls per batch, median of 5 batches\n")
        print("| call | N | checks on | checks off | bare kernels | on/off - 1 | host time of one call, on / off |")
        print("|---|---|---|---|---|---|---|")
        for r in over.itertuples():
            on = min(r.checks_on_ms, r.checks_on_repeat_ms)
            bare = ("n/a" if r.bare_kernels_ms is None or math.isnan(r.bare_kernels_ms)
                    else f"{r.bare_kernels_ms:.3f} ms")
            host = (f"{r.host_on_ms:.3f} / {r.host_off_ms:.3f} ms" if "host_on_ms" in over.columns
                    and not math.isnan(r.host_on_ms) else "n/a")
            print(f"| {r.call} | {r.n:,} | {on:.3f} ms | {r.checks_off_ms:.3f} ms | {bare} | "
                  f"{on / r.checks_off_ms - 1:+.1%} | {host} |")

    print("\ntargets (this run)\n")
    cud = {(d, n): ms(rows, "sdpa_cudnn", f"softmax d={d}", n, False, "fwd_nograd") for d in (64, 128) for n in NS}
    for n, want in ((32760, 6), (75600, 15)):
        t = ms(rows, "hla()", "M=2 r=64", n, False, "fwd_nograd")
        flops = 4 * n * 64 * 64 * 128 * 12
        print(f"- hla() M=2 r=64 fwd N={n}: {cud[(128, n)] / t:.1f}x cuDNN d=128 (target {want}x), "
              f"{flops / (t * 1e-3) / 1e12 / peak:.0%} of peak")
    for d, n, want in ((64, 32760, 5), (128, 32760, 3), (128, 75600, 7)):
        t = ms(rows, "make_variant().forward", "hla:m=2,phi=affine", n, False, "fwd_nograd", d)
        print(f"- hla:m=2,phi=affine tied d={d} N={n}: {cud[(d, n)] / t:.1f}x cuDNN d={d} (target {want}x)")
    for n in NS:
        fit = ms(rows, "make_variant().forward", "hla:m=2,phi=affine,proj=1", n, False, "fwd_nograd", 64)
        r64 = ms(rows, "hla()", "M=2 r=64", n, False, "fwd_nograd")
        print(f"- proj=1 d=64 (dv=64) N={n}: {fit / r64:.2f}x the hla() M=2 r=64 (dv=128) call (target <= 1.2x)")
    for spec, m in (("hla:m=3,phi=affine", 3), ("hla:m=4,phi=affine", 4), ("hla:m=3,phi=affine,tied=0", 3),
                    ("hla:m=4,phi=affine,tied=0", 4)):
        for d in (64, 128):
            sel = rows[(rows.spec == spec) & (rows.d == d) & (~rows.causal) & (rows["mode"] == "fwd_nograd")]
            if not len(sel):
                continue
            ratios = ", ".join(f"{float(sel[sel.n == n].ms.iloc[0]) / cud[(d, n)]:.2f}"
                               for n in NS if (sel.n == n).any())
            want = 1.2 if "tied=0" not in spec else (m + 1) / 2 * 1.2
            print(f"- {spec} d={d} fwd / cuDNN d={d} at N={', '.join(map(str, NS))}: {ratios} (target <= {want:.1f})")


if __name__ == "__main__":
    main()
