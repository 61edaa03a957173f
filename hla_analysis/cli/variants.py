"""``hla-analysis variants``: list the registered attention variants and their properties."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "variants",
        help="list the attention variants and the spec strings that name them",
        description=(
            "List the registered attention variants (the default set of `compare`) and the "
            "options of each family. Every command that takes a variant accepts these spec "
            "strings, e.g. 'hla:m=3,phi=affine' or 'linear:phi=favor,features=128'."
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
    print(
        "\noptions, written family:key=value,key=value:\n"
        "  linear  phi=NAME (default elu1); phi=favor takes features=F (default 64; m=F is deprecated), seed=S;\n"
        "          phi=affine takes c (hla takes the same map options)\n"
        "  hla     m=FACTORS (default 2), phi=NAME (default affine, with c=M so factors are 1 + s/M),\n"
        "          proj=1 (one learnable d x d projection, factors stay tied), tied=0 (one per factor),\n"
        "          shift=1 (learnable logit shift b per head, affine only: factors 1 + (s - b)/c)\n"
        "  power   p=POWER (default 2): weight (q.k)^p\n"
        "positive: every weight >= 0 by construction; sign-blind: cannot tell a key k from -k"
    )
    return 0
