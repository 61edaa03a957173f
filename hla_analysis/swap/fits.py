"""Per-layer fitted parameters of learnable variants, stored as one safetensors file.

Keys are ``layer.{l}.{spec}.{objective}.{parameter}`` (the parameter name as in the bound
variant's ``state_dict``); the file's metadata holds the fit settings and names the format
(``format``: :data:`FITS_FORMAT`, ``format_version``), so a reader can tell a fits file this
toolkit wrote from any other safetensors file. :func:`save_fits` writes it atomically;
:func:`load_fits` reads it back (safetensors only, never pickle); :func:`read_fits_file` also
refuses a file this toolkit did not write.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import Tensor

OBJECTIVES = ("map_kl", "output_mse")
FITS_FORMAT = "hla-analysis-fits"
FITS_FORMAT_VERSION = "1"


def fit_key(layer: int, spec: str, objective: str) -> str:
    """Key prefix of one layer's parameters of ``spec`` fitted with ``objective``."""
    return f"layer.{layer}.{spec}.{objective}."


def save_fits(path: str | Path, params: dict[str, Tensor], *, settings: dict | None = None) -> Path:
    """Atomically write ``{key: tensor}`` (see :func:`fit_key`) with ``settings`` as metadata."""
    from safetensors.torch import save

    from hla_analysis._io import atomic_write_bytes

    path = Path(path)
    tensors = {name: t.detach().to("cpu", torch.float32).contiguous() for name, t in params.items()}
    metadata = {"format": FITS_FORMAT, "format_version": FITS_FORMAT_VERSION,
                "settings": json.dumps(settings or {}, sort_keys=True)}
    atomic_write_bytes(path, save(tensors, metadata=metadata))
    return path


_RERUN = "pass the .fits.safetensors that `hla-analysis compare` (or `evaluate`) wrote, or rerun compare"


def read_fits_file(path: str | Path) -> tuple[dict[str, Tensor], dict]:
    """The tensors and settings of a fits file, refusing a safetensors file this toolkit did not write.

    A fits file names its format in its metadata (:func:`save_fits`). Files written before it did
    (their metadata is exactly one ``settings`` entry holding a JSON object) are still read.
    Whether the tensors fit the model is for the caller to check (names and shapes).

    Raises
    ------
    FileNotFoundError
        If there is no file at ``path``.
    ValueError
        One line naming the file and the fix: not safetensors, no or foreign metadata, or
        another format version.
    """
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no fits file at {path}; {_RERUN}")
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            settings = _fits_settings(path, metadata)
            return {name: f.get_tensor(name) for name in f.keys()}, settings
    except (SafetensorError, OSError) as exc:
        raise ValueError(f"cannot read {path} as a safetensors fits file ({exc}); {_RERUN}") from None


def _fits_settings(path: Path, metadata: dict) -> dict:
    """The settings a fits file's metadata records, after checking that it names our format."""
    try:
        settings = json.loads(metadata.get("settings", ""))
    except (TypeError, ValueError):
        settings = None
    if not isinstance(settings, dict):
        missing = "has no safetensors metadata" if not metadata else "has no fit settings in its metadata"
        raise ValueError(f"{path} is not a fits file written by hla-analysis (it {missing}); {_RERUN}")
    fmt = metadata.get("format")
    if fmt is None and set(metadata) == {"settings"}:
        return settings  # written before fits files named their format: save_fits wrote only the settings
    if fmt != FITS_FORMAT:
        raise ValueError(f"{path} is not a fits file written by hla-analysis (its metadata names the format "
                         f"{fmt!r}, not {FITS_FORMAT!r}); {_RERUN}")
    if metadata.get("format_version") != FITS_FORMAT_VERSION:
        raise ValueError(f"{path} has fits format version {metadata.get('format_version')!r}, this toolkit reads "
                         f"version {FITS_FORMAT_VERSION}; rerun compare with this version")
    return settings


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
