"""Run a model over its inputs and store what enters each softmax: :func:`capture`.

The inputs are text (tokenized here), the user's own tensors, or images (the model's own
image processor); see :mod:`hla_analysis.capture.sources`. The loop is the same for all:
batch inputs, run the forward pass under :class:`~hla_analysis.capture.recorder.AttentionRecorder`,
check that softmax recomputed from the recorded q, k, scale and mask reproduces the model's
probabilities, store q and k in the canonical scale split
(:mod:`hla_analysis.capture.scale_split`), write one file per input, resume when interrupted.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import re
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch

from hla_analysis._io import LOCK_NAME, exclusive_output_lock
from hla_analysis.capture.inputs import PACKINGS, plan_inputs
from hla_analysis.capture.manifest import sealed
from hla_analysis.capture.models import LoadedModel, load_model, resolve_model
from hla_analysis.capture.recorder import AttentionCall, AttentionRecorder, CaptureError
from hla_analysis.capture.scale_split import CONVENTION, apply_factors, canonical_scale, split_factors
from hla_analysis.capture.sources import (
    ModelInput,
    batch_key,
    check_argument_names,
    check_tensor_values,
    forward_arguments,
    image_inputs,
    inputs_sha256,
    stack_batch,
    tensor_inputs,
)
from hla_analysis.capture.store import (
    DTYPES,
    FORMAT,
    FORMAT_VERSION,
    MANIFEST,
    PARTIAL,
    atomic_save_tensors,
    atomic_write_json,
    file_sha256,
    input_file_name,
    load_capture,
    read_manifest,
    tensor_sha256,
)
from hla_analysis.capture.texts import Document, default_documents, read_documents

# Tokens per forward pass, and entries of one [B, H, N, N] probability tensor; the model's
# own eager attention materializes the latter, so it bounds the batch at long N.
_BATCH_TOKENS = 8192
_BATCH_MAP_ENTRIES = 1 << 24
_DEFAULT_TEXT_INPUTS = 8


def weights_sha256(model) -> str:
    """SHA-256 over the model's state dict (names, dtypes, shapes and bytes, in order).

    Identifies the weights actually used, whatever file format they were loaded from.
    """
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(bytes.fromhex(tensor_sha256(tensor)))
    return digest.hexdigest()


def recomputed_softmax(q: torch.Tensor, k: torch.Tensor, scale: float, allowed: torch.Tensor | None) -> torch.Tensor:
    """softmax(scale * q k^T) over allowed keys, in float32.

    ``q, k: [..., N, d]``; ``allowed``: bool ``[..., N, N]`` broadcastable, or None for all keys.
    """
    logits = torch.matmul(q.float(), k.float().transpose(-1, -2)).mul_(scale)
    if allowed is not None:
        logits.masked_fill_(~allowed, float("-inf"))
    return torch.softmax(logits, dim=-1)


def _max_prob_errors(q, k, scale, allowed, probs, n) -> torch.Tensor:
    """Largest |recomputed - model| per batch row over the first ``n`` (real) tokens.

    Query rows with no allowed key are skipped; a NaN anywhere else counts as an infinite error.

    ``q, k: [B, H, N, d]`` (keys expanded to every query head), ``allowed: [B, n, n]``,
    ``probs: [B, H, N, N]``. Works on blocks of rows and heads so that the temporary maps
    stay near ``_BATCH_MAP_ENTRIES`` entries even at 8,192 tokens.
    """
    batch, heads = q.shape[:2]
    worst = torch.zeros(batch)
    full = bool(allowed.all())
    per_head = max(1, n * n)
    rows = max(1, _BATCH_MAP_ENTRIES // (heads * per_head))
    head_step = heads if rows > 1 else max(1, min(heads, _BATCH_MAP_ENTRIES // per_head))
    for b in range(0, batch, rows):
        mask = None if full else allowed[b:b + rows, None].to(q.device)
        for h in range(0, heads, head_step):
            ref = probs[b:b + rows, h:h + head_step, :n]
            diff = recomputed_softmax(q[b:b + rows, h:h + head_step, :n], k[b:b + rows, h:h + head_step, :n],
                                      scale, mask).sub_(ref[..., :n].float()).abs_()
            if mask is not None:
                # a query row with no allowed key (left padding) has no softmax to compare; the
                # model's values there are whatever its mask arithmetic gives
                diff.masked_fill_(~mask.any(-1, keepdim=True), 0.0)
            # NaN in a compared row is a failure, not a pass (NaN > tolerance is False)
            err = diff.nan_to_num_(nan=float("inf")).amax(dim=(1, 2, 3))
            if ref.shape[-1] > n:
                # mass the model put on padding keys is attention our unpadded copy cannot see
                err = torch.maximum(err, ref[..., n:].float().abs().amax(dim=(1, 2, 3)))
            worst[b:b + rows] = torch.maximum(worst[b:b + rows], err.cpu())
    return worst


def _mask_kind(allowed: torch.Tensor) -> str:
    n = allowed.shape[-1]
    if bool(allowed.all()):
        return "full"
    if torch.equal(allowed, torch.ones(n, n, dtype=torch.bool).tril()):
        return "causal"
    return "explicit"


class _BatchCollector:
    """Receives attention calls during one batched forward pass; slices, checks, rescales, casts.

    ``lengths`` are the real (unpadded) lengths of the rows for text; ``None`` for tensor
    inputs, whose length is the number of positions the first recorded call sees.
    ``known_layers`` are the layers of an earlier batch, whose scale-split factors are
    reused so that every input of a capture is stored in the same split.
    """

    def __init__(self, rows: int, lengths: list[int] | None, dtype: torch.dtype, tolerance: float,
                 known_layers: list[dict] | None):
        self.rows = rows
        self.lengths = lengths
        self.width = max(lengths) if lengths else None
        self.dtype = dtype
        self.tolerance = tolerance
        self.known_layers = known_layers
        self.layers: list[dict] = []
        self.tensors: list[dict[str, torch.Tensor]] = [{} for _ in range(rows)]
        self.errors = [0.0 for _ in range(rows)]
        self.kinds: list[list[str]] = [[] for _ in range(rows)]

    def _shape_checks(self, call: AttentionCall) -> None:
        batch, _, nq, _ = call.query.shape
        if batch != self.rows:
            raise CaptureError(
                f"{call.name} runs attention over {batch} rows for {self.rows} inputs (windowed or chunked "
                "attention?); captures need one attention row per input: skip it with modules= (--modules REGEX) "
                "(a model whose every layer is windowed, like Swin, cannot be captured)"
            )
        if self.width is None:
            self.width, self.lengths = nq, [nq] * self.rows
        elif nq != self.width:
            first = self.layers[0]["name"] if self.layers else "the input"
            raise CaptureError(
                f"{call.name} attends over {nq} positions where {first} has {self.width}; a capture holds "
                "layers of one length: record them separately with modules= (--modules REGEX)"
            )

    def _factors(self, call: AttentionCall, layer: int) -> tuple[list[float], list[float]]:
        if self.known_layers is not None:
            if layer >= len(self.known_layers) or self.known_layers[layer]["name"] != call.name:
                raise CaptureError("the model called its attention modules in a different order between batches")
            known = self.known_layers[layer]
            return known["q_factor"], known["k_factor"]
        n = self.lengths[0]  # the first input of a fresh capture fixes the split
        return split_factors(call.query[0, :, :n], call.key[0, :, :n], call.scale)

    def __call__(self, call: AttentionCall) -> None:
        self._shape_checks(call)
        layer = len(self.layers)
        heads, kv_heads = call.query.shape[1], call.key.shape[1]
        groups = heads // kv_heads
        dim = call.query.shape[-1]
        q_factor, k_factor = self._factors(call, layer)
        scale = canonical_scale(dim)
        query = apply_factors(call.query, q_factor)
        key = apply_factors(call.key, k_factor)
        # Rows of equal length share one batched check: the common case costs about as
        # much as the model's own eager attention.
        by_length: dict[int, list[int]] = {}
        for b, n in enumerate(self.lengths):
            by_length.setdefault(n, []).append(b)
        for n, rows in by_length.items():
            idx = torch.tensor(rows, device=call.query.device)
            q, k, v = query[idx], key[idx], call.value[idx]
            allowed, probs = call.allowed[rows][:, :n, :n], call.probs[idx]
            k_full = k.repeat_interleave(groups, dim=1)
            exact = _max_prob_errors(q, k_full, scale, allowed, probs, n)
            if not float(exact.max()) <= self.tolerance:
                cause = (f"it passes {', '.join(call.arguments)} to its attention function, which captures do "
                         "not store" if call.arguments else
                         "the model changes its logits in a way captures do not store (e.g. soft-capping, a "
                         "position bias or attention sinks)")
                raise CaptureError(
                    f"{call.name}: softmax recomputed from the recorded q, k and scale differs from the model's "
                    f"own probabilities by {float(exact.max()):.2e} (> tolerance {self.tolerance:.0e}); {cause}; "
                    "restrict modules= (--modules REGEX) or pass attention_function="
                )
            q = q[:, :, :n].to("cpu", self.dtype)
            k = k[:, :, :n].to("cpu", self.dtype)
            v = v[:, :, :n].to("cpu", self.dtype)
            errors = exact
            if self.dtype != torch.float32:
                errors = _max_prob_errors(q, k.repeat_interleave(groups, dim=1), scale, allowed, probs.cpu(), n)
            for j, b in enumerate(rows):
                self.errors[b] = max(self.errors[b], float(errors[j]))
                kind = _mask_kind(allowed[j])
                self.kinds[b].append(kind)
                self.tensors[b][f"layer.{layer}.q"] = q[j]
                self.tensors[b][f"layer.{layer}.k"] = k[j]
                self.tensors[b][f"layer.{layer}.v"] = v[j]
                if kind == "explicit":
                    self.tensors[b][f"layer.{layer}.mask"] = allowed[j].clone()
        self.layers.append({
            "name": call.name, "scale": scale, "model_scale": call.scale, "heads": heads, "kv_heads": kv_heads,
            "head_dim": dim, "head_dim_v": call.value.shape[-1], "mask": self.kinds[0][-1],
            "q_factor": [float(f) for f in q_factor], "k_factor": [float(f) for f in k_factor],
        })


def _documents(texts) -> tuple[list[Document], str]:
    if texts is None:
        return default_documents(), "pydoc_data.topics"
    if isinstance(texts, (str, Path)):
        return read_documents(texts), str(Path(texts).resolve())
    if isinstance(texts, Sequence) and texts and all(isinstance(t, str) for t in texts):
        return [Document(f"texts[{i}]", t) for i, t in enumerate(texts)], "python list of texts"
    raise ValueError("texts must be None (default corpus), a path to a file or folder, or a non-empty list of strings")


def _check_args(num_inputs, max_tokens, dtype, packing, batch_size, check_tolerance, modules):
    for name, value in (("num_inputs", num_inputs), ("max_tokens", max_tokens)):
        if value is None and name == "num_inputs":
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    if packing not in PACKINGS:
        raise ValueError(f"packing must be one of {PACKINGS}, got {packing!r}")
    if batch_size is not None and (isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1):
        raise ValueError(f"batch_size must be a positive int or None (automatic), got {batch_size!r}")
    if not check_tolerance > 0:
        raise ValueError(f"check_tolerance must be positive, got {check_tolerance!r}")
    _check_modules(modules)


def _check_modules(modules) -> None:
    """A bad ``modules=`` pattern is reported before any model is loaded or run."""
    if modules is None:
        return
    if not isinstance(modules, str):
        raise ValueError(f"modules must be a regular expression string or None (all modules), got {modules!r}")
    try:
        re.compile(modules)
    except re.error as exc:
        raise ValueError(f"modules={modules!r} is not a valid regular expression ({exc}); "
                         r"pass a pattern on module names, e.g. 'layers\.0\.'") from None


def check_device(device) -> str:
    """Validate a torch device string at the boundary: one line instead of a torch traceback.

    Examples
    --------
    >>> check_device("cpu")
    'cpu'
    >>> check_device("bogus")
    Traceback (most recent call last):
    ...
    ValueError: device='bogus' is not a torch device; pass cpu, cuda or cuda:N
    """
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"device={device!r} is not a torch device; pass cpu, cuda or cuda:N") from None
    if parsed.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={device!r} but this torch has no CUDA device; use --device cpu.")
    try:
        torch.empty(0, device=parsed)
    except (RuntimeError, AssertionError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ValueError(f"device={device!r} is not usable here ({first}); pass cpu or an available GPU") from None
    return str(device)


def check_out(out: Path) -> None:
    """Refuse an output path capture cannot use, before the model loads (one line naming the fix).

    ``out`` must be a folder or not exist; the nearest existing folder on its path must be a
    folder we may write in; no folder above it may hold a capture (a capture keeps only its own
    files, so that it can resume); an existing ``out`` may hold only a capture's own files.
    Checked again, under the output lock, when the run starts writing (:func:`_prepare_out`).
    """
    import os

    if out.exists() and not out.is_dir():
        raise ValueError(f"out={str(out)!r} is a file; pass a directory for the capture")
    resolved = out.resolve()
    existing = resolved if resolved.is_dir() else next(p for p in resolved.parents if p.exists())
    if not existing.is_dir():
        raise ValueError(f"out={str(out)!r} cannot be created: {existing} is a file, not a folder; "
                         "pass a path below a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ValueError(f"out={str(out)!r} cannot be written: {existing} is not writable by this user; "
                         "pass a folder you can write to")
    for folder in resolved.parents:
        if any((folder / name).is_file() or (folder / name).is_symlink() for name in (MANIFEST, PARTIAL)):
            raise ValueError(f"out={str(out)!r} lies inside the capture {folder}, which keeps only its own files "
                             "(so that it can resume); pass a path outside it")
    if resolved.is_dir():
        _refuse_foreign(out)


def _prepare_out(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    for stale in out.glob(".*.tmp"):  # ours, left by a run killed mid-write (SIGKILL, power loss)
        if _own_temp(stale.name):
            stale.unlink(missing_ok=True)
    _refuse_foreign(out)


def _refuse_foreign(out: Path) -> None:
    """Refuse an ``out`` folder that holds files other than a capture's own."""
    ours = {MANIFEST, PARTIAL}
    # input files are ours in a folder with a capture manifest (damaged ones are reported later), or
    # when their safetensors metadata names the capture format (a run killed before its first manifest)
    manifest = any((out / name).is_file() for name in ours)
    foreign = [p.name for p in out.iterdir()
               if p.name not in ours and not (p.name.startswith("input_") and p.suffix == ".safetensors"
                                              and (manifest or _written_by_capture(p)))
               and not p.name.startswith(".")]
    if foreign:
        raise ValueError(
            f"out={str(out)!r} already holds files that are not part of a capture ({', '.join(sorted(foreign)[:3])}); "
            "pass an empty or new directory"
        )


def _own_temp(name: str) -> bool:
    """Whether a file is one of capture's own temporary files (``atomic_write_*``'s names for its
    input files and manifests), not a user's file that merely looks temporary."""
    return name.endswith(".tmp") and (name.startswith(".input_") or any(
        name.startswith(f".{own}.") for own in (MANIFEST, PARTIAL)))


def _remove_if_empty(out: Path) -> None:
    """Remove ``out`` if it holds nothing but the lock file (and capture's stale temporary files)."""
    try:
        names = [p.name for p in out.iterdir()]
        if all(n == LOCK_NAME or _own_temp(n) for n in names):
            for n in names:
                (out / n).unlink(missing_ok=True)
            out.rmdir()
    except OSError:
        pass


def _written_by_capture(path: Path) -> bool:
    """Whether a file is a capture input file: a safetensors file whose metadata names our format."""
    from safetensors import safe_open

    if path.is_symlink():  # a link is never a file capture wrote (and is not opened to find out)
        return False
    try:
        with safe_open(str(path), framework="pt") as f:
            return (f.metadata() or {}).get("format") == FORMAT
    except Exception:  # not a safetensors file at all (safetensors raises its own error types)
        return False


def _finished_records(out: Path, settings: dict) -> tuple[list[dict], dict]:
    """Records of inputs already captured by an interrupted run with the same settings."""
    partial = out / PARTIAL
    if not partial.is_file():
        return [], {}
    previous = read_manifest(partial)
    if previous.get("settings") != settings:
        raise ValueError(
            f"out={str(out)!r} holds an unfinished capture with different settings; re-run it with its own "
            "settings to resume, or pass a new directory"
        )
    records = []
    for rec in previous.get("inputs", []):
        file = out / rec["file"]
        # keep finished inputs only while they are contiguous and intact; redo the rest
        if rec["index"] != len(records) or not file.is_file() or file.stat().st_size != rec["bytes"] \
                or file_sha256(file) != rec["sha256"]:
            break
        records.append(rec)
    return records, (previous if records else {})


def _auto_batch_size(max_tokens: int, heads: int) -> int:
    return max(1, min(_BATCH_TOKENS // max_tokens, _BATCH_MAP_ENTRIES // (heads * max_tokens * max_tokens)))


def _one_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0].strip()


def _model_source(model, *, device, progress, tokenizer, submodule, need_tokenizer) -> LoadedModel:
    """A name, folder or hub id is loaded; an nn.Module is used as given (moved to ``device``)."""
    if isinstance(model, torch.nn.Module):
        if submodule:
            from hla_analysis.capture.models import select_submodule

            model = select_submodule(model, submodule)
        if device is not None:
            model = model.to(device)
        cls = type(model)
        return LoadedModel(name=cls.__name__, source=f"python object {cls.__module__}.{cls.__qualname__}",
                           model=model, tokenizer=tokenizer)
    loaded = load_model(model, device=device or "cpu", progress=progress,
                        tokenizer=need_tokenizer and tokenizer is None, submodule=submodule)
    if tokenizer is not None:
        loaded.tokenizer = tokenizer
    return loaded


def _text_items(loaded, texts, *, num_inputs, max_tokens, packing) -> tuple[list[ModelInput], dict]:
    net = loaded.model
    taken, _ = forward_arguments(net)
    if "input_ids" not in taken:
        raise ValueError(
            f"{type(net).__name__}.forward takes no input_ids (it takes {', '.join(taken[:4]) or 'nothing named'}), "
            "so it cannot read text: pass inputs= (dicts of tensors named after those arguments), or on the "
            "command line --inputs FILE.safetensors or --image-dir DIR"
        )
    if loaded.tokenizer is None:
        raise ValueError(
            f"{loaded.name} has no tokenizer: pass tokenizer= to capture text, or pass inputs= (e.g. "
            "[{'input_ids': ids}]) with token ids you made yourself"
        )
    documents, documents_source = _documents(texts)
    limit = getattr(getattr(net, "config", None), "max_position_embeddings", None)
    if isinstance(limit, int) and max_tokens > limit:
        raise ValueError(f"max_tokens={max_tokens} exceeds {loaded.name!r}'s position limit of {limit} tokens")
    planned = plan_inputs(loaded.tokenizer, documents, num_inputs=num_inputs, max_tokens=max_tokens, packing=packing)
    items = []
    for p in planned:
        name = p.sources[0] + (f" (+{len(p.sources) - 1} more)" if len(p.sources) > 1 else "")
        items.append(ModelInput(name, {"input_ids": torch.tensor([p.input_ids])}, p.input_ids, p.sources))
    plan = hashlib.sha256(json.dumps([[list(p.input_ids), list(p.sources)] for p in planned]).encode()).hexdigest()
    return items, {"max_tokens": max_tokens, "packing": packing, "texts": documents_source, "plan_sha256": plan}


def _check_tensor_items(net, items: list[ModelInput], origin: str) -> None:
    names = sorted({key for item in items for key in item.tensors})
    check_argument_names(net, names, origin=origin)
    check_tensor_values(items)


def _select(items: list[ModelInput], num_inputs: int | None, origin: str) -> list[ModelInput]:
    if num_inputs is None:
        return items
    if num_inputs > len(items):
        raise ValueError(f"num_inputs={num_inputs} but {origin} holds only {len(items)} inputs; lower num_inputs")
    return items[:num_inputs]


def _batches(items: list[ModelInput], start: int, size: int, *, text: bool):
    """Consecutive inputs per forward pass: any lengths for text (padded), equal shapes otherwise."""
    i = start
    while i < len(items):
        chunk = [items[i]]
        while len(chunk) < size and i + len(chunk) < len(items) and \
                (text or batch_key(items[i + len(chunk)]) == batch_key(items[i])):
            chunk.append(items[i + len(chunk)])
        yield i, chunk
        i += len(chunk)


def _text_batch(chunk: list[ModelInput], pad_id: int, device) -> tuple[dict, list[int]]:
    lengths = [len(item.input_ids) for item in chunk]
    width = max(lengths)
    ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(chunk), width), dtype=torch.long)
    for row, item in enumerate(chunk):
        ids[row, :lengths[row]] = torch.tensor(item.input_ids)
        mask[row, :lengths[row]] = 1  # right padding keeps real tokens' positions and results
    return {"input_ids": ids.to(device), "attention_mask": mask.to(device)}, lengths


def _float_dtype(net) -> torch.dtype:
    for param in net.parameters():
        if param.is_floating_point():
            return param.dtype
    return torch.float32


def _model_device(net):
    for param in net.parameters():
        return param.device
    return torch.device("cpu")


def _forward(loaded, kwargs: dict, collector, *, modules, attention_function, first: ModelInput) -> None:
    net = loaded.model
    try:
        with AttentionRecorder(net, on_call=collector, modules=modules,
                               attention_function=attention_function) as recorder:
            net(**kwargs)
    except CaptureError:
        raise
    except Exception as exc:  # the model's own failure on inputs it does not expect
        shapes = ", ".join(f"{k} {list(v.shape)}" for k, v in kwargs.items())
        fix = "pass the arguments, shapes and dtypes its forward expects"
        if getattr(getattr(net, "config", None), "is_encoder_decoder", False) \
                and not any(k.startswith("decoder_") for k in kwargs):
            # T5, Whisper...: the decoder needs inputs (DETR's runs on its own queries, so no refusal up front)
            fix = ("it is an encoder-decoder model and the inputs hold no decoder arguments: capture its encoder "
                   "with --submodule encoder (Python: capture(model.get_encoder(), inputs=...)), or add "
                   "decoder_input_ids to the inputs")
        raise ValueError(
            f"{type(net).__name__}.forward failed on input {first.name!r} ({shapes}): {type(exc).__name__}: "
            f"{_one_line(exc)}; {fix}"
        ) from None
    if recorder.calls_seen == 0:
        raise ValueError(
            f"the recorder saw no attention call from {type(net).__name__}: its attention does not dispatch "
            "through transformers' AttentionInterface; use a transformers model whose attention is selected by "
            "config._attn_implementation (load it with attn_implementation='eager' rather than a fused kernel "
            "module), or make your module call ALL_ATTENTION_FUNCTIONS.get_interface(config._attn_implementation, "
            "eager_attention_forward)"
        )
    if not collector.layers:
        seen = sorted(set(recorder.names_seen))
        raise ValueError(
            f"modules={modules!r} matched none of the {len(seen)} attention modules "
            f"({', '.join(seen[:3])}{', ...' if len(seen) > 3 else ''}); pass a pattern that matches some"
        )


def capture(model="minilm", *, out, inputs=None, texts=None, images=None, num_inputs: int | None = None,
            max_tokens: int = 256, dtype: str = "float32", progress: bool = True, packing: str = "pack",
            batch_size: int | None = None, modules: str | None = None,
            attention_function: Callable | None = None, device: str | None = None,
            check_tolerance: float = 1e-4, tokenizer=None, submodule: str | None = None) -> Path:
    """Capture q, k, v of every attention layer of a model, on text or on your own inputs.

    Parameters
    ----------
    model : str or torch.nn.Module
        ``"minilm"`` (embedded all-MiniLM-L6-v2, non-causal), ``"smollm2"`` (embedded
        SmolLM2-135M-Instruct, causal, grouped key/value heads), a Hugging Face model
        folder or hub id (weights read from safetensors only), or a module: a
        transformers model, a part of one (``model.get_encoder()``), or any module whose
        attention dispatches through transformers' ``AttentionInterface``.
    out : str or Path
        Capture directory (created). Re-running with the same settings resumes an
        interrupted capture, or returns at once if it is complete. A second capture into
        the same directory at the same time is refused.
    inputs : iterable of dict, dict, str or Path, optional
        Your own inputs, one dict of forward keyword arguments to tensors per input, each
        tensor with a leading batch dimension (1, or several inputs at once):
        ``{"pixel_values": [1, 3, 224, 224]}`` for a ViT, ``{"input_features": [1, 80,
        3000]}`` for a Whisper encoder, ``{"input_ids": ...}`` tokenized yourself. A path
        names a safetensors file of such tensors with a leading input axis.
    texts : None, str, Path or list of str
        The text path (default when neither ``inputs`` nor ``images`` is given): None for
        the Python language-reference topics (``pydoc_data.topics``), a path to a text
        file or a folder of ``.txt/.md/.rst`` files, or a list of texts.
    images : str, Path or list of paths, optional
        PNG/JPEG files (or a folder of them) run through the model's own
        ``AutoImageProcessor``; needs a model name or folder.
    num_inputs : int, optional
        Number of inputs: default 8 for text, every given input otherwise (then the
        first ``num_inputs`` are used).
    max_tokens : int
        Text only: tokens per input, special tokens included.
    dtype : {"float32", "float16", "bfloat16"}
        Storage dtype. A loaded model always runs in float32.
    progress : bool
        Show a tqdm progress bar.
    packing : {"pack", "document"}
        Text only; see :func:`hla_analysis.capture.inputs.plan_inputs`.
    batch_size : int, optional
        Inputs per forward pass; default chooses from the sequence length.
    modules : str, optional
        Regular expression selecting which attention modules to record (by module
        name, e.g. ``r"layers\\.(0|29)\\."`` or ``"encoder"``); default: all.
    attention_function : callable, optional
        Attention implementation to run and record instead of the model's own eager one.
    device : str, optional
        Torch device for the forward passes (a module is moved there). Default: ``"cpu"``
        for a loaded model, the module's own device for a module.
    check_tolerance : float
        Largest allowed difference between softmax recomputed from the stored float32
        q, k, scale and mask, and the model's own probabilities.
    tokenizer : optional
        Tokenizer for capturing text from a module (names and folders load their own).
    submodule : str, optional
        Dotted path of the part of the model to run, e.g. ``"encoder"``.

    Returns
    -------
    Path
        The capture directory; open it with :func:`hla_analysis.capture.load_capture`.
        q and k are stored in the canonical scale split (``scale = head_dim**-0.5``, equal
        mean norms; :mod:`hla_analysis.capture.scale_split`); the manifest records the
        scale the model passed and the factors that rebuild its q and k.

    Raises
    ------
    ImportError
        If the package shipping the model, or transformers, is missing (names the pip command).
    ValueError
        One line saying what to pass instead: bad arguments, a directory holding
        something else or being written by another capture, inputs the forward does not
        take, a model without tokenizer given no inputs, attention the recorder never
        saw, cross-attention, or probabilities that cannot be reproduced from what is stored.

    Examples
    --------
    >>> import tempfile
    >>> from hla_analysis.capture import load_capture
    >>> with tempfile.TemporaryDirectory() as tmp:
    ...     path = capture("minilm", out=tmp, num_inputs=2, max_tokens=12, progress=False)
    ...     manifest = load_capture(path).manifest
    >>> manifest["num_layers"], manifest["num_heads"], manifest["lengths"], manifest["causal"]
    (6, 12, [12, 12], False)
    >>> manifest["input_kind"], manifest["max_abs_prob_error"] < 1e-5
    ('text', True)
    """
    _check_args(num_inputs, max_tokens, dtype, packing, batch_size, check_tolerance, modules)
    out = Path(out)
    started = time.perf_counter()
    plan = _plan(model, out=out, inputs=inputs, texts=texts, images=images, num_inputs=num_inputs,
                 max_tokens=max_tokens, packing=packing, dtype=dtype, modules=modules, device=device,
                 progress=progress, tokenizer=tokenizer, submodule=submodule)
    options = _RunOptions(dtype=dtype, batch_size=batch_size, max_tokens=max_tokens, modules=modules,
                          attention_function=attention_function, tolerance=check_tolerance, progress=progress,
                          started=started)
    net = plan.loaded.model
    was_training = {m: m.training for m in net.modules()}
    net.eval()
    created = not out.exists()
    try:
        with exclusive_output_lock(out, command="capture"):
            try:
                _prepare_out(out)
                return _run(plan, out, options)
            except BaseException:
                # a failed run removes the folder it created, as long as nothing was captured in it
                # (only while holding its lock: a run refused by the lock never touches the folder)
                if created:
                    _remove_if_empty(out)
                raise
    finally:
        for module, mode in was_training.items():
            module.training = mode


@dataclass(frozen=True)
class _Plan:
    """What a capture will run: the loaded model, the inputs and the settings that identify it."""

    loaded: LoadedModel
    items: list
    kind: str
    arguments: list
    settings: dict
    device: object


@dataclass(frozen=True)
class _RunOptions:
    dtype: str
    batch_size: int | None
    max_tokens: int
    modules: str | None
    attention_function: Callable | None
    tolerance: float
    progress: bool
    started: float


def _plan(model, *, out: Path, inputs, texts, images, num_inputs, max_tokens, packing, dtype, modules, device,
          progress, tokenizer, submodule) -> _Plan:
    """Step 1, plan: check the arguments, load the model, build the inputs and the settings."""
    given = [name for name, value in (("inputs", inputs), ("texts", texts), ("images", images)) if value is not None]
    if len(given) > 1:
        raise ValueError(f"pass one of inputs=, texts= or images=, not {' and '.join(given)}")
    kind = {"inputs": "tensors", "images": "images"}.get(given[0] if given else "texts", "text")
    if device is not None:
        check_device(device)
    check_out(out)  # every problem of the output path is reported before the model loads
    if images is not None and isinstance(model, torch.nn.Module):
        raise ValueError(
            "images= needs a model name or folder holding its image processor; for a module, run its image "
            "processor yourself and pass inputs=[{'pixel_values': ...}]"
        )
    given_items = None
    if kind == "tensors":  # read and checked (NaN/Inf, empty) before the model loads
        given_items = _select(tensor_inputs(inputs), num_inputs, "inputs")
        check_tensor_values(given_items)
    loaded = _model_source(model, device=device, progress=progress, tokenizer=tokenizer, submodule=submodule,
                           need_tokenizer=kind == "text")
    net = loaded.model
    if kind == "text":
        items, source_settings = _text_items(loaded, texts, num_inputs=num_inputs or _DEFAULT_TEXT_INPUTS,
                                             max_tokens=max_tokens, packing=packing)
    else:
        items, source_settings = _tensor_items(model, net, kind, inputs=inputs, images=images,
                                               num_inputs=num_inputs, items=given_items)
    arguments = ["input_ids", "attention_mask"] if kind == "text" else sorted({k for i in items for k in i.tensors})
    settings = {
        "model": loaded.name, "weights_sha256": weights_sha256(net), "input_kind": kind,
        "num_inputs": len(items), "dtype": dtype, "modules": modules, "scale_convention": CONVENTION,
        **source_settings,
    }
    return _Plan(loaded, items, kind, arguments, settings, _model_device(net))


def _tensor_items(model, net, kind: str, *, inputs, images, num_inputs,
                  items: list[ModelInput] | None = None) -> tuple[list[ModelInput], dict]:
    """The inputs of a tensor or image capture; ``items``: tensor inputs already read and selected."""
    if kind == "tensors":
        origin = "inputs"
        items = items if items is not None else _select(tensor_inputs(inputs), num_inputs, origin)
        source = str(Path(inputs).resolve()) if isinstance(inputs, (str, Path)) else "python inputs"
    else:
        origin = "images"
        items = _select(image_inputs(images, resolve_model(model)[0], net), num_inputs, origin)
        source = str(Path(images).resolve()) if isinstance(images, (str, Path)) else "python list of images"
    _check_tensor_items(net, items, origin)
    return items, {kind: source, "inputs_sha256": inputs_sha256(items)}


def _run(plan: _Plan, out: Path, options: _RunOptions) -> Path:
    """Steps 2-4: run the batches, record every input as it finishes, write the manifest."""
    from tqdm.auto import tqdm

    if _already_complete(out, plan.settings, progress=options.progress):
        return out
    records, previous = _finished_records(out, plan.settings)
    layers: list[dict] | None = previous.get("layers")
    elapsed_before = float(previous.get("capture_seconds", 0.0))
    bar = tqdm(total=len(plan.items), initial=len(records), disable=not options.progress, unit="input",
               desc=f"capture {plan.loaded.name}", dynamic_ncols=True)

    def save(start, chunk, collector, layers) -> int:
        records.extend(_record(out, start, chunk, collector, layers))
        elapsed = elapsed_before + time.perf_counter() - options.started
        atomic_write_json(out / PARTIAL, _manifest(plan.loaded, plan.settings, layers, records, elapsed,
                                                   complete=False, kind=plan.kind, arguments=plan.arguments))
        return len(chunk)

    # One writer thread saves batch i while the model runs batch i + 1 (hashing and file writes
    # release the GIL), so at most two batches are held in host memory. Records stay in input
    # order, and an error in either thread stops the capture after the pending write lands.
    pending = None
    with torch.inference_mode(), ThreadPoolExecutor(max_workers=1) as writer:
        for start, chunk, collector in _forward_batches(plan, options, start=len(records), layers=layers,
                                                        records=records):
            layers = _checked_layers(layers, collector)
            if pending is not None:
                bar.update(pending.result())
            pending = writer.submit(save, start, chunk, collector, layers)
        if pending is not None:
            bar.update(pending.result())
    bar.close()
    _write(out, plan, layers, records, elapsed_before + time.perf_counter() - options.started)
    return out


def _already_complete(out: Path, settings: dict, *, progress: bool) -> bool:
    """A complete capture with these settings (verified intact) is returned as it is."""
    if not (out / MANIFEST).is_file():
        return False
    existing = read_manifest(out / MANIFEST)
    if existing.get("settings") == settings and existing.get("complete"):
        # "already complete" must mean intact: a damaged file is reported now, not later
        load_capture(out).verify()
        if progress:
            print(f"{out}: capture already complete (verified)")
        return True
    raise ValueError(f"out={str(out)!r} holds a complete capture with different settings; pass a new directory")


def _first_batch_size(plan: _Plan, options: _RunOptions, layers, records) -> int:
    net = plan.loaded.model
    if options.batch_size:
        return options.batch_size
    if plan.kind == "text":
        return _auto_batch_size(options.max_tokens, getattr(getattr(net, "config", None), "num_attention_heads", 12))
    if layers:
        return _auto_batch_size(records[0]["length"], layers[0]["heads"])
    return 1  # learn the sequence length and head count from the first input


def _forward_batches(plan: _Plan, options: _RunOptions, *, start: int, layers, records):
    """Step 2, run: yield ``(start, chunk, collector)`` per forward pass from input ``start`` on."""
    text = plan.kind == "text"
    net = plan.loaded.model
    batch = _first_batch_size(plan, options, layers, records)
    pad_id = 0
    if text and plan.loaded.tokenizer.pad_token_id is not None:
        pad_id = plan.loaded.tokenizer.pad_token_id
    storage = DTYPES[options.dtype]
    float_dtype = _float_dtype(net)
    while start < len(plan.items):
        start, chunk = next(_batches(plan.items, start, batch, text=text))
        if text:
            kwargs, lengths = _text_batch(chunk, pad_id, plan.device)
        else:
            kwargs, lengths = stack_batch(chunk, device=plan.device, float_dtype=float_dtype), None
        collector = _BatchCollector(len(chunk), lengths, storage, options.tolerance, layers)
        _forward(plan.loaded, kwargs, collector, modules=options.modules,
                 attention_function=options.attention_function, first=chunk[0])
        if layers is None:
            layers = collector.layers
            if not options.batch_size and not text:
                batch = _auto_batch_size(collector.width, layers[0]["heads"])
        yield start, chunk, collector
        start += len(chunk)


def _checked_layers(layers, collector) -> list[dict]:
    if layers is None:
        return collector.layers
    if len(layers) != len(collector.layers):
        raise ValueError("the model called a different number of attention modules between batches")
    return layers


def _record(out: Path, start: int, chunk, collector, layers) -> list[dict]:
    """Step 3, record: one file per input of the batch, and its manifest record."""
    return [_write_input(out, start + row, item, row, collector, layers) for row, item in enumerate(chunk)]


def _write(out: Path, plan: _Plan, layers, records, elapsed: float) -> None:
    """Step 4, write: the sealed manifest marks the capture complete."""
    atomic_write_json(out / MANIFEST, _manifest(plan.loaded, plan.settings, layers, records, elapsed, complete=True,
                                                kind=plan.kind, arguments=plan.arguments))
    (out / PARTIAL).unlink(missing_ok=True)


def _write_input(out: Path, index: int, item: ModelInput, row: int, collector, layers) -> dict:
    tensors = collector.tensors[row]
    n = collector.lengths[row]
    for l, layer in enumerate(layers):
        kind = collector.kinds[row][l]
        if kind != layer["mask"] and kind != "explicit":
            # this input's pattern differs from the layer's usual one: keep it explicitly
            full = torch.ones(n, n, dtype=torch.bool)
            tensors[f"layer.{l}.mask"] = full.tril() if kind == "causal" else full
    if item.input_ids is not None:
        tensors["input_ids"] = torch.tensor(item.input_ids, dtype=torch.long)
    file = out / input_file_name(index)
    digest, per_tensor = atomic_save_tensors(file, tensors)
    record = {
        "index": index, "name": item.name, "file": file.name, "bytes": file.stat().st_size,
        "sha256": digest, "length": n, "tensor_sha256": per_tensor,
        "max_abs_prob_error": collector.errors[row],
    }
    if item.input_ids is not None:
        record.update(sources=list(item.sources), input_ids=list(item.input_ids))
    return record


def _manifest(loaded, settings, layers, records, elapsed, *, complete, kind, arguments) -> dict:
    from hla_analysis import __version__

    config = getattr(loaded.model, "config", None)
    heads = {layer["heads"] for layer in layers}
    kv_heads = {layer["kv_heads"] for layer in layers}
    dims = {layer["head_dim"] for layer in layers}
    dims_v = {layer["head_dim_v"] for layer in layers}
    if len(heads) != 1 or len(kv_heads) != 1 or len(dims) != 1 or len(dims_v) != 1:
        raise ValueError("recorded layers differ in head count or head dim; "
                         "capture them separately with modules= (--modules REGEX)")
    num_heads, num_kv = heads.pop(), kv_heads.pop()
    head_dim = dims.pop()
    lengths = [rec["length"] for rec in records]
    manifest = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "complete": complete,
        "toolkit_version": __version__,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "model": loaded.name,
        "model_source": loaded.source,
        "weights_sha256": settings["weights_sha256"],
        "architecture": (getattr(config, "architectures", None) or [type(loaded.model).__name__])[0],
        "model_type": getattr(config, "model_type", None),
        "input_kind": kind,
        "input_arguments": list(arguments),
        "num_layers": len(layers),
        "num_heads": num_heads,
        "num_kv_heads": num_kv,
        "kv_head_for_query_head": [h // (num_heads // num_kv) for h in range(num_heads)],
        "head_dim": head_dim,
        "head_dim_v": dims_v.pop(),
        "scale": canonical_scale(head_dim),
        "scale_convention": CONVENTION,
        "causal": all(layer["mask"] == "causal" for layer in layers),
        "layers": [dict(layer) for layer in layers],
        "dtype": settings["dtype"],
        "num_inputs": len(records),
        "lengths": lengths,
        "total_tokens": sum(lengths),
        "max_abs_prob_error": max((rec["max_abs_prob_error"] for rec in records), default=0.0),
        "capture_seconds": round(elapsed, 3),
        "settings": settings,
        "inputs": records,
    }
    if kind == "text":
        manifest.update(max_tokens=settings["max_tokens"], packing=settings["packing"], texts=settings["texts"])
    return sealed(manifest)
