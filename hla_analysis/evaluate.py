"""Model-level evaluation: swap each variant into the real model and measure what it loses.

For every variant (and, for learnable ones, every fitting objective) the chosen layers are
swapped one at a time (``single``) and as the prefix ``0..l`` (``cumulative``), and the
held-out inputs of the capture run through the model. Encoders: cosine between swapped and
original mean-pooled embeddings, and the Spearman correlation of pairwise embedding
similarities. Causal LMs: perplexity beside the original's, and the mean next-token KL.
Every run also reports the fraction of rows whose normaliser failed (``status``).

Output: a tidy table ``model, variant, objective, layer, layers_swapped, swap_mode, split,
input, metric, value, status``; each variant/objective is written atomically into
``<out>.parts/`` as it finishes, so an interrupted run resumes.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import re
import shutil
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from hla_analysis._io import (
    LOCK_NAME,
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_table,
    check_parts_folder,
    exclusive_output_lock,
    refuse_busy_siblings,
    refuse_foreign_outputs,
    settings_owner,
    written_files,
)
from hla_analysis.capture import load_capture
from hla_analysis.fit import FitConfig, fit_variant, is_learnable
from hla_analysis.swap import OBJECTIVES, fit_key, load_fits, save_fits, swap_attention
from hla_analysis.swap.fits import read_fits_file
from hla_analysis.variants import make_variant

COLUMNS = ["model", "variant", "objective", "layer", "layers_swapped", "swap_mode", "split", "input", "metric",
           "value", "status"]
SWAP_MODES = ("single", "cumulative")


def _compare_settings(results: Path) -> dict:
    path = results.with_name(results.stem + ".settings.json")
    if not path.is_file():
        if not results.exists():
            raise FileNotFoundError(f"no results table at {results}; run `hla-analysis compare` first and pass its "
                                    "--out")
        raise FileNotFoundError(f"no {path.name} beside {results}; pass the table `hla-analysis compare` wrote")
    try:
        settings = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"cannot read {path} ({exc}); rerun `hla-analysis compare`") from None
    if not isinstance(settings, dict):
        raise ValueError(f"{path} is not the settings file `hla-analysis compare` writes; pass the table it wrote")
    owner = settings.get("output")
    if isinstance(owner, str) and owner != results.name:
        raise ValueError(f"{path} belongs to {results.with_name(owner)}, not to {results}; pass that table, "
                         "or rerun `hla-analysis compare` with --out " + str(results))
    return settings


def _read_json(path: Path):
    """A JSON file's content, or None when it is missing or unreadable."""
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None


def _only_given_fits(log) -> bool:
    """Whether a fits log records no fitting of this run's own (every entry came from a given file)."""
    return isinstance(log, list) and all(isinstance(r, dict) and r.get("source") == "given fits" for r in log)


def _check_results_capture(settings: dict, results: Path, capture: Path) -> None:
    """Refuse a results table of another capture (compare records the capture manifest's SHA-256)."""
    from hla_analysis.compare import capture_identity

    recorded = settings.get("capture_sha256")
    if recorded and recorded != capture_identity(capture):
        raise ValueError(
            f"--results {results} was computed on another capture ({settings.get('capture')}), not on --capture "
            f"{capture}; pass the results of this capture, or the capture those results came from"
        )


_FIT_NAME = re.compile(r"layer\.(\d+)\.(.+?)\.(" + "|".join(OBJECTIVES) + r")\.(.+)")


def check_given_fits(given: dict, recorded: dict, path: Path, cap, capture: Path, specs: list[str]) -> None:
    """Refuse given fits that do not belong to this capture and these variants (one line each).

    ``recorded``: the settings in the file's metadata (:func:`read_fits_file`); fits that record
    their capture (compare's, and evaluate's since they name it) must come from ``capture``. Every
    tensor must be named ``layer.<l>.<variant>.<objective>.<parameter>`` with ``l`` a layer of the
    capture; those of the variants evaluated must be exactly the parameters (names and shapes) of
    the variant bound to the capture's heads.
    """
    from hla_analysis.compare import capture_identity

    fix = "pass the fits compare wrote for this capture, or leave --fits out to fit here"
    recorded_capture = recorded.get("capture_sha256")
    if isinstance(recorded_capture, str) and recorded_capture != capture_identity(capture):
        raise ValueError(f"--fits {path} was fitted on another capture ({recorded.get('capture')}), not on "
                         f"--capture {capture}; {fix}")
    found: dict[tuple, dict] = {}
    for name, tensor in given.items():
        match = _FIT_NAME.fullmatch(name)
        if match is None:
            raise ValueError(f"--fits {path} holds a tensor {name!r}, not named layer.<l>.<variant>.<objective>."
                             f"<parameter>: it is not a fits file of hla-analysis; {fix}")
        layer, spec, objective, parameter = int(match[1]), match[2], match[3], match[4]
        if layer >= cap.num_layers:
            raise ValueError(f"--fits {path} holds fits of layer {layer} but the capture has {cap.num_layers} "
                             f"layers: they were fitted on another model; {fix}")
        found.setdefault((layer, spec, objective), {})[parameter] = tensor
    for spec in dict.fromkeys(make_variant(s).spec for s in specs):
        variant = make_variant(spec)
        if not is_learnable(variant):
            continue
        expected = {n: tuple(t.shape) for n, t in variant.bind(cap.head_dim, heads=cap.num_heads).state_dict().items()}
        for (layer, got_spec, objective), state in sorted(found.items()):
            if got_spec != spec:
                continue
            where = f"--fits {path}: layer {layer} {spec} ({objective})"
            if set(state) != set(expected):
                raise ValueError(f"{where} holds the parameters {sorted(state)}, but the variant has "
                                 f"{sorted(expected)}; {fix}")
            for parameter, shape in expected.items():
                if tuple(state[parameter].shape) != shape:
                    raise ValueError(
                        f"{where}: {parameter} is {list(state[parameter].shape)} but {cap.num_heads} heads of size "
                        f"{cap.head_dim} need {list(shape)}: fitted for another model; {fix}")


def _load_causal_lm(model: str):
    from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer  # noqa: F401

    from hla_analysis.capture.models import resolve_model

    path, _ = resolve_model(model)
    return AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager", dtype=torch.float32).eval()


def _load(model: str, causal: bool):
    if causal:
        return _load_causal_lm(model)
    from hla_analysis.capture.models import load_model

    return load_model(model, tokenizer=False).model


def check_model_identity(net, model: str, cap, causal: bool) -> None:
    """Refuse a model whose weights differ from the ones the capture recorded (``weights_sha256``).

    The capture hashes the bare backbone (``AutoModel``); a causal LM is compared through its
    ``base_model``, which holds the same tensors under the same names.
    """
    from hla_analysis.capture.run import weights_sha256

    expected = cap.manifest.get("weights_sha256")
    body = net.base_model if causal and getattr(net, "base_model", None) is not None else net
    actual = weights_sha256(body)
    if expected and actual != expected:
        raise ValueError(
            f"--model {model!r} (weights sha256 {actual[:12]}) is not the model the capture {cap.path} was made "
            f"from ({cap.manifest.get('model')!r}, weights sha256 {expected[:12]}); pass that model as --model, "
            "or evaluate a capture of this model"
        )


def _train_batch(cap, layers, train_inputs: int) -> dict:
    """q, k, v of the training inputs, ``[I, len(layers) * H, N, d]``: the layers' heads side by side."""
    data = [[cap.get(layer, i) for i in range(train_inputs)] for layer in layers]
    batch = {n: torch.cat([torch.stack([d[n] for d in per_layer]) for per_layer in data], dim=1)
             for n in ("q", "k", "v")}
    batch.update(scale=data[0][0]["scale"], causal=data[0][0]["causal"])
    return batch


def _split_state(state: dict, layers: list[int], heads: int) -> dict[int, dict] | None:
    """A jointly fitted state (leading dim ``len(layers) * heads``) as one state per layer; None if not per head."""
    if not all(t.dim() and t.shape[0] == len(layers) * heads for t in state.values()):
        return None
    return {layer: {n: t[j * heads:(j + 1) * heads].clone() for n, t in state.items()}
            for j, layer in enumerate(layers)}


def fit_parameters(cap, specs, *, train_inputs: int, fit: dict | FitConfig, objectives=OBJECTIVES, have=None,
                   joint: bool = False, progress=False) -> tuple[dict, list]:
    """Fit every learnable spec per layer on the training inputs, once per objective.

    ``have`` (a fits dict, e.g. the ``.fits.safetensors`` that ``compare`` writes) supplies
    parameters already fitted: a layer/spec/objective it holds is taken as is, not refitted.
    ``joint``: the layers a spec/objective still needs are fitted in one optimisation, their
    heads side by side (``bind(d, heads=layers * H)``; every parameter is per head, so the
    heads stay independent). The loss is then the mean over all those layers' rows instead
    of each layer's own mean: each head's gradient is scaled by a constant, to which Adam is
    invariant except through its ``eps``; one optimisation of 30 layers' heads costs one
    thirtieth of the per-op overhead of 30 small ones. Falls back to per-layer fits when a
    parameter is not per head or the layers' scales differ.
    Returns ``(params, log)``; ``params`` holds the given and the new parameters.
    """
    have = dict(have or {})
    params, log = dict(have), []
    fit = fit.as_dict() if isinstance(fit, FitConfig) else dict(fit)
    learnable = [s for s in specs if is_learnable(make_variant(s))]
    jobs = [(layer, s, o) for layer in range(cap.num_layers) for s in learnable for o in objectives]
    todo = [j for j in jobs if not any(k.startswith(fit_key(j[0], make_variant(j[1]).spec, j[2])) for k in have)]
    groups: dict[tuple, list[int]] = {}
    for layer, spec, objective in todo:
        groups.setdefault((spec, objective), []).append(layer)
    units = ([(layers, spec, objective) for (spec, objective), layers in groups.items()] if joint
             else [([layer], spec, objective) for layer, spec, objective in todo])
    scales = {float(cap.get(layer, 0, verify=False)["scale"]) for layer in range(cap.num_layers)} if joint else set()
    for layers, spec, objective in tqdm(units, desc="fit", disable=not progress):
        config = FitConfig(**{**fit, "objective": objective})
        states = None
        if len(layers) > 1 and len(scales) == 1:
            variant = make_variant(spec).bind(cap.head_dim, heads=cap.num_heads * len(layers))
            result = fit_variant(variant, [_train_batch(cap, layers, train_inputs)], config=config)
            states = _split_state(variant.state_dict(), layers, cap.num_heads)
            entries = [{"layer": layer, "variant": spec, "objective": objective, "loss_initial": result.initial_loss,
                        "loss_final": result.final_loss, "joint_layers": len(layers)} for layer in layers]
        if states is None:
            states, entries = {}, []
            for layer in layers:
                variant = make_variant(spec).bind(cap.head_dim, heads=cap.num_heads)
                result = fit_variant(variant, [_train_batch(cap, [layer], train_inputs)], config=config)
                states[layer] = variant.state_dict()
                entries.append({"layer": layer, "variant": spec, "objective": objective,
                                "loss_initial": result.initial_loss, "loss_final": result.final_loss})
        spec_name = make_variant(spec).spec
        for layer, state in states.items():
            params.update({fit_key(layer, spec_name, objective) + n: t for n, t in state.items()})
        log += entries
    for layer, spec, objective in jobs:
        if (layer, spec, objective) not in todo:
            log.append({"layer": layer, "variant": spec, "objective": objective, "loss_initial": None,
                        "loss_final": None, "source": "given fits"})
    return params, log


def _forward(net, ids: torch.Tensor, causal: bool, blocked: bool = False) -> torch.Tensor:
    """Mean-pooled embeddings (encoders), logits or, with ``blocked``, last hidden states (causal LMs)."""
    with torch.no_grad():
        if causal and blocked:
            return net.base_model(input_ids=ids, use_cache=False).last_hidden_state
        out = net(input_ids=ids, use_cache=False) if causal else net(input_ids=ids)
    return out.logits if causal else out.last_hidden_state.mean(1)


class NextTokenMeasure:
    """Per-input NLL and next-token KL of a causal LM from its last hidden states, blocked over tokens.

    The plain measure materialises ``[inputs, tokens, vocab]`` logits twice (original and
    swapped) and their log-softmax; at SmolLM2's 49,152-token vocabulary that is hundreds of MB
    per swap and most of a short run's time. Here the LM head runs on ``chunk`` token positions
    at a time: each chunk's logits and log-softmax are float32 (as in the plain measure), the
    per-input sums accumulate in float64. The original model's log-probabilities are computed
    once and kept while they take at most ``keep_elements`` floats, otherwise recomputed per
    chunk. The result equals the plain measure up to float32 rounding of the logits
    (``tests/test_evaluate.py::test_next_token_measure_blocked_equals_plain``).

    Parameters
    ----------
    head : torch.nn.Module
        The model's output embedding (``net.get_output_embeddings()``): hidden -> logits.
    ref_hidden : Tensor
        ``[B, N, h]`` last hidden states of the original model.
    ids : Tensor
        ``[B, N]`` token ids; position ``t`` predicts token ``t + 1``.
    """

    def __init__(self, head, ref_hidden: torch.Tensor, ids: torch.Tensor, *, chunk: int = 256,
                 keep_elements: int = 2**26):
        batch, n = ids.shape
        if n < 2:
            raise ValueError("next-token metrics need inputs of at least 2 tokens")
        self.head, self.batch, self.predicted = head, batch, n - 1
        self.targets = ids[:, 1:].reshape(-1, 1)
        self.owner = torch.arange(batch).repeat_interleave(n - 1)
        total = batch * (n - 1)
        self.chunks = [slice(s, min(s + chunk, total)) for s in range(0, total, chunk)]
        self.ref = self._flat(ref_hidden)
        vocab = self._logp(self.ref[:1]).shape[-1]
        self.kept = [self._logp(self.ref[c]) for c in self.chunks] if total * vocab <= keep_elements else None
        self.nll_ref = self._sums(None)[0]

    def _flat(self, hidden: torch.Tensor) -> torch.Tensor:
        return hidden[:, :-1].reshape(-1, hidden.shape[-1])

    def _logp(self, hidden: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return torch.log_softmax(self.head(hidden).float(), -1)

    def _sums(self, hidden: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        nll = torch.zeros(self.batch, dtype=torch.float64)
        kl = torch.zeros(self.batch, dtype=torch.float64)
        flat = None if hidden is None else self._flat(hidden)
        for i, c in enumerate(self.chunks):
            logp_ref = self.kept[i] if self.kept is not None else self._logp(self.ref[c])
            logp = logp_ref if flat is None else self._logp(flat[c])
            nll.index_add_(0, self.owner[c], -logp.gather(-1, self.targets[c]).squeeze(-1).double())
            if flat is not None:
                kl.index_add_(0, self.owner[c], (logp_ref.exp() * (logp_ref - logp)).sum(-1).double())
        return nll / self.predicted, kl / self.predicted

    def __call__(self, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(nll, nll_original, kl)``, each ``[B]`` float64: means over the predicted positions."""
        nll, kl = self._sums(hidden)
        return nll, self.nll_ref, kl


def blocked_head(net, ids: torch.Tensor):
    """The LM head if ``head(base_model(ids))`` gives the model's logits, else None.

    Models that change logits after the head (soft-capping, logit scales) fail the check and
    keep the plain measure. Tolerance: float32 eps times the logits' magnitude and the width
    of the head's dot products.
    """
    head = net.get_output_embeddings() if hasattr(net, "get_output_embeddings") else None
    if head is None or getattr(net, "base_model", net) is net:
        return None
    probe = ids[:1, : min(8, ids.shape[1])]
    with torch.no_grad():
        full = net(input_ids=probe, use_cache=False).logits
        hidden = net.base_model(input_ids=probe, use_cache=False).last_hidden_state
        mine = head(hidden)
    if mine.shape != full.shape:
        return None
    tol = 8 * torch.finfo(full.dtype).eps * hidden.shape[-1] * float(full.abs().max().clamp_min(1))
    return head if float((mine - full).abs().max()) <= tol else None


def _metrics(ref: torch.Tensor, out: torch.Tensor, ids: torch.Tensor, causal: bool, measure=None) -> list[tuple]:
    """``(input position, metric, value)``; input position None for set-level metrics.

    Causal LMs: with ``measure`` (a :class:`NextTokenMeasure`) ``out`` is the last hidden
    state and the metrics are blocked; without it ``ref`` and ``out`` are full logits.
    """
    rows = []
    if causal:
        if measure is not None:
            nll, nll_ref, kl = measure(out)
        else:
            logp_ref = torch.log_softmax(ref[:, :-1].float(), -1)
            logp = torch.log_softmax(out[:, :-1].float(), -1)
            target = ids[:, 1:, None]
            nll = -logp.gather(-1, target).squeeze(-1).mean(-1)
            nll_ref = -logp_ref.gather(-1, target).squeeze(-1).mean(-1)
            kl = (logp_ref.exp() * (logp_ref - logp)).sum(-1).mean(-1)
        for i in range(len(ids)):
            rows += [(i, "nll", float(nll[i])), (i, "next_token_kl", float(kl[i]))]
        rows += [(None, "perplexity", float(nll.mean().exp())),
                 (None, "perplexity_original", float(nll_ref.mean().exp())),
                 (None, "next_token_kl", float(kl.mean()))]
    else:
        from scipy.stats import spearmanr

        cos = torch.nn.functional.cosine_similarity(ref, out, dim=-1)
        for i in range(len(ids)):
            rows.append((i, "embedding_cosine", float(cos[i])))
        rows.append((None, "embedding_cosine", float(cos.mean())))
        if len(ids) >= 3:  # a rank correlation needs at least 3 pairs; with 2 inputs there is 1 pair: no row
            upper = np.triu_indices(len(ids), 1)
            sims = [torch.nn.functional.cosine_similarity(e[:, None].float(), e[None].float(), dim=-1).numpy()[upper]
                    for e in (ref, out)]
            rows.append((None, "pairwise_spearman", float(spearmanr(*sims).statistic)))
    return rows


class BlockCache:
    """Reuse transformer-block outputs between runs of one model on the same inputs.

    Block ``i``'s output depends only on the inputs and on which of the layers ``0..i`` are
    swapped (and with what). A run that agrees with an earlier one on ``0..i`` takes block
    ``i``'s output from it instead of recomputing: a single swap of layer ``l`` reuses the
    original model's blocks ``0..l-1``, a cumulative swap of ``0..l`` reuses blocks ``0..l-1``
    of the cumulative swap of ``0..l-1``. Only those two prefixes are kept (nothing swapped,
    everything swapped), so memory is ``2 * num_layers`` block outputs. This halves the work
    of the ``single`` + ``cumulative`` sweep; :func:`tests.test_evaluate` checks that every
    output equals the plain, uncached forward.

    Use :meth:`set` before each forward: the swapped layers and a tag naming the variant.
    """

    def __init__(self, blocks):
        self.blocks = blocks
        self.store: dict = {}
        self.swapped: frozenset = frozenset()
        self.tag = None
        self.hits = 0

    @staticmethod
    def find(net, num_layers: int):
        """The ``ModuleList`` of the model's transformer blocks, or None if there is none."""
        for _, module in net.named_modules():
            if isinstance(module, torch.nn.ModuleList) and len(module) == num_layers:
                return module
        return None

    def set(self, swapped=(), tag=None) -> None:
        swapped = frozenset(swapped)
        if swapped and tag != self.tag:  # a new variant: its swapped prefixes are of no use
            self.store = {k: v for k, v in self.store.items() if not k[1]}
            self.tag = tag
        self.swapped = swapped

    def __enter__(self):
        for i, block in enumerate(self.blocks):
            block.forward = self._wrap(i, block.forward)  # an instance attribute shadows the method
        return self

    def __exit__(self, *exc):
        for block in self.blocks:
            del block.forward
        self.store.clear()

    def _wrap(self, i, forward):
        def run(*args, **kwargs):
            prefix = frozenset(layer for layer in self.swapped if layer <= i)
            key = (i, prefix)
            if key in self.store:
                self.hits += 1
                return self.store[key]
            out = forward(*args, **kwargs)
            if not prefix or prefix == frozenset(range(i + 1)):
                self.store[key] = out
            return out

        return run


def attention_calls(net, ids: torch.Tensor, causal: bool) -> list[tuple[int, str]]:
    """``(id(module), module name)`` of each self-attention call, in call order, from one short run."""
    with swap_attention(net, "softmax") as session:
        _forward(net, ids[:1, : min(4, ids.shape[1])], causal)
    return list(zip(session.module_ids, session.modules))


def layer_order(net, ids: torch.Tensor, causal: bool) -> dict[int, int] | None:
    """``{id(attention module): layer}`` in call order; None when a module is called more than once.

    A shared module (ALBERT) has one number per call, which a map by module cannot hold.
    """
    calls = attention_calls(net, ids, causal)
    order = {module: layer for layer, (module, _) in enumerate(calls)}
    return order if len(order) == len(calls) else None


def capture_layer_calls(capture_names: list[str], call_names: list[str]) -> list[int]:
    """The model's attention call that each capture layer recorded, matched by module name.

    A capture names modules relative to the model it ran (``layers.1.self_attn`` for a bare
    backbone); the evaluated model may hold that backbone under a prefix
    (``model.layers.1.self_attn``), so a name matches itself or a dotted suffix. The j-th
    capture layer of a name is the j-th call of that module (a shared module is called once
    per layer).

    Examples
    --------
    >>> capture_layer_calls(["layers.1.attn"], ["model.layers.0.attn", "model.layers.1.attn"])
    [1]
    """
    def same(a: str, b: str) -> bool:
        return a == b or a.endswith("." + b) or b.endswith("." + a)

    result, seen = [], {}
    for layer, name in enumerate(capture_names):
        calls = [i for i, called in enumerate(call_names) if same(called, name)]
        modules = sorted({call_names[i] for i in calls})
        if len(modules) != 1:
            found = "matches none" if not modules else f"matches several ({', '.join(modules[:3])})"
            raise ValueError(
                f"capture layer {layer} ({name}) {found} of the model's {len(call_names)} attention calls "
                f"({', '.join(call_names[:3])}{', ...' if len(call_names) > 3 else ''}); evaluate the model the "
                "capture was made from"
            )
        j = seen.get(name, 0)
        if j >= len(calls):
            raise ValueError(f"capture layer {layer} ({name}) is call {j + 1} of that module, but the model calls "
                             f"it {len(calls)} times; evaluate the model the capture was made from")
        seen[name] = j + 1
        result.append(calls[j])
    return result


def _fits_for_calls(fits: dict | None, to_call: list[int] | None) -> dict | None:
    """Fits keyed by capture layer, re-keyed by the model's attention call (what swap_attention reads)."""
    if fits is None or to_call is None:
        return fits
    renamed = {}
    for name, tensor in fits.items():
        head, _, rest = name.partition(".")
        layer, _, tail = rest.partition(".")
        if head == "layer" and layer.isdigit() and int(layer) < len(to_call):
            renamed[f"layer.{to_call[int(layer)]}.{tail}"] = tensor
    return renamed


def _blocks_match(blocks, order: dict[int, int]) -> bool:
    """Whether the i-th attention module called lives in the i-th block (needed by BlockCache)."""
    where = {id(m): i for i, block in enumerate(blocks) for m in block.modules()}
    return len(order) == len(blocks) and all(where.get(m) == layer for m, layer in order.items())


def _run_variant(net, spec, objective, fits, ids, ref, causal, num_layers, layers, modes, *, cache=None,
                 order=None, measure=None, to_call=None) -> list[tuple]:
    """Rows of one variant: every layer swapped alone and as the prefix ``0..l``.

    A swapped set that both modes share (layer 0 alone = layers 0..0) runs once. With
    ``cache`` (a :class:`BlockCache` entered on ``net``) and ``order`` (:func:`layer_order`),
    blocks whose output an earlier run already computed are reused. With ``measure`` (a
    :class:`NextTokenMeasure`; ``ref`` is then the original's last hidden state) a causal LM's
    metrics are computed blocked over tokens. ``to_call`` (:func:`capture_layer_calls`) maps
    the capture's layers, which ``layers`` and ``fits`` number, to the model's attention calls
    that are swapped; default: the same numbers.
    """
    rows, done = [], {}
    fits = _fits_for_calls(fits, to_call)
    for mode in modes:
        for layer in layers:
            chosen = [layer] if mode == "single" else list(range(layer + 1))
            key = frozenset(chosen)
            if key not in done:
                swapped = chosen if to_call is None else [to_call[c] for c in chosen]
                if cache is not None:
                    cache.set(swapped, (spec, objective))
                with swap_attention(net, spec, layers=swapped, fits=fits, objective=objective) as session:
                    if order:
                        session._order = order
                    out = _forward(net, ids, causal, blocked=measure is not None)
                if cache is not None:
                    cache.set()
                failed = session.failed_fraction
                status = "ok" if failed == 0 else "normaliser_failed"
                values = _metrics(ref, out, ids, causal, measure)
                # the model's output, not a metric: a non-finite output makes every metric NaN
                if not bool(torch.isfinite(out).all()):
                    status, values = "nonfinite_output", [(i, m, float("nan")) for i, m, _ in values]
                done[key] = (values + [(None, "failed_fraction", failed)], status)
            values, status = done[key]
            for i, metric, value in values:
                rows.append((spec, objective, layer, len(chosen), mode, "heldout", i, metric, value, status))
    return rows


_TOOL = "hla-analysis evaluate"


def _outputs(out: Path) -> list[Path]:
    """Every file a run writes beside ``out``; the settings file (which marks them as ours) is [2]."""
    return [out, out.with_name(out.stem + ".fits.safetensors"), out.with_name(out.stem + ".settings.json")]


def _check_outputs(out: Path, *, overwrite: bool) -> None:
    """Refuse, before any work, outputs that cannot be written or that evaluate did not write."""
    outputs = _outputs(out)
    refuse_foreign_outputs(out, outputs, settings=outputs[2], tool=_TOOL, overwrite=overwrite)


def resolve_fits(fits, results: Path) -> Path | None:
    """``"auto"``: the ``.fits.safetensors`` that ``compare`` wrote beside ``results`` (None if absent)."""
    if fits is None:
        return None
    if str(fits) == "auto":
        path = results.with_name(results.stem + ".fits.safetensors")
        owner = settings_owner(results.with_name(results.stem + ".settings.json"))
        if owner is not None and owner != results.name:
            return None  # those fits belong to the table of the same stem with another suffix
        return path if path.is_file() else None
    return Path(fits)


class _Clock:
    """Wall and CPU seconds (every thread of this process) of named stages."""

    def __init__(self):
        self.stages: dict[str, dict] = {}

    @contextlib.contextmanager
    def __call__(self, name: str):
        wall, cpu = time.perf_counter(), time.process_time()
        try:
            yield
        finally:
            stage = self.stages.setdefault(name, {"seconds": 0.0, "cpu_seconds": 0.0})
            stage["seconds"] = round(stage["seconds"] + time.perf_counter() - wall, 2)
            stage["cpu_seconds"] = round(stage["cpu_seconds"] + time.process_time() - cpu, 2)


def run_model_evaluation(model: str, *, capture: str | Path, results: str | Path, out: str | Path,
                         variants="default", objectives=OBJECTIVES, max_heldout: int | None = None,
                         max_tokens: int | None = None, fits: str | Path | None = None,
                         fit_overrides: dict | None = None, joint_fits: bool = False, plain: bool = False,
                         reuse_blocks: bool = True, overwrite: bool = False, progress: bool = True) -> pd.DataFrame:
    """Swap every variant into ``model`` layer by layer and write the tidy model-level table.

    Parameters
    ----------
    model : str
        ``"minilm"``, ``"smollm2"`` or a local model folder: the model the capture came from.
    capture : path
        The capture the comparison ran on; its held-out inputs are evaluated.
    results : path
        The comparison's results table; its ``.settings.json`` gives the train/held-out
        split and the fit settings, reused here to fit learnable variants per objective.
    out : path
        ``.parquet`` or ``.csv``; fitted parameters go to ``<out stem>.fits.safetensors``.
    variants : str or list of str
        Specs or ``"default"`` (the comparison's own list).
    objectives : tuple of str
        Fitting objectives of learnable variants (``map_kl``, ``output_mse``).
    max_heldout : int, optional
        Evaluate only the first held-out inputs (cost grows with their number).
    max_tokens : int, optional
        Evaluate only the first tokens of each held-out input (a causal LM's prefix is
        exactly what the model computes on it; an encoder sees a truncated input).
    fits : path or "auto", optional
        A ``.fits.safetensors`` file (the one ``compare`` writes beside its table, or an
        earlier ``evaluate``'s): the layers/variants/objectives it holds are used as fitted
        there, not refitted; only what it lacks is fitted. ``"auto"``: compare's file beside
        ``results`` if there is one.
    fit_overrides : dict, optional
        FitConfig fields (e.g. ``{"max_rows": 64}``) that replace the comparison's for the
        fits this call runs itself (given fits keep their own settings). Recorded in the
        table (``fit_steps``, ``fit_max_rows`` per objective) and the settings.
    joint_fits : bool
        Fit all layers of a spec/objective in one optimisation (see :func:`fit_parameters`).
    plain : bool
        The reference path: every swap a plain full forward (no :class:`BlockCache`) and
        causal metrics on full logits (no :class:`NextTokenMeasure`). Slower, same numbers.
    reuse_blocks : bool
        Reuse transformer-block outputs shared between swaps (ignored with ``plain``).
    overwrite : bool
        Replace an existing ``out`` (and its ``.fits.safetensors`` / ``.settings.json``) that
        evaluate did not write. Its own earlier results are replaced without asking.

    Stage timings (wall and CPU seconds) go to ``<out stem>.settings.json`` under ``stages``.
    """
    from hla_analysis.compare import capture_identity, resolve_variants

    capture, results, out = Path(capture), Path(results), Path(out)
    if out.suffix not in (".parquet", ".csv"):
        raise ValueError(f"--out must end in .parquet or .csv, got {out.name!r}")
    if out.resolve().with_suffix("") == results.resolve().with_suffix(""):
        raise ValueError(f"--out {out} shares its name stem with --results {results}, whose settings and fits it "
                         "reads and would replace; choose another --out name.")
    _check_outputs(out, overwrite=overwrite)
    bad = [o for o in objectives if o not in OBJECTIVES]
    if bad:
        raise ValueError(f"unknown objectives {bad}; choose from {', '.join(OBJECTIVES)}")
    if max_tokens is not None and max_tokens < 2:
        raise ValueError(f"max_tokens must be >= 2, got {max_tokens}")
    fits = resolve_fits(fits, results)
    given, given_settings = read_fits_file(fits) if fits is not None else (None, {})
    settings = _compare_settings(results)
    own_fit = {**settings["fit"], **(fit_overrides or {})}
    FitConfig(**own_fit)  # bad overrides fail here, before any work
    specs = resolve_variants(settings["variants"] if variants == "default" else variants)
    cap = load_capture(capture)
    _check_results_capture(settings, results, capture)
    if given is not None:
        check_given_fits(given, given_settings, fits, cap, capture, specs)
    if cap.manifest.get("input_kind") != "text":
        raise ValueError(f"{capture} is a capture of {cap.manifest.get('input_kind')} inputs; model-level "
                         "evaluation runs held-out token ids through the model, so it needs a text capture")
    train = int(settings["train_inputs"])
    heldout = list(range(train, cap.num_inputs))[:max_heldout]
    if not heldout:
        raise ValueError("the capture has no held-out input beyond the comparison's training inputs")
    if len({cap.lengths[i] for i in heldout}) != 1:
        raise ValueError("held-out inputs differ in length; capture with packing='pack' for equal lengths")
    causal = bool(cap.manifest["causal"])
    fits_digest = hashlib.sha256(Path(fits).read_bytes()).hexdigest()[:16] if fits is not None else None
    key = hashlib.sha256(json.dumps([str(capture.resolve()), specs, list(objectives), heldout, settings["fit"],
                                     fits_digest, own_fit, max_tokens, joint_fits]).encode()).hexdigest()[:16]
    parts = out.with_name(out.name + ".parts")
    clock = _Clock()
    started, cpu_started = time.perf_counter(), time.process_time()
    # the model is loaded and checked before anything is written: a wrong --model leaves nothing behind
    with clock("load_model"):
        net = _load(model, causal)
        check_model_identity(net, model, cap, causal)
        ids = torch.stack([cap.get(0, i)["input_ids"] for i in heldout])[:, :max_tokens]
        calls = attention_calls(net, ids, causal)
        to_call = capture_layer_calls([layer["name"] for layer in cap.manifest["layers"]], [n for _, n in calls])
        order = {module: layer for layer, (module, _) in enumerate(calls)}
        order = order if len(order) == len(calls) else None  # a shared module has no single number
        head = blocked_head(net, ids) if causal and not plain else None

    created = not parts.exists()
    locked = False
    lock = contextlib.ExitStack()
    try:
        # one writer per --out: a second evaluate into it fails at once (the lock lives in the parts)
        lock.enter_context(exclusive_output_lock(parts, command="evaluate"))
        locked = True  # from here on the parts folder is this run's to clean up
        marker = parts / "settings.json"
        refuse_busy_siblings(out, command="evaluate")
        before = check_parts_folder(parts, "evaluate")
        if before is not None and before.get("key") != key:
            raise ValueError(f"{parts} holds partial results of a run with other settings; "
                             "delete it or choose another --out")
        atomic_write_json(marker, {"key": key})
        fits_path = out.with_name(out.stem + ".fits.safetensors")
        if not (parts / "fits.safetensors").is_file():
            with clock("fit"):
                params, log = fit_parameters(cap, specs, train_inputs=train, fit=own_fit, objectives=objectives,
                                             have=given, joint=joint_fits, progress=progress)
            atomic_write_json(parts / "fits_log.json", log)
            save_fits(parts / "fits.safetensors", params,
                      settings={"fit": own_fit, "train_inputs": train, "given_fits": str(fits) if fits else None,
                                "capture": str(capture.resolve()), "capture_sha256": capture_identity(capture)})
        fitted = load_fits(parts / "fits.safetensors")
        log = json.loads((parts / "fits_log.json").read_text()) if (parts / "fits_log.json").is_file() else []
        # the settings each objective's fits ran with: given fits keep compare's, own fits the overrides
        fit_used = {}
        for objective in objectives:
            own = any(r["objective"] == objective and r.get("source") != "given fits" for r in log)
            fit_used[objective] = {**own_fit, "joint_layers": joint_fits} if own else settings["fit"]

        blocks = BlockCache.find(net, len(calls)) if reuse_blocks and not plain and order else None
        cache = BlockCache(blocks) if blocks is not None and _blocks_match(blocks, order) else None
        layers = list(range(cap.num_layers))
        jobs = [(s, o if is_learnable(make_variant(s)) else "none") for s in specs for o in objectives]
        jobs = list(dict.fromkeys(jobs))
        tables = []
        with cache if cache is not None else contextlib.nullcontext():
            with clock("reference"):
                ref = _forward(net, ids, causal, blocked=head is not None)
                measure = NextTokenMeasure(head, ref, ids) if head is not None else None
            for spec, objective in tqdm(jobs, desc=f"evaluate {model}", unit="variant", disable=not progress):
                part = parts / f"{hashlib.sha256(f'{spec}|{objective}'.encode()).hexdigest()[:12]}.parquet"
                if not part.exists():
                    with clock("swaps"):
                        rows = _run_variant(net, spec, objective if objective != "none" else "map_kl", fitted, ids,
                                            ref, causal, cap.num_layers, layers, SWAP_MODES, cache=cache, order=order,
                                            measure=measure, to_call=to_call)
                    table = pd.DataFrame(rows, columns=COLUMNS[1:])
                    table["objective"] = objective
                    table["input"] = table["input"].map(lambda i: heldout[int(i)] if i is not None and i == i else -1)
                    atomic_write_table(part, table)
                tables.append(pd.read_parquet(part))
        table = pd.concat(tables, ignore_index=True)
        table.insert(0, "model", cap.manifest.get("model"))
        table["module"] = table["layer"].map(lambda l: cap.manifest["layers"][int(l)]["name"])
        table["train_inputs"] = train
        table["tokens"] = int(ids.shape[1])
        table["fit_steps"] = table.objective.map(lambda o: fit_used.get(o, {}).get("steps", 0))
        table["fit_max_rows"] = table.objective.map(lambda o: fit_used.get(o, {}).get("max_rows", 0))
        atomic_write_table(out, table)
        atomic_write_bytes(fits_path, (parts / "fits.safetensors").read_bytes())
        atomic_write_json(out.with_name(out.stem + ".settings.json"),
                          {"tool": _TOOL, "output": out.name, "capture": str(capture.resolve()),
                           "results": str(results.resolve()),
                           "variants": list(specs),
                           "objectives": list(objectives), "heldout": heldout, "tokens": int(ids.shape[1]),
                           "given_fits": str(fits) if fits else None, "fit_settings": fit_used, "fit_log": log,
                           "plain": plain, "block_cache": cache is not None, "blocked_lm_head": measure is not None,
                           "torch_threads": torch.get_num_threads(),
                           # this process only: a resumed run counts the work done after the restart
                           "stages": clock.stages,
                           "seconds": round(time.perf_counter() - started, 1),
                           "cpu_seconds": round(time.process_time() - cpu_started, 1),
                           "files": written_files([out, fits_path])})
        shutil.rmtree(parts)
        return table
    except BaseException:
        # a run that failed before finishing any work removes the parts folder it created; fits it
        # only copied from a given file are no work (fits it trained itself are kept for the resume)
        left = {p.name for p in parts.iterdir()} if parts.is_dir() else set()
        no_work = left <= {"settings.json", LOCK_NAME} or (
            left <= {"settings.json", LOCK_NAME, "fits.safetensors", "fits_log.json"}
            and _only_given_fits(_read_json(parts / "fits_log.json")))
        if created and locked and no_work:
            shutil.rmtree(parts, ignore_errors=True)
        raise
    finally:
        lock.close()
