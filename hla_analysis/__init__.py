"""hla-analysis: how well Hadamard Linear Attention and kernel linear attention approximate softmax.

Tensor layout, kept everywhere: ``[..., N, D]`` -- any leading batch/head dims, then
tokens ``N``, then features ``D``. HLA factors come as a sequence of ``M`` such tensors
(widths may differ per factor) or one stacked tensor ``[..., M, N, r]``.
"""

__version__ = "0.1.0"

from hla_analysis.ops import (  # noqa: E402  (version must exist before submodules import it)
    hla,
    hla_attention_map,
    hla_attention_output,
    kernel_attention_map,
    kernel_attention_output,
    linear_attention,
    softmax_attention_map,
    softmax_attention_output,
)
from hla_analysis.variants import list_variants, make_variant  # noqa: E402

__all__ = [
    "__version__",
    "hla",
    "hla_attention_map",
    "hla_attention_output",
    "kernel_attention_map",
    "kernel_attention_output",
    "linear_attention",
    "softmax_attention_map",
    "softmax_attention_output",
    "make_variant",
    "list_variants",
]
