"""Adam as TF1's ``tf.train.AdamOptimizer`` computes it (SPEC 4), the authors' optimizer.

Written by hand because no library offers it: torch.optim.Adam adds epsilon to the bias-corrected
sqrt(v_hat), TF1 adds it to the raw sqrt(v) and folds both bias corrections into the step size
(``training_ops.cc`` ApplyAdam):

    lr_t = lr * sqrt(1 - beta2^t) / (1 - beta1^t)
    m   += (g - m) * (1 - beta1)
    v   += (g^2 - v) * (1 - beta2)
    w   -= lr_t * m / (sqrt(v) + eps)

In torch's terms TF's epsilon is eps / sqrt(1 - beta2^t): 31.6x at step 1, about 1x after a few
thousand steps. The difference matters for tensors with tiny or zero gradients (after per-tensor
clipping of a large tensor, or BN betas with an exact zero gradient), which move up to 0.14 of
their update apart after 6 steps.

The state (``step``, ``exp_avg``, ``exp_avg_sq``) has the names and meaning of torch.optim.Adam's,
so optimizer states saved with either load into the other.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch


class TF1Adam(torch.optim.Optimizer):
    """Adam with TF1's epsilon placement ("epsilon hat"); no weight decay, no amsgrad.

    Each tensor counts its own steps, as torch.optim.Adam does (TF1 shares one beta power per
    graph; the two agree whenever every tensor gets a gradient at every step, as in training).
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
    ) -> None:
        if lr < 0 or eps < 0 or not all(0.0 <= beta < 1.0 for beta in betas):
            raise ValueError(f"TF1Adam needs lr >= 0, eps >= 0 and betas in [0, 1), got {lr}, {eps}, {betas}")
        super().__init__(params, {"lr": lr, "betas": tuple(betas), "eps": eps})

    @torch.no_grad()
    def step(self, closure: Callable[[], torch.Tensor] | None = None) -> torch.Tensor | None:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if params:
                self._update(group, params)
        return loss

    def _update(self, group: dict[str, Any], params: list[torch.Tensor]) -> None:
        beta1, beta2 = group["betas"]
        for p in params:
            if p.grad.is_sparse:
                raise RuntimeError("TF1Adam does not support sparse gradients")
            state = self.state[p]
            if not state:
                state["step"] = torch.tensor(0.0)  # on the CPU like torch.optim.Adam's: no device sync
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        states = [self.state[p] for p in params]
        grads = [p.grad for p in params]
        exp_avgs = [s["exp_avg"] for s in states]
        exp_avg_sqs = [s["exp_avg_sq"] for s in states]
        for s in states:
            s["step"] += 1
        torch._foreach_lerp_(exp_avgs, grads, 1 - beta1)
        torch._foreach_mul_(exp_avg_sqs, beta2)  # = v + (g^2 - v)(1 - beta2) without a copy of g^2
        torch._foreach_addcmul_(exp_avg_sqs, grads, grads, 1 - beta2)
        denominators = torch._foreach_sqrt(exp_avg_sqs)
        torch._foreach_add_(denominators, group["eps"])
        step_sizes = [-_tf1_step_size(group["lr"], beta1, beta2, int(s["step"])) for s in states]
        torch._foreach_addcdiv_(params, exp_avgs, denominators, step_sizes)


def _tf1_step_size(lr: float, beta1: float, beta2: float, step: int) -> float:
    """TF1's lr_t = lr * sqrt(1 - beta2^t) / (1 - beta1^t) for the 1-based step t."""
    return lr * math.sqrt(1 - beta2**step) / (1 - beta1**step)
