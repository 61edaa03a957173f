"""What a capture feeds the model: token ids from text, the user's own tensors, or images.

Every source becomes a list of :class:`ModelInput`, one per input: the keyword arguments of
the model's forward pass, each tensor with a leading batch dimension of 1. Text is tokenized
(:mod:`hla_analysis.capture.inputs`); tensors come from Python dicts or a safetensors file
whose tensors are named by forward argument with a leading input axis; images go through
the model's own ``AutoImageProcessor``. Nothing is tokenized unless text is captured.
"""

from __future__ import annotations

import hashlib
import inspect
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


@dataclass(frozen=True)
class ModelInput:
    """One input: its name, its forward arguments (batch dim 1), and for text its tokens."""

    name: str
    tensors: dict = field(hash=False)
    input_ids: tuple[int, ...] | None = None
    sources: tuple[str, ...] | None = None


def forward_arguments(model) -> tuple[list[str], bool]:
    """Named parameters of ``model.forward`` and whether it also takes ``**kwargs``."""
    try:
        params = inspect.signature(model.forward).parameters.values()
    except (TypeError, ValueError):
        return [], True
    names = [p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    return names, any(p.kind is p.VAR_KEYWORD for p in params)


def check_argument_names(model, names, *, origin: str) -> None:
    """Refuse input names that ``model.forward`` does not take (one line listing what it takes).

    transformers forwards end in ``**kwargs``, which would swallow a misspelt name
    silently, so names are checked against the explicit parameters whenever there are any.
    """
    taken, var_kw = forward_arguments(model)
    unknown = [n for n in names if n not in taken]
    if unknown and (taken or not var_kw):
        raise ValueError(
            f"{origin} names {', '.join(map(repr, unknown))}, which {type(model).__name__}.forward does not take; "
            f"name the tensors after its arguments: {', '.join(taken) or '(none)'}"
        )


def _is_mask(key: str) -> bool:
    return key == "attention_mask" or key.endswith("_attention_mask")


def check_tensor_values(items: list[ModelInput]) -> None:
    """Refuse, before the model runs, inputs whose values cannot give a meaningful capture.

    A NaN or Inf in a floating tensor would reach the attention logits and surface later as
    a softmax mismatch blamed on the model; an input with 0 tokens (or any empty tensor)
    fails inside the model's reshapes; an all-zero 2-D (or all-False) attention mask leaves
    no position to attend to, and the model would attend uniformly to masked positions.
    Additive float masks may hold -inf (blocked), so masks are checked for NaN only.

    Examples
    --------
    >>> check_tensor_values([ModelInput("x", {"pixel_values": torch.tensor([[0.0, float("nan")]])})])
    Traceback (most recent call last):
    ...
    ValueError: input 0 (pixel_values of 'x') contains NaN or Inf; pass finite values (check how it was made)
    """
    for i, item in enumerate(items):
        for key, t in sorted(item.tensors.items(), key=lambda kv: kv[0] != "input_ids"):  # input_ids first
            where = f"input {i} ({key} of {item.name!r})"
            if t.numel() == 0:
                if key == "input_ids":
                    raise ValueError(f"input {i} has 0 tokens ({key} of {item.name!r} has shape "
                                     f"{list(t.shape)}); pass at least one token id per input")
                raise ValueError(f"{where} is empty (shape {list(t.shape)}); pass a tensor with at least one value")
            if t.is_floating_point() or t.is_complex():
                if _is_mask(key):
                    if bool(torch.isnan(t).any()):
                        raise ValueError(f"{where} contains NaN; pass 1/0 (or True/False) for attend/skip")
                elif not bool(torch.isfinite(t).all()):
                    raise ValueError(f"{where} contains NaN or Inf; pass finite values (check how it was made)")
            if _is_mask(key) and (t.ndim <= 2 or t.dtype == torch.bool) and not bool(t.any()):
                raise ValueError(f"{where} is all zero, leaving no position to attend to; pass 1 for the "
                                 "positions to attend to")


def _as_tensor(value, key: str, origin: str) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        tensor = value
    else:
        try:
            import numpy as np
        except ImportError:  # pragma: no cover
            np = None
        if np is None or not isinstance(value, np.ndarray):
            raise ValueError(
                f"{origin}[{key!r}] is a {type(value).__name__}; every value must be a tensor with a leading "
                "batch dimension, e.g. pixel_values of shape [1, 3, 224, 224]"
            )
        tensor = torch.from_numpy(value)
    if tensor.ndim < 1:
        raise ValueError(f"{origin}[{key!r}] is a scalar; give it a leading batch dimension, e.g. shape [1, ...]")
    return tensor.detach()


def split_batched(batch: Mapping, *, name: str, origin: str) -> list[ModelInput]:
    """One dict of tensors sharing a leading batch axis -> one :class:`ModelInput` per row."""
    if not isinstance(batch, Mapping) or not batch:
        raise ValueError(
            f"{origin} must be a non-empty dict of forward arguments to tensors, e.g. "
            f"{{'pixel_values': tensor of shape [1, 3, 224, 224]}}, got {type(batch).__name__}"
        )
    tensors = {}
    for key, value in batch.items():
        if not isinstance(key, str) or not key.isidentifier():
            raise ValueError(f"{origin} has the key {key!r}; keys must be forward argument names")
        tensors[key] = _as_tensor(value, key, origin)
    sizes = {key: t.shape[0] for key, t in tensors.items()}
    if len(set(sizes.values())) != 1:
        raise ValueError(
            f"{origin} mixes leading (batch) sizes {sizes}; every tensor needs the same leading input axis"
        )
    rows = next(iter(sizes.values()))
    if rows == 0:
        raise ValueError(f"{origin} holds 0 inputs (leading axis of length 0)")
    if rows == 1:
        return [ModelInput(name, tensors)]
    return [ModelInput(f"{name}[{b}]", {key: t[b:b + 1] for key, t in tensors.items()}) for b in range(rows)]


def read_tensor_file(path: str | Path) -> list[ModelInput]:
    """Inputs from a safetensors file: tensors named by forward argument, leading input axis.

    Examples
    --------
    >>> import tempfile, safetensors.torch
    >>> with tempfile.TemporaryDirectory() as tmp:
    ...     safetensors.torch.save_file({"pixel_values": torch.zeros(3, 3, 8, 8)}, f"{tmp}/x.safetensors")
    ...     items = read_tensor_file(f"{tmp}/x.safetensors")
    >>> [i.name for i in items], tuple(items[0].tensors["pixel_values"].shape)
    (['x.safetensors[0]', 'x.safetensors[1]', 'x.safetensors[2]'], (1, 3, 8, 8))
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    if path.is_dir():
        raise ValueError(f"inputs file {str(path)!r} is a folder; pass one .safetensors file (for a folder of "
                         "images, --image-dir / images=)")
    if not path.is_file():
        raise FileNotFoundError(f"inputs file {str(path)!r} does not exist; pass a .safetensors file")
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise ValueError(
            f"{path} is not a readable safetensors file ({str(exc).splitlines()[0] if str(exc) else exc!r}); "
            "write it with safetensors.torch.save_file({'pixel_values': tensor_of_shape_[n, ...]}, path)"
        ) from None
    items = split_batched(tensors, name=path.name, origin=str(path))
    if len(items) == 1:
        items = [ModelInput(f"{path.name}[0]", items[0].tensors)]
    return items


def tensor_inputs(inputs) -> list[ModelInput]:
    """Normalise ``inputs=``: a safetensors path, one dict, or an iterable of dicts."""
    if isinstance(inputs, (str, Path)):
        return read_tensor_file(inputs)
    if isinstance(inputs, Mapping):
        return split_batched(inputs, name="inputs", origin="inputs")
    if not isinstance(inputs, Iterable):
        raise ValueError(
            f"inputs must be an iterable of dicts of tensors (forward arguments) or a .safetensors path, "
            f"got {type(inputs).__name__}"
        )
    items: list[ModelInput] = []
    for i, batch in enumerate(inputs):
        items.extend(split_batched(batch, name=f"inputs[{i}]", origin=f"inputs[{i}]"))
    if not items:
        raise ValueError("inputs is empty; pass at least one dict of forward arguments")
    return items


def image_files(images) -> list[Path]:
    """PNG/JPEG files of a folder (sorted, hidden files skipped), or a list of files."""
    if isinstance(images, (str, Path)):
        folder = Path(images)
        if not folder.is_dir():
            raise FileNotFoundError(f"image folder {str(folder)!r} does not exist; pass a folder of PNG/JPEG files")
        files = sorted(p for p in folder.iterdir()
                       if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith("."))
        if not files:
            raise ValueError(f"{folder} holds no PNG or JPEG file ({', '.join(IMAGE_SUFFIXES)})")
        return files
    files = [Path(p) for p in images]
    missing = [str(p) for p in files if not p.is_file()]
    if missing or not files:
        raise FileNotFoundError(f"image files not found: {', '.join(missing[:3]) or '(none given)'}")
    return files


def image_inputs(images, processor_path: str, model) -> list[ModelInput]:
    """Run the model's own ``AutoImageProcessor`` over image files; one input per image."""
    from PIL import Image, UnidentifiedImageError
    from transformers import AutoImageProcessor

    files = image_files(images)
    try:
        processor = AutoImageProcessor.from_pretrained(processor_path)
    except Exception as exc:  # OSError / ValueError / KeyError with multi-line text
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ValueError(
            f"could not load an image processor for {processor_path!r} ({first}); the folder needs "
            "preprocessor_config.json, or preprocess the images yourself and pass --inputs FILE.safetensors "
            "holding pixel_values [n, 3, H, W]"
        ) from None
    taken, _ = forward_arguments(model)
    items = []
    for file in files:
        try:
            with Image.open(file) as img:
                batch = processor(images=img.convert("RGB"), return_tensors="pt")
        except (UnidentifiedImageError, OSError) as exc:
            raise ValueError(f"{file} is not a readable image ({exc}); remove it from the folder") from None
        tensors = {key: value for key, value in batch.items() if isinstance(value, torch.Tensor)
                   and (not taken or key in taken)}
        items.append(ModelInput(str(file), tensors))
    return items


def inputs_sha256(items: list[ModelInput]) -> str:
    """SHA-256 over every input's name, argument names, dtypes, shapes and bytes."""
    from hla_analysis.capture.store import tensor_sha256

    digest = hashlib.sha256()
    for item in items:
        digest.update(item.name.encode() + b"\0")
        for key in sorted(item.tensors):
            t = item.tensors[key]
            digest.update(f"{key}|{t.dtype}|{tuple(t.shape)}|{tensor_sha256(t)}\0".encode())
    return digest.hexdigest()


def stack_batch(items: list[ModelInput], *, device, float_dtype: torch.dtype) -> dict:
    """Concatenate equal-shaped inputs along the batch axis, on ``device``; floats in the model's dtype."""
    out = {}
    for key in items[0].tensors:
        t = torch.cat([item.tensors[key] for item in items])
        if t.is_floating_point():
            t = t.to(float_dtype)
        out[key] = t.to(device)
    return out


def batch_key(item: ModelInput) -> tuple:
    """Inputs with equal keys give one forward pass: same names, shapes and dtypes."""
    return tuple((key, tuple(t.shape), t.dtype) for key, t in sorted(item.tensors.items()))
