"""Fused kernels for nextvlad, installed as ``nextvlad.kernels``. Per op (Liger-Kernel layout): the
public op with validation, dispatch and its torch.library registration (``<op>.py``), the Triton
kernels and launchers (``<op>_triton.py``) and the PyTorch references (``<op>_reference.py``)."""

from .residual_aggregation import residual_aggregation, triton_interpreter_enabled
from .residual_aggregation_reference import (
    frame_mask,
    l2_normalize_clusters,
    residual_aggregation_einsum,
    residual_aggregation_reference,
)

__all__ = [
    "frame_mask",
    "l2_normalize_clusters",
    "residual_aggregation",
    "residual_aggregation_einsum",
    "residual_aggregation_reference",
    "triton_interpreter_enabled",
]
