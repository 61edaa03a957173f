"""Variant spec strings, parsed once: the single parser that torch and SymPy code share.

A spec is ``family`` or ``family:key=value,key=value`` (the families and their options are
described in :mod:`hla_analysis.variants`). This module imports neither torch nor SymPy:
:func:`normalize_spec` turns a string into a :class:`VariantSpec` (defaults filled in,
values checked, canonical spelling), and :func:`spec_columns` into the typed columns a
results table carries beside its ``variant`` string.

Examples
--------
>>> spec = normalize_spec("hla:m=3,phi=affine,proj=1")
>>> spec.family, spec.factors, spec.phi, spec.spec
('hla', 3, 'affine', 'hla:m=3,phi=affine,proj=1')
>>> spec_columns("hla:m=3,phi=affine,proj=1", head_dim=4)["params_per_head"]
16
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

from hla_analysis.registry import DEPRECATED_MAP_OPTIONS, FEATURE_MAP_REGISTRY, FeatureMapEntry

FAMILIES = ("softmax", "linear", "hla", "power")
MAX_FACTORS = 8

# Options of the family itself; every family with a feature map also takes the maps' options.
_FAMILY_OPTIONS: dict[str, dict[str, type]] = {
    "softmax": {},
    "linear": {"phi": str},
    "hla": {"m": int, "phi": str, "tied": int, "proj": int, "shift": int},
    "power": {"p": int},
}
_MAP_OPTION_TYPES = {key: opt.type for entry in FEATURE_MAP_REGISTRY.values() for key, opt in entry.options.items()}
# linear specs still accept favor's old "m" (feature count) for one release
_DEPRECATED_KEYS = {"linear": {"m": int}}
_DEFAULTS = {"linear": {"phi": "elu1"}, "hla": {"m": 2, "phi": "affine"}, "power": {"p": 2}}


def _allowed(family: str) -> dict[str, type]:
    if family in ("softmax", "power"):
        return dict(_FAMILY_OPTIONS[family])
    return {**_FAMILY_OPTIONS[family], **_MAP_OPTION_TYPES, **_DEPRECATED_KEYS.get(family, {})}


def parse_spec(spec: str) -> tuple[str, dict]:
    """Split ``"family:key=value,..."`` into the family and typed options (syntax only).

    >>> parse_spec("linear:phi=favor,features=128")
    ('linear', {'phi': 'favor', 'features': 128})
    """
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"a variant spec must be a non-empty string like 'hla:m=2,phi=affine', got {spec!r}.")
    family, _, rest = spec.strip().partition(":")
    family = family.strip().lower()
    if family not in FAMILIES:
        raise ValueError(f"unknown variant family {family!r} in {spec!r}; choose one of {', '.join(FAMILIES)}.")
    allowed = _allowed(family)
    options: dict = {}
    items = [part.strip() for part in rest.split(",")] if rest.strip() else []
    for item in items:
        key, eq, value = item.partition("=")
        key = key.strip()
        if not eq:
            raise ValueError(f"cannot parse {item!r} in variant spec {spec!r}: write key=value, separated by commas.")
        if key in options:
            raise ValueError(f"option {key!r} is given twice in variant spec {spec!r}.")
        if key not in allowed:
            known = ", ".join(allowed) or "none"
            raise ValueError(f"variant family {family!r} has no option {key!r} (spec {spec!r}); options: {known}.")
        try:
            options[key] = allowed[key](value.strip())
        except ValueError:
            raise ValueError(f"option {key}={value!r} in {spec!r} must be {allowed[key].__name__}.") from None
    return family, options


@dataclass(frozen=True)
class VariantSpec:
    """A checked variant spec: family, options as written (defaults included) and ``spec``.

    Everything the rest of the toolkit asks about a variant without building it is a
    property here: factor count, feature map, tying, learnable parts, parameter budget.
    """

    family: str
    options: dict
    spec: str

    @property
    def phi(self) -> str | None:
        return self.options.get("phi")

    @property
    def entry(self) -> FeatureMapEntry | None:
        return FEATURE_MAP_REGISTRY[self.phi] if self.phi is not None else None

    @property
    def factors(self) -> int | None:
        """M: 1 for linear, p for power, None for softmax."""
        return {"softmax": None, "linear": 1, "hla": self.options.get("m"), "power": self.options.get("p")}[self.family]

    @property
    def tied(self) -> bool:
        """All factors share one feature map (and projection): power, and hla unless tied=0."""
        return self.family == "power" or (self.family == "hla" and bool(self.options.get("tied", 1)))

    @property
    def untied(self) -> bool:
        """Every factor has its own feature map and projection (hla with tied=0)."""
        return self.family == "hla" and not self.tied

    @property
    def shared_proj(self) -> bool:
        return self.family == "hla" and self.tied and bool(self.options.get("proj", 0))

    @property
    def shifted(self) -> bool:
        return self.family == "hla" and bool(self.options.get("shift", 0))

    @property
    def map_options(self) -> dict:
        """The options the feature map is built with (defaults filled in)."""
        if self.entry is None:
            return {}
        given = {k: v for k, v in self.options.items() if k in self.entry.options}
        if self.phi == "affine" and self.family == "hla":
            given.setdefault("c", float(self.factors))  # (1 + s/M)^M -> exp(s)
        return {**self.entry.defaults(), **given}

    @property
    def feature_maps(self) -> int:
        """How many feature-map instances the variant holds (0 for softmax and power)."""
        if self.family in ("softmax", "power"):
            return 0
        return self.factors if self.untied else 1

    @property
    def projections(self) -> int:
        """How many learnable d x d projections: M untied, one shared with proj=1, else 0."""
        if self.family != "hla":
            return 0
        return self.factors if self.untied else int(self.shared_proj)

    @property
    def positive(self) -> bool:
        """Whether every weight is >= 0 by construction."""
        if self.family == "softmax":
            return True
        if self.family == "power":
            return self.factors % 2 == 0
        if self.phi == "affine":
            return self.tied and self.factors % 2 == 0
        return self.entry.positive

    @property
    def sign_blind(self) -> bool:
        """True when the weight cannot tell a key ``k`` from ``-k`` (even power of odd features)."""
        even = self.factors is not None and self.factors % 2 == 0
        return even and (self.family == "power" or (self.tied and self.phi == "identity"))

    @property
    def learnable(self) -> bool:
        """Whether the variant has parameters to fit."""
        hla_params = self.family == "hla" and (not self.tied or self.shared_proj or self.shifted)
        return hla_params or (self.entry is not None and self.entry.learnable)

    def params_per_head(self, head_dim: int) -> int:
        """Learnable parameters per head for head dim ``head_dim`` (what a fit adjusts)."""
        maps = self.feature_maps * self.entry.params_per_head(head_dim) if self.entry is not None else 0
        return maps + self.projections * head_dim * head_dim + int(self.shifted)

    def columns(self, head_dim: int) -> dict:
        """The typed columns of :func:`spec_columns`."""
        return {
            "family": self.family, "factors": self.factors, "phi": self.phi, "tied": self.tied,
            "proj": bool(self.options.get("proj", 0)), "shift": self.shifted, "learnable": self.learnable,
            "params_per_head": self.params_per_head(head_dim),
        }


def _canonical(family: str, options: dict) -> str:
    if not options:
        return family
    return family + ":" + ",".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in options.items())


def normalize_spec(spec: str | VariantSpec) -> VariantSpec:
    """Parse, complete and check a spec string.

    Raises
    ------
    ValueError
        Unknown family, option or feature map; an option the feature map does not take;
        bad values (M < 1 or > 8, c <= 0, ...).

    Warns
    -----
    DeprecationWarning
        ``linear:phi=favor,m=N``: favor's feature count is now ``features=N`` (``m`` is the
        factor count of ``hla``); the old spelling is read for one more release.

    Examples
    --------
    >>> normalize_spec("linear:phi=favor,features=128").spec
    'linear:phi=favor,features=128'
    >>> normalize_spec("hla:m=0")
    Traceback (most recent call last):
    ...
    ValueError: hla needs m >= 1 factors, got 0 (spec 'hla:m=0').
    """
    if isinstance(spec, VariantSpec):
        return spec
    family, given = parse_spec(spec)
    options = {**_DEFAULTS.get(family, {}), **given}  # defaults first: the canonical order
    _check_family_values(family, options, spec)
    if "phi" in options:
        entry = FEATURE_MAP_REGISTRY.get(options["phi"])
        if entry is None:
            raise ValueError(
                f"unknown feature map phi={options['phi']!r} in {spec!r}; "
                f"choose one of {', '.join(FEATURE_MAP_REGISTRY)}."
            )
        options = _renamed_deprecated(family, options, spec)
        map_given = {k: v for k, v in options.items() if k not in _FAMILY_OPTIONS[family]}
        entry.check_options(map_given, where=f" (spec {spec!r})")
    if options.get("shift") and options.get("phi") != "affine":
        raise ValueError(f"shift=1 needs affine factors (phi=affine), got phi={options.get('phi')} (spec {spec!r}).")
    return VariantSpec(family, options, _canonical(family, options))


def _check_family_values(family: str, options: dict, spec: str) -> None:
    if family == "hla":
        m = options["m"]
        if not 1 <= m <= MAX_FACTORS:
            raise ValueError(
                f"hla needs m >= 1 factors, got {m} (spec {spec!r})." if m < 1
                else f"hla with m={m} factors is beyond this toolkit's limit of {MAX_FACTORS} (spec {spec!r})."
            )
        for flag in ("tied", "proj", "shift"):
            if options.get(flag, 0) not in (0, 1):
                raise ValueError(f"{flag} must be 0 or 1, got {options[flag]} (spec {spec!r}).")
    elif family == "power" and not 1 <= options["p"] <= MAX_FACTORS:
        raise ValueError(f"power needs 1 <= p <= {MAX_FACTORS}, got {options['p']} (spec {spec!r}).")


def _renamed_deprecated(family: str, options: dict, spec: str) -> dict:
    """Old option names of the chosen map, renamed in place (same position) with a warning."""
    renames = DEPRECATED_MAP_OPTIONS.get(options["phi"], {})
    old = [key for key in options if key in renames and key in _DEPRECATED_KEYS.get(family, {})]
    if not old:
        return options
    for key in old:
        if renames[key] in options:
            raise ValueError(f"{spec!r} gives both {key}= and {renames[key]}=; write {renames[key]}= only.")
        warnings.warn(
            f"{key}= in {spec!r} is deprecated for phi={options['phi']}: write {renames[key]}= "
            f"({key} means the factor count of hla specs); the old spelling goes in the next release.",
            DeprecationWarning, stacklevel=4,
        )
    return {renames.get(k, k) if k in old else k: v for k, v in options.items()}


def spec_columns(spec: str | VariantSpec, *, head_dim: int) -> dict:
    """The typed columns a results table carries beside ``variant``.

    Parameters
    ----------
    spec : str or VariantSpec
        A variant spec.
    head_dim : int
        Head dimension d (parameter counts grow with it).

    Returns
    -------
    dict
        ``family`` (str), ``factors`` (int, None for softmax), ``phi`` (str or None),
        ``tied``, ``proj``, ``shift``, ``learnable`` (bool) and ``params_per_head`` (int).

    Examples
    --------
    >>> cols = spec_columns("linear:phi=hedgehog", head_dim=8)
    >>> cols["family"], cols["factors"], cols["tied"], cols["learnable"], cols["params_per_head"]
    ('linear', 1, False, True, 64)
    """
    if isinstance(head_dim, bool) or not isinstance(head_dim, int) or head_dim < 1:
        raise ValueError(f"head_dim must be an integer >= 1, got {head_dim!r}.")
    return normalize_spec(spec).columns(head_dim)


#: Columns :func:`add_spec_columns` adds (``params_per_head`` only when missing).
SPEC_COLUMNS = ("family", "factors", "phi", "tied", "proj", "shift", "learnable", "params_per_head")


def add_spec_columns(table, *, head_dim: int | None = None):
    """``table`` (a DataFrame with a ``variant`` column) with the spec columns appended.

    Columns already present are kept as they are, so a table written before these columns
    existed can be completed by readers; ``head_dim`` is needed only when
    ``params_per_head`` is missing. ``factors`` is a nullable integer (``<NA>`` for softmax).
    """
    import pandas as pd

    missing = [name for name in SPEC_COLUMNS if name not in table.columns]
    if not missing:
        return table
    if "params_per_head" in missing and head_dim is None:
        raise ValueError("the table has no params_per_head column; pass head_dim to compute it.")
    with warnings.catch_warnings():
        # tables written before features= carry favor's old m=: reading them is not writing one
        warnings.simplefilter("ignore", DeprecationWarning)
        per_variant = {v: normalize_spec(v).columns(head_dim or 1) for v in table["variant"].unique()}
    out = table.copy()
    for name in missing:
        values = out["variant"].map({v: cols[name] for v, cols in per_variant.items()})
        if name == "factors":
            values = pd.array(values.tolist(), dtype="Int64")
        elif name in ("tied", "proj", "shift", "learnable"):
            values = values.astype(bool)
        elif name == "params_per_head":
            values = values.astype("int64")
        out[name] = values
    return out
