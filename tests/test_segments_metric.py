"""SegmentMeanAveragePrecision (validation) against hand-computed and float64 oracles."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from nextvlad.metrics_segments import SegmentMeanAveragePrecision


def hand_case():
    """4 segments x 4 classes. Class 1 rated (0.9 +, 0.8 -, 0.8 +, 0.1 -): ties rank the negative
    first, AP = (1/1 + 2/3) / 2 = 5/6. Class 2: only a rated negative, left out. Class 3: a
    negative at 0.7 above its positive at 0.5: AP = 1/2. Class 0 is unrated everywhere (its
    high scores do not count). mean = (5/6 + 1/2) / 2 = 2/3."""
    preds = torch.tensor([[0.99, 0.9, 0.3, 0.7], [0.99, 0.8, 0.2, 0.5],
                          [0.99, 0.8, 0.6, 0.0], [0.99, 0.1, 0.0, 0.0]])
    target = torch.zeros(4, 4)
    weights = torch.zeros(4, 4)
    for segment, class_id, label in [(0, 1, 1), (1, 1, 0), (2, 1, 1), (3, 1, 0), (0, 2, 0),
                                     (0, 3, 0), (1, 3, 1)]:
        target[segment, class_id], weights[segment, class_id] = label, 1
    return preds, target, weights


def oracle(preds, target, weights) -> float:
    """float64 per-class AP over rated entries, ties pessimistic, mean over classes with a positive."""
    aps = []
    for c in range(preds.shape[1]):
        rated = weights[:, c] > 0
        scores, labels = preds[rated, c].double().numpy(), target[rated, c].numpy() > 0
        if not labels.any():
            continue
        order = np.lexsort((labels, -scores))  # descending score, negatives (False) first on ties
        hits = labels[order]
        precision = np.cumsum(hits) / np.arange(1, len(hits) + 1)
        aps.append(precision[hits].sum() / labels.sum())
    return float(np.mean(aps)) if aps else 0.0


def test_hand_computed_case_with_ties_unrated_and_a_class_without_positives():
    preds, target, weights = hand_case()
    metric = SegmentMeanAveragePrecision(num_classes=4)
    metric.update(preds, target, weights)
    assert float(metric.compute()) == pytest.approx(2 / 3, abs=1e-12)
    assert oracle(preds, target, weights) == pytest.approx(2 / 3, abs=1e-12)
    average_precision, positives = metric.compute_per_class()
    assert average_precision[[1, 3]].tolist() == pytest.approx([5 / 6, 1 / 2])
    assert positives.tolist() == [0, 2, 0, 1]


def random_case(segments=200, classes=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    preds = (torch.randint(0, 9, (segments, classes), generator=g) / 8.0)  # many ties
    weights = (torch.rand(segments, classes, generator=g) < 0.3).float()
    target = (torch.rand(segments, classes, generator=g) < 0.4).float() * weights
    return preds, target, weights


def test_streaming_in_any_batch_order_equals_the_oracle():
    preds, target, weights = random_case()
    expected = oracle(preds, target, weights)
    for seed in range(3):
        order = torch.randperm(len(preds), generator=torch.Generator().manual_seed(seed))
        metric = SegmentMeanAveragePrecision(num_classes=preds.shape[1])
        for chunk in order.split(17):
            metric.update(preds[chunk], target[chunk], weights[chunk])
        assert float(metric.compute()) == pytest.approx(expected, abs=1e-12)
        # memory: one stored entry per rating, not per (segment, class)
        assert sum(t.numel() for t in metric.top_scores) == int(weights.sum())


def test_bad_arguments_are_named():
    metric = SegmentMeanAveragePrecision(num_classes=4)
    with pytest.raises(ValueError, match="one shape"):
        metric.update(torch.zeros(2, 4), torch.zeros(2, 4), torch.zeros(3, 4))
    with pytest.raises(ValueError, match="preds has 3 classes but num_classes is 4"):
        metric.update(torch.zeros(2, 3), torch.zeros(2, 3), torch.zeros(2, 3))
    with pytest.raises(ValueError, match="NaN"):
        metric.update(torch.full((1, 4), float("nan")), torch.zeros(1, 4), torch.ones(1, 4))


def _ddp_worker(rank, world_size, init_file, shards, out_dir):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        metric = SegmentMeanAveragePrecision(num_classes=shards[rank][0].shape[1])
        preds, target, weights = shards[rank]
        for start in range(0, len(preds), 7):
            metric.update(preds[start:start + 7], target[start:start + 7], weights[start:start + 7])
        torch.save(float(metric.compute()), os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_ddp_two_processes_equal_the_oracle(tmp_path):
    preds, target, weights = random_case(90, 8, seed=3)
    take = [torch.arange(len(preds)) % 3 != 2, torch.arange(len(preds)) % 3 == 2]
    shards = [(preds[m], target[m], weights[m]) for m in take]
    mp.spawn(_ddp_worker, args=(2, str(tmp_path / "init"), shards, str(tmp_path)), nprocs=2, join=True)
    expected = oracle(preds, target, weights)
    for rank in range(2):
        assert torch.load(tmp_path / f"rank{rank}.pt") == pytest.approx(expected, abs=1e-12)
