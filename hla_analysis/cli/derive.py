"""``hla-analysis derive``: the rational form of a variant's attention weight in the score scale t."""

from __future__ import annotations

import argparse
import json
import textwrap

HELP = "rational form and degrees of a variant's attention weight (SymPy)"
DESCRIPTION = (
    "Derive a_1(t) = prod_m s^(m)_1(t) / sum_l prod_m s^(m)_l(t) from the variant's "
    "definition, with the query scaled q -> t q, and report numerator, denominator and "
    "their degrees in t. VARIANT is a family (hla, linear, softmax, power) or a registry "
    "spec such as 'hla:m=3,phi=affine' or 'linear:phi=taylor'."
)
EXAMPLES = """\
examples:
  hla-analysis derive hla --factors 3          # degrees 3 and 3
  hla-analysis derive linear --json            # degrees 1 and 1
  hla-analysis derive softmax                  # not rational
  hla-analysis derive 'hla:m=2,phi=taylor' --latex
"""


def add_variant_command(subparsers, name: str, *, help: str, description: str, examples: str):
    """A subcommand taking VARIANT and --factors, read the same way by `derive` and `degree`."""
    p = subparsers.add_parser(
        name, epilog=examples, formatter_class=argparse.RawDescriptionHelpFormatter, help=help,
        description=textwrap.fill(description),
    )
    p.add_argument(
        "variant", metavar="VARIANT",
        help="a registry spec (see `hla-analysis variants`), or a bare family meaning its rational "
             "member: hla = hla:m=M,phi=affine, linear = linear:phi=affine (similarity 1 + s), "
             "power = power:p=P, softmax",
    )
    p.add_argument("--factors", "-M", type=int, default=None, help="M for hla (default 2), p for power")
    return p


def register(subparsers) -> None:
    p = add_variant_command(subparsers, "derive", help=HELP, description=DESCRIPTION, examples=EXAMPLES)
    fmt = p.add_mutually_exclusive_group()
    fmt.add_argument("--json", action="store_true", help="print one JSON object")
    fmt.add_argument("--latex", action="store_true", help="print a LaTeX formula")
    p.set_defaults(func=run)


def run(args) -> int:
    from hla_analysis.symbolic.derive import derive

    form = derive(args.variant, factors=args.factors)
    if args.json:
        print(json.dumps(form.to_dict()))
    elif args.latex:
        print(form.to_latex())
    else:
        print(f"variant:      {form.variant}")
        print(f"similarity:   {form.factor_similarity}")
        if form.rational:
            print(f"numerator:    {form.numerator}   (degree {form.numerator_degree} in t)")
            print(f"denominator:  {form.denominator}   (degree {form.denominator_degree} in t)")
        else:
            print(f"weight:       {form.weight}")
            print("rational:     no -- compare with Pade / Taylor of exp (hla-analysis degree)")
        print(f"note:         {form.note}")
    return 0
