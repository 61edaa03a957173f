"""``hla-analysis derive``: the rational form of a variant's attention weight in the score scale t."""

from __future__ import annotations

import json


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "derive",
        help="rational form and degrees of a variant's attention weight (SymPy)",
        description=(
            "Derive a_1(t) = prod_m s^(m)_1(t) / sum_l prod_m s^(m)_l(t) from the variant's "
            "definition, with the query scaled q -> t q, and report numerator, denominator and "
            "their degrees in t. VARIANT is a family (hla, linear, softmax, power) or a registry "
            "spec such as 'hla:m=3,phi=affine' or 'linear:phi=taylor'."
        ),
    )
    p.add_argument("variant", metavar="VARIANT")
    p.add_argument("--factors", "-M", type=int, default=None, help="M for hla (default 2), p for power")
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
