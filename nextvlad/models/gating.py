"""Squeeze-and-excitation context gating (SPEC 3.2; paper Fig. 4)."""

from __future__ import annotations

import torch
from torch import nn

from nextvlad._validation import check_positive_int
from nextvlad.models.initialization import tf_batch_norm, tf_linear


class SEContextGating(nn.Module):
    """``h * sigmoid(W2 relu(BN(W1 h)))`` with bias-free W1 (H -> H/r) and W2 (H/r -> H).

    As in the authors' code there is no BN after the second projection.
    """

    def __init__(self, hidden_size: int, reduction: int = 8) -> None:
        super().__init__()
        check_positive_int(hidden_size=hidden_size, gating_reduction=reduction)
        if hidden_size % reduction:
            raise ValueError(f"gating_reduction={reduction} must divide hidden_size={hidden_size}")
        squeezed = hidden_size // reduction
        self.squeeze = tf_linear(hidden_size, squeezed, bias=False)
        self.squeeze_bn = tf_batch_norm(squeezed, fused=True)  # the authors' gating_bn
        self.excite = tf_linear(squeezed, hidden_size, bias=False)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        gates = torch.sigmoid(self.excite(torch.relu(self.squeeze_bn(self.squeeze(hidden)))))
        return hidden * gates
