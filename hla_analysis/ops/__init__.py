"""Attention operators in PyTorch: materialized references and O(N) forms beside them.

Layout: ``[..., N, D]``; leading batch/head dims broadcast.
"""

from hla_analysis.ops.hla import FORMS, hla, linear_attention
from hla_analysis.ops.reference import (
    hla_attention_map,
    hla_attention_output,
    hla_weights,
    kernel_attention_map,
    kernel_attention_output,
    softmax_attention_map,
    softmax_attention_output,
)
from hla_analysis.ops.tied import is_tied, symmetric_power_features, symmetric_state_size

__all__ = [
    "FORMS",
    "hla",
    "linear_attention",
    "hla_attention_map",
    "hla_attention_output",
    "hla_weights",
    "kernel_attention_map",
    "kernel_attention_output",
    "softmax_attention_map",
    "softmax_attention_output",
    "is_tied",
    "symmetric_power_features",
    "symmetric_state_size",
]
