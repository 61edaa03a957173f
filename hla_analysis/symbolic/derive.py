"""Rational forms of registry variants: spec string in, :class:`RationalForm` out.

Short family names pick the member of the contract's affine family (MISSION.md,
"Definitions"): ``hla`` is ``hla:m=M,phi=affine`` and ``linear`` is ``linear:phi=affine``
(similarity ``1 + s``, the ``M = 1`` case). The registry's own default linear map (elu+1)
is not rational in ``t``; ask for it by its full spec, ``linear:phi=elu1``.
"""

from __future__ import annotations

from functools import lru_cache

from hla_analysis.spec import normalize_spec
from hla_analysis.symbolic.feature_maps import SYMBOLIC_FEATURE_MAPS
from hla_analysis.symbolic.rational_form import RationalForm, derive_rational_form

_SHORT = {"softmax", "linear", "hla", "power"}


def resolve_spec(variant: str, *, factors: int | None = None) -> str:
    """Canonical registry spec for a short family name or a full spec, with ``factors`` applied.

    Examples
    --------
    >>> resolve_spec("hla", factors=3)
    'hla:m=3,phi=affine'
    >>> resolve_spec("linear")
    'linear:phi=affine'
    >>> resolve_spec("power:p=4")
    'power:p=4'
    """
    if factors is not None and (isinstance(factors, bool) or not isinstance(factors, int) or factors < 1):
        raise ValueError(f"--factors / factors must be an integer M >= 1, got {factors!r}.")
    if not isinstance(variant, str) or not variant.strip():
        raise ValueError(f"variant must be a family name or spec like 'hla:m=2,phi=affine', got {variant!r}.")
    name = variant.strip().lower()
    if name in _SHORT:
        spec = {
            "softmax": "softmax",
            "linear": "linear:phi=affine",
            "hla": f"hla:m={factors or 2},phi=affine",
            "power": f"power:p={factors or 2}",
        }[name]
        if name in ("softmax", "linear") and factors not in (None, 1):
            raise ValueError(f"{name} has no factor count (it is M = 1); use 'hla' with --factors {factors}.")
        return normalize_spec(spec).spec
    var = normalize_spec(variant)
    if factors is not None and factors != var.factors:
        key = {"hla": "m", "power": "p"}.get(var.family)
        if key is None:
            raise ValueError(f"{var.spec!r} has a fixed factor count; drop --factors {factors}.")
        if key in var.options:
            raise ValueError(
                f"{var.spec!r} already sets {key}={var.options[key]} but factors={factors} was also given; "
                "pass only one."
            )
        sep = "," if ":" in var.spec else ":"
        return normalize_spec(f"{var.spec}{sep}{key}={factors}").spec
    return var.spec


@lru_cache(maxsize=128)
def derive(variant: str, *, factors: int | None = None) -> RationalForm:
    """Derive the rational form in ``t`` of a registry variant (see :mod:`.rational_form`).

    Parameters
    ----------
    variant : str
        ``softmax``, ``linear``, ``hla``, ``power`` or any registry spec
        (``hla:m=3,phi=affine,tied=0``, ``linear:phi=taylor``, ...).
    factors : int, optional
        ``M`` for ``hla`` (default 2) or ``p`` for ``power``.

    Raises
    ------
    ValueError
        Unknown variant or feature map, ``M < 1``, or a degree too large to expand.

    Examples
    --------
    >>> form = derive("hla", factors=3)
    >>> form.variant, form.numerator_degree, form.denominator_degree
    ('hla:m=3,phi=affine', 3, 3)
    >>> derive("linear").degree
    1
    >>> derive("softmax").rational
    False
    """
    var = normalize_spec(resolve_spec(variant, factors=factors))
    if var.phi is not None and var.phi not in SYMBOLIC_FEATURE_MAPS:
        raise ValueError(f"feature map {var.phi!r} has no symbolic version; known: {sorted(SYMBOLIC_FEATURE_MAPS)}.")
    # map_options: the registry's HLA scales the affine similarity by c = M unless c is given
    return derive_rational_form(
        var.family, factors=var.factors, phi=var.phi if var.family != "power" else "identity",
        tied=var.tied or var.family == "linear", options=var.map_options, variant=var.spec,
    )
