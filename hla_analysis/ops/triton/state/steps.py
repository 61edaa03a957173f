"""The Triton HLA pipeline split into differentiable steps, so that work can sit between them.

:class:`HLAFunction` fuses state, apply and backward in one ``autograd.Function``. Sequence
parallelism needs a collective between the state and its use, so here each step is its own
``autograd.Function`` over the same launchers (flat tensors ``[BH, N, r]``, see
:mod:`.autograd`):

* :class:`TotalState`: ``(k1, k2, v) -> (S [BH, R, dv], z [BH, R1, R2])``, both fp32, the
  non-causal state of these keys;
* :class:`ApplyState`: ``(q1, q2, S, z) -> (o, den)``, the non-causal output from a given state;
* :class:`CausalFromState`: ``(q1, q2, k1, k2, v, S0, z0) -> (o, den)``, the causal chunked
  form started from the state ``(S0, z0)`` of keys before this sequence (gradients for the
  initial state included).

``den`` (fp32, ``[BH, N]``) is returned, not checked: the caller decides how to refuse a
non-positive normaliser (the distributed caller agrees with the other ranks first).
"""

from __future__ import annotations

import torch

from hla_analysis.ops.triton.config import default_config
from hla_analysis.ops.triton.state.autograd import apply_states, compute_states, factor_grads, transposed


def step_config(q1, q2, v, *, causal: bool) -> dict:
    """:func:`default_config` for flat inputs, with the causal chunk checked against the blocks."""
    r2 = 1 if q2 is None else q2.shape[-1]
    cfg = default_config(r1=q1.shape[-1], r2=r2, dv=v.shape[-1], causal=causal, dtype=v.dtype)
    return cfg


def _grad_of_output(grad, o, den, dtype):
    """``o = num / den``: ``d num = g / den`` (compute dtype), ``d den = -(g . o) / den`` (fp32)."""
    grad = grad.contiguous()
    dnum = (grad.float() / den[..., None]).to(dtype)
    dden = (-(grad.float() * o.float()).sum(-1) / den).contiguous()
    return dnum, dden


def _as_state(s, z, bh, r1, r2, dtype):
    """fp32 ``[BH, R, dv]``, ``[BH, R1, R2]`` -> the launchers' one-chunk layout."""
    return (s.to(dtype).reshape(bh, 1, r1 * r2, -1).contiguous(),
            z.float().reshape(bh, 1, r1, r2).contiguous())


class TotalState(torch.autograd.Function):
    """``S = sum_n kr(k_n) (x) v_n`` and ``z = sum_n k1_n (x) k2_n``, fp32."""

    @staticmethod
    def forward(ctx, k1, k2, v, cfg):
        k1t = transposed(k1, k2, cfg)
        s, z = compute_states(k1, k2, v, None, mode="total", cfg=cfg, f1t=k1t)
        ctx.save_for_backward(k1, k2, v, k1t)
        ctx.cfg = cfg
        bh = k1.shape[0]
        return s.float().reshape(bh, s.shape[-2], s.shape[-1]), z.reshape(bh, *z.shape[-2:])

    @staticmethod
    def backward(ctx, ds, dz):
        k1, k2, v, k1t = ctx.saved_tensors
        r2 = 1 if k2 is None else k2.shape[-1]
        ds = torch.zeros((k1.shape[0], k1.shape[-1] * r2, v.shape[-1]), device=v.device) if ds is None else ds
        dz = torch.zeros((k1.shape[0], k1.shape[-1], r2), device=v.device) if dz is None else dz
        s, z = _as_state(ds, dz, k1.shape[0], k1.shape[-1], r2, v.dtype)
        # key side, non-causal: the query-side arguments are not read
        dk1, dk2, dv = factor_grads(k1, k2, v, None, k1, k2, v, None, s, z,
                                    causal=False, query_side=False, cfg=ctx.cfg, x1t=k1t)
        return dk1.to(k1.dtype), None if dk2 is None else dk2.to(k1.dtype), dv.to(v.dtype), None


class ApplyState(torch.autograd.Function):
    """Non-causal ``o = (kr(q) S) / (kr(q) . z)`` from a given state; also returns ``den``."""

    @staticmethod
    def forward(ctx, q1, q2, s, z, dv_like, cfg):
        bh, n, r1 = q1.shape
        r2 = 1 if q2 is None else q2.shape[-1]
        st, zt = _as_state(s, z, bh, r1, r2, dv_like.dtype)
        q1t = transposed(q1, q2, cfg)
        # the non-causal apply reads no keys or values: they only give the output's shape
        o, den = apply_states(q1, q2, q1, q2, dv_like, st, zt, causal=False, cfg=cfg, q1t=q1t)
        ctx.save_for_backward(q1, q2, o, den, st, zt, q1t)
        ctx.cfg = cfg
        ctx.mark_non_differentiable(den)
        return o, den

    @staticmethod
    def backward(ctx, grad, _grad_den):
        q1, q2, o, den, st, zt, q1t = ctx.saved_tensors
        dnum, dden = _grad_of_output(grad, o, den, o.dtype)
        ds, dz = compute_states(q1, q2, dnum, dden, mode="total", cfg=ctx.cfg, f1t=q1t)
        dq1, dq2, _ = factor_grads(q1, q2, dnum, dden, q1, q2, dnum, None, st, zt,
                                   causal=False, query_side=True, cfg=ctx.cfg, x1t=q1t)
        bh = q1.shape[0]
        return (dq1.to(q1.dtype), None if dq2 is None else dq2.to(q1.dtype),
                ds.float().reshape(bh, *ds.shape[-2:]), dz.reshape(bh, *dz.shape[-2:]), None, None)


class CausalFromState(torch.autograd.Function):
    """Causal chunked HLA whose every prefix state starts at ``(S0, z0)`` (fp32); returns ``(o, den)``."""

    @staticmethod
    def forward(ctx, q1, q2, k1, k2, v, s0, z0, cfg):
        initial = (s0.float().contiguous(), z0.float().contiguous())
        k1t = transposed(k1, k2, cfg)
        s, z = compute_states(k1, k2, v, None, mode="prefix", cfg=cfg, f1t=k1t, initial=initial)
        o, den = apply_states(q1, q2, k1, k2, v, s, z, causal=True, cfg=cfg)
        ctx.save_for_backward(q1, q2, k1, k2, v, o, den, s, z, k1t)
        ctx.cfg = cfg
        ctx.mark_non_differentiable(den)
        return o, den

    @staticmethod
    def backward(ctx, grad, _grad_den):
        q1, q2, k1, k2, v, o, den, s, z, k1t = ctx.saved_tensors
        cfg = ctx.cfg
        dnum, dden = _grad_of_output(grad, o, den, v.dtype)
        q1t = transposed(q1, q2, cfg)
        ds, dz = compute_states(q1, q2, dnum, dden, mode="suffix", cfg=cfg, f1t=q1t)
        dq1, dq2, _ = factor_grads(q1, q2, dnum, dden, k1, k2, v, None, s, z,
                                   causal=True, query_side=True, cfg=cfg, x1t=q1t)
        dk1, dk2, dv = factor_grads(k1, k2, v, None, q1, q2, dnum, dden, ds, dz,
                                    causal=True, query_side=False, cfg=cfg, x1t=k1t)
        # every query reads the initial state: its gradient is the query side's total state
        ds0, dz0 = compute_states(q1, q2, dnum, dden, mode="total", cfg=cfg, f1t=q1t)
        bh = q1.shape[0]
        cast = lambda t, like: None if t is None else t.to(like.dtype)  # noqa: E731
        return (cast(dq1, q1), cast(dq2, q1), cast(dk1, k1), cast(dk2, k1), cast(dv, v),
                ds0.float().reshape(bh, *ds0.shape[-2:]), dz0.reshape(bh, *dz0.shape[-2:]), None)
