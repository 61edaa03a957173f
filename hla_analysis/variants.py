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
Feature-map options (``features`` and ``seed`` for favor, ``c`` for affine; see
:mod:`hla_analysis.registry`) go in the same spec, e.g. ``linear:phi=favor,features=128,seed=1``
or ``hla:m=2,phi=favor,features=32``. Specs are parsed by :mod:`hla_analysis.spec`.
Learnable HLA (fit with :mod:`hla_analysis.fit`):
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
>>> q = torch.rand(2, 6, 8)   # entries >= 0: every logit >= 0, so (1 + s/3)^3 > 0
>>> var.attention_map(q, q).sum(-1).allclose(torch.ones(2, 6))
True
"""

from __future__ import annotations

import contextlib
import math

import torch
from torch import Tensor, nn

from hla_analysis._checks import (
    check_batch,
    check_factor_lists,
    check_mask_leading_dims,
    check_pair,
    check_scale,
    nonnegative_by_construction,
    query_positions,
)
from hla_analysis.feature_maps import FEATURE_MAPS, make_feature_map
from hla_analysis.ops import hla, hla_attention_map, hla_weights, softmax_attention_map, softmax_attention_output
from hla_analysis.ops.reference import masked_row_sums
from hla_analysis.spec import FAMILIES, VariantSpec, normalize_spec, parse_spec  # noqa: F401  (re-exported)

# The variants a comparison runs by default (issue 5); every one is a valid spec.
DEFAULT_VARIANTS = (
    "softmax",
    "linear:phi=identity",
    "linear:phi=elu1",
    "linear:phi=relu",
    "linear:phi=exp",
    "linear:phi=favor,features=64",
    "linear:phi=favor,features=256",
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


class Variant(nn.Module):
    """A configured attention variant: ``attention_map`` and ``forward`` with one signature.

    Build with :func:`make_variant`, which returns the family's subclass
    (:class:`SoftmaxVariant`, :class:`KernelVariant` for linear and hla,
    :class:`PowerVariant`). Attributes: ``kind`` (family), ``factors`` (M; 1 for linear, p
    for power, None for softmax), ``phi`` (feature-map name or None), ``options``, ``spec``
    (canonical spec string), ``parsed`` (its :class:`~hla_analysis.spec.VariantSpec`) and
    ``is_reference`` (True for softmax only).
    Learnable parts (Hedgehog, ReBased, untied HLA projections) are created on first use,
    when the head dim is known, or by :meth:`bind`.
    """

    def __init__(self, spec: VariantSpec):
        super().__init__()
        self.parsed = spec
        self.kind = spec.family
        self.options = dict(spec.options)
        self.spec = spec.spec
        self.phi = spec.phi
        self.factors = spec.factors
        self.tied = spec.tied
        self.shared_proj = spec.shared_proj
        self.shifted = spec.shifted
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
        self._build(dim, heads)
        return self

    def _build(self, dim: int, heads: int | None) -> None:
        """Create the family's modules and parameters (none by default)."""

    #: True for the family whose weights *are* the reference (softmax): a comparison scores it
    #: with the reference rows themselves instead of recomputing them.
    is_reference = False

    @property
    def positive(self) -> bool:
        """Whether every weight this variant produces is >= 0 by construction."""
        return self.parsed.positive

    @property
    def reads_all_keys(self) -> bool:
        """Whether a key's features depend on keys a causal row does not see: cosFormer's
        sequence length, the shift over every token of exp and FAVOR+. Read from the spec (bound
        or not); False for most families."""
        phi = getattr(self, "phi", None)
        return phi is not None and bool(getattr(FEATURE_MAPS.get(phi), "reads_all_keys", False))

    @property
    def sign_blind(self) -> bool:
        """True when the weight cannot tell a key ``k`` from ``-k``.

        An even number of identical factors on odd features (``(q.k)^p`` with p even, or tied
        identity features) gives ``w(q, k) = w(q, -k)``. Reported in comparison tables, since
        averaging over heads would hide it.
        """
        return self.parsed.sign_blind

    # -- the maths (one signature for every family) ----------------------------------
    def features(
        self, q: Tensor, k: Tensor, *, scale: float | None = None, query_offset: int = 0
    ) -> tuple[list[Tensor], list[Tensor]]:
        """Factor features ``(qs, ks)``: M tensors each; tied factors share one object."""
        raise NotImplementedError

    def attention_map(self, q: Tensor, k: Tensor, *, scale: float | None = None, causal: bool = False,
                      key_padding_mask: Tensor | None = None, query_offset: int = 0,
                      allow_signed: bool = False) -> Tensor:
        """Row-normalised ``[..., Nq, Nk]`` map of this variant (materialized; for analysis).

        Negative weights or a non-positive row normaliser raise a ``ValueError`` unless
        ``allow_signed=True`` (as in :func:`~hla_analysis.ops.hla_attention_map`).
        """
        raise NotImplementedError

    def weights(self, q: Tensor, k: Tensor, *, scale: float | None = None, causal: bool = False,
                key_padding_mask: Tensor | None = None, query_offset: int = 0) -> tuple[Tensor, Tensor]:
        """Unnormalised weights ``[..., Nq, Nk]`` and row normalizers ``[..., Nq, 1]``, unjudged.

        For counting failing rows: ``weights / normalizer`` is the map, and a row whose
        normalizer is <= 0 is a failure even where the ratio looks like a distribution.
        Softmax returns its map and a normalizer of one.
        """
        raise NotImplementedError

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
        raise NotImplementedError

    def extra_repr(self) -> str:
        return f"spec={self.spec!r}"


class SoftmaxVariant(Variant):
    """The reference: ``exp(s_ij)`` normalised per row; not a finite kernel."""

    is_reference = True

    def features(self, q, k, *, scale=None, query_offset=0):
        raise ValueError("softmax has no feature factors; it is not a (finite) kernel.")

    def attention_map(self, q, k, *, scale=None, causal=False, key_padding_mask=None, query_offset=0,
                      allow_signed=False):
        return softmax_attention_map(
            q, k, scale=scale, causal=causal, key_padding_mask=key_padding_mask, query_offset=query_offset
        )

    def weights(self, q, k, *, scale=None, causal=False, key_padding_mask=None, query_offset=0):
        attn = self.attention_map(
            q, k, scale=scale, causal=causal, key_padding_mask=key_padding_mask, query_offset=query_offset
        )
        return attn, torch.ones_like(attn[..., :1])

    def forward(self, q, k, v, *, scale=None, causal=False, key_padding_mask=None, allow_signed=False,
                form="auto", backend="auto"):
        return softmax_attention_output(q, k, v, scale=scale, causal=causal, key_padding_mask=key_padding_mask)


class _FactorVariant(Variant):
    """A product of M factor similarities ``phi_m(q).phi_m(k)``: the maths runs in :mod:`hla_analysis.ops`."""

    def features(self, q, k, *, scale=None, query_offset=0):
        check_pair(q, k)  # NaN/Inf: a flag of its own, since e.g. relu(-inf) = 0 hides it
        return self._factor_features(*self._scaled(q, k, scale), query_offset=query_offset)

    def _factor_features(self, q: Tensor, k: Tensor, *, query_offset: int) -> tuple[list[Tensor], list[Tensor]]:
        raise NotImplementedError

    def attention_map(self, q, k, *, scale=None, causal=False, key_padding_mask=None, query_offset=0,
                      allow_signed=False):
        with check_batch():
            qs, ks = self.features(q, k, scale=scale, query_offset=query_offset)
            return hla_attention_map(
                qs, ks, causal=causal, key_padding_mask=key_padding_mask,
                query_offset=query_offset, allow_signed=allow_signed,
            )

    def weights(self, q, k, *, scale=None, causal=False, key_padding_mask=None, query_offset=0):
        """As :meth:`Variant.weights`; tied factors form their similarity once.

        ``hla_weights`` multiplies M similarity matrices, one matmul each. When every factor
        is the same (tied, ``power``) and no gradient is needed, the one similarity ``s`` is
        computed once and multiplied by itself in the same order, ``((s * s) * s) ...``: the
        same bits as M matmuls. A map with a direct similarity (``FeatureMap.has_similarity``:
        Taylor, ReBased) skips its wide features, with or without a gradient; equal up to
        float rounding, and closer to the exact value (ReBased's float32 features can sum
        to a negative weight, the direct ``(q~.k~)^2`` cannot).
        """
        sim = None
        if self._direct_similarity():
            check_pair(q, k)
            sim = self._similarity(*self._scaled(q, k, scale))
        else:
            qs, ks = self.features(q, k, scale=scale, query_offset=query_offset)
            tied = all(f is qs[0] for f in qs) and all(f is ks[0] for f in ks)
            # With a graph (the fits), M matmuls: their backward sums the gradient in the same
            # order as before, and a fit amplifies any rounding change to an O(lr) one.
            graph = torch.is_grad_enabled() and (qs[0].requires_grad or ks[0].requires_grad)
            if not tied or (graph and self.factors > 1):
                return hla_weights(qs, ks, causal=causal, key_padding_mask=key_padding_mask,
                                   query_offset=query_offset)
            check_factor_lists(qs, ks)  # as hla_weights checks them (tied: one pair)
            sim = qs[0] @ ks[0].transpose(-1, -2)
        return _tied_weights(sim, self.factors, q, k, causal=causal, key_padding_mask=key_padding_mask,
                             query_offset=query_offset)

    def _scaled(self, q: Tensor, k: Tensor, scale: float | None) -> tuple[Tensor, Tensor]:
        self.bind(q.shape[-1])
        root = math.sqrt(check_scale(scale, q.shape[-1]))
        return q * root, k * root

    def _direct_similarity(self) -> bool:
        """Whether the factors are tied and their similarity has a direct form (:meth:`_similarity`)."""
        return False

    def _similarity(self, q: Tensor, k: Tensor) -> Tensor:
        """The one factor similarity of scaled ``q``, ``k`` without features (see ``_direct_similarity``)."""
        raise NotImplementedError

    def forward(self, q, k, v, *, scale=None, causal=False, key_padding_mask=None, allow_signed=False,
                form="auto", backend="auto"):
        # positive by construction (Taylor, ReBased: sign-indefinite features, weights >= 0):
        # no feature-sign certificate; normalisers and outputs are still checked
        certified = nonnegative_by_construction() if self.positive else contextlib.nullcontext()
        with check_batch(), certified:  # the input flags and hla's join one host sync
            qs, ks = self.features(q, k, scale=scale)
            return hla(
                qs, ks, v, causal=causal, key_padding_mask=key_padding_mask,
                allow_signed=allow_signed, form=form, backend=backend,
            )


class PowerVariant(_FactorVariant):
    """``(s_ij)^p``: p tied identity factors."""

    def _factor_features(self, q, k, *, query_offset):
        return [q] * self.factors, [k] * self.factors


class KernelVariant(_FactorVariant):
    """Kernel linear attention (M = 1) and HLA: feature maps, optional projections and shift."""

    def _build(self, dim, heads):
        for _ in range(self.parsed.feature_maps):
            self.maps.append(make_feature_map(self.phi, dim, heads=heads, **self.parsed.map_options))
        eye = torch.eye(dim) if heads is None else torch.eye(dim).repeat(heads, 1, 1)
        for _ in range(self.parsed.projections):
            self.proj.append(nn.Parameter(eye.clone()))
        if self.shifted:
            self.shift = nn.Parameter(torch.zeros(() if heads is None else (heads, 1, 1)))

    def _direct_similarity(self):
        return not self.parsed.untied and not self.shifted and FEATURE_MAPS[self.phi].has_similarity

    def _similarity(self, q, k):
        return self.maps[0].similarity(*self._projected(q, k))

    def _projected(self, q: Tensor, k: Tensor) -> tuple[Tensor, Tensor]:
        """Tied factors: ``q``, ``k`` through the one shared projection, if any."""
        if self.shared_proj:
            w = self.proj[0].to(q.dtype).transpose(-1, -2)
            return q @ w, k @ w
        return q, k

    def _factor_features(self, q, k, *, query_offset):
        n_keys = k.shape[-2]
        q_pos = k_pos = None  # position tensors only for maps that read them (two launches less)
        if any(phi.uses_positions for phi in self.maps) or not (isinstance(query_offset, int) and query_offset == 0):
            q_pos = query_positions(query_offset, q.shape[-2], q.device)
            k_pos = torch.arange(n_keys, device=k.device)
        if not self.parsed.untied:  # one map shared by every factor, at most one projection
            q, k = self._projected(q, k)
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


def _tied_weights(sim: Tensor, m: int, q: Tensor, k: Tensor, *, causal: bool, key_padding_mask: Tensor | None,
                  query_offset: int) -> tuple[Tensor, Tensor]:
    """``hla_weights`` of ``m`` factors that all have the similarity ``sim``: ``sim^m`` masked, row sums.

    The product runs in ``hla_weights``' order (``((s * s) * s) ...``), so it has the same
    bits as M separate matmuls; in place when no gradient is needed.
    """
    check_mask_leading_dims(key_padding_mask, q, k)
    in_place = not (torch.is_grad_enabled() and sim.requires_grad)
    weights = sim if m == 1 else sim * sim
    for _ in range(m - 2):
        weights = weights.mul_(sim) if in_place else weights * sim
    return masked_row_sums(weights, causal=causal, key_padding_mask=key_padding_mask, query_offset=query_offset,
                           in_place=in_place)


_FAMILY_CLASSES: dict[str, type[Variant]] = {
    "softmax": SoftmaxVariant, "linear": KernelVariant, "hla": KernelVariant, "power": PowerVariant,
}


def make_variant(spec: str) -> Variant:
    """Turn a spec string into a configured :class:`Variant`.

    Parameters
    ----------
    spec : str
        ``softmax``, ``linear:phi=NAME[,opts]``, ``hla:m=M,phi=NAME[,c=..,proj=1,tied=0,shift=1]`` or
        ``power:p=P``. Feature maps: identity, elu1, relu, exp, affine (option ``c``), favor
        (options ``features``, ``seed``), taylor, cosformer, hedgehog, rebased. ``m`` is
        the factor count of hla specs; ``linear:phi=favor,m=N`` (the old spelling of
        ``features=N``) still works for one release, with a ``DeprecationWarning``. Odd ``p``
        is allowed: its weights can be negative.

    Raises
    ------
    ValueError
        Every spec :func:`hla_analysis.spec.normalize_spec` refuses (its docstring lists them).

    Examples
    --------
    >>> make_variant("linear:phi=favor,features=128").spec
    'linear:phi=favor,features=128'
    >>> type(make_variant("hla:m=3,phi=affine")).__name__
    'KernelVariant'
    """
    parsed = normalize_spec(spec)
    return _FAMILY_CLASSES[parsed.family](parsed)


def list_variants() -> list[str]:
    """The registered default variant specs, in the order comparisons report them."""
    return list(DEFAULT_VARIANTS)
