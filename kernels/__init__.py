"""Fused kernels for nextvlad, one file per op (Liger-Kernel layout), installed as ``nextvlad.kernels``."""

from .residual_aggregation import (
    l2_normalize_clusters,
    residual_aggregation,
    residual_aggregation_einsum,
    residual_aggregation_reference,
)

__all__ = [
    "l2_normalize_clusters",
    "residual_aggregation",
    "residual_aggregation_einsum",
    "residual_aggregation_reference",
]
