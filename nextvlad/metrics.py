"""YouTube-8M challenge metrics (SPEC 5) as streaming, DDP-correct torchmetrics classes.

All four metrics take ``update(preds, target)`` with ``preds`` the per-class probabilities (B, C)
and ``target`` the multi-hot labels (B, C); a label counts as positive when it is 1.

* :class:`GlobalAveragePrecision` - GAP@k, the Kaggle 2018 metric.
* :class:`HitAtOne` - fraction of videos whose highest-scored class is a true label.
* :class:`PrecisionAtEqualRecallRate` - PERR.
* :class:`MeanAveragePrecision` - mean over classes of the per-class AP of the top-k pairs.

GAP and MAP keep only each video's top-k (score, label[, class]) pairs, O(top_k) memory per video,
never the (videos x C) prediction matrix. Their list states are concatenated across processes
(``dist_reduce_fx="cat"``), and the positive counters are summed, so under DDP ``compute()`` gives
exactly the value over the union of all ranks' data. Scores are stored in the metric's dtype
(float32 by default; ``metric.set_dtype(torch.float64)`` keeps float64 scores distinct), counts and
results are float64.

Deterministic ties (the authors' code breaks them with a seed-0 shuffle over heap order, which
depends on the order the data was read, SPEC 7.18):

* Selecting the top-k classes of a video, or the top-n for PERR: among equal scores the lower
  class index ranks first.
* Ranking the accumulated pairs for AP: among equal scores the negatives rank before the
  positives (the pessimistic order). The result therefore depends only on the multiset of pairs,
  not on the order of ``update`` calls or on how the data was sharded over DDP ranks. Without ties
  it is exactly the authors' value.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.utilities.data import dim_zero_cat

from nextvlad._validation import check_positive_int

__all__ = [
    "GlobalAveragePrecision",
    "HitAtOne",
    "MeanAveragePrecision",
    "PrecisionAtEqualRecallRate",
]

def _exact_integers(dtype: torch.dtype) -> int:
    """The largest n such that every integer up to n is exact in the float ``dtype``."""
    return int(2 / torch.finfo(dtype).eps)


# Class indices are stored in the metric's float dtype (so that a rank without data, which
# torchmetrics pads with an empty tensor of that dtype, still gathers): float32 is exact to 2**24.
_MAX_EXACT_CLASSES = _exact_integers(torch.float32)


def _cat_state(state: list[Tensor] | Tensor, dtype: torch.dtype, device: torch.device) -> Tensor:
    """A "cat" list state as one 1-D tensor, empty when nothing was accumulated."""
    if isinstance(state, list) and not state:
        return torch.empty(0, dtype=dtype, device=device)
    return dim_zero_cat(state)


def _check_inputs(preds: Tensor, target: Tensor, validate_values: bool) -> None:
    """Raise ValueError naming the argument when ``preds``/``target`` are not (B, C) pairs."""
    if preds.ndim != 2:
        raise ValueError(f"preds must be 2-D (videos, classes), got shape {tuple(preds.shape)}")
    if target.ndim != 2:
        raise ValueError(f"target must be 2-D (videos, classes), got shape {tuple(target.shape)}")
    if preds.shape != target.shape:
        raise ValueError(
            f"preds and target must have the same shape, got preds {tuple(preds.shape)} "
            f"and target {tuple(target.shape)}"
        )
    if preds.shape[1] < 1:
        raise ValueError("preds must have at least one class (got 0 columns)")
    if not validate_values:
        return
    # Both flags in one device-to-host copy: a single sync per update, as validate_args promises.
    flags = torch.stack((torch.isnan(preds).any(), ((target != 0) & (target != 1)).any()))
    has_nan, not_multi_hot = flags.tolist()
    if has_nan:
        raise ValueError("preds contains NaN")
    if not_multi_hot:
        raise ValueError("target must be multi-hot: every value 0 or 1")


def _top_k_mask(preds: Tensor, k: Tensor, k_max: int) -> Tensor:
    """Boolean (B, C) mask of each video's ``k[b]`` highest-scored classes; ``k`` is (B, 1).

    Among classes tied with the k-th score the lower indices are taken, so exactly ``k[b]``
    classes are selected whatever order ``torch.topk`` returns ties in. Costs two ``topk`` and a
    few elementwise passes, no full sort of the C scores.
    """
    if k_max == 0:
        return torch.zeros_like(preds, dtype=torch.bool)
    kth_score = preds.topk(k_max, dim=1).values.gather(1, (k - 1).clamp(min=0))
    above = preds > kth_score
    tied = preds == kth_score
    missing = k - above.sum(dim=1, keepdim=True)
    return (above | (tied & (tied.cumsum(dim=1) <= missing))) & (k > 0)


def _top_k_per_video(preds: Tensor, target: Tensor, top_k: int) -> tuple[Tensor, Tensor, Tensor]:
    """Each video's top-k (score, positive, class) triples, flattened to 1-D.

    Uses all classes when ``top_k`` exceeds their number. The order within a video is irrelevant:
    the AP ranking depends only on the multiset of pairs.
    """
    num_videos, num_classes = preds.shape
    k = min(top_k, num_classes)
    selected = _top_k_mask(preds, torch.full((num_videos, 1), k, device=preds.device), k)
    # The k selected classes of each row, found without a host sync: the only positive keys.
    index_key = torch.arange(num_classes, 0, -1, device=preds.device)
    top_classes = torch.where(selected, index_key, 0).topk(k, dim=1).indices
    top_scores = preds.gather(1, top_classes)
    top_positive = target.gather(1, top_classes) > 0
    return top_scores.flatten(), top_positive.flatten(), top_classes.flatten()


def _pessimistic_order(scores: Tensor, positive: Tensor) -> Tensor:
    """Permutation ranking pairs by descending score, negatives before positives on equal score."""
    by_label = torch.argsort(positive.to(torch.uint8), stable=True)
    return by_label[torch.argsort(scores[by_label], descending=True, stable=True)]


def _sum_of_precisions(ranked_positive: Tensor) -> Tensor:
    """Sum over positive ranks i of (#positives in ranks 1..i) / i in float64 (non-interpolated)."""
    hits = ranked_positive.to(torch.float64)
    ranks = torch.arange(1, hits.numel() + 1, dtype=torch.float64, device=hits.device)
    return (hits.cumsum(0) / ranks * hits).sum()


class _TopKPairs(Metric):
    """Shared state of GAP and MAP: every video's top-k (score, label, class) triples."""

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    def __init__(self, top_k: int, validate_args: bool, **kwargs) -> None:
        super().__init__(**kwargs)
        check_positive_int(top_k=top_k)
        self.top_k = top_k
        self.validate_args = validate_args
        self.add_state("top_scores", default=[], dist_reduce_fx="cat")
        self.add_state("top_labels", default=[], dist_reduce_fx="cat")

    def _append_top_k(self, preds: Tensor, target: Tensor) -> Tensor:
        """Store the batch's top-k scores and labels; return the matching class indices."""
        preds, target = preds.detach(), target.detach()
        scores, positive, classes = _top_k_per_video(preds, target, self.top_k)
        self.top_scores.append(scores.to(self.dtype))
        self.top_labels.append(positive.to(self.dtype))
        return classes

    def _accumulated_pairs(self) -> tuple[Tensor, Tensor]:
        scores = _cat_state(self.top_scores, self.dtype, self.device)
        return scores, _cat_state(self.top_labels, self.dtype, self.device) > 0


class GlobalAveragePrecision(_TopKPairs):
    """GAP@k: non-interpolated AP of all videos' top-k (score, label) pairs (SPEC 5).

    The pairs of every video's ``top_k`` highest-scored classes are ranked together by score, and
    ``GAP = (1 / P) * sum over positive ranks i of precision@i`` where ``P`` counts *all* positive
    labels, including those outside every top-k. Returns 0 when nothing was accumulated or there
    are no positives. Ties: see the module docstring.

    Args:
        top_k: classes kept per video (20 in the challenge); all classes when larger than C.
        validate_args: check that target is 0/1 and preds has no NaN (one device sync per update).
    """

    def __init__(self, top_k: int = 20, validate_args: bool = True, **kwargs) -> None:
        super().__init__(top_k, validate_args, **kwargs)
        self.add_state(
            "num_positives", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum"
        )

    def update(self, preds: Tensor, target: Tensor) -> None:
        """Accumulate a batch of probabilities ``preds`` (B, C) and multi-hot ``target`` (B, C)."""
        _check_inputs(preds, target, self.validate_args)
        self._append_top_k(preds, target)
        self.num_positives += (target.detach() > 0).sum().to(torch.float64)

    def compute(self) -> Tensor:
        scores, positive = self._accumulated_pairs()
        if scores.numel() == 0 or self.num_positives <= 0:
            return torch.tensor(0.0, dtype=torch.float64, device=self.num_positives.device)
        ranked_positive = positive[_pessimistic_order(scores, positive)]
        return _sum_of_precisions(ranked_positive) / self.num_positives


class MeanAveragePrecision(_TopKPairs):
    """MAP: mean over classes of the AP of each class's top-k pairs (SPEC 5).

    For class c the ranked list holds the (score, label) of every video whose top-k contained c;
    the denominator is all positives of c. A class with no positives has AP 0 and counts in the
    mean (the authors' convention) unless ``filter_empty_classes`` drops it (Google's). Returns 0
    when no class is left to average. Ties: see the module docstring.

    Args:
        num_classes: number of classes C (3862 for YouTube-8M 2018).
        top_k: classes kept per video; all classes when larger than C.
        filter_empty_classes: average only over classes with at least one positive label.
        validate_args: check that target is 0/1 and preds has no NaN (one device sync per update).
    """

    def __init__(
        self,
        num_classes: int,
        top_k: int = 20,
        filter_empty_classes: bool = False,
        validate_args: bool = True,
        **kwargs,
    ) -> None:
        super().__init__(top_k, validate_args, **kwargs)
        check_positive_int(num_classes=num_classes)
        if num_classes > _MAX_EXACT_CLASSES:
            raise ValueError(f"num_classes must be <= {_MAX_EXACT_CLASSES}, got {num_classes}")
        self.num_classes = num_classes
        self.filter_empty_classes = filter_empty_classes
        self.add_state("top_classes", default=[], dist_reduce_fx="cat")
        self.add_state(
            "class_positives",
            default=torch.zeros(num_classes, dtype=torch.float64),
            dist_reduce_fx="sum",
        )

    def set_dtype(self, dst_type: str | torch.dtype) -> "MeanAveragePrecision":
        """Also the dtype of the stored class indices: refused where it cannot hold every index
        exactly (float16 stops at 2048, bfloat16 at 256), which would merge classes."""
        if isinstance(dst_type, torch.dtype) and dst_type.is_floating_point:
            exact = _exact_integers(dst_type)
            if self.num_classes > exact:
                raise ValueError(f"{type(self).__name__}.set_dtype({dst_type}): its class indices would be rounded "
                                 f"(exact up to {exact}, num_classes is {self.num_classes})")
        return super().set_dtype(dst_type)

    def update(self, preds: Tensor, target: Tensor) -> None:
        """Accumulate a batch of probabilities ``preds`` (B, C) and multi-hot ``target`` (B, C)."""
        _check_inputs(preds, target, self.validate_args)
        if preds.shape[1] != self.num_classes:
            raise ValueError(
                f"preds has {preds.shape[1]} classes but num_classes is {self.num_classes}"
            )
        classes = self._append_top_k(preds, target)
        self.top_classes.append(classes.to(self.dtype))
        self.class_positives += (target.detach() > 0).sum(0).to(torch.float64)

    def compute(self) -> Tensor:
        average_precision = self._average_precision_of_every_class()[self._kept_classes()]
        if average_precision.numel() == 0:
            return torch.tensor(0.0, dtype=torch.float64, device=self.class_positives.device)
        return average_precision.mean()

    def compute_per_class(self) -> tuple[Tensor, Tensor]:
        """Per-class ``(average_precision, positives)``, float64 (C,) each, over all processes.

        Every class is returned whatever ``filter_empty_classes`` says; a class without positives
        has AP 0 (its ``positives`` entry tells it apart). Under DDP the states are gathered as in
        ``compute()``, so every rank must call it. ``compute()`` is the mean of the kept entries.
        """
        with self.sync_context(
            dist_sync_fn=self.dist_sync_fn, should_sync=self._to_sync, should_unsync=self._should_unsync
        ):
            return self._average_precision_of_every_class().clone(), self.class_positives.clone()

    def _kept_classes(self) -> Tensor:
        if self.filter_empty_classes:
            return self.class_positives > 0
        return torch.ones_like(self.class_positives, dtype=torch.bool)

    def _average_precision_of_every_class(self) -> Tensor:
        """float64 AP of all C classes from the current (local or synced) states."""
        scores, positive = self._accumulated_pairs()
        classes = _cat_state(self.top_classes, self.dtype, self.device).long()
        # Rank by (class, descending score, negatives first) with three stable sorts.
        order = _pessimistic_order(scores, positive)
        order = order[torch.argsort(classes[order], stable=True)]
        classes, hits = classes[order], positive[order].to(torch.float64)
        num_classes = self.num_classes
        # Rank and running positive count of each pair within its class's segment.
        pairs_per_class = torch.bincount(classes, minlength=num_classes)
        segment_start = pairs_per_class.cumsum(0) - pairs_per_class
        rank = torch.arange(1, classes.numel() + 1, device=classes.device) - segment_start[classes]
        hits_per_class = torch.zeros(num_classes, dtype=torch.float64, device=hits.device)
        hits_per_class.index_add_(0, classes, hits)
        hits_before_class = hits_per_class.cumsum(0) - hits_per_class
        running_hits = hits.cumsum(0) - hits_before_class[classes]
        precision_sum = torch.zeros_like(hits_per_class)
        precision_sum.index_add_(0, classes, running_hits / rank.to(torch.float64) * hits)
        positives = self.class_positives
        average_precision = torch.where(
            positives > 0, precision_sum / positives.clamp(min=1.0), torch.zeros_like(positives)
        )
        return average_precision


class _MeanOverVideos(Metric):
    """A per-video score averaged over every video seen (summed states, so exact under DDP)."""

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    def __init__(self, validate_args: bool = True, **kwargs) -> None:
        super().__init__(**kwargs)
        self.validate_args = validate_args
        self.add_state("score_sum", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("videos", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def _video_scores(self, preds: Tensor, target: Tensor) -> Tensor:
        """(B,) float64 score of each video of the batch."""
        raise NotImplementedError

    def update(self, preds: Tensor, target: Tensor) -> None:
        """Accumulate a batch of probabilities ``preds`` (B, C) and multi-hot ``target`` (B, C)."""
        _check_inputs(preds, target, self.validate_args)
        self.score_sum += self._video_scores(preds.detach(), target.detach()).sum()
        self.videos += preds.shape[0]

    def compute(self) -> Tensor:
        return self.score_sum / self.videos.clamp(min=1)


class HitAtOne(_MeanOverVideos):
    """Hit@1: mean over videos of ``target[argmax(preds)]``, ties to the first max index (SPEC 5).

    Args:
        validate_args: check that target is 0/1 and preds has no NaN (one device sync per update).
    """

    def _video_scores(self, preds: Tensor, target: Tensor) -> Tensor:
        # torch.argmax returns the first maximal index on ties, as numpy does.
        best_class = preds.argmax(dim=1, keepdim=True)
        return (target.gather(1, best_class) > 0).squeeze(1).to(torch.float64)


class PrecisionAtEqualRecallRate(_MeanOverVideos):
    """PERR: mean over videos of the precision of its top-n classes, n = its number of labels.

    Per video ``sum over the top-n classes of label * [pred > 0] / n`` (SPEC 5); a video without
    labels scores 0 and still counts in the mean. Top-n ties go to the lower class index.

    Args:
        validate_args: check that target is 0/1 and preds has no NaN (one device sync per update).
    """

    def _video_scores(self, preds: Tensor, target: Tensor) -> Tensor:
        positive = target > 0
        num_labels = positive.sum(dim=1, keepdim=True)
        max_labels = int(num_labels.max()) if preds.shape[0] else 0
        top_n = _top_k_mask(preds, num_labels, max_labels)
        correct = (top_n & positive & (preds > 0)).sum(dim=1)
        return correct.to(torch.float64) / num_labels.squeeze(1).clamp(min=1)
