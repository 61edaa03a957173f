"""Sequence-parallel HLA: the tokens sharded over the ranks of a torch.distributed group.

HLA's state ``S = sum_j k_j^(1) (x) ... (x) k_j^(M) (x) [v_j, 1]`` is a sum over tokens, so
each rank sums its own shard and the ranks combine the partial states (LASP-2 style):

* non-causal: one ``all_reduce`` of the local states gives every rank the full state;
* causal: one ``all_gather`` of the local states gives every rank the exclusive prefix over
  the ranks before it, the initial state of its chunked form.

The collectives are ``autograd.Function`` s (the gradient of an all-reduce is an all-reduce;
that of the rank prefix is the suffix sum over the ranks after, from one all-gather), so
the backward is exact. The transport is whatever the caller's process group uses (NCCL on
GPUs, gloo on CPU); this module never creates a process group.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence

import torch
import torch.distributed as dist
from torch import Tensor

from hla_analysis._checks import (
    as_factors,
    broadcast_leading,
    check_factor_lists,
    check_mask_leading_dims,
    check_stacked_against_values,
    check_values,
)

# the torch forms share the state layout [..., r_1, r_2 * ... * r_M * (dv + 1)]
from hla_analysis.ops.hla import BACKENDS, _blocks, _chunked, _key_state, _query_apply

__all__ = ["hla_sequence_parallel"]

_MESSAGE_BYTES = 1024  # room for one rank's error message in the failure exchange
# torch 2.13 renamed all_gather_into_tensor to all_gather_single (same arguments)
_all_gather_flat = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


class _AllReduceSum(torch.autograd.Function):
    """``y = sum over ranks of x``; every rank's output feeds its loss, so ``dx = sum of dy``."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        y = x.contiguous().clone()
        dist.all_reduce(y, group=group)
        return y

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


def _gather(x: Tensor, group) -> Tensor:
    """``[world, *x.shape]``: every rank's ``x``, in rank order (one all-gather)."""
    world = dist.get_world_size(group)
    out = torch.empty((world * x.numel(),), device=x.device, dtype=x.dtype)
    _all_gather_flat(out, x.contiguous().view(-1), group=group)
    return out.view(world, *x.shape)


class _ExclusiveRankPrefix(torch.autograd.Function):
    """``y_r = sum_{p < r} x_p``, so ``dx_p = sum_{r > p} dy_r`` (the suffix; one all-gather each way)."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        rank = dist.get_rank(group)
        return _gather(x, group)[:rank].sum(0)

    @staticmethod
    def backward(ctx, grad):
        rank = dist.get_rank(ctx.group)
        return _gather(grad, ctx.group)[rank + 1:].sum(0), None


def _agree(error: str | None, signature: str, group, device) -> None:
    """Raise on every rank if any rank failed its checks or the ranks' inputs disagree.

    One small all-gather of ``[failed, crc(signature)]``; the failing ranks' messages are
    exchanged only on failure, so that each rank raises the same sentence and none waits in a
    collective that the others never reach.
    """
    mine = torch.tensor([error is not None, zlib.crc32(signature.encode())], dtype=torch.int64, device=device)
    flags = _gather(mine, group).cpu()
    failed = [r for r in range(flags.shape[0]) if flags[r, 0]]
    if failed:
        text = (error or "").encode()[:_MESSAGE_BYTES]
        buf = torch.zeros(_MESSAGE_BYTES, dtype=torch.uint8)
        buf[: len(text)] = torch.tensor(list(text), dtype=torch.uint8)
        messages = _gather(buf.to(device), group).cpu()
        first = bytes(messages[failed[0]].tolist()).rstrip(b"\0").decode(errors="replace")
        raise ValueError(f"hla_sequence_parallel: rank {failed[0]} refused its inputs "
                         f"(failing ranks {failed}): {first}")
    if len(set(flags[:, 1].tolist())) > 1:
        raise ValueError(
            "hla_sequence_parallel: the ranks' inputs disagree in factor count, widths, value width, "
            "leading (batch/head) dims, dtype, mask presence, causal or backend; every rank must pass "
            f"its shard of the same problem (this rank: {signature})."
        )


def _check_normalizers_everywhere(den: Tensor, *, allow_signed: bool, group) -> None:
    """:func:`hla_analysis._checks.check_normalizers` over all ranks' rows, raised on every rank."""
    d = den.detach()
    counts = torch.stack([
        (~torch.isfinite(d)).sum(),
        torch.zeros((), dtype=torch.int64, device=d.device) if allow_signed else (d <= 0).sum(),
        (d == 0).sum(),
        torch.tensor(d.numel(), device=d.device),
    ]).to(torch.int64)
    dist.all_reduce(counts, group=group)
    nonfinite, bad, zero, total = counts.tolist()
    if nonfinite:
        raise ValueError(
            f"{nonfinite} of {total} row normalizer(s) over all ranks overflowed to Inf/NaN: the feature "
            "products are too large for this dtype. Rescale q/k or use float64."
        )
    if bad:
        raise ValueError(
            f"{bad} of {total} row(s) over all ranks have a zero or negative normalizer "
            f"sum_l prod_m s_il <= 0 ({zero} exactly zero). Negative: sign-indefinite features; zero: "
            "a row whose similarities vanish, or whose keys (at or before it, if causal) are all "
            "masked. Use a strictly positive feature map, unmask a key per row, or pass "
            "allow_signed=True to get the signed result."
        )


def _check_local(qs, ks, v, key_padding_mask, *, causal, chunk_size, backend):
    """hla()'s input checks on this rank's shard; returns the checked factor lists."""
    if isinstance(v, Tensor):
        check_stacked_against_values(qs, v)
    qs, ks = as_factors(qs, "qs"), as_factors(ks, "ks")
    check_factor_lists(qs, ks)
    n_queries, n_keys = qs[0].shape[-2], ks[0].shape[-2]
    check_values(v, n_keys)
    broadcast_leading({"qs[0]": qs[0], "ks[0]": ks[0], "v": v})
    if n_queries != n_keys:
        raise ValueError(f"each rank needs as many queries as keys (its shard of one sequence), got "
                         f"{n_queries} and {n_keys}.")
    if not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}.")
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}.")
    if key_padding_mask is not None:
        # rows left without any key are a global property: the normaliser check finds them
        if not isinstance(key_padding_mask, Tensor) or key_padding_mask.dtype != torch.bool:
            raise ValueError("key_padding_mask must be a bool tensor [..., N_local] (True = real token).")
        if key_padding_mask.shape[-1] != n_keys:
            raise ValueError(f"key_padding_mask has {key_padding_mask.shape[-1]} entries per row but this "
                             f"rank holds {n_keys} keys; pass the mask's shard beside the tokens' shard.")
        check_mask_leading_dims(key_padding_mask, *qs, *ks, v)
    return qs, ks


def _choose_backend(qs, ks, v, key_padding_mask, *, causal, backend) -> str:
    if backend == "torch":
        return "torch"
    from hla_analysis.ops import triton_backend

    explicit = backend == "triton"
    if triton_backend.usable(qs, ks, v, causal=causal, key_padding_mask=key_padding_mask, explicit=explicit):
        return "triton"
    if explicit:
        raise ValueError(triton_backend.why_not(qs, ks, v, causal=causal, key_padding_mask=key_padding_mask))
    return "torch"


def _signature(qs, ks, v, key_padding_mask, *, causal, backend) -> str:
    """Everything that fixes the state's shape and the path taken; the token count is left out."""
    lead = torch.broadcast_shapes(*(t.shape[:-2] for t in (*qs, *ks, v)))
    return (f"M={len(qs)} widths={[q.shape[-1] for q in qs]} dv={v.shape[-1]} lead={tuple(lead)} "
            f"dtype={v.dtype} mask={key_padding_mask is not None} causal={bool(causal)} backend={backend}")


def _torch_path(qs, ks, v, key_padding_mask, *, causal, chunk_size, group):
    work = torch.promote_types(v.dtype, torch.float32)
    qs = [q.to(work) for q in qs]
    ks = [k.to(work) for k in ks]
    values = torch.cat([v.to(work), torch.ones_like(v[..., :1], dtype=work)], -1)
    if key_padding_mask is not None:
        values = values * key_padding_mask[..., None].to(work)
    block = max(chunk_size, 256)
    local = None
    for sl in _blocks(ks[0].shape[-2], block):
        part = _key_state([k[..., sl, :] for k in ks], values[..., sl, :])
        local = part if local is None else local + part
    if causal:
        initial = _ExclusiveRankPrefix.apply(local, group)
        out = _chunked(qs, ks, values, chunk=chunk_size, initial_state=initial)
    else:
        state = _AllReduceSum.apply(local, group)
        out = torch.cat([_query_apply([q[..., sl, :] for q in qs], state)
                         for sl in _blocks(qs[0].shape[-2], block)], -2)
    return out[..., :-1], out[..., -1:]


def _triton_path(qs, ks, v, key_padding_mask, *, causal, group):
    from hla_analysis.ops.triton import _lead_shape
    from hla_analysis.ops.triton.state.steps import ApplyState, CausalFromState, TotalState, step_config

    if key_padding_mask is not None:  # a zero first key factor removes the key everywhere
        ks = [ks[0] * key_padding_mask[..., None].to(ks[0].dtype), *ks[1:]]
    work = torch.bfloat16 if v.dtype == torch.float16 else v.dtype  # fp16 states overflow
    lead = _lead_shape([*qs, *ks, v])
    n = v.shape[-2]

    def flat(t):
        t = t.to(work).expand(*lead, *t.shape[-2:])
        return t.reshape(-1, n, t.shape[-1]).contiguous()

    q1, k1, vf = flat(qs[0]), flat(ks[0]), flat(v)
    q2, k2 = (flat(qs[1]), flat(ks[1])) if len(qs) == 2 else (None, None)
    # one collective for both parts of the state: S [BH, R, dv] and z [BH, R1, R2], fp32
    s, z = TotalState.apply(k1, k2, vf, step_config(k1, k2, vf, causal=False))
    packed = torch.cat([s.flatten(1), z.flatten(1)], 1)
    if causal:
        packed = _ExclusiveRankPrefix.apply(packed, group)
    else:
        packed = _AllReduceSum.apply(packed, group)
    s, z = packed[:, : s[0].numel()].view_as(s), packed[:, s[0].numel():].view_as(z)
    if causal:
        o, den = CausalFromState.apply(q1, q2, k1, k2, vf, s, z, step_config(q1, q2, vf, causal=True))
    else:
        o, den = ApplyState.apply(q1, q2, s, z, torch.empty_like(vf), step_config(q1, q2, vf, causal=False))
    return o.reshape(*lead, n, v.shape[-1]).to(v.dtype), den.reshape(*lead, n, 1)


def hla_sequence_parallel(
    qs: Tensor | Sequence[Tensor],
    ks: Tensor | Sequence[Tensor],
    v: Tensor,
    *,
    causal: bool = False,
    key_padding_mask: Tensor | None = None,
    group: dist.ProcessGroup | None = None,
    chunk_size: int = 64,
    allow_signed: bool = False,
    backend: str = "auto",
) -> Tensor:
    """HLA over a sequence sharded across the ranks of ``group``; each rank gets its output shard.

    Rank ``p`` holds the contiguous token range ``[N_0 + ... + N_{p-1}, ... + N_p)`` of one
    sequence (shards may be uneven). The result on every rank equals the matching rows of
    :func:`hla_analysis.ops.hla` on the whole sequence, and so do the gradients.

    Non-causal: the local states are summed by one ``all_reduce``. Causal: one ``all_gather``
    of the local states gives each rank the state of the ranks before it, the initial state
    of its chunked form. Every rank must call this function with the same options.

    Parameters
    ----------
    qs, ks : sequence of Tensor or Tensor
        This rank's shard: ``M`` tensors ``[..., N_local, r_m]`` or one stacked
        ``[..., M, N_local, r]`` (as in :func:`~hla_analysis.ops.hla`).
    v : Tensor
        Values ``[..., N_local, dv]``.
    causal : bool
        Global token ``i`` attends to global tokens ``j <= i``.
    key_padding_mask : Tensor, optional
        Bool ``[..., N_local]``, this rank's shard of the mask; True for real tokens.
    group : ProcessGroup, optional
        The caller's initialised process group (default: the world group). Never created here.
    chunk_size : int
        Tokens per chunk of the torch chunked form (the Triton kernels pick their own).
    allow_signed : bool
        Return the signed ratio instead of raising on a non-positive normaliser.
    backend : str
        ``"torch"``, ``"triton"`` (fused kernels, M <= 2) or ``"auto"`` (Triton for CUDA
        inputs it supports, else torch).

    Returns
    -------
    Tensor
        This rank's output shard ``[..., N_local, dv]`` in the dtype of ``v``.

    Raises
    ------
    ValueError
        On every rank, after the ranks have agreed (no rank is left waiting in a collective):
        a rank's bad input (the message names the rank), ranks whose shards disagree in shape,
        dtype or options, or non-positive normalisers anywhere (unless ``allow_signed``).
        Also when no process group is initialised.

    Examples
    --------
    Inside an initialised process group (e.g. under ``torchrun``), each rank passes its shard::

        rank, world = dist.get_rank(), dist.get_world_size()
        shard = slice(rank * n // world, (rank + 1) * n // world)
        out = hla_sequence_parallel([q1[..., shard, :], q2[..., shard, :]],
                                    [k1[..., shard, :], k2[..., shard, :]], v[..., shard, :],
                                    causal=True)
    """
    if not dist.is_available() or not dist.is_initialized():
        raise ValueError("hla_sequence_parallel needs an initialised torch.distributed process group "
                         "(e.g. run under torchrun and call dist.init_process_group first).")
    group = dist.group.WORLD if group is None else group
    device = v.device if isinstance(v, Tensor) else torch.device("cpu")
    error, signature, path = None, "", "torch"
    try:
        qs, ks = _check_local(qs, ks, v, key_padding_mask, causal=causal, chunk_size=chunk_size, backend=backend)
        path = _choose_backend(qs, ks, v, key_padding_mask, causal=causal, backend=backend)
        signature = _signature(qs, ks, v, key_padding_mask, causal=causal, backend=path)
    except ValueError as exc:
        error = str(exc)
    _agree(error, signature, group, device)

    if path == "triton":
        out, den = _triton_path(qs, ks, v, key_padding_mask, causal=causal, group=group)
        _check_normalizers_everywhere(den, allow_signed=allow_signed, group=group)
        return out
    num, den = _torch_path(qs, ks, v, key_padding_mask, causal=causal, chunk_size=chunk_size, group=group)
    _check_normalizers_everywhere(den, allow_signed=allow_signed, group=group)
    return (num / den).to(v.dtype)
