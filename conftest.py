"""Test-wide settings. Runs before any test module (and before any Triton kernel is defined)."""

import os

# Model hubs are unreachable on CI and on the project's machines: fail fast, never hang.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

# Without a GPU, Triton kernels run through the interpreter on CPU. The variable must be set
# before any @triton.jit function is defined, i.e. before hla_analysis.ops.triton is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
