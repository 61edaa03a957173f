"""``hla-analysis approx``: errors of every family approximating exp on [-L, 0] or (-inf, 0]."""

from __future__ import annotations

import argparse
import json
import re

EXAMPLES = """\
examples:
  hla-analysis approx --interval -inf 0                 # absolute error; lambda_nn of the rational family
  hla-analysis approx --interval -16 0 --normalised     # error up to the row's normalising constant
  hla-analysis approx --interval -8 0 --family minimax_nn hla_tied_shift --degree 1 4 8 --json
"""


def interval_argument(parser, help: str = "interval ending at 0, e.g. '-inf 0' or '-16 0'") -> None:
    # let '-inf' be a value like '-16' (argparse only knows digits as negative numbers)
    parser._negative_number_matcher = re.compile(r"^-(\d+|\d*\.\d+|inf)$")
    parser.add_argument("--interval", nargs=2, metavar=("LO", "HI"), default=None, help=help)


def register(subparsers) -> None:
    from hla_analysis.numeric.half_line import FAMILIES

    p = subparsers.add_parser(
        "approx", epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter,
        help="error of each family (rational, polynomial, HLA tied, kernel linear) approximating exp",
        description="Max error of exp's approximants on [-L, 0] or (-inf, 0] by family and degree: absolute "
                    "(relative to a row's largest weight), relative, or normalised (up to a constant factor).",
    )
    interval_argument(p)
    p.add_argument("--family", nargs="+", default=list(FAMILIES), help=f"families among {', '.join(FAMILIES)}")
    p.add_argument("--degree", type=int, nargs="+", default=list(range(1, 9)), help="degrees M >= 0")
    p.add_argument("--normalised", action="store_true", help="report min_c max |w/(c e^s) - 1|")
    p.add_argument("--json", action="store_true", help="print JSON lines")
    p.set_defaults(func=run)


def run(args) -> int:
    from hla_analysis.numeric.half_line import family_errors
    from hla_analysis.numeric.intervals import Interval

    iv = Interval.parse(args.interval or ("-inf", "0"))
    metric = "normalised_rel_error" if args.normalised else ("max_abs_error" if not iv.bounded else "max_rel_error")
    if args.normalised and not iv.bounded:
        raise ValueError("--normalised needs a finite interval (relative errors are infinite on a half-line); "
                         "use e.g. --interval -16 0.")
    # every error (a bad interval, degree or family) comes before any output
    notes, results = [], []
    for family in args.family:
        values, records = {}, []
        for degree in args.degree:
            if family == "linear" and degree != 1:
                continue
            e = family_errors(family, degree, interval=iv)
            values[degree] = e[metric]
            records.append(e)
            if e[metric] != e[metric] and e.get("note"):  # NaN: the note says why (e.g. the exchange failed)
                notes.append(f"{family} M={degree}: {e['note']}")
        results.append((family, values, records))
    if args.json:
        for _, _, records in results:
            for e in records:
                print(json.dumps({k: (v if not isinstance(v, float) or v == v and abs(v) != float("inf") else str(v))
                                  for k, v in e.items()}))
        return 0
    print(f"exp on {iv.label()}: {metric}")
    for family, values, _ in results:
        if values:  # 'linear' has only degree 1
            print(f"{family:>15}: " + "  ".join(f"M={d}:{v:.2e}" for d, v in values.items()))
    for note in notes:
        print(f"  nan: {note}")
    return 0
