"""Run a model over texts and store what enters each softmax: :func:`capture`."""

from __future__ import annotations

import datetime
import hashlib
import json
import time
from pathlib import Path
from typing import Callable, Sequence

import torch

from hla_analysis.capture.inputs import PACKINGS, PlannedInput, plan_inputs
from hla_analysis.capture.models import load_model
from hla_analysis.capture.recorder import AttentionCall, AttentionRecorder
from hla_analysis.capture.store import (
    load_capture,
    DTYPES, FORMAT, FORMAT_VERSION, MANIFEST, PARTIAL, atomic_save_tensors, atomic_write_json,
    file_sha256, input_file_name, read_manifest, tensor_sha256,
)
from hla_analysis.capture.texts import Document, default_documents, read_documents

# Tokens per forward pass, and entries of one [B, H, N, N] probability tensor; the model's
# own eager attention materializes the latter, so it bounds the batch at long N.
_BATCH_TOKENS = 8192
_BATCH_MAP_ENTRIES = 1 << 24


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
                                      scale, mask)
            err = diff.sub_(ref[..., :n].float()).abs_().amax(dim=(1, 2, 3))
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
    """Receives attention calls during one batched forward pass; slices, checks, casts."""

    def __init__(self, lengths: list[int], dtype: torch.dtype, tolerance: float):
        self.lengths = lengths
        self.dtype = dtype
        self.tolerance = tolerance
        self.layers: list[dict] = []  # name, scale, kv_heads, heads, head_dim, kind
        self.tensors: list[dict[str, torch.Tensor]] = [{} for _ in lengths]
        self.errors = [0.0 for _ in lengths]
        self.kinds: list[list[str]] = [[] for _ in lengths]

    def __call__(self, call: AttentionCall) -> None:
        layer = len(self.layers)
        heads, kv_heads = call.query.shape[1], call.key.shape[1]
        groups = heads // kv_heads
        # Rows of equal length share one batched check: the common case costs about as
        # much as the model's own eager attention.
        by_length: dict[int, list[int]] = {}
        for b, n in enumerate(self.lengths):
            by_length.setdefault(n, []).append(b)
        for n, rows in by_length.items():
            idx = torch.tensor(rows, device=call.query.device)
            q, k, v = call.query[idx], call.key[idx], call.value[idx]
            allowed, probs = call.allowed[rows][:, :n, :n], call.probs[idx]
            k_full = k.repeat_interleave(groups, dim=1)
            exact = _max_prob_errors(q, k_full, call.scale, allowed, probs, n)
            if float(exact.max()) > self.tolerance:
                raise ValueError(
                    f"{call.name}: softmax recomputed from the recorded q, k and scale differs from the model's "
                    f"own probabilities by {float(exact.max()):.2e} (> tolerance {self.tolerance:.0e}); the model "
                    "changes its logits in a way captures do not store (e.g. soft-capping or attention sinks); "
                    "restrict modules= or pass attention_function="
                )
            q = q[:, :, :n].to("cpu", self.dtype)
            k = k[:, :, :n].to("cpu", self.dtype)
            v = v[:, :, :n].to("cpu", self.dtype)
            errors = exact
            if self.dtype != torch.float32:
                errors = _max_prob_errors(q, k.repeat_interleave(groups, dim=1), call.scale, allowed,
                                          probs.cpu(), n)
            for j, b in enumerate(rows):
                self.errors[b] = max(self.errors[b], float(errors[j]))
                kind = _mask_kind(allowed[j])
                self.kinds[b].append(kind)
                self.tensors[b][f"layer.{layer}.q"] = q[j].clone()
                self.tensors[b][f"layer.{layer}.k"] = k[j].clone()
                self.tensors[b][f"layer.{layer}.v"] = v[j].clone()
                if kind == "explicit":
                    self.tensors[b][f"layer.{layer}.mask"] = allowed[j].clone()
        self.layers.append({
            "name": call.name, "scale": call.scale, "heads": heads, "kv_heads": kv_heads,
            "head_dim": call.query.shape[-1], "head_dim_v": call.value.shape[-1],
            "mask": self.kinds[0][-1],
        })


def _settings(loaded, documents_source, planned, *, num_inputs, max_tokens, dtype, packing, modules) -> dict:
    plan = hashlib.sha256(json.dumps([[list(p.input_ids), list(p.sources)] for p in planned]).encode()).hexdigest()
    return {
        "model": loaded.name,
        "weights_sha256": weights_sha256(loaded.model),
        "num_inputs": num_inputs,
        "max_tokens": max_tokens,
        "dtype": dtype,
        "packing": packing,
        "modules": modules,
        "texts": documents_source,
        "plan_sha256": plan,
    }


def _documents(texts) -> tuple[list[Document], str]:
    if texts is None:
        return default_documents(), "pydoc_data.topics"
    if isinstance(texts, (str, Path)):
        return read_documents(texts), str(Path(texts).resolve())
    if isinstance(texts, Sequence) and texts and all(isinstance(t, str) for t in texts):
        return [Document(f"texts[{i}]", t) for i, t in enumerate(texts)], "python list of texts"
    raise ValueError("texts must be None (default corpus), a path to a file or folder, or a non-empty list of strings")


def _check_args(num_inputs, max_tokens, dtype, packing, batch_size, check_tolerance):
    for name, value in (("num_inputs", num_inputs), ("max_tokens", max_tokens)):
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


def _prepare_out(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise ValueError(f"out={str(out)!r} is a file; pass a directory for the capture")
    out.mkdir(parents=True, exist_ok=True)
    for stale in out.glob(".*.tmp"):  # left by a run killed mid-write (SIGKILL, power loss)
        stale.unlink(missing_ok=True)
    ours = {MANIFEST, PARTIAL}
    foreign = [p.name for p in out.iterdir()
               if p.name not in ours and not (p.name.startswith("input_") and p.suffix == ".safetensors")
               and not p.name.startswith(".")]
    if foreign:
        raise ValueError(
            f"out={str(out)!r} already holds files that are not part of a capture ({', '.join(sorted(foreign)[:3])}); "
            "pass an empty or new directory"
        )


def _finished_records(out: Path, settings: dict) -> list[dict]:
    """Records of inputs already captured by an interrupted run with the same settings."""
    partial = out / PARTIAL
    if not partial.is_file():
        return []
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
    return records


def _auto_batch_size(max_tokens: int, heads: int) -> int:
    return max(1, min(_BATCH_TOKENS // max_tokens, _BATCH_MAP_ENTRIES // (heads * max_tokens * max_tokens)))


def capture(model: str = "minilm", *, out, num_inputs: int = 8, max_tokens: int = 256, texts=None,
            dtype: str = "float32", progress: bool = True, packing: str = "pack",
            batch_size: int | None = None, modules: str | None = None,
            attention_function: Callable | None = None, device: str = "cpu",
            check_tolerance: float = 1e-4) -> Path:
    """Capture q, k, v of every attention layer of a pretrained model on real text.

    Parameters
    ----------
    model : str
        ``"minilm"`` (embedded all-MiniLM-L6-v2, non-causal), ``"smollm2"`` (embedded
        SmolLM2-135M-Instruct, causal, grouped key/value heads), or any Hugging Face
        model folder or hub id whose attention dispatches through transformers'
        ``AttentionInterface``.
    out : str or Path
        Capture directory (created). Re-running with the same settings resumes an
        interrupted capture, or returns at once if it is complete.
    num_inputs : int
        Number of inputs.
    max_tokens : int
        Tokens per input, special tokens included (at most the model's position limit).
    texts : None, str, Path or list of str
        None: the Python language-reference topics (``pydoc_data.topics``); a path: a
        text file or a folder of ``.txt/.md/.rst`` files; a list: the texts themselves.
    dtype : {"float32", "float16", "bfloat16"}
        Storage dtype. The model always runs in float32.
    progress : bool
        Show a tqdm progress bar.
    packing : {"pack", "document"}
        See :func:`hla_analysis.capture.inputs.plan_inputs`.
    batch_size : int, optional
        Inputs per forward pass; default chooses from ``max_tokens``.
    modules : str, optional
        Regular expression selecting which attention modules to record (by module
        name, e.g. ``r"layers\\.(0|29)\\."``); default: all.
    attention_function : callable, optional
        Attention implementation to run and record instead of the model's own eager one.
    device : str
        Torch device for the forward passes.
    check_tolerance : float
        Largest allowed difference between softmax recomputed from the recorded
        float32 q, k, scale and mask, and the model's own probabilities.

    Returns
    -------
    Path
        The capture directory; open it with :func:`hla_analysis.capture.load_capture`.

    Raises
    ------
    ImportError
        If the package shipping the model, or transformers, is missing (names the pip command).
    ValueError
        On bad arguments, a directory holding something else, or a model whose
        probabilities cannot be reproduced from what is recorded.

    Examples
    --------
    >>> import tempfile
    >>> from hla_analysis.capture import load_capture
    >>> with tempfile.TemporaryDirectory() as tmp:
    ...     path = capture("minilm", out=tmp, num_inputs=2, max_tokens=12, progress=False)
    ...     manifest = load_capture(path).manifest
    >>> manifest["num_layers"], manifest["num_heads"], manifest["lengths"], manifest["causal"]
    (6, 12, [12, 12], False)
    >>> manifest["max_abs_prob_error"] < 1e-5
    True
    """
    from tqdm.auto import tqdm

    _check_args(num_inputs, max_tokens, dtype, packing, batch_size, check_tolerance)
    if str(device).startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device={device!r} but this torch has no CUDA device; use --device cpu.")
    out = Path(out)
    _prepare_out(out)
    started = time.perf_counter()
    documents, documents_source = _documents(texts)
    loaded = load_model(model, device=device, progress=progress)
    config = loaded.model.config
    limit = getattr(config, "max_position_embeddings", None)
    if limit is not None and max_tokens > limit:
        raise ValueError(f"max_tokens={max_tokens} exceeds {model!r}'s position limit of {limit} tokens")
    planned = plan_inputs(loaded.tokenizer, documents, num_inputs=num_inputs, max_tokens=max_tokens, packing=packing)
    settings = _settings(loaded, documents_source, planned, num_inputs=num_inputs, max_tokens=max_tokens,
                         dtype=dtype, packing=packing, modules=modules)

    if (out / MANIFEST).is_file():
        existing = read_manifest(out / MANIFEST)
        if existing.get("settings") == settings and existing.get("complete"):
            # "already complete" must mean intact: a damaged file is reported now, not later
            load_capture(out).verify()
            if progress:
                print(f"{out}: capture already complete (verified)")
            return out
        raise ValueError(f"out={str(out)!r} holds a complete capture with different settings; pass a new directory")

    records = _finished_records(out, settings)
    previous = read_manifest(out / PARTIAL) if records else {}
    layers: list[dict] | None = previous.get("layers")
    elapsed_before = float(previous.get("capture_seconds", 0.0))
    heads = getattr(config, "num_attention_heads", 12)
    batch = batch_size or _auto_batch_size(max_tokens, heads)
    pad_id = loaded.tokenizer.pad_token_id if loaded.tokenizer.pad_token_id is not None else 0
    storage = DTYPES[dtype]

    bar = tqdm(total=num_inputs, initial=len(records), disable=not progress, unit="input",
               desc=f"capture {model}", dynamic_ncols=True)
    with torch.inference_mode():
        for start in range(len(records), num_inputs, batch):
            chunk: list[PlannedInput] = planned[start:start + batch]
            lengths = [len(p.input_ids) for p in chunk]
            width = max(lengths)
            ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
            mask = torch.zeros((len(chunk), width), dtype=torch.long)
            for row, p in enumerate(chunk):
                ids[row, :lengths[row]] = torch.tensor(p.input_ids)
                mask[row, :lengths[row]] = 1  # right padding keeps real tokens' positions and results
            collector = _BatchCollector(lengths, storage, check_tolerance)
            with AttentionRecorder(loaded.model, on_call=collector, modules=modules,
                                   attention_function=attention_function):
                loaded.model(input_ids=ids.to(device), attention_mask=mask.to(device))
            if not collector.layers:
                raise ValueError(
                    f"no attention call was recorded for {model!r}: its attention does not dispatch through "
                    "transformers' AttentionInterface, or modules= matched no attention module"
                )
            if layers is None:
                layers = collector.layers
            elif [layer["name"] for layer in layers] != [layer["name"] for layer in collector.layers]:
                raise ValueError("the model called its attention modules in a different order between batches")
            for row, p in enumerate(chunk):
                index = start + row
                tensors = collector.tensors[row]
                for l, layer in enumerate(layers):
                    kind = collector.kinds[row][l]
                    if kind != layer["mask"] and kind != "explicit":
                        # this input's pattern differs from the layer's usual one: keep it explicitly
                        n = lengths[row]
                        full = torch.ones(n, n, dtype=torch.bool)
                        tensors[f"layer.{l}.mask"] = full.tril() if kind == "causal" else full
                tensors["input_ids"] = torch.tensor(p.input_ids, dtype=torch.long)
                file = out / input_file_name(index)
                digest = atomic_save_tensors(file, tensors)
                records.append({
                    "index": index, "file": file.name, "bytes": file.stat().st_size,
                    "sha256": digest, "length": lengths[row], "sources": list(p.sources),
                    "input_ids": list(p.input_ids),
                    "tensor_sha256": {key: tensor_sha256(t) for key, t in tensors.items()},
                    "max_abs_prob_error": collector.errors[row],
                })
            elapsed = elapsed_before + time.perf_counter() - started
            atomic_write_json(out / PARTIAL, _manifest(loaded, settings, layers, records, elapsed, complete=False))
            bar.update(len(chunk))
    bar.close()
    elapsed = elapsed_before + time.perf_counter() - started
    atomic_write_json(out / MANIFEST, _manifest(loaded, settings, layers, records, elapsed, complete=True))
    (out / PARTIAL).unlink(missing_ok=True)
    return out


def _manifest(loaded, settings, layers, records, elapsed, *, complete) -> dict:
    from hla_analysis import __version__

    config = loaded.model.config
    heads = {layer["heads"] for layer in layers}
    kv_heads = {layer["kv_heads"] for layer in layers}
    dims = {layer["head_dim"] for layer in layers}
    scales = {layer["scale"] for layer in layers}
    if len(heads) != 1 or len(kv_heads) != 1 or len(dims) != 1:
        raise ValueError("recorded layers differ in head count or head dim; capture them separately with modules=")
    num_heads, num_kv = heads.pop(), kv_heads.pop()
    lengths = [rec["length"] for rec in records]
    return {
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
        "num_layers": len(layers),
        "num_heads": num_heads,
        "num_kv_heads": num_kv,
        "kv_head_for_query_head": [h // (num_heads // num_kv) for h in range(num_heads)],
        "head_dim": dims.pop(),
        "head_dim_v": layers[0]["head_dim_v"],
        "scale": scales.pop() if len(scales) == 1 else None,
        "causal": all(layer["mask"] == "causal" for layer in layers),
        "layers": [dict(layer) for layer in layers],
        "dtype": settings["dtype"],
        "max_tokens": settings["max_tokens"],
        "packing": settings["packing"],
        "texts": settings["texts"],
        "num_inputs": len(records),
        "lengths": lengths,
        "total_tokens": sum(lengths),
        "max_abs_prob_error": max((rec["max_abs_prob_error"] for rec in records), default=0.0),
        "capture_seconds": round(elapsed, 3),
        "settings": settings,
        "inputs": records,
    }
