"""Swap an attention variant into a real model: :func:`swap_attention`.

Inside the context the chosen layers of a transformers model compute attention with a
variant (:mod:`hla_analysis.variants`) instead of softmax: the same post-RoPE q, k, v and
scale that a capture records, grouped key/value heads shared as the model shares them,
causal and padding masks kept. The other layers run the model's own eager attention.
Layers are the model's self-attention calls numbered in call order within a forward, as
captures number them; cross-attention and attention arguments the variants do not implement
(soft-capping, position biases, sinks, short sliding windows) are refused, never dropped. Softmax swapped in equals the
model's own output to float tolerance (tests check it for BERT, Llama and MiniLM).
"""

from __future__ import annotations

import contextlib
import contextvars
import sys
from pathlib import Path
from typing import Iterator

import torch
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
    layer = None if session is None else session._layer_of(module, kwargs)
    if layer is None or layer not in session.layers:
        return _model_eager(module)(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout,
                                    **kwargs)
    session._check_arguments(layer, module, key.shape[2], dropout, kwargs)
    variant = session._variant_for(layer, query.shape[-1], query.shape[1])
    counts = session.counts.setdefault(layer, SwapCounts())
    return variant_attention(variant, query, key, value, attention_mask, scaling, counts)


def _register() -> None:
    register_implementation(IMPLEMENTATION_NAME, _swap_dispatch)


def _parse_layers(layers, num_layers: int | None) -> frozenset[int] | None:
    """The chosen layers; None for "all". ``num_layers`` (when known before a forward) bounds them early."""
    if isinstance(layers, str):
        if layers != "all":
            raise ValueError(f"layers must be 'all', an int or a list of ints, got {layers!r}")
        return None
    chosen = [layers] if isinstance(layers, int) else list(layers)
    if not chosen or not all(isinstance(l, int) and not isinstance(l, bool) for l in chosen):
        raise ValueError(f"layers must be 'all', an int or a non-empty list of ints, got {layers!r}")
    bad = [l for l in chosen if l < 0 or (num_layers is not None and l >= num_layers)]
    if bad:
        raise ValueError(f"layers {bad} are out of range for a model with {num_layers} attention layers "
                         f"(0..{num_layers - 1})")
    return frozenset(chosen)


def _known_layer_count(model) -> int | None:
    """config.num_hidden_layers where it counts every self-attention call (not encoder-decoder or multimodal)."""
    config = getattr(model, "config", None)
    if config is None or getattr(config, "is_encoder_decoder", False) or getattr(config, "sub_configs", None):
        return None
    count = getattr(config, "num_hidden_layers", None)
    return count if isinstance(count, int) else None


class _AllLayers:
    """``layers="all"``: every self-attention call, however many the forward makes."""

    def __contains__(self, layer) -> bool:
        return True

    def __iter__(self):
        return iter(())


class SwapSession:
    """State of one :func:`swap_attention` context: the swapped layers and their counts.

    Layers are the model's self-attention *calls*, numbered in call order within each forward
    of the model (as a capture numbers them): a module called several times (ALBERT shares one
    module across its layers) has one number per call. ``counts`` maps each swapped layer to
    its :class:`SwapCounts` (rows computed, rows whose normaliser failed);
    :attr:`failed_fraction` sums them. ``modules`` names the module of each call of the last
    forward.
    """

    def __init__(self, spec: str, layers: frozenset[int] | None, fits: dict[str, Tensor] | None, objective: str,
                 names: dict[int, str] | None = None):
        from hla_analysis.variants import make_variant

        self.spec = make_variant(spec).spec
        self.all_layers = layers is None
        self.layers = _AllLayers() if layers is None else layers
        self.objective = objective
        self.counts: dict[int, SwapCounts] = {}
        self.modules: list[str] = []
        self.module_ids: list[int] = []
        self._fits = fits
        self._names = names or {}
        # {id(module): layer} set by a caller that skips some calls (evaluate's block reuse);
        # None: number the calls as they come
        self._order: dict[int, int] | None = None
        self._depth = 0
        self._calls = 0
        self._variants: dict[int, object] = {}

    def _name(self, module) -> str:
        return self._names.get(id(module), type(module).__name__)

    def _forward_started(self, *_) -> None:
        if self._depth == 0:
            self._calls, self.modules, self.module_ids = 0, [], []
        self._depth += 1

    def _forward_ended(self, module, _args, output) -> None:
        self._depth -= 1
        if self._depth or output is None or self._order is not None:
            return  # a nested forward, a failed one (torch passes None), or numbering given by the caller
        if self._calls == 0:
            raise ValueError(
                f"{type(module).__name__} made no attention call through transformers' AttentionInterface, so "
                "swap_attention swapped nothing; only models whose attention dispatches through it (loaded with "
                "attn_implementation='eager') can be swapped"
            )
        bad = sorted(l for l in self.layers if l >= self._calls)
        if bad:
            raise ValueError(f"layers {bad} are out of range: {type(module).__name__} made {self._calls} "
                             f"self-attention calls (layers 0..{self._calls - 1})")

    def _layer_of(self, module, kwargs: dict) -> int | None:
        from hla_analysis.capture.recorder import cross_attention

        name = self._name(module)
        if cross_attention(module, name, kwargs):
            if self.all_layers:
                raise ValueError(
                    f"{name} is cross-attention (queries from the decoder, keys from the encoder), which is not "
                    "supported; pass the encoder (model.get_encoder()), or list the self-attention layers to "
                    "swap (layers=[...], numbered over self-attention calls only; cross-attention runs as before)"
                )
            return None  # never swapped, not numbered
        if self._order is not None:
            return self._order.get(id(module))
        if self._depth == 0:
            raise ValueError(
                f"{name} ran attention outside a forward of the model given to swap_attention, so its layer "
                "number is unknown; call that model (or pass the part you call to swap_attention)"
            )
        layer = self._calls
        self._calls += 1
        self.modules.append(name)
        self.module_ids.append(id(module))
        return layer

    def _check_arguments(self, layer: int, module, num_keys: int, dropout: float, kwargs: dict) -> None:
        from hla_analysis.capture.recorder import changing_arguments

        found = changing_arguments(kwargs, num_keys, dropout=dropout, training=module.training)
        if found:
            raise ValueError(
                f"layer {layer} ({self._name(module)}): {', '.join(found)} is not supported by swap_attention, "
                "whose variants implement plain scaled dot-product attention with a causal or padding mask; "
                "swap other layers" + (" or call model.eval()" if "training mode" in found[-1] else "")
            )

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
                    detail = " ".join(str(exc).split())
                    detail = detail if len(detail) <= 300 else detail[:297] + "..."
                    raise ValueError(f"fitted parameters of {self.spec} for layer {layer} do not fit this model "
                                     f"({detail}); pass fits made on a capture of this model, or drop --fits to "
                                     "fit them here") from None
            variant.requires_grad_(False)
            self._variants[layer] = variant
        return variant

    @property
    def failed_fraction(self) -> float:
        rows = sum(c.rows for c in self.counts.values())
        return sum(c.failed for c in self.counts.values()) / rows if rows else 0.0


def _entry_points(model) -> list:
    """The modules whose forward starts a numbering: the model and its transformers parts."""
    try:
        from transformers import PreTrainedModel
    except ImportError:  # pragma: no cover - transformers is a dependency
        return [model]
    return [model] + [m for m in model.modules() if m is not model and isinstance(m, PreTrainedModel)]


@contextlib.contextmanager
def _attention_switched(model):
    """Every transformers config of ``model`` dispatches to the swap implementation inside the context."""
    from hla_analysis.capture.recorder import _attention_configs

    if hasattr(model, "set_attn_implementation") and getattr(model, "config", None) is not None:
        # restored config by config, as they were: set_attn_implementation(previous) would apply the
        # top-level choice (say sdpa) to sub-models that never supported it (DETR's ResNet backbone)
        saved = [(config, config._attn_implementation_internal) for config in _attention_configs(model)]
        try:
            model.set_attn_implementation(IMPLEMENTATION_NAME)
        except (ValueError, KeyError) as exc:
            for config, previous in saved:
                config._attn_implementation_internal = previous
            raise ValueError(
                f"{type(model).__name__} cannot switch its attention implementation ({exc}); only models that "
                "dispatch attention through transformers' AttentionInterface can be swapped"
            ) from None
        try:
            yield
        finally:
            for config, previous in saved:
                config._attn_implementation_internal = previous
        return
    configs = _attention_configs(model) if isinstance(model, torch.nn.Module) else []
    if not configs:
        raise ValueError(
            f"{type(model).__name__} holds no transformers config selecting its attention implementation, so its "
            "attention cannot be swapped; pass a transformers model (or a module holding transformers layers) "
            "loaded with attn_implementation='eager'"
        )
    saved = [(config, config._attn_implementation_internal) for config in configs]
    for config in configs:
        config._attn_implementation_internal = IMPLEMENTATION_NAME
    try:
        yield
    finally:
        for config, previous in saved:
            config._attn_implementation_internal = previous


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
        Attention layers to swap: the model's self-attention calls, numbered in call order
        within each forward (as in a capture), so a module shared by several layers (ALBERT)
        has one number per call and an encoder-decoder's decoder self-attention follows its
        encoder's. Cross-attention is never swapped or numbered; ``"all"`` refuses a model
        that runs it.
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
        Bad spec or layers, a learnable variant without fits, a model whose attention
        cannot be switched or whose mask is neither causal nor padding, or a swapped layer
        whose attention the variants do not implement: cross-attention with ``"all"``, or an
        argument that changes the attention (``softcap``, ``position_bias``, attention
        sinks, a sliding window shorter than the sequence, dropout in training mode). The
        last ones are raised by the forward pass inside the context.

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
    chosen = _parse_layers(layers, _known_layer_count(model))
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
    names = {id(m): name for name, m in model.named_modules()} if isinstance(model, torch.nn.Module) else {}
    session = SwapSession(spec, chosen, fits, objective, names)
    _register()
    with _attention_switched(model):
        handles = []
        for entry in _entry_points(model):
            handles.append(entry.register_forward_pre_hook(session._forward_started))
            handles.append(entry.register_forward_hook(session._forward_ended, always_call=True))
        token = _active.set(session)
        try:
            yield session
        finally:
            _active.reset(token)
            for handle in handles:
                handle.remove()
