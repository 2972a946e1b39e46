"""The NeXtVLAD aggregation layer (paper section 3.2, authors' ``NeXtVLAD.forward``, SPEC 3.1)."""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

from nextvlad._validation import check_choice, check_positive_int
from nextvlad.kernels import residual_aggregation
from nextvlad.kernels import frame_mask
from nextvlad.models.initialization import (
    MaskedBatchNorm1d,
    tf_batch_norm,
    tf_linear,
    variance_scaling_,
)

ClusterBNStatistics = Literal["all", "masked"]


class NeXtVLAD(nn.Module):
    """Aggregates (B, M, N) frame features into a (B, K * D) video descriptor, D = expansion*N/G.

    Steps (SPEC 3.1): expansion FC (bias) -> per-group sigmoid attention from the expanded frame
    (bias) -> cluster logits from the full expanded frame (no bias) -> cluster BN -> softmax over K
    -> residuals to shared centroids summed over real frames and groups (the fused op) -> intra L2
    normalisation over D -> flatten in TF's d*K+k order -> vlad BN.

    Args:
        feature_size: N, input features per frame.
        clusters: K.
        groups: G; must divide expansion * feature_size.
        expansion: lambda.
        cluster_bn_statistics: "all" takes cluster-BN moments over every padded row as the
            authors' code does; "masked" over real frames only.
        backend: aggregation backend passed to ``residual_aggregation``.
    """

    def __init__(
        self,
        feature_size: int,
        clusters: int,
        groups: int,
        expansion: int = 2,
        cluster_bn_statistics: ClusterBNStatistics = "all",
        backend: str = "auto",
    ) -> None:
        super().__init__()
        check_positive_int(feature_size=feature_size, clusters=clusters, groups=groups, expansion=expansion)
        expanded = expansion * feature_size
        if expanded % groups:
            raise ValueError(
                f"groups={groups} must divide expansion*feature_size={expansion}*{feature_size}={expanded}"
            )
        check_choice("cluster_bn_statistics", cluster_bn_statistics, ("all", "masked"))
        self.feature_size, self.clusters, self.groups = feature_size, clusters, groups
        self.group_size = expanded // groups
        self.cluster_bn_statistics = cluster_bn_statistics
        self.backend = backend

        self.expansion_fc = tf_linear(feature_size, expanded)
        self.group_attention = tf_linear(expanded, groups)
        self.cluster_logits = tf_linear(expanded, groups * clusters, bias=False)
        self.cluster_bn = MaskedBatchNorm1d(groups * clusters, fused=False)
        # (K, D) for the aggregation op; TF stores it as [1, D, K] with fan_in D.
        self.centroids = nn.Parameter(variance_scaling_(torch.empty(clusters, self.group_size), self.group_size))
        self.vlad_bn = tf_batch_norm(self.output_size, fused=False)

    @property
    def output_size(self) -> int:
        return self.clusters * self.group_size

    def forward(self, frames: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        self.check_frames(frames)
        return self.aggregate(self.expansion_fc(frames), lengths)

    def check_frames(self, frames: torch.Tensor) -> None:
        """ValueError unless ``frames`` has ``feature_size`` features per frame."""
        if frames.shape[-1] != self.feature_size:
            raise ValueError(f"NeXtVLAD expects {self.feature_size} features per frame, got {frames.shape[-1]}")

    def aggregate(self, expanded: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """Everything after the expansion FC, from ``expanded`` (B, M, expansion * N).

        Separate so that a mixture can run its branches' expansion FCs as one GEMM.
        """
        batch, max_frames, _ = expanded.shape
        attention = self.group_attention(expanded)
        logits = self.cluster_logits(expanded).flatten(0, 1)  # (B * M, G * K)
        mask = frame_mask(lengths, max_frames).reshape(-1) if self.cluster_bn_statistics == "masked" else None
        logits = self.cluster_bn(logits, mask)
        vlad = residual_aggregation(
            expanded.reshape(batch, max_frames, self.groups, self.group_size),
            logits.reshape(batch, max_frames, self.groups, self.clusters).to(expanded.dtype),
            attention,
            lengths,
            self.centroids,  # fp32 master copy: the op accepts any float dtype here
            backend=self.backend,
            normalize=True,  # intra-normalisation over D per cluster (SPEC 3.1 step 8), done by the op
        )
        return self.vlad_bn(flatten_like_tf(vlad))


def flatten_like_tf(vlad: torch.Tensor) -> torch.Tensor:
    """(B, K, D) -> (B, D*K) with flat index d*K + k, the authors' layout (checkpoints port as-is)."""
    return vlad.transpose(1, 2).flatten(1)

