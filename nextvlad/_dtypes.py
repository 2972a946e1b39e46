"""Dtype policy shared by the layers and losses."""

from __future__ import annotations

import torch


def at_least_float32(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` in fp32 if it is bf16/fp16 (statistics and losses are not computed in half
    precision), else unchanged: float64 stays float64 (``.float()`` would round it)."""
    return tensor.to(torch.promote_types(tensor.dtype, torch.float32))
