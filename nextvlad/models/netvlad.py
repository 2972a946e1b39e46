"""The NetVLAD aggregation layer, the baseline NeXtVLAD is compared against (paper section 3.1).

Follows the Willow/starter-code layer that the authors' repository uses as its baseline: soft
assignment from a bias-free projection plus cluster BN, residual aggregation over real frames,
intra L2 normalisation over the feature dimension, then L2 normalisation of the whole descriptor.
``input_reduction`` gives the paper's NetVLAD_small (a linear reduction of each frame to 1/4 of its
size before aggregation); NetVLAD_random is a data option (``sample_frames``), not a layer change.
"""

from __future__ import annotations

import torch
from torch import nn
import torch.nn.functional as F

from nextvlad._dtypes import at_least_float32
from nextvlad._validation import check_choice, check_positive_int
from nextvlad.kernels import residual_aggregation
from nextvlad.kernels import frame_mask
from nextvlad.models.initialization import MaskedBatchNorm1d, tf_linear, variance_scaling_
from nextvlad.models.nextvlad import ClusterBNStatistics, flatten_like_tf

# sigmoid(30) rounds to exactly 1.0 in fp32/bf16: NetVLAD has no attention, so every real frame
# gets weight 1 through the same fused op that NeXtVLAD uses (with one group).
_FULL_ATTENTION_LOGIT = 30.0


class NetVLAD(nn.Module):
    """Aggregates (B, M, N) frame features into a (B, K * N') descriptor, N' = N // input_reduction.

    Args:
        feature_size: N, input features per frame.
        clusters: K.
        input_reduction: 1 for NetVLAD; 4 for the paper's NetVLAD_small.
        cluster_bn_statistics: "all" (padded rows included, as the TF code) or "masked".
        backend: aggregation backend passed to ``residual_aggregation``.
    """

    def __init__(
        self,
        feature_size: int,
        clusters: int,
        input_reduction: int = 1,
        cluster_bn_statistics: ClusterBNStatistics = "all",
        backend: str = "auto",
    ) -> None:
        super().__init__()
        check_positive_int(feature_size=feature_size, clusters=clusters, input_reduction=input_reduction)
        if feature_size % input_reduction:
            raise ValueError(f"input_reduction={input_reduction} must divide feature_size={feature_size}")
        check_choice("cluster_bn_statistics", cluster_bn_statistics, ("all", "masked"))
        self.feature_size, self.clusters = feature_size, clusters
        self.descriptor_size = feature_size // input_reduction
        self.cluster_bn_statistics = cluster_bn_statistics
        self.backend = backend
        self.reduction = tf_linear(feature_size, self.descriptor_size) if input_reduction > 1 else nn.Identity()
        self.cluster_logits = tf_linear(self.descriptor_size, clusters, bias=False)
        # The Willow baseline's cluster_bn is slim.batch_norm on a rank-2 input with the default
        # fused=None, i.e. the fused kernel: Bessel-corrected moving variance.
        self.cluster_bn = MaskedBatchNorm1d(clusters, fused=True)
        self.centroids = nn.Parameter(
            variance_scaling_(torch.empty(clusters, self.descriptor_size), self.descriptor_size)
        )

    @property
    def output_size(self) -> int:
        return self.clusters * self.descriptor_size

    def forward(self, frames: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        batch, max_frames, features = frames.shape
        if features != self.feature_size:
            raise ValueError(f"NetVLAD expects {self.feature_size} features per frame, got {features}")
        descriptors = self.reduction(frames)
        logits = self.cluster_logits(descriptors).reshape(batch * max_frames, self.clusters)
        mask = frame_mask(lengths, max_frames).reshape(-1) if self.cluster_bn_statistics == "masked" else None
        logits = self.cluster_bn(logits, mask).reshape(batch, max_frames, 1, self.clusters)
        attention = descriptors.new_full((1, 1, 1), _FULL_ATTENTION_LOGIT).expand(batch, max_frames, 1)
        vlad = residual_aggregation(
            descriptors.unsqueeze(2),
            logits.to(descriptors.dtype),
            attention,
            lengths,
            self.centroids,
            backend=self.backend,
            normalize=True,  # intra-normalisation over D per cluster
        )
        return F.normalize(at_least_float32(flatten_like_tf(vlad)), p=2.0, dim=-1, eps=1e-6)
