"""The dtypes the fused kernels compute in, their dot precision, and the cast back to the caller's dtype."""

from __future__ import annotations

import os

import torch

from hla_analysis._checks import check_narrowed


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def work_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the kernels compute in: fp16 runs as bf16 (its range; fp16 tensor-core sums
    overflow), and everything runs in fp32 under the interpreter, whose bf16 dots are wrong."""
    if _interpreting():
        return torch.float32
    return torch.bfloat16 if dtype == torch.float16 else dtype


def _precision(dtype) -> str:
    """``input_precision`` of the kernels' dots: exact for fp32, tensor cores otherwise."""
    return "ieee" if dtype == torch.float32 else "tf32"


def narrowed(out: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``out`` cast to the caller's ``dtype``, refusing values the cast turns into Inf."""
    if out.dtype == dtype:
        return out
    result = out.to(dtype)
    check_narrowed(out, result)
    return result
