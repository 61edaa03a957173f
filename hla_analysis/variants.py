"""One registry of attention variants, named by short spec strings.

A spec is ``family`` or ``family:key=value,key=value``:

=========  ==============================================  ===========================
family     weight a_ij proportional to                      options (defaults)
=========  ==============================================  ===========================
softmax    exp(s_ij)                                        --
linear     phi(q_i).phi(k_j)              (M = 1)           phi=elu1, map options
hla        prod_m phi_m(q_i).phi_m(k_j)   (M factors)       m=2, phi=affine, c=m, tied=1
power      (s_ij)^p                       (p tied factors)  p=2
=========  ==============================================  ===========================

``s_ij = scale * q_i.k_j`` is the softmax logit (``scale`` defaults to ``1/sqrt(d)``): every
variant feeds ``sqrt(scale) * q`` and ``sqrt(scale) * k`` to its feature maps, so that e.g.
``hla:m=3,phi=affine`` has factor similarity ``1 + s/3`` and weight ``(1 + s/3)^3``.
Feature-map options (``m`` and ``seed`` for favor, ``c`` for affine) go in the same spec,
e.g. ``linear:phi=favor,m=128,seed=1``. Learnable HLA (fit with :mod:`hla_analysis.fit`):
``proj=1`` adds one projection ``W`` (d x d per head, identity at start) applied to q and k
before the factors, which stay tied -- the same parameter budget as Hedgehog's map; ``tied=0``
gives every factor its own projection ``W_m`` (M d^2 parameters). ``shift=1`` (affine factors
only) adds a learnable logit shift ``b`` per head: factors ``1 + (s - b)/c``, which can move the
zero of ``(1 + s/M)^M`` below the logits a head actually produces (heads with attention
sinks have logits far below ``-M``, where the even power grows again).

Examples
--------
>>> var = make_variant("hla:m=3,phi=affine")
>>> var.kind, var.factors, var.phi, var.spec
('hla', 3, 'affine', 'hla:m=3,phi=affine')
>>> q = torch.randn(2, 6, 8)
>>> var.attention_map(q, q).sum(-1).allclose(torch.ones(2, 6))
True
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from hla_analysis._checks import check_batch, check_pair, check_scale
from hla_analysis.feature_maps import FEATURE_MAPS, make_feature_map
from hla_analysis.ops import hla, hla_attention_map, hla_weights, softmax_attention_map, softmax_attention_output

FAMILIES = ("softmax", "linear", "hla", "power")

# Options each family understands besides the feature-map ones; value parsers.
_MAP_OPTIONS = {"m": int, "seed": int, "c": float}
_FAMILY_OPTIONS = {
    "softmax": {},
    "linear": {"phi": str, "seed": int, "c": float, "m": int},
    "hla": {"phi": str, "seed": int, "c": float, "m": int, "tied": int, "proj": int, "shift": int},
    "power": {"p": int},
}
_MAX_FACTORS = 8
_PHI_OPTIONS = {"favor": {"m", "seed"}, "affine": {"c"}}

# The variants a comparison runs by default (issue 5); every one is a valid spec.
DEFAULT_VARIANTS = (
    "softmax",
    "linear:phi=identity",
    "linear:phi=elu1",
    "linear:phi=relu",
    "linear:phi=exp",
    "linear:phi=favor,m=64",
    "linear:phi=favor,m=256",
    "linear:phi=taylor",
    "linear:phi=cosformer",
    "linear:phi=hedgehog",
    "linear:phi=rebased",
    "power:p=2",
    "power:p=4",
    "hla:m=2,phi=affine",
    "hla:m=3,phi=affine",
    "hla:m=4,phi=affine",
    "hla:m=2,phi=exp",
    "hla:m=2,phi=affine,proj=1",
    "hla:m=3,phi=affine,proj=1",
    "hla:m=4,phi=affine,proj=1",
)


def parse_spec(spec: str) -> tuple[str, dict]:
    """Split ``"family:key=value,..."`` into the family and typed options.

    >>> parse_spec("linear:phi=favor,m=128")
    ('linear', {'phi': 'favor', 'm': 128})
    """
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"a variant spec must be a non-empty string like 'hla:m=2,phi=affine', got {spec!r}.")
    family, _, rest = spec.strip().partition(":")
    family = family.strip().lower()
    if family not in FAMILIES:
        raise ValueError(f"unknown variant family {family!r} in {spec!r}; choose one of {', '.join(FAMILIES)}.")
    allowed = _FAMILY_OPTIONS[family]
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


class Variant(nn.Module):
    """A configured attention variant: ``attention_map`` and ``forward`` with one signature.

    Build with :func:`make_variant`. Attributes: ``kind`` (family), ``factors`` (M; 1 for
    linear, p for power, None for softmax), ``phi`` (feature-map name or None), ``options``
    and ``spec`` (canonical spec string). Learnable parts (Hedgehog, ReBased, untied HLA
    projections) are created on first use, when the head dim is known, or by :meth:`bind`.
    """

    def __init__(self, family: str, options: dict, spec: str):
        super().__init__()
        self.kind = family
        self.options = dict(options)
        self.spec = spec
        self.phi = options.get("phi")
        self.factors = {"softmax": None, "linear": 1, "hla": options.get("m"), "power": options.get("p")}[family]
        self.tied = family == "power" or (family == "hla" and bool(options.get("tied", 1)))
        self.shared_proj = family == "hla" and self.tied and bool(options.get("proj", 0))
        self.shifted = family == "hla" and bool(options.get("shift", 0))
        self.dim: int | None = None
        self.heads: int | None = None
        self.maps = nn.ModuleList()
        self.proj = nn.ParameterList()
        self.shift: nn.Parameter | None = None

    # -- construction -------------------------------------------------------------
    def bind(self, dim: int, *, heads: int | None = None) -> Variant:
        """Create the feature maps for head dim ``dim`` (idempotent).

        With ``heads``, learnable parameters get a leading head axis: the variant then takes
        ``[..., heads, N, d]`` inputs and fits every head separately in one pass.
        """
        if self.dim is not None:
            if dim != self.dim:
                raise ValueError(f"variant {self.spec!r} was built for head dim {self.dim}, got {dim}.")
            return self
        self.dim, self.heads = dim, heads
        if self.kind in ("linear", "hla"):
            map_options = {k: v for k, v in self.options.items() if k in _MAP_OPTIONS and not (k == "m" and self.kind == "hla")}
            if self.phi == "affine" and self.kind == "hla":
                map_options.setdefault("c", float(self.factors))
            n_maps = 1 if self.tied or self.kind == "linear" else self.factors
            for _ in range(n_maps):
                self.maps.append(make_feature_map(self.phi, dim, heads=heads, **map_options))
            eye = torch.eye(dim) if heads is None else torch.eye(dim).repeat(heads, 1, 1)
            n_proj = self.factors if self.kind == "hla" and not self.tied else int(self.shared_proj)
            for _ in range(n_proj):
                self.proj.append(nn.Parameter(eye.clone()))
            if self.shifted:
                self.shift = nn.Parameter(torch.zeros(() if heads is None else (heads, 1, 1)))
        return self

    @property
    def positive(self) -> bool:
        """Whether every weight this variant produces is >= 0 by construction."""
        if self.kind == "softmax":
            return True
        if self.kind == "power":
            return self.factors % 2 == 0
        if self.phi == "affine":
            return self.tied and self.factors % 2 == 0
        return FEATURE_MAPS[self.phi].positive

    @property
    def sign_blind(self) -> bool:
        """True when the weight cannot tell a key ``k`` from ``-k``.

        An even number of identical factors on odd features (``(q.k)^p`` with p even, or tied
        identity features) gives ``w(q, k) = w(q, -k)``. Reported in comparison tables, since
        averaging over heads would hide it.
        """
        even = self.factors is not None and self.factors % 2 == 0
        return even and (self.kind == "power" or (self.tied and self.phi == "identity"))

    # -- the maths ------------------------------------------------------------------
    def features(
        self, q: Tensor, k: Tensor, *, scale: float | None = None, query_offset: int = 0
    ) -> tuple[list[Tensor], list[Tensor]]:
        """Factor features ``(qs, ks)``: M tensors each; tied factors share one object."""
        if self.kind == "softmax":
            raise ValueError("softmax has no feature factors; it is not a (finite) kernel.")
        check_pair(q, k)  # NaN/Inf: a flag of its own, since e.g. relu(-inf) = 0 hides it
        self.bind(q.shape[-1])
        root = math.sqrt(check_scale(scale, q.shape[-1]))
        q, k = q * root, k * root
        n_keys = k.shape[-2]
        q_pos = torch.arange(query_offset, query_offset + q.shape[-2], device=q.device)
        k_pos = torch.arange(n_keys, device=k.device)
        if self.kind == "power":
            return [q] * self.factors, [k] * self.factors
        if self.tied or self.kind == "linear":
            if self.shared_proj:
                w = self.proj[0].to(q.dtype).transpose(-1, -2)
                q, k = q @ w, k @ w
            fq = self._shifted(self.maps[0], self.maps[0](q, positions=q_pos, length=n_keys))
            fk = self.maps[0](k, positions=k_pos, length=n_keys)
            return [fq] * self.factors, [fk] * self.factors
        qs, ks = [], []
        for phi, w in zip(self.maps, self.proj):
            w = w.to(q.dtype).transpose(-1, -2)
            qs.append(self._shifted(phi, phi(q @ w, positions=q_pos, length=n_keys)))
            ks.append(phi(k @ w, positions=k_pos, length=n_keys))
        return qs, ks

    def _shifted(self, phi, fq: Tensor) -> Tensor:
        """Query features ``[1 - b/c, q/sqrt(c)]``: similarity ``1 + (s - b)/c`` against ``[1, k/sqrt(c)]``."""
        if self.shift is None:
            return fq
        lead = fq[..., :1] * (1 - self.shift.to(fq.dtype) / phi.c)
        return torch.cat([lead, fq[..., 1:]], dim=-1)

    def attention_map(
        self,
        q: Tensor,
        k: Tensor,
        *,
        scale: float | None = None,
        causal: bool = False,
        key_padding_mask: Tensor | None = None,
        query_offset: int = 0,
        allow_signed: bool = False,
    ) -> Tensor:
        """Row-normalised ``[..., Nq, Nk]`` map of this variant (materialized; for analysis).

        Negative weights or a non-positive row normaliser raise a ``ValueError`` unless
        ``allow_signed=True`` (as in :func:`~hla_analysis.ops.hla_attention_map`).
        """
        if self.kind == "softmax":
            return softmax_attention_map(
                q, k, scale=scale, causal=causal, key_padding_mask=key_padding_mask, query_offset=query_offset
            )
        with check_batch():
            qs, ks = self.features(q, k, scale=scale, query_offset=query_offset)
            return hla_attention_map(
                qs, ks, causal=causal, key_padding_mask=key_padding_mask,
                query_offset=query_offset, allow_signed=allow_signed,
            )

    def weights(
        self,
        q: Tensor,
        k: Tensor,
        *,
        scale: float | None = None,
        causal: bool = False,
        key_padding_mask: Tensor | None = None,
        query_offset: int = 0,
    ) -> tuple[Tensor, Tensor]:
        """Unnormalised weights ``[..., Nq, Nk]`` and row normalizers ``[..., Nq, 1]``, unjudged.

        For counting failing rows: ``weights / normalizer`` is the map, and a row whose
        normalizer is <= 0 is a failure even where the ratio looks like a distribution.
        Softmax returns its map and a normalizer of one.
        """
        if self.kind == "softmax":
            attn = self.attention_map(
                q, k, scale=scale, causal=causal, key_padding_mask=key_padding_mask, query_offset=query_offset
            )
            return attn, torch.ones_like(attn[..., :1])
        qs, ks = self.features(q, k, scale=scale, query_offset=query_offset)
        return hla_weights(qs, ks, causal=causal, key_padding_mask=key_padding_mask, query_offset=query_offset)

    def forward(
        self,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        *,
        scale: float | None = None,
        causal: bool = False,
        key_padding_mask: Tensor | None = None,
        allow_signed: bool = False,
        form: str = "auto",
        backend: str = "auto",
    ) -> Tensor:
        """Attention output ``[..., N, dv]``; O(N) for every family but softmax.

        Checks as in :func:`~hla_analysis.ops.hla`, with one host sync per call: variants
        that are not positive by construction (``positive`` is False) may raise for
        weights that could be negative unless ``allow_signed=True``.
        """
        if self.kind == "softmax":
            return softmax_attention_output(q, k, v, scale=scale, causal=causal, key_padding_mask=key_padding_mask)
        with check_batch():  # the input flags and hla's join one host sync
            qs, ks = self.features(q, k, scale=scale)
            return hla(
                qs, ks, v, causal=causal, key_padding_mask=key_padding_mask,
                allow_signed=allow_signed, form=form, backend=backend,
            )

    def extra_repr(self) -> str:
        return f"spec={self.spec!r}"


def _canonical(family: str, options: dict) -> str:
    if not options:
        return family
    return family + ":" + ",".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in options.items())


def make_variant(spec: str) -> Variant:
    """Turn a spec string into a configured :class:`Variant`.

    Parameters
    ----------
    spec : str
        ``softmax``, ``linear:phi=NAME[,opts]``, ``hla:m=M,phi=NAME[,c=..,proj=1,tied=0,shift=1]`` or
        ``power:p=P``. Feature maps: identity, elu1, relu, exp, affine (option ``c``), favor
        (options ``m`` features, ``seed``; in hla specs ``m`` is the factor count), taylor,
        cosformer, hedgehog, rebased. Odd ``p`` is allowed: its weights can be negative.

    Raises
    ------
    ValueError
        Unknown family, option or feature map; an option the feature map does not take;
        bad values (M < 1 or > 8, c <= 0, ...).

    Examples
    --------
    >>> make_variant("linear:phi=favor,m=128").spec
    'linear:phi=favor,m=128'
    >>> make_variant("hla:m=0")
    Traceback (most recent call last):
    ...
    ValueError: hla needs m >= 1 factors, got 0 (spec 'hla:m=0').
    """
    family, options = parse_spec(spec)
    if family == "linear":
        options = {"phi": options.pop("phi", "elu1"), **options}
    elif family == "hla":
        options = {"m": options.pop("m", 2), "phi": options.pop("phi", "affine"), **options}
        if not 1 <= options["m"] <= _MAX_FACTORS:
            raise ValueError(
                f"hla needs m >= 1 factors, got {options['m']} (spec {spec!r})."
                if options["m"] < 1
                else f"hla with m={options['m']} factors is beyond this toolkit's limit of {_MAX_FACTORS} (spec {spec!r})."
            )
        for flag in ("tied", "proj", "shift"):
            if options.get(flag, 0) not in (0, 1):
                raise ValueError(f"{flag} must be 0 or 1, got {options[flag]} (spec {spec!r}).")
    elif family == "power":
        options = {"p": options.pop("p", 2), **options}
        if options["p"] < 1 or options["p"] > _MAX_FACTORS:
            raise ValueError(f"power needs 1 <= p <= {_MAX_FACTORS}, got {options['p']} (spec {spec!r}).")
    if "phi" in options and options["phi"] not in FEATURE_MAPS:
        raise ValueError(
            f"unknown feature map phi={options['phi']!r} in {spec!r}; choose one of {', '.join(FEATURE_MAPS)}."
        )
    if "phi" in options:
        # in hla specs m is the factor count, so it never reaches the feature map
        given = {k for k in options if k in _MAP_OPTIONS and not (k == "m" and family == "hla")}
        unknown = given - _PHI_OPTIONS.get(options["phi"], set())
        if unknown:
            takes = ", ".join(sorted(_PHI_OPTIONS.get(options["phi"], set()))) or "no options"
            raise ValueError(
                f"feature map phi={options['phi']} does not take {', '.join(sorted(unknown))} "
                f"(spec {spec!r}); it takes {takes}."
            )
    if options.get("shift") and options.get("phi") != "affine":
        raise ValueError(f"shift=1 needs affine factors (phi=affine), got phi={options.get('phi')} (spec {spec!r}).")
    if "c" in options and not (math.isfinite(options["c"]) and options["c"] > 0):
        raise ValueError(f"c must be a finite number > 0 (similarity 1 + s/c), got {options['c']} (spec {spec!r}).")
    if "m" in options and family == "linear" and options["m"] < 1:
        raise ValueError(f"favor needs m >= 1 random features, got {options['m']} (spec {spec!r}).")
    return Variant(family, options, _canonical(family, options))


def list_variants() -> list[str]:
    """The registered default variant specs, in the order comparisons report them."""
    return list(DEFAULT_VARIANTS)
