"""``hla-analysis degree``: measured (AAA) versus symbolic rational degree of a variant."""

from __future__ import annotations

import json

from hla_analysis.cli.derive import add_variant_command

HELP = "measure a variant's rational degree in t with AAA and compare with the symbolic one"
DESCRIPTION = (
    "Sample a(t), the variant's own attention weights with q -> t q on random q/k "
    "(float64), fit AAA and report the smallest degree reaching each tolerance, next "
    "to the degree derived symbolically. Rational variants match; softmax and other "
    "non-rational ones grow as the tolerance tightens."
)
EXAMPLES = """\
examples:
  hla-analysis degree hla --factors 3                  # measured 3 == symbolic 3
  hla-analysis degree softmax --tol 1e-3 1e-6 1e-9     # grows as the tolerance tightens
  hla-analysis degree 'linear:phi=taylor' --json
  hla-analysis degree hla --factors 2 --interval -inf 0   # t on the half-line (Möbius-mapped)
  hla-analysis degree softmax --normalised --interval -8 0 --tol 1e-2 1e-4
                                           # degree each family needs for exp on [-8, 0], up to a constant
"""


def register(subparsers) -> None:
    p = add_variant_command(subparsers, "degree", help=HELP, description=DESCRIPTION, examples=EXAMPLES)
    p.add_argument("--tol", type=float, nargs="+", default=[1e-9], help="relative tolerance(s), > 0")
    p.add_argument("--t-max", type=float, default=3.0, help="sample t in (0, t_max]")
    from hla_analysis.cli.approx import interval_argument

    interval_argument(p, help="the range of the temperature t to sample, e.g. '-inf 0' or '-8 5' (default: "
                              "(0, --t-max]); with --normalised, a finite range ending at 0 of the logits")
    p.add_argument("--normalised", action="store_true",
                   help="with softmax and a finite --interval: the degree M each approximating family "
                        "(hla-analysis approx) needs for min_c max |w/(c e^s) - 1| <= tol on it")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=run)


def _run_normalised(args) -> int:
    from hla_analysis.numeric.half_line import FAMILIES, needed_degree
    from hla_analysis.numeric.intervals import Interval

    if args.variant != "softmax":
        raise ValueError(f"--normalised measures how each family approximates softmax's exp; use VARIANT softmax, "
                         f"got {args.variant!r}.")
    if args.interval is None or not Interval.parse(args.interval).bounded:
        raise ValueError("--normalised needs a finite --interval such as '-16 0' (on a half-line every "
                         "normalised error is infinite).")
    iv = Interval.parse(args.interval)
    for tol in args.tol:
        if not 0 < tol < 1:
            raise ValueError(f"--tol must be in (0, 1) with --normalised, got {tol}.")
    table = {f"{tol:g}": {family: needed_degree(family, interval=iv, tol=tol) for family in FAMILIES}
             for tol in args.tol}
    if args.json:
        print(json.dumps({"variant": "softmax", "interval": iv.label(), "normalised": True, "max_degree": 8,
                          "needed_degree": {t: {f: (d if d != float("inf") else None) for f, d in row.items()}
                                            for t, row in table.items()}}))
        return 0
    print(f"degree M needed for normalised error <= tol on {iv.label()} (none: not reached up to M = 8)")
    print(f"{'family':>15}  " + "  ".join(f"{t:>8}" for t in table))
    for family in FAMILIES:
        print(f"{family:>15}  " + "  ".join(f"{'none' if row[family] == float('inf') else int(row[family]):>8}"
                                          for row in table.values()))
    return 0


def run(args) -> int:
    if args.normalised:
        return _run_normalised(args)
    from hla_analysis.numeric.degree import measure_variant_degree
    from hla_analysis.symbolic.derive import derive, resolve_spec
    from hla_analysis.variants import make_variant

    for tol in args.tol:
        if not tol > 0:
            raise ValueError(f"--tol must be > 0 (e.g. 1e-9), got {tol}.")
    spec = resolve_spec(args.variant, factors=args.factors)
    form = derive(spec)
    var = make_variant(spec)
    measured = {f"{tol:g}": measure_variant_degree(var, tol=tol, t_max=args.t_max,
                                                           interval=args.interval) for tol in args.tol}
    if args.json:
        print(json.dumps({"variant": spec, "rational": form.rational, "symbolic_degree": form.degree,
                          "measured_degree": measured}))
        return 0
    print(f"variant:          {spec}" + (f"  (t in {args.interval[0]}..{args.interval[1]})" if args.interval else ""))
    print(f"symbolic degree:  {form.degree if form.rational else 'not rational'}")
    for tol, deg in measured.items():
        agree = "" if not form.rational else ("  (matches)" if deg == form.degree else "  (MISMATCH)")
        print(f"measured @ {tol:>7}: {deg}{agree}")
    return 0
