"""``hla-analysis degree``: measured (AAA) versus symbolic rational degree of a variant."""

from __future__ import annotations

import argparse
import json
import textwrap

from hla_analysis.cli.derive import add_variant_arguments

EXAMPLES = """\
examples:
  hla-analysis degree hla --factors 3                  # measured 3 == symbolic 3
  hla-analysis degree softmax --tol 1e-3 1e-6 1e-9     # grows as the tolerance tightens
  hla-analysis degree 'linear:phi=taylor' --json
  hla-analysis degree hla --factors 2 --interval -inf 0   # t on the half-line (Möbius-mapped)
"""


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "degree",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        help="measure a variant's rational degree in t with AAA and compare with the symbolic one",
        description=textwrap.fill(
            "Sample a(t), the variant's own attention weights with q -> t q on random q/k "
            "(float64), fit AAA and report the smallest degree reaching each tolerance, next "
            "to the degree derived symbolically. Rational variants match; softmax and other "
            "non-rational ones grow as the tolerance tightens."
        ),
    )
    add_variant_arguments(p)
    p.add_argument("--tol", type=float, nargs="+", default=[1e-9], help="relative tolerance(s), > 0")
    p.add_argument("--t-max", type=float, default=3.0, help="sample t in (0, t_max]")
    from hla_analysis.cli.approx import interval_argument

    interval_argument(p)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=run)


def run(args) -> int:
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
