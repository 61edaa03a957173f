"""``hla-analysis variants``: list the registered attention variants and their properties."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "variants",
        help="list the attention variants and the spec strings that name them",
        description=(
            "List the registered attention variants. Every command that takes a variant "
            "accepts these spec strings, e.g. 'hla:m=3,phi=affine' or 'linear:phi=favor,m=128'."
        ),
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from hla_analysis.feature_maps import FEATURE_MAPS
    from hla_analysis.variants import list_variants, make_variant

    print(f"{'spec':34} {'family':8} {'M':>2}  {'positive':8}  sign-blind")
    for spec in list_variants():
        var = make_variant(spec)
        factors = "-" if var.factors is None else str(var.factors)
        print(f"{spec:34} {var.kind:8} {factors:>2}  {str(var.positive):8}  {var.sign_blind}")
    print(f"\nfeature maps (phi=...): {', '.join(FEATURE_MAPS)}")
    return 0
