"""Record what enters every softmax of a Hugging Face model, through one generic hook.

Recent transformers models do not compute attention themselves: each attention module
projects q/k/v, applies its own QK-norm and rotary embedding, then calls the function
registered under ``config._attn_implementation`` in ``AttentionInterface``. We register
one more implementation, ``"hla_capture"``, that runs the model's own eager attention and
hands the caller exactly the tensors that function saw: the post-RoPE queries and keys,
the values, the scale, the additive mask, and the probabilities it produced. No code is
specific to one architecture.
"""

from __future__ import annotations

import contextvars
import re
import sys
from dataclasses import dataclass
from typing import Callable

import torch

IMPLEMENTATION_NAME = "hla_capture"

_active: contextvars.ContextVar = contextvars.ContextVar("hla_capture_recorder", default=None)
_REGISTERED: set[str] = set()  # implementation names registered with transformers


class CaptureError(ValueError):
    """A model does something a capture cannot store; raised from inside its forward pass.

    A separate type, so the capture loop can tell it from the model's own failures, which
    it reports as bad inputs.
    """


@dataclass
class AttentionCall:
    """One call of an attention function, as the model made it.

    ``query`` is ``[B, Hq, Nq, d]``; ``key`` and ``value`` are ``[B, Hkv, Nk, d]`` with the
    model's own (possibly grouped) key/value heads; ``allowed`` is a bool ``[B, Nq, Nk]``
    (True = the query may attend to the key) derived from the model's mask; ``probs`` is
    the model's attention probabilities ``[B, Hq, Nq, Nk]``.
    """

    name: str
    query: torch.Tensor
    key: torch.Tensor
    value: torch.Tensor
    scale: float
    allowed: torch.Tensor
    probs: torch.Tensor
    arguments: tuple[str, ...] = ()


def generic_eager_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """Plain softmax attention for models whose modeling file has no ``eager_attention_forward``.

    Grouped key/value heads are shared by consecutive query heads (query head ``h`` uses
    key/value head ``h // (Hq // Hkv)``), the layout of transformers' ``repeat_kv``.
    """
    groups = query.shape[1] // key.shape[1]
    key = key.repeat_interleave(groups, dim=1)
    value = value.repeat_interleave(groups, dim=1)
    scale = query.shape[-1] ** -0.5 if scaling is None else scaling
    logits = torch.matmul(query, key.transpose(-1, -2)) * scale
    if attention_mask is not None:
        if attention_mask.dtype == torch.bool:
            logits = logits.masked_fill(~attention_mask, float("-inf"))
        else:
            logits = logits + attention_mask
    probs = torch.softmax(logits, dim=-1, dtype=torch.float32).to(query.dtype)
    return torch.matmul(probs, value).transpose(1, 2).contiguous(), probs


# Keyword arguments transformers passes to attention functions that do not change what eager
# attention computes from q, k, v, the mask and the scale (the mask already carries causality).
NEUTRAL_ARGUMENTS = frozenset({
    "position_ids", "cache_position", "use_cache", "output_attentions", "is_causal", "past_key_value",
    "past_key_values", "cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k", "encoder_hidden_states",
    "layer_idx", "output_hidden_states", "return_dict",
})
_CROSS_NAME = re.compile(r"(?i)(?:^|\.)[a-z_]*(?:cross_?att|encoder_attn|encdecatt)[a-z_]*(?:\.|$)")


def _describe(value) -> str:
    if isinstance(value, torch.Tensor):
        return f" (a {list(value.shape)} tensor)"
    return f"={value!r}"


def changing_arguments(kwargs: dict, num_keys: int, *, dropout: float = 0.0, training: bool = False) -> list[str]:
    """The keyword arguments of one attention call that can make it differ from plain softmax.

    Everything outside :data:`NEUTRAL_ARGUMENTS` that is set (not None or False) counts, e.g.
    ``softcap`` (Gemma2), ``position_bias`` (T5), ``s_aux`` (attention sinks), a
    ``sliding_window`` shorter than the ``num_keys`` keys, or dropout in training mode.

    Examples
    --------
    >>> changing_arguments({"softcap": 5.0, "position_ids": None, "sliding_window": 4096}, 16)
    ['softcap=5.0']
    >>> changing_arguments({"sliding_window": 8}, 16, dropout=0.1, training=True)
    ['sliding_window=8', 'dropout=0.1 in training mode']
    """
    found = []
    for name, value in kwargs.items():
        if name in NEUTRAL_ARGUMENTS or value is None or value is False:
            continue
        if name == "sliding_window" and isinstance(value, int) and value >= num_keys:
            continue  # a window at least as long as the sequence cuts nothing
        found.append(f"{name}{_describe(value)}")
    if dropout and training:
        found.append(f"dropout={dropout!r} in training mode")
    return found


def cross_attention(module, name: str, kwargs: dict) -> bool:
    """Whether an attention module is recognisably cross-attention (keys from another sequence).

    Read from the module (``is_cross_attention``, BERT-style), the arguments
    (``encoder_hidden_states``) and the module's name (``encoder_attn``, ``crossattention``,
    ``cross_attn``, ``EncDecAttention``): lengths do not tell, e.g. Whisper with as many
    decoder tokens as encoder frames, or a self-attention reading a cache.

    Examples
    --------
    >>> cross_attention(None, "decoder.layers.0.encoder_attn", {}), cross_attention(None, "layers.0.self_attn", {})
    (True, False)
    """
    return bool(getattr(module, "is_cross_attention", False) or kwargs.get("encoder_hidden_states") is not None
                or _CROSS_NAME.search(name))


def _eager_for(module) -> Callable:
    own = getattr(sys.modules.get(type(module).__module__), "eager_attention_forward", None)
    return own if callable(own) else generic_eager_attention


def allowed_from_mask(mask: torch.Tensor | None, batch: int, nq: int, nk: int) -> torch.Tensor:
    """Turn a transformers attention mask into a bool ``[B, Nq, Nk]`` "may attend" tensor.

    Raises ``ValueError`` for a mask that adds finite non-zero values to the logits (a
    position bias such as ALiBi) or differs between heads: the capture format stores
    which pairs are masked, not additive biases.

    Examples
    --------
    >>> m = torch.zeros(1, 1, 2, 2); m[..., 0, 1] = torch.finfo(torch.float32).min
    >>> allowed_from_mask(m, 1, 2, 2).tolist()
    [[[True, False], [True, True]]]
    """
    if mask is None:
        return torch.ones(batch, nq, nk, dtype=torch.bool)
    if mask.ndim != 4:
        raise CaptureError(f"expected a 4-D attention mask [B, heads, Nq, Nk], got shape {tuple(mask.shape)}")
    mask = mask[..., -nq:, -nk:]
    if mask.dtype == torch.bool:
        allowed = mask
    else:
        blocked = mask <= torch.finfo(mask.dtype).min / 2
        if not torch.all((mask == 0) | blocked):
            raise CaptureError(
                "the model adds a finite bias to its attention logits (ALiBi, a relative position bias as in "
                "BEiT/Swin, or a shifted-window mask); captures and swaps reproduce causal and padding masks only, "
                "so this model's attention cannot be reproduced from q, k and scale: choose a model without it"
            )
        allowed = ~blocked
    if allowed.shape[1] != 1 and not torch.all(allowed == allowed[:, :1]):
        raise CaptureError("the model uses a different mask per head, which captures do not store")
    return allowed[:, 0].expand(batch, nq, nk).cpu()


def _capture_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    recorder = _active.get()
    eager = recorder.eager if recorder is not None and recorder.eager is not None else _eager_for(module)
    output, probs = eager(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)
    if recorder is not None:
        recorder._record(module, query, key, value, attention_mask, scaling, probs, kwargs)
    return output, probs


def _attention_configs(model) -> list:
    """Every transformers config held by ``model`` or one of its submodules (each once)."""
    configs: dict[int, object] = {}
    for module in model.modules():
        config = getattr(module, "config", None)
        if config is not None and hasattr(config, "_attn_implementation_internal"):
            configs.setdefault(id(config), config)
            for key in getattr(config, "sub_configs", {}) or {}:
                sub = getattr(config, key, None)
                if sub is not None and hasattr(sub, "_attn_implementation_internal"):
                    configs.setdefault(id(sub), sub)
    return list(configs.values())


def register_implementation(name: str, attention: Callable) -> None:
    """Register ``attention`` as transformers attention implementation ``name`` (once per name).

    Its masks are built exactly as for eager attention, the function every implementation here
    wraps: without a registered mask function transformers builds no mask at all for an unknown
    implementation, and causal models would silently attend to the future.
    """
    if name in _REGISTERED:
        return
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, eager_mask

    AttentionInterface.register(name, attention)
    AttentionMaskInterface.register(name, eager_mask)
    _REGISTERED.add(name)


def _register() -> None:
    register_implementation(IMPLEMENTATION_NAME, _capture_attention)


class AttentionRecorder:
    """Context manager that routes a model's attention through the recorder.

    Parameters
    ----------
    model : torch.nn.Module
        A transformers model, a part of one (e.g. ``model.get_encoder()``), or any module
        whose attention modules read ``config._attn_implementation`` and dispatch through
        transformers' ``AttentionInterface``. Attention that bypasses the interface is
        not seen; check ``calls_seen`` after the forward pass.
    on_call : callable
        Called with an :class:`AttentionCall` for every recorded attention call, in
        call order, while the model runs.
    modules : str, optional
        Regular expression (``re.search``) on module names, e.g. ``r"layers\\.(0|5)\\."``;
        only matching attention modules are recorded. Default: every attention module.
    attention_function : callable, optional
        The attention function to run and record instead of the model's own eager
        implementation; same signature as transformers' ``eager_attention_forward``,
        returning ``(output, probabilities)``.

    Examples
    --------
    >>> from hla_analysis.capture.models import load_model
    >>> net = load_model("minilm").model
    >>> calls = []
    >>> with AttentionRecorder(net, on_call=calls.append), torch.no_grad():
    ...     _ = net(input_ids=torch.tensor([[101, 7592, 2088, 102]]))
    >>> len(calls), tuple(calls[0].query.shape), calls[0].name
    (6, (1, 12, 4, 32), 'encoder.layer.0.attention.self')
    """

    def __init__(self, model, *, on_call: Callable[[AttentionCall], None], modules: str | None = None,
                 attention_function: Callable | None = None):
        if modules is not None:
            try:
                self._pattern = re.compile(modules)
            except re.error as exc:
                raise ValueError(f"modules={modules!r} is not a valid regular expression: {exc}") from None
        else:
            self._pattern = None
        if attention_function is not None and not callable(attention_function):
            raise ValueError("attention_function must be callable like transformers' eager_attention_forward")
        self.model = model
        self.on_call = on_call
        self.eager = attention_function
        self._names = {id(m): name for name, m in model.named_modules()}
        self._token = None
        self._previous = []
        self.calls_seen = 0
        self.names_seen = []

    def __enter__(self):
        _register()
        # Every transformers attention module picks its function from its own config's
        # _attn_implementation, so switching each config reachable from a submodule reaches
        # them all, whether the model is a PreTrainedModel, a part of one, or a plain
        # nn.Module that holds transformers layers.
        self._configs = _attention_configs(self.model)
        self._previous = [(config, config._attn_implementation_internal) for config in self._configs]
        for config in self._configs:
            config._attn_implementation_internal = IMPLEMENTATION_NAME
        self.calls_seen = 0
        self.names_seen: list[str] = []
        self._token = _active.set(self)
        return self

    def __exit__(self, *exc_info):
        _active.reset(self._token)
        for config, previous in self._previous:
            config._attn_implementation_internal = previous
        return False

    def _record(self, module, query, key, value, attention_mask, scaling, probs, kwargs=None):
        name = self._names.get(id(module), type(module).__name__)
        self.calls_seen += 1
        self.names_seen.append(name)
        if self._pattern is not None and not self._pattern.search(name):
            return
        if probs is None:
            raise CaptureError(f"the attention function used for {name} returned no probabilities; "
                               "it must return (output, probs)")
        batch, heads_q, nq, _ = query.shape
        heads_kv, nk = key.shape[1], key.shape[2]
        kwargs = kwargs or {}
        if nq != nk:
            raise CaptureError(
                f"{name} is cross-attention or uses a cache ({nq} queries, {nk} keys); captures hold "
                "self-attention only: skip it with modules= (--modules REGEX) matching only self-attention "
                "modules, e.g. 'self_attn|attention\\.self'"
            )
        if cross_attention(module, name, kwargs):
            raise CaptureError(
                f"{name} is cross-attention (queries from the decoder, keys from the encoder); captures hold "
                "self-attention only: capture the encoder (model.get_encoder(), --submodule encoder) or skip it "
                "with modules= (--modules REGEX) matching only self-attention modules, e.g. 'self_attn'"
            )
        if heads_q % heads_kv:
            raise CaptureError(f"{name}: {heads_q} query heads are not a multiple of {heads_kv} key/value heads")
        scale = float(query.shape[-1] ** -0.5 if scaling is None else scaling)
        allowed = allowed_from_mask(attention_mask, batch, nq, nk)
        arguments = tuple(changing_arguments(kwargs, nk))
        self.on_call(AttentionCall(name, query.detach(), key.detach(), value.detach(), scale, allowed, probs.detach(),
                                   arguments))
