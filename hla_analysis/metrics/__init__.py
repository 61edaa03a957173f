"""How far an attention map is from softmax: per-row metrics and streamed whole-head metrics.

Rows are blocks ``[..., R, N]`` (query rows, then keys) with a bool ``allowed`` mask of the
same shape. ``rows`` holds the per-row functions, ``streaming`` the accumulator that walks a
head block by block so no ``N x N`` map is ever held whole.

Examples
--------
>>> import torch
>>> from hla_analysis.metrics import head_metrics
>>> p = torch.softmax(torch.tensor([[2.0, 1.0, 0.0]]), dim=-1)
>>> m = head_metrics(p, p)
>>> m["kl_mean"], m["topk_recall_mean"], m["failed_fraction"]
(0.0, 1.0, 0.0)
"""

from hla_analysis.metrics.rows import (
    KL_EPS,
    average_ranks,
    entropy_rows,
    failed_approximation_rows,
    js_divergence_rows,
    kl_divergence_rows,
    spearman_rows,
    topk_recall_rows,
    total_variation_rows,
)
from hla_analysis.metrics.streaming import StreamingAttentionMetrics, head_metrics, stream_head_metrics

__all__ = [
    "KL_EPS",
    "StreamingAttentionMetrics",
    "average_ranks",
    "entropy_rows",
    "failed_approximation_rows",
    "head_metrics",
    "js_divergence_rows",
    "kl_divergence_rows",
    "spearman_rows",
    "stream_head_metrics",
    "topk_recall_rows",
    "total_variation_rows",
]
