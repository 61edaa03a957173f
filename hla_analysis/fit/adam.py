"""Adam with a cosine-annealed learning rate: the fits' optimiser, without ``torch.optim``.

``torch.optim.Optimizer`` imports ``torch._dynamo`` on first use: 2.7 s of a 30 s CPU
comparison (measured on 2 cores, torch 2.13), paid once per process for 40-step fits of a few
hundred parameters. :class:`CosineAdam` does the same arithmetic as ``torch.optim.Adam``
(default betas and eps, no weight decay, single-tensor form) stepped by
``CosineAnnealingLR(T_max=steps, eta_min=0)``, op for op, so the fitted parameters are those
of the torch pair up to float rounding (``tests/test_fit_adam.py`` compares them).
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import Tensor


class CosineAdam:
    """``Adam(params, lr)`` whose learning rate follows a cosine from ``lr`` to 0 over ``steps``.

    Call :meth:`zero_grad`, backward, then :meth:`step` (the optimiser step followed by the
    schedule's step, as ``optimiser.step(); scheduler.step()``).
    """

    def __init__(self, params: Iterable[Tensor], *, lr: float, steps: int,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8):
        self.params = list(params)
        self.base_lr = self.lr = float(lr)
        self.t_max = max(int(steps), 1)
        self.betas, self.eps = betas, eps
        self.exp_avg = [torch.zeros_like(p, memory_format=torch.preserve_format) for p in self.params]
        self.exp_avg_sq = [torch.zeros_like(p, memory_format=torch.preserve_format) for p in self.params]
        self.steps_taken = [0] * len(self.params)  # Adam's step count, per parameter (as torch keeps it)
        self.epoch = 0  # the schedule's step count (CosineAnnealingLR's last_epoch)

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None

    @torch.no_grad()
    def step(self) -> None:
        beta1, beta2 = self.betas
        for i, (p, exp_avg, exp_avg_sq) in enumerate(zip(self.params, self.exp_avg, self.exp_avg_sq)):
            grad = p.grad
            if grad is None:
                continue
            self.steps_taken[i] += 1
            step = float(self.steps_taken[i])
            exp_avg.lerp_(grad, 1 - beta1)
            exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
            bias_correction1 = 1 - beta1**step
            bias_correction2 = 1 - beta2**step
            step_size = self.lr / bias_correction1
            denom = (exp_avg_sq.sqrt() / bias_correction2**0.5).add_(self.eps)
            p.addcdiv_(exp_avg, denom, value=-step_size)
        self._schedule()

    def _schedule(self) -> None:
        """CosineAnnealingLR's recursive update with ``eta_min = 0`` (its chainable form)."""
        self.epoch += 1
        e, t = self.epoch, self.t_max
        if (e - 1 - t) % (2 * t) == 0:
            self.lr = self.lr + self.base_lr * (1 - math.cos(math.pi / t)) / 2
        else:
            self.lr = (1 + math.cos(math.pi * e / t)) / (1 + math.cos(math.pi * (e - 1) / t)) * self.lr
