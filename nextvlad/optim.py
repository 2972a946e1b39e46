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

The update runs as torch.optim.Adam's (fused where torch has a fused kernel for the parameters'
device: one pass over parameter, gradient and both moments instead of six foreach passes) with
torch's epsilon set to ``eps / sqrt(1 - beta2^t)`` for the step t, which is TF1's update exactly
(the algebra above); tensors at different step counts are updated in one call per count.

The state (``step``, ``exp_avg``, ``exp_avg_sq``) has the names and meaning of torch.optim.Adam's,
so optimizer states saved with either load into the other; ``tf1_step`` keeps the step count on
the host as well (reading ``step``, on the device when fused, would wait for the GPU every step).
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch.optim.adam import adam as adam_update


class TF1Adam(torch.optim.Optimizer):
    """Adam with TF1's epsilon placement ("epsilon hat"); no weight decay, no amsgrad.

    Each tensor counts its own steps, as torch.optim.Adam does (TF1 shares one beta power per
    graph; the two agree whenever every tensor gets a gradient at every step, as in training).
    ``fused``: torch's fused Adam kernel (default: where torch has one for every parameter's
    device), else its foreach implementation; both compute TF1's update.
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        fused: bool | None = None,
    ) -> None:
        if lr < 0 or eps < 0 or not all(0.0 <= beta < 1.0 for beta in betas):
            raise ValueError(f"TF1Adam needs lr >= 0, eps >= 0 and betas in [0, 1), got {lr}, {eps}, {betas}")
        super().__init__(params, {"lr": lr, "betas": tuple(betas), "eps": eps})
        devices = {p.device.type for group in self.param_groups for p in group["params"]}
        self.fused = devices <= set(_FUSED_DEVICES) if fused is None else fused

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
        by_step: dict[int, list[torch.Tensor]] = defaultdict(list)
        for p in params:
            if p.grad.is_sparse:
                raise RuntimeError("TF1Adam does not support sparse gradients")
            state = self._state_of(p)
            state["tf1_step"] += 1
            by_step[state["tf1_step"]].append(p)
        for step, tensors in by_step.items():
            states = [self.state[p] for p in tensors]
            adam_update(
                tensors, [p.grad for p in tensors], [s["exp_avg"] for s in states], [s["exp_avg_sq"] for s in states],
                [], [s["step"] for s in states], foreach=None if self.fused else True, fused=self.fused or None,
                amsgrad=False, beta1=beta1, beta2=beta2, lr=group["lr"], weight_decay=0.0,
                eps=group["eps"] / math.sqrt(1 - beta2**step), maximize=False)

    def _state_of(self, p: torch.Tensor) -> dict[str, Any]:
        """The tensor's state, made at its first step (as torch.optim.Adam's: ``step`` on the device
        when fused, on the CPU otherwise), ``tf1_step`` added to a state loaded from a checkpoint."""
        state = self.state[p]
        if not state:
            device = p.device if self.fused else torch.device("cpu")
            state["step"] = torch.tensor(0.0, dtype=torch.float32, device=device)
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        elif self.fused and state["step"].device != p.device:  # a state saved by a foreach run
            state["step"] = state["step"].to(device=p.device, dtype=torch.float32)
        if "tf1_step" not in state:  # once per tensor after a load: one read of the step
            state["tf1_step"] = int(state["step"])
        return state


#: Device types whose parameters torch's fused Adam kernel updates.
_FUSED_DEVICES = ("cpu", "cuda")
