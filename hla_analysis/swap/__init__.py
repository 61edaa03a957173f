"""Swap an attention variant into a real model: :func:`swap_attention`.

Inside the context the chosen layers of a transformers model compute attention with a
variant (:mod:`hla_analysis.variants`) instead of softmax: the same post-RoPE q, k, v and
scale that a capture records, grouped key/value heads shared as the model shares them,
causal and padding masks kept. The other layers run the model's own eager attention.
Layers are numbered in call order, as captures number them. Softmax swapped in equals the
model's own output to float tolerance (tests check it for BERT, Llama and MiniLM).
"""

from __future__ import annotations

import contextlib
import contextvars
import sys
from pathlib import Path
from typing import Iterator

from torch import Tensor

from hla_analysis.capture.recorder import register_implementation
from hla_analysis.swap.attention import SwapCounts, mask_pattern, variant_attention
from hla_analysis.swap.fits import OBJECTIVES, fit_key, layer_state, load_fits, save_fits

IMPLEMENTATION_NAME = "hla_swap"

_active: contextvars.ContextVar = contextvars.ContextVar("hla_swap_session", default=None)

__all__ = ["swap_attention", "SwapSession", "SwapCounts", "mask_pattern", "variant_attention",
           "OBJECTIVES", "fit_key", "layer_state", "load_fits", "save_fits", "IMPLEMENTATION_NAME"]


def _model_eager(module):
    from hla_analysis.capture.recorder import generic_eager_attention

    own = getattr(sys.modules.get(type(module).__module__), "eager_attention_forward", None)
    return own if callable(own) else generic_eager_attention


def _swap_dispatch(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    session = _active.get()
    layer = None if session is None else session._layer_of(module)
    if layer is None or layer not in session.layers:
        return _model_eager(module)(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout,
                                    **kwargs)
    variant = session._variant_for(layer, query.shape[-1], query.shape[1])
    counts = session.counts.setdefault(layer, SwapCounts())
    return variant_attention(variant, query, key, value, attention_mask, scaling, counts)


def _register() -> None:
    register_implementation(IMPLEMENTATION_NAME, _swap_dispatch)


def _parse_layers(layers, num_layers: int | None) -> frozenset[int]:
    if isinstance(layers, str):
        if layers != "all":
            raise ValueError(f"layers must be 'all', an int or a list of ints, got {layers!r}")
        if num_layers is None:
            raise ValueError("layers='all' needs config.num_hidden_layers; pass the layer indices instead")
        return frozenset(range(num_layers))
    chosen = [layers] if isinstance(layers, int) else list(layers)
    if not chosen or not all(isinstance(l, int) and not isinstance(l, bool) for l in chosen):
        raise ValueError(f"layers must be 'all', an int or a non-empty list of ints, got {layers!r}")
    bad = [l for l in chosen if l < 0 or (num_layers is not None and l >= num_layers)]
    if bad:
        raise ValueError(f"layers {bad} are out of range for a model with {num_layers} attention layers "
                         f"(0..{num_layers - 1})")
    return frozenset(chosen)


class SwapSession:
    """State of one :func:`swap_attention` context: the swapped layers and their counts.

    ``counts`` maps each swapped layer to its :class:`SwapCounts` (rows computed, rows whose
    normaliser failed); :attr:`failed_fraction` sums them.
    """

    def __init__(self, spec: str, layers: frozenset[int], fits: dict[str, Tensor] | None, objective: str):
        from hla_analysis.variants import make_variant

        self.spec = make_variant(spec).spec
        self.layers = layers
        self.objective = objective
        self.counts: dict[int, SwapCounts] = {}
        self._fits = fits
        self._ids: dict[int, int] = {}
        self._variants: dict[int, object] = {}

    def _layer_of(self, module) -> int:
        # call order numbers the layers, as a capture does; one module keeps its number
        return self._ids.setdefault(id(module), len(self._ids))

    def _variant_for(self, layer: int, dim: int, heads: int):
        variant = self._variants.get(layer)
        if variant is None:
            from hla_analysis.fit import is_learnable
            from hla_analysis.variants import make_variant

            variant = make_variant(self.spec).bind(dim, heads=heads)
            if is_learnable(variant):
                state = layer_state(self._fits or {}, layer, self.spec, self.objective)
                if not state:
                    raise ValueError(
                        f"the fits hold no parameters of {self.spec} ({self.objective}) for layer {layer}; "
                        "fit that layer (hla-analysis evaluate does) or swap other layers"
                    )
                try:
                    variant.load_state_dict(state, strict=True)
                except RuntimeError as exc:
                    first = str(exc).splitlines()[0]
                    raise ValueError(f"fitted parameters of {self.spec} for layer {layer} do not fit this model: "
                                     f"{first}") from None
            variant.requires_grad_(False)
            self._variants[layer] = variant
        return variant

    @property
    def failed_fraction(self) -> float:
        rows = sum(c.rows for c in self.counts.values())
        return sum(c.failed for c in self.counts.values()) / rows if rows else 0.0


@contextlib.contextmanager
def swap_attention(model, spec: str, *, layers="all", fits=None, objective: str = "map_kl") -> Iterator[SwapSession]:
    """Run the chosen attention layers of ``model`` with the variant ``spec`` inside the context.

    Parameters
    ----------
    model : transformers.PreTrainedModel
        A model whose attention dispatches through transformers' ``AttentionInterface``
        (every recent architecture), loaded with ``attn_implementation="eager"`` so that the
        layers left alone compute what they computed before.
    spec : str
        Variant spec, e.g. ``"hla:m=2,phi=affine"`` (see :mod:`hla_analysis.variants`).
    layers : "all", int or list of int
        Attention layers to swap, numbered in call order (as in a capture).
    fits : path, dict or None
        Fitted parameters of learnable variants: a ``.fits.safetensors`` file written by
        ``hla-analysis compare`` (beside its table), ``hla-analysis evaluate`` or
        :func:`save_fits`, or the dict it holds; keys ``fit_key(layer, spec, objective) +
        <state_dict name>``. Required for learnable variants (Hedgehog, ReBased, HLA with
        ``proj=1``).
    objective : {"map_kl", "output_mse"}
        Which fitted parameters to load: those fitted by map KL or by layer-output MSE.

    Yields
    ------
    SwapSession
        ``counts`` per swapped layer: rows computed and rows whose normaliser failed (those
        rows output zero; they never turn the model's output into NaN).

    Raises
    ------
    ValueError
        Bad spec or layers, a learnable variant without fits, or a model whose attention
        cannot be switched or whose mask is neither causal nor padding.

    Examples
    --------
    >>> import torch
    >>> from hla_analysis.capture.models import load_model
    >>> net = load_model("minilm").model
    >>> ids = torch.tensor([[101, 7592, 2088, 102]])
    >>> with torch.no_grad():
    ...     before = net(input_ids=ids).last_hidden_state
    ...     with swap_attention(net, "softmax") as session:
    ...         same = net(input_ids=ids).last_hidden_state
    ...     with swap_attention(net, "hla:m=2,phi=affine", layers=[0]):
    ...         other = net(input_ids=ids).last_hidden_state
    >>> bool(torch.allclose(before, same, atol=1e-5)), sorted(session.counts), bool(torch.allclose(before, other))
    (True, [0, 1, 2, 3, 4, 5], False)
    """
    from hla_analysis.fit import is_learnable
    from hla_analysis.variants import make_variant

    if objective not in OBJECTIVES:
        raise ValueError(f"objective must be one of {', '.join(OBJECTIVES)}, got {objective!r}")
    num_layers = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    chosen = _parse_layers(layers, num_layers)
    if isinstance(fits, (str, Path)):
        fits = load_fits(fits)
    if fits is not None and not isinstance(fits, dict):
        raise ValueError(f"fits must be a path to a .fits.safetensors file or a dict of tensors, "
                         f"got {type(fits).__name__}")
    if is_learnable(make_variant(spec)) and fits is None:
        raise ValueError(
            f"{spec} has learnable parameters; pass fits= (the .fits.safetensors that `hla-analysis evaluate` "
            "writes) so it runs with parameters fitted on the training inputs"
        )
    session = SwapSession(spec, chosen, fits, objective)
    _register()
    previous = model.config._attn_implementation
    try:
        model.set_attn_implementation(IMPLEMENTATION_NAME)
    except (ValueError, KeyError) as exc:
        raise ValueError(
            f"{type(model).__name__} cannot switch its attention implementation ({exc}); only models that "
            "dispatch attention through transformers' AttentionInterface can be swapped"
        ) from None
    token = _active.set(session)
    try:
        yield session
    finally:
        _active.reset(token)
        model.set_attn_implementation(previous)
