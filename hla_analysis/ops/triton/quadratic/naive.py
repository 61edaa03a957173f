"""Plain-torch twins of the quadratic op (:mod:`.autograd`): no Triton, differentiable by autograd.

* :func:`hla`: the twin of ``QuadraticHLAFunction.apply`` on its packed layout (factors
  ``[NF, BH, N, RP]``, values ``[BH, N, DV]``): the weight map ``prod_f (q_f k_f^T)^POW``
  written out, masked when causal, and normalised by its row sums.
* :func:`quadratic_torch`: the blockwise twin of the whole path on the caller's tensors
  (``(num, den)`` over key blocks: O(N) forward memory), the engine of
  ``hla(..., form="quadratic")`` where the kernel does not run (no Triton, or float64).
"""

from __future__ import annotations

import torch


def hla(q, k, v, pow_, causal):
    """Twin of ``QuadraticHLAFunction.apply(q, k, v, pow_, causal, ...)``: the output ``[BH, N, DV]``."""
    w = 1.0
    for qf, kf in zip(q, k):  # NF factor tensors
        w = w * (qf @ kf.transpose(-1, -2)) ** pow_
    if causal:
        w = w.tril()
    return (w @ v) / w.sum(-1, keepdim=True)


def quadratic_torch(qs, ks, v, *, causal: bool, key_padding_mask, block: int = 256):
    """Blockwise torch twin of the quadratic kernel: ``(num, den)`` over key blocks."""
    work = torch.promote_types(v.dtype, torch.float32)
    qs = [q.to(work) for q in qs]
    ks = [k.to(work) for k in ks]
    vv = v.to(work)
    if key_padding_mask is not None:
        ks = [ks[0] * key_padding_mask[..., None].to(work), *ks[1:]]
    n = v.shape[-2]
    num, den = 0, 0
    rows = torch.arange(n, device=v.device)[:, None]
    for start in range(0, n, block):
        sl = slice(start, min(start + block, n))
        tile = qs[0] @ ks[0][..., sl, :].transpose(-1, -2)
        for q, k in zip(qs[1:], ks[1:]):
            tile = tile * (q @ k[..., sl, :].transpose(-1, -2))
        if causal:
            tile = tile * (torch.arange(sl.start, sl.stop, device=v.device)[None, :] <= rows)
        num = num + tile @ vv[..., sl, :]
        den = den + tile.sum(-1, keepdim=True)
    return num, den
