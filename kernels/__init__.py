"""Fused kernels for nextvlad, one file per op (Liger-Kernel layout), installed as ``nextvlad.kernels``."""

from .residual_aggregation import (
    ResidualAggregationFunction,
    compile_for_gpu,
    frame_mask,
    l2_normalize_clusters,
    residual_aggregation,
    residual_aggregation_einsum,
    residual_aggregation_reference,
    resource_usage,
    triton_interpreter_enabled,
)

__all__ = [
    "ResidualAggregationFunction",
    "compile_for_gpu",
    "frame_mask",
    "l2_normalize_clusters",
    "residual_aggregation",
    "residual_aggregation_einsum",
    "residual_aggregation_reference",
    "resource_usage",
    "triton_interpreter_enabled",
]
