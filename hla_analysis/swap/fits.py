"""Per-layer fitted parameters of learnable variants, stored as one safetensors file.

Keys are ``layer.{l}.{spec}.{objective}.{parameter}`` (the parameter name as in the bound
variant's ``state_dict``); the file's metadata holds the fit settings. :func:`save_fits`
writes it atomically; :func:`load_fits` reads it back (safetensors only, never pickle).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import Tensor

OBJECTIVES = ("map_kl", "output_mse")


def fit_key(layer: int, spec: str, objective: str) -> str:
    """Key prefix of one layer's parameters of ``spec`` fitted with ``objective``."""
    return f"layer.{layer}.{spec}.{objective}."


def save_fits(path: str | Path, params: dict[str, Tensor], *, settings: dict | None = None) -> Path:
    """Atomically write ``{key: tensor}`` (see :func:`fit_key`) with ``settings`` as metadata."""
    from safetensors.torch import save

    from hla_analysis._io import atomic_write_bytes

    path = Path(path)
    tensors = {name: t.detach().to("cpu", torch.float32).contiguous() for name, t in params.items()}
    atomic_write_bytes(path, save(tensors, metadata={"settings": json.dumps(settings or {}, sort_keys=True)}))
    return path


def load_fits(path: str | Path) -> dict[str, Tensor]:
    """Read a fits file written by :func:`save_fits` (or by ``hla-analysis evaluate``)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no fits file at {path}; `hla-analysis evaluate` writes <out>.fits.safetensors")
    try:
        return load_file(path)
    except (SafetensorError, OSError, ValueError) as exc:
        raise ValueError(f"cannot read {path} as a safetensors fits file ({exc}); rerun the fit") from None


def layer_state(fits: dict[str, Tensor], layer: int, spec: str, objective: str) -> dict[str, Tensor]:
    """The ``state_dict`` of one layer's fitted variant (empty when the file has none)."""
    prefix = fit_key(layer, spec, objective)
    return {name[len(prefix):]: t for name, t in fits.items() if name.startswith(prefix)}
