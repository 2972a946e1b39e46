"""The 2019 segment metric during validation, as a streaming, DDP-exact torchmetrics class.

:class:`SegmentMeanAveragePrecision` is the Kaggle metric's idea (SPEC_SEGMENTS 5.3) restricted
to what validation knows: per class, the *rated* segments ranked by the model's score, AP with
the number of rated positives, mean over the classes with a rated positive. It is not mAP@100K of
a submission (that also depends on each segment's top 20 and the 100K cut: `nextvlad
score-segments`), but it ranks the same quantity a segment model is trained for.
"""

from __future__ import annotations

import torch
from torch import Tensor

from nextvlad.metrics import MeanAveragePrecision

__all__ = ["SegmentMeanAveragePrecision"]


class SegmentMeanAveragePrecision(MeanAveragePrecision):
    """Mean over classes with a rated positive of the AP of the class's rated segments.

    ``update(preds, target, weights)`` takes (S, C) probabilities, rated scores (> 0: positive)
    and weights (> 0: the entry is rated). Only rated entries are stored (score, label, class), so
    memory grows with the number of ratings, not with S x C; the lists are concatenated across
    processes, so under DDP ``compute()`` is exactly the value over all ranks' segments. The
    per-class ranking and its ties (negatives first among equal scores) are those of
    `MeanAveragePrecision`, whose state and AP computation this reuses: the "top-k pairs" are the
    rated entries here.
    """

    def __init__(self, num_classes: int, validate_args: bool = True, **kwargs) -> None:
        super().__init__(num_classes, top_k=1, filter_empty_classes=True,
                         validate_args=validate_args, **kwargs)

    def update(self, preds: Tensor, target: Tensor, weights: Tensor) -> None:  # type: ignore[override]
        if preds.shape != target.shape or preds.shape != weights.shape or preds.ndim != 2:
            raise ValueError(f"preds, target and weights must be (segments, classes) of one shape, "
                             f"got {tuple(preds.shape)}, {tuple(target.shape)}, {tuple(weights.shape)}")
        if preds.shape[1] != self.num_classes:
            raise ValueError(f"preds has {preds.shape[1]} classes but num_classes is {self.num_classes}")
        if self.validate_args and torch.isnan(preds).any():
            raise ValueError("preds contains NaN")
        preds, target, rated = preds.detach(), target.detach(), weights.detach() > 0
        segment, classes = rated.nonzero(as_tuple=True)
        positive = target[segment, classes] > 0
        self.top_scores.append(preds[segment, classes].to(self.dtype))
        self.top_labels.append(positive.to(self.dtype))
        self.top_classes.append(classes.to(self.dtype))
        self.class_positives += ((target > 0) & rated).sum(0).to(torch.float64)
