"""The fits' optimiser (CosineAdam) against torch.optim.Adam + CosineAnnealingLR."""

from __future__ import annotations

import pytest
import torch

from hla_analysis.fit.adam import CosineAdam


def _problem(seed: int, dtype):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(40, 7, generator=g, dtype=dtype)
    b = torch.randn(40, 3, generator=g, dtype=dtype)
    w0 = torch.randn(7, 3, generator=g, dtype=dtype)
    s0 = torch.randn(3, generator=g, dtype=dtype)
    return a, b, w0, s0


def _loss(a, b, w, s):
    # a non-quadratic loss, so that the gradients change sign and size along the way
    return torch.nn.functional.softplus(a @ w * s - b).square().mean()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("steps,lr", [(40, 0.01), (7, 0.3), (1, 0.05)])
def test_cosine_adam_follows_torch_adam_with_cosine_annealing(dtype, steps, lr):
    a, b, w0, s0 = _problem(steps, dtype)
    ours = [w0.clone().requires_grad_(), s0.clone().requires_grad_()]
    theirs = [w0.clone().requires_grad_(), s0.clone().requires_grad_()]
    opt = CosineAdam(ours, lr=lr, steps=steps)
    ref = torch.optim.Adam(theirs, lr=lr)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(ref, T_max=max(steps, 1))
    for step in range(steps):
        for params, o in ((ours, opt), (theirs, ref)):
            o.zero_grad()
            _loss(a, b, *params).backward()
            if step == 2:  # a step where one parameter gets no gradient: its state must not move
                params[1].grad = None
            o.step()
        schedule.step()
        assert opt.lr == pytest.approx(schedule.get_last_lr()[0], rel=4 * 2**-52, abs=1e-300)
        for mine, want in zip(ours, theirs):
            # the same elementwise ops in the same order; a few ulps allow another libm or
            # another vectorisation of sqrt/div between the two code paths
            eps = torch.finfo(dtype).eps
            torch.testing.assert_close(mine, want, rtol=8 * eps * (step + 1), atol=8 * eps * lr * (step + 1))
    assert not torch.equal(ours[0], w0)  # it did move
