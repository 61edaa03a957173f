"""The capture manifest: its schema, its content hash, and the one reader that checks both.

Every field a reader relies on is declared in :data:`SCHEMA` (top level), :data:`LAYER_SCHEMA`
(one entry per recorded attention module) and :data:`INPUT_SCHEMA` (one entry per input);
a manifest missing one, or holding the wrong type, is refused with one line naming it.
The manifest also stores ``manifest_sha256``, a SHA-256 of its own canonical JSON without
that key, so an edited field (a layer's ``scale``, a file name) is caught on load instead of
silently changing results downstream; fields derived from others (the key/value head map,
the scales, ``causal``, ``lengths``) are recomputed on load, so a resealed edit is caught too.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

FORMAT = "hla-analysis-capture"
FORMAT_VERSION = 2
HASH_KEY = "manifest_sha256"
INPUT_KINDS = ("text", "tensors", "images")

_NUM = (int, float)
SCHEMA = {
    "format": str, "format_version": int, "complete": bool, "model": str, "model_source": str,
    "weights_sha256": str, "architecture": str, "input_kind": str, "input_arguments": list,
    "num_layers": int, "num_heads": int, "num_kv_heads": int, "kv_head_for_query_head": list,
    "head_dim": int, "head_dim_v": int, "scale": _NUM, "scale_convention": str, "causal": bool, "layers": list,
    "dtype": str, "num_inputs": int, "lengths": list, "total_tokens": int,
    "max_abs_prob_error": _NUM, "capture_seconds": _NUM, "settings": dict, "inputs": list,
}
LAYER_SCHEMA = {
    "name": str, "scale": _NUM, "model_scale": _NUM, "heads": int, "kv_heads": int, "head_dim": int,
    "head_dim_v": int, "mask": str, "q_factor": list, "k_factor": list,
}
INPUT_SCHEMA = {
    "index": int, "name": str, "file": str, "bytes": int, "sha256": str, "length": int,
    "tensor_sha256": dict, "max_abs_prob_error": _NUM,
}
#: present only when ``input_kind == "text"``
TEXT_INPUT_SCHEMA = {"input_ids": list, "sources": list}


def content_sha256(manifest: dict) -> str:
    """SHA-256 of a manifest's canonical JSON (sorted keys), ``manifest_sha256`` left out.

    Examples
    --------
    >>> content_sha256({"a": 1, HASH_KEY: "x"}) == content_sha256({"a": 1})
    True
    """
    body = {key: value for key, value in manifest.items() if key != HASH_KEY}
    blob = json.dumps(body, sort_keys=True, separators=(",", ":"), allow_nan=False).encode("utf-8")
    return hashlib.sha256(blob).hexdigest()


def sealed(manifest: dict) -> dict:
    """The manifest with its content hash stored under ``manifest_sha256``."""
    return {**manifest, HASH_KEY: content_sha256(manifest)}


def _type_name(kind) -> str:
    return " or ".join(t.__name__ for t in kind) if isinstance(kind, tuple) else kind.__name__


def _check_fields(obj, schema: dict, where: str, path: Path) -> None:
    if not isinstance(obj, dict):
        raise ValueError(f"{path}: {where} is not a JSON object; the capture is damaged, capture again")
    for key, kind in schema.items():
        if key not in obj:
            raise ValueError(f"{path}: {where} lacks the field {key!r}; the capture is damaged, capture again")
        value = obj[key]
        if isinstance(value, bool) and kind is not bool or not isinstance(value, kind):
            raise ValueError(
                f"{path}: {where} field {key!r} must be {_type_name(kind)}, got {type(value).__name__}; "
                "the capture is damaged, capture again"
            )


def plain_file_name(name: str, folder: Path, where: str) -> str:
    """Refuse a stored file name that is not one plain name inside ``folder`` (no ``..``, no path)."""
    if (not isinstance(name, str) or not name or name in (".", "..") or "/" in name or "\\" in name
            or "\x00" in name or Path(name).is_absolute() or Path(name).name != name):
        raise ValueError(
            f"{where} names the file {name!r}, which is not a plain file name inside the capture directory; "
            "the manifest was tampered with, capture again"
        )
    target = (folder / name).resolve()
    if target.parent != folder.resolve():
        raise ValueError(f"{where} file {name!r} is a link that resolves outside the capture directory (to "
                         f"{target}); copy the real file into the folder in its place, or capture again")
    return name


def refuse_linked_manifest(path: Path) -> None:
    """Refuse a manifest that is a symbolic link: a capture reads only real files inside its own folder.

    A linked manifest would describe (and vouch for, through its hashes) files it does not sit
    beside; one line naming the link, its target and the fix.
    """
    if path.is_symlink():
        raise ValueError(f"{path} is a symbolic link (to {path.resolve()}); a capture reads only real files inside "
                         "its folder: copy the real file into the folder in its place, or capture again")


def _positive_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def _check_counts(manifest: dict, path: Path) -> None:
    """Head counts and sizes that agree with each other (the layers and tensors are checked against them)."""
    for key in ("num_heads", "num_kv_heads", "head_dim", "head_dim_v"):
        if not _positive_int(manifest[key]):
            raise ValueError(f"{path}: {key} must be a positive integer, got {manifest[key]!r}; capture again")
    heads, kv = manifest["num_heads"], manifest["num_kv_heads"]
    if kv > heads:
        raise ValueError(f"{path}: num_kv_heads={kv} exceeds num_heads={heads}; capture again")
    mapping = manifest["kv_head_for_query_head"]
    if not all(isinstance(j, int) and not isinstance(j, bool) and 0 <= j < kv for j in mapping):
        raise ValueError(f"{path}: kv_head_for_query_head must list key/value heads in [0, {kv}); capture again")


def _check_layer(layer: dict, l: int, manifest: dict, path: Path) -> None:
    """A layer's heads, sizes and scales against the manifest's (the tensors' shapes follow the layer's)."""
    import math

    for key, top in (("heads", "num_heads"), ("kv_heads", "num_kv_heads"), ("head_dim", "head_dim"),
                     ("head_dim_v", "head_dim_v")):
        if layer[key] != manifest[top]:
            raise ValueError(f"{path}: layer {l} has {key}={layer[key]!r} but the manifest says "
                             f"{top}={manifest[top]!r}; capture again")
    for key in ("scale", "model_scale"):
        value = layer[key]
        if isinstance(value, bool) or not math.isfinite(value) or value <= 0:
            raise ValueError(f"{path}: layer {l} {key} must be a finite number > 0, got {value!r}; capture again")
    for key in ("q_factor", "k_factor"):
        if not all(isinstance(f, (int, float)) and not isinstance(f, bool) and math.isfinite(f) and f > 0
                   for f in layer[key]):
            raise ValueError(f"{path}: layer {l} {key} must hold finite numbers > 0; capture again")


MASK_KINDS = ("full", "causal", "explicit")
_SCALE_RTOL = 1e-12


def _edited(path: Path, field: str, detail: str) -> ValueError:
    return ValueError(f"{path}: {field} {detail}; the manifest was edited after the capture wrote it, capture again")


def _check_derived(manifest: dict, path: Path) -> None:
    """Fields a capture derives from others, recomputed: a resealed edit of one cannot change results.

    The content hash stops an edit that was not resealed; these stop one that was (run after
    the schema, counts and layers are checked, so the inputs here are well-formed).
    """
    from hla_analysis.capture.scale_split import canonical_scale

    heads, kv = manifest["num_heads"], manifest["num_kv_heads"]
    if heads % kv:
        raise _edited(path, "num_heads", f"={heads} is not a multiple of num_kv_heads={kv}")
    expected = [h // (heads // kv) for h in range(heads)]
    if manifest["kv_head_for_query_head"] != expected:
        h = next(h for h, (got, want) in enumerate(zip(manifest["kv_head_for_query_head"], expected)) if got != want)
        raise _edited(path, "kv_head_for_query_head", f"is not h // {heads // kv} for {heads} query heads over {kv} "
                      f"key/value heads (query head {h} -> {manifest['kv_head_for_query_head'][h]})")
    scale = canonical_scale(manifest["head_dim"])
    tops = [("scale", manifest["scale"])]
    for l, layer in enumerate(manifest["layers"]):
        tops.append((f"layer {l} scale", layer["scale"]))
    for field, value in tops:
        if isinstance(value, bool) or not abs(value - scale) <= _SCALE_RTOL * scale:
            raise _edited(path, field, f"is {value!r}, not head_dim**-0.5 = {scale!r}")
    for l, layer in enumerate(manifest["layers"]):
        if layer["mask"] not in MASK_KINDS:
            raise _edited(path, f"layer {l} mask", f"is {layer['mask']!r}, not one of {MASK_KINDS}")
    causal = all(layer["mask"] == "causal" for layer in manifest["layers"])
    if manifest["causal"] != causal:
        raise _edited(path, "causal", f"is {manifest['causal']} but the layers' masks say {causal}")
    lengths = [rec["length"] for rec in manifest["inputs"]]
    if manifest["lengths"] != lengths:
        raise _edited(path, "lengths", "disagree with the inputs' recorded lengths")
    if manifest["total_tokens"] != sum(lengths):
        raise _edited(path, "total_tokens", f"is {manifest['total_tokens']}, not the sum of lengths {sum(lengths)}")


def validate(manifest: dict, path: Path) -> dict:
    """Check a parsed manifest against the schema; return it unchanged.

    Raises
    ------
    ValueError
        One line naming the first missing or mistyped field, a field that disagrees with
        what the capture derives it from (the key/value head map, the scales, ``causal``,
        ``lengths``), or a file name that is not a plain name inside the capture directory.
    """
    _check_fields(manifest, SCHEMA, "the manifest", path)
    if manifest["input_kind"] not in INPUT_KINDS:
        raise ValueError(f"{path}: input_kind must be one of {INPUT_KINDS}, got {manifest['input_kind']!r}; "
                         "capture again")
    if len(manifest["layers"]) != manifest["num_layers"] or len(manifest["inputs"]) != manifest["num_inputs"]:
        raise ValueError(f"{path}: num_layers/num_inputs disagree with the layer and input lists; capture again")
    if len(manifest["kv_head_for_query_head"]) != manifest["num_heads"]:
        raise ValueError(f"{path}: kv_head_for_query_head does not list {manifest['num_heads']} heads; capture again")
    _check_counts(manifest, path)
    for l, layer in enumerate(manifest["layers"]):
        _check_fields(layer, LAYER_SCHEMA, f"layer {l}", path)
        if len(layer["q_factor"]) != layer["heads"] or len(layer["k_factor"]) != layer["kv_heads"]:
            raise ValueError(f"{path}: layer {l} has q_factor/k_factor of the wrong length; capture again")
        _check_layer(layer, l, manifest, path)
    text = manifest["input_kind"] == "text"
    for i, rec in enumerate(manifest["inputs"]):
        _check_fields(rec, {**INPUT_SCHEMA, **(TEXT_INPUT_SCHEMA if text else {})}, f"input {i}", path)
        if rec["index"] != i:
            raise ValueError(f"{path}: input {i} is recorded with index {rec['index']}; capture again")
        plain_file_name(rec["file"], path.parent, f"{path}: input {i}")
    _check_derived(manifest, path)
    return manifest


def read_manifest(path: str | Path, *, check_schema: bool = True) -> dict:
    """Parse a manifest JSON file, check its format version, content hash and schema.

    Raises
    ------
    ValueError
        If it is a symbolic link, not JSON, not a capture manifest, of another format
        version, edited after it was written (hash mismatch), or missing fields.
    """
    path = Path(path)
    refuse_linked_manifest(path)
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path} is corrupt ({exc}); delete the capture directory and capture again") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ValueError(f"{path} is not an hla-analysis capture manifest")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise ValueError(
            f"{path} has capture format version {manifest.get('format_version')}, this toolkit reads "
            f"version {FORMAT_VERSION}; capture again with this version"
        )
    stored = manifest.get(HASH_KEY)
    if not isinstance(stored, str):
        raise ValueError(f"{path} has no {HASH_KEY}; the capture is damaged, capture again")
    try:
        actual = content_sha256(manifest)
    except ValueError:  # NaN or Infinity smuggled into the JSON
        actual = None
    if stored != actual:
        raise ValueError(
            f"{path} was modified after the capture wrote it (its content no longer matches {HASH_KEY}); "
            "capture again into a new directory"
        )
    return validate(manifest, path) if check_schema else manifest
