"""On-disk capture format, and the lazy, hash-checked loader.

A capture is a directory::

    manifest.json                 written last; present only when the capture is complete
    manifest.partial.json         progress of an unfinished capture (what resume reads)
    input_00000.safetensors       one file per input: for every layer l,
    input_00001.safetensors       layer.{l}.q [Hq, N, d], layer.{l}.k / .v [Hkv, N, d],
    ...                           optional layer.{l}.mask [N, N]; input_ids [N] for text

One file per input, because an input is the unit of work (one forward pass yields all
layers of it): each file is written atomically as soon as its forward pass ends, memory
stays bounded by one batch even at 8,192 tokens, and resume simply skips finished
files. Reading stays lazy per layer because safetensors reads single tensors from the
header offsets without loading the rest of the file. The manifest keeps a SHA-256 of
every file and of every tensor, so :meth:`Capture.get` checks exactly what it reads, and
a SHA-256 of its own content (:mod:`hla_analysis.capture.manifest`); every read also
checks each tensor's dtype and shape against the manifest. q and k are stored in the
canonical scale split of :mod:`hla_analysis.capture.scale_split`.
Keys and values are stored with the model's own key/value heads (3 for SmolLM2, not
9) and expanded to every query head on read.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch

from hla_analysis._io import (  # noqa: F401  (re-exported)
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_with,
    file_sha256,
)
from hla_analysis.capture.manifest import (  # noqa: F401
    FORMAT,
    FORMAT_VERSION,
    plain_file_name,
    read_manifest,
    refuse_linked_manifest,
)

MANIFEST = "manifest.json"
PARTIAL = "manifest.partial.json"
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def input_file_name(index: int) -> str:
    """File name of input ``index`` inside a capture directory."""
    return f"input_{index:05d}.safetensors"


def tensor_sha256(tensor: torch.Tensor) -> str:
    """SHA-256 of a tensor's raw bytes (dtype-agnostic, no copy for contiguous CPU tensors).

    Examples
    --------
    >>> tensor_sha256(torch.zeros(2)) == hashlib.sha256(bytes(8)).hexdigest()
    True
    """
    raw = tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()
    return hashlib.sha256(memoryview(raw)).hexdigest()


# safetensors' names for the dtypes a capture writes
_SAFETENSORS_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64",
                       torch.int64: "I64", torch.int32: "I32", torch.bool: "BOOL", torch.uint8: "U8"}


def _raw_bytes(tensor: torch.Tensor) -> memoryview:
    return memoryview(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())


def atomic_save_tensors(path: str | Path, tensors: dict[str, torch.Tensor]) -> tuple[str, dict[str, str]]:
    """Atomically write a safetensors file; return the SHA-256 of the file and of each tensor.

    The file is streamed tensor by tensor from the tensors' own memory (no in-memory copy of
    the file), and the per-tensor digests are computed in threads beside the write: at
    8,192 tokens one SmolLM2 input is about 1 GB. The layout is safetensors' own (an 8-byte
    little-endian header length, a JSON header padded with spaces to 8 bytes, then the data),
    so ``safetensors.safe_open`` reads it.

    Examples
    --------
    >>> import tempfile, safetensors.torch
    >>> path = Path(tempfile.mkdtemp()) / "x.safetensors"
    >>> digest, per_tensor = atomic_save_tensors(path, {"a": torch.arange(3.0), "b": torch.ones(2, 2)})
    >>> digest == file_sha256(path), per_tensor["a"] == tensor_sha256(torch.arange(3.0))
    (True, True)
    >>> safetensors.torch.load_file(path)["b"].tolist()
    [[1.0, 1.0], [1.0, 1.0]]
    """
    import json
    from concurrent.futures import ThreadPoolExecutor

    raw, header, offset = {}, {"__metadata__": {"format": FORMAT}}, 0
    for name, tensor in tensors.items():
        if tensor.dtype not in _SAFETENSORS_DTYPES:
            raise TypeError(f"tensor {name!r} has dtype {tensor.dtype}, which captures do not store")
        raw[name] = _raw_bytes(tensor)
        header[name] = {"dtype": _SAFETENSORS_DTYPES[tensor.dtype], "shape": list(tensor.shape),
                        "data_offsets": [offset, offset + raw[name].nbytes]}
        offset += raw[name].nbytes
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    head = len(text).to_bytes(8, "little") + text
    digest = hashlib.sha256(head)

    def write(f):
        f.write(head)
        for view in raw.values():
            f.write(view)
            digest.update(view)

    # hashlib and file writes release the GIL on large buffers, so the threads overlap
    with ThreadPoolExecutor(max_workers=4) as pool:
        per_tensor = {name: pool.submit(lambda v: hashlib.sha256(v).hexdigest(), view) for name, view in raw.items()}
        atomic_write_with(path, write)
        return digest.hexdigest(), {name: future.result() for name, future in per_tensor.items()}


class Capture:
    """A finished capture: manifest plus lazy, verified access to q, k, v per layer and input.

    Use :func:`load_capture` to open one.

    Attributes
    ----------
    path : Path
    manifest : dict
        Model id and weight hash, architecture, layers, heads, head dim, dtype, scale,
        causal flag, tokens and lengths of every input, toolkit version, and the
        largest difference between recomputed softmax and the model's probabilities.
    num_layers, num_inputs, num_heads, head_dim : int
    lengths : list of int
        Tokens per input (inputs are stored unpadded, each with its own length).
    """

    def __init__(self, path: Path, manifest: dict):
        self.path = Path(path)
        self.manifest = manifest
        self.num_layers = int(manifest["num_layers"])
        self.num_inputs = int(manifest["num_inputs"])
        self.num_heads = int(manifest["num_heads"])
        self.head_dim = int(manifest["head_dim"])
        self.lengths = [int(rec["length"]) for rec in manifest["inputs"]]
        self.input_kind = manifest["input_kind"]
        if manifest["dtype"] not in DTYPES:
            raise ValueError(
                f"{self.path}: manifest dtype {manifest['dtype']!r} is not one of {sorted(DTYPES)}; capture again"
            )
        self.dtype = DTYPES[manifest["dtype"]]
        self._kv_index = torch.tensor(manifest["kv_head_for_query_head"], dtype=torch.long)

    def __repr__(self) -> str:
        return (f"Capture({str(self.path)!r}, model={self.manifest['model']!r}, layers={self.num_layers}, "
                f"heads={self.num_heads}, inputs={self.num_inputs}, tokens={sum(self.lengths)})")

    def _check_index(self, layer, input_index):
        for name, value, bound in (("layer", layer, self.num_layers), ("input_index", input_index, self.num_inputs)):
            if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < bound:
                raise ValueError(f"{name} must be an int in [0, {bound}), got {value!r}")

    def _open(self, input_index: int):
        from safetensors import SafetensorError, safe_open

        rec = self.manifest["inputs"][input_index]
        file = self.path / plain_file_name(rec["file"], self.path, f"{self.path / MANIFEST}: input {input_index}")
        if not file.is_file():
            raise FileNotFoundError(f"{file} is missing from the capture; capture again into a new directory")
        size = file.stat().st_size
        if size != rec["bytes"]:
            raise ValueError(
                f"{file} is truncated or modified ({size} bytes, manifest says {rec['bytes']}); "
                "capture again into a new directory"
            )
        try:
            return safe_open(str(file), framework="pt"), rec
        except (SafetensorError, OSError, ValueError) as exc:
            raise ValueError(f"{file} is corrupt ({exc}); capture again into a new directory") from None

    def _read(self, handle, rec, key: str, verify: bool, dtype: torch.dtype, shape: tuple) -> torch.Tensor:
        expected = rec["tensor_sha256"].get(key)
        if expected is None:
            raise ValueError(f"{self.path / MANIFEST}: input {rec['index']} lists no tensor {key}; capture again")
        try:
            tensor = handle.get_tensor(key)
        except Exception as exc:  # safetensors raises its own error types for bad offsets
            raise ValueError(f"{self.path / rec['file']}: cannot read {key} ({exc}); the file is corrupt") from None
        if tensor.dtype != dtype or tuple(tensor.shape) != tuple(shape):
            raise ValueError(
                f"{self.path / rec['file']}: tensor {key} is {str(tensor.dtype).replace('torch.', '')} "
                f"{list(tensor.shape)} but the manifest says {str(dtype).replace('torch.', '')} {list(shape)}; "
                "the file was replaced or forged, capture again into a new directory"
            )
        if verify and tensor_sha256(tensor) != expected:
            raise ValueError(
                f"{self.path / rec['file']}: tensor {key} does not match its SHA-256 in the manifest; "
                "the file was modified or corrupted; capture again into a new directory"
            )
        return tensor

    def get(self, layer: int, input_index: int, *, verify: bool = True, as_recorded: bool = False) -> dict:
        """Tensors of one layer for one input, read from disk on demand.

        Parameters
        ----------
        layer, input_index : int
        verify : bool
            Check each tensor read against its SHA-256 in the manifest (cheap: a few ms
            per layer and input at 256 tokens). Dtypes and shapes are always checked.
        as_recorded : bool
            Undo the canonical scale split: return q and k exactly as the model passed them
            to its attention function, with the model's own ``scale``.

        Returns
        -------
        dict
            ``q``, ``k``, ``v``: ``[heads, N, d]`` (keys and values expanded to every query
            head), ``scale``: float (softmax logit = scale * q.k; ``head_dim**-0.5`` unless
            ``as_recorded``), ``causal``: bool, ``attention_mask``: bool ``[N, N]`` (True =
            may attend) or None when the pattern is fully described by ``causal``,
            ``input_ids``: ``[N]`` int64 for text captures, else None, ``layer_name``: str.

        Raises
        ------
        ValueError
            On an index out of range, or a truncated, corrupt, modified or forged file.
        """
        from hla_analysis.capture.scale_split import apply_factors

        self._check_index(layer, input_index)
        handle, rec = self._open(input_index)
        info = self.manifest["layers"][layer]
        n = int(rec["length"])
        heads, kv_heads, dim, dim_v = info["heads"], info["kv_heads"], info["head_dim"], info["head_dim_v"]
        with handle:
            q = self._read(handle, rec, f"layer.{layer}.q", verify, self.dtype, (heads, n, dim))
            k = self._read(handle, rec, f"layer.{layer}.k", verify, self.dtype, (kv_heads, n, dim))
            v = self._read(handle, rec, f"layer.{layer}.v", verify, self.dtype, (kv_heads, n, dim_v))
            ids = None
            if "input_ids" in rec["tensor_sha256"]:
                ids = self._read(handle, rec, "input_ids", verify, torch.int64, (n,))
            mask_key = f"layer.{layer}.mask"
            mask = None
            if mask_key in rec["tensor_sha256"]:
                mask = self._read(handle, rec, mask_key, verify, torch.bool, (n, n))
        scale = float(info["scale"])
        if as_recorded:
            q = apply_factors(q, [1.0 / f for f in info["q_factor"]], head_dim=0)
            k = apply_factors(k, [1.0 / f for f in info["k_factor"]], head_dim=0)
            scale = float(info["model_scale"])
        if k.shape[0] != self.num_heads:
            k = k.index_select(0, self._kv_index)
            v = v.index_select(0, self._kv_index)
        return {
            "q": q, "k": k, "v": v,
            "scale": scale,
            "causal": bool(info["mask"] == "causal") and mask is None,
            "attention_mask": mask,
            "input_ids": ids,
            "layer_name": info["name"],
        }

    def as_cache(self, input_index: int, *, verify: bool = True) -> dict[str, torch.Tensor]:
        """One input's activations under TransformerLens's hook names, in its layouts.

        Keys ``blocks.{l}.attn.hook_q``, ``hook_k``, ``hook_v`` (``[1, pos, head, d_head]``)
        and ``hook_pattern`` (``[1, head, query_pos, key_pos]``), for every captured layer
        ``l`` (the capture's own layer numbering), with a leading batch axis of one as in
        ``run_with_cache``. q and k are the model's own, as passed to its attention
        function: *after* rotary embeddings, i.e. TransformerLens's ``hook_rot_q`` and
        ``hook_rot_k`` for rotary models (``hook_q``/``hook_k`` otherwise). Keys and values
        of grouped-query models are expanded to every query head. ``hook_pattern`` is
        softmax recomputed from them in float32, masked as the model masked.

        Raises
        ------
        ValueError
            On an index out of range, or a damaged file (see :meth:`get`).

        Examples
        --------
        >>> cache = cap.as_cache(0)                                # doctest: +SKIP
        >>> cache["blocks.0.attn.hook_pattern"].shape             # doctest: +SKIP
        torch.Size([1, 12, 24, 24])
        """
        cache = {}
        for layer in range(self.num_layers):
            d = self.get(layer, input_index, verify=verify, as_recorded=True)
            for name in ("q", "k", "v"):
                cache[f"blocks.{layer}.attn.hook_{name}"] = d[name].transpose(0, 1).unsqueeze(0)
            cache[f"blocks.{layer}.attn.hook_pattern"] = _pattern(d).unsqueeze(0)
        return cache

    def verify(self) -> None:
        """Check every file of the capture against its SHA-256 (reads everything once).

        Raises
        ------
        ValueError
            Naming the first file that is missing, truncated or modified.
        """
        for rec in self.manifest["inputs"]:
            file = self.path / plain_file_name(rec["file"], self.path, f"{self.path / MANIFEST}: input {rec['index']}")
            if not file.is_file():
                raise FileNotFoundError(f"{file} is missing from the capture")
            if file.stat().st_size != rec["bytes"] or file_sha256(file) != rec["sha256"]:
                raise ValueError(f"{file} is truncated or modified (SHA-256 differs from the manifest)")


def _pattern(d: dict) -> torch.Tensor:
    """Softmax over allowed keys of ``scale * q k^T``, ``[heads, N, N]`` in float32."""
    q, k = d["q"].float(), d["k"].float()
    n = q.shape[-2]
    allowed = d["attention_mask"]
    if allowed is None:
        full = torch.ones(n, n, dtype=torch.bool)
        allowed = full.tril() if d["causal"] else full
    logits = (q @ k.transpose(-1, -2)) * d["scale"]
    return torch.softmax(logits.masked_fill(~allowed, float("-inf")), dim=-1)


def load_capture(path: str | Path) -> Capture:
    """Open a capture directory written by :func:`hla_analysis.capture.capture`.

    Only JSON and safetensors are read (never pickle). Per-layer tensors are loaded
    lazily by :meth:`Capture.get`, which verifies their hashes.

    Parameters
    ----------
    path : str or Path

    Returns
    -------
    Capture

    Raises
    ------
    FileNotFoundError
        If the directory or its manifest does not exist.
    ValueError
        If ``path`` is a file, the capture is incomplete (interrupted), or its manifest is
        a symbolic link, corrupt, edited after it was written (content hash, or derived fields such as the
        scales and the key/value head map that disagree with the rest), missing fields, or
        names files outside the directory.

    Examples
    --------
    >>> import tempfile
    >>> from hla_analysis.capture import capture
    >>> with tempfile.TemporaryDirectory() as tmp:
    ...     cap = load_capture(capture("minilm", out=tmp, num_inputs=1, max_tokens=16, progress=False))
    ...     d = cap.get(5, 0)
    ...     cap.num_layers, tuple(d["q"].shape), d["causal"], round(d["scale"] ** -2)
    (6, (12, 16, 32), False, 32)
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ValueError(f"capture directory {str(path)!r} is a file; pass the folder that holds the capture "
                         f"({str(path.parent)!r} if this file is part of it)")
    if not path.is_dir():
        raise FileNotFoundError(f"capture directory {str(path)!r} does not exist")
    manifest_path = path / MANIFEST
    refuse_linked_manifest(manifest_path)  # a dangling link too (read_manifest refuses the others)
    if not manifest_path.is_file():
        partial = path / PARTIAL
        if partial.is_file():
            done = len(read_manifest(partial, check_schema=False).get("inputs", []))
            raise ValueError(
                f"capture in {str(path)!r} is incomplete ({done} inputs finished): it was interrupted; "
                "re-run the same capture command to resume it"
            )
        raise FileNotFoundError(f"{str(path)!r} holds no {MANIFEST}; it is not a capture directory")
    manifest = read_manifest(manifest_path)
    if not manifest.get("complete"):
        raise ValueError(f"capture in {str(path)!r} is not marked complete; re-run the capture command to finish it")
    return Capture(path, manifest)
