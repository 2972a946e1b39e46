"""Challenge metrics (SPEC 5) against an independent float64 numpy oracle and hand-made cases."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from nextvlad.metrics import (
    GlobalAveragePrecision,
    HitAtOne,
    MeanAveragePrecision,
    PrecisionAtEqualRecallRate,
)

# ----------------------------------------------------------------------------------------------
# Oracle: SPEC 5 written out with numpy loops, float64, no code shared with nextvlad.metrics.
# Tie rules (documented in nextvlad.metrics): top-k/top-n ties go to the lower class index; in
# the AP ranking equal scores put negatives before positives.


def oracle_top_classes(scores_row: np.ndarray, k: int) -> np.ndarray:
    return np.argsort(-scores_row.astype(np.float64), kind="stable")[:k]


def oracle_average_precision(scores, labels, num_positives: float) -> float:
    scores = np.asarray(scores, dtype=np.float64)
    labels = np.asarray(labels, dtype=np.float64)
    if num_positives <= 0 or scores.size == 0:
        return 0.0
    # np.lexsort: last key is primary -> descending score, then label ascending (negatives first).
    order = np.lexsort((labels, -scores))
    seen_positives, precision_sum = 0, 0.0
    for rank, index in enumerate(order, start=1):
        if labels[index] > 0:
            seen_positives += 1
            precision_sum += seen_positives / rank
    return precision_sum / num_positives


def oracle_gap(preds: np.ndarray, target: np.ndarray, top_k: int) -> float:
    pair_scores, pair_labels = [], []
    for scores_row, labels_row in zip(preds, target):
        for c in oracle_top_classes(scores_row, top_k):
            pair_scores.append(scores_row[c])
            pair_labels.append(labels_row[c])
    return oracle_average_precision(pair_scores, pair_labels, float(target.sum()))


def oracle_map(preds: np.ndarray, target: np.ndarray, top_k: int, filter_empty: bool) -> float:
    num_classes = preds.shape[1]
    top = [set(oracle_top_classes(row, top_k).tolist()) for row in preds]
    aps = []
    for c in range(num_classes):
        positives = float(target[:, c].sum())
        if filter_empty and positives == 0:
            continue
        videos = [v for v in range(len(preds)) if c in top[v]]
        aps.append(oracle_average_precision(preds[videos, c], target[videos, c], positives))
    return float(np.mean(aps)) if aps else 0.0


def oracle_hit_at_one(preds: np.ndarray, target: np.ndarray) -> float:
    return float(np.mean([target[v, np.argmax(preds[v])] for v in range(len(preds))]))


def oracle_perr(preds: np.ndarray, target: np.ndarray) -> float:
    precisions = []
    for scores_row, labels_row in zip(preds, target):
        n = int(labels_row.sum())
        if n == 0:
            precisions.append(0.0)
            continue
        top = oracle_top_classes(scores_row, n)
        precisions.append(float(np.sum(labels_row[top] * (scores_row[top] > 0))) / n)
    return float(np.mean(precisions))


def oracle_all(preds: np.ndarray, target: np.ndarray, top_k: int) -> dict[str, float]:
    # float32 -> float64 is exact, so the ranking (and its ties) is unchanged.
    preds, target = preds.astype(np.float64), target.astype(np.float64)
    return {
        "gap": oracle_gap(preds, target, top_k),
        "hit1": oracle_hit_at_one(preds, target),
        "perr": oracle_perr(preds, target),
        "map": oracle_map(preds, target, top_k, filter_empty=False),
        "map_filtered": oracle_map(preds, target, top_k, filter_empty=True),
    }


# ----------------------------------------------------------------------------------------------
# Helpers


def make_metrics(num_classes: int, top_k: int) -> dict:
    return {
        "gap": GlobalAveragePrecision(top_k=top_k),
        "hit1": HitAtOne(),
        "perr": PrecisionAtEqualRecallRate(),
        "map": MeanAveragePrecision(num_classes, top_k=top_k),
        "map_filtered": MeanAveragePrecision(num_classes, top_k=top_k, filter_empty_classes=True),
    }


def run_metrics(preds: np.ndarray, target: np.ndarray, top_k: int, batch_size: int) -> dict:
    metrics = make_metrics(preds.shape[1], top_k)
    for start in range(0, len(preds), batch_size):
        p = torch.from_numpy(preds[start : start + batch_size])
        t = torch.from_numpy(target[start : start + batch_size])
        for metric in metrics.values():
            metric.update(p, t)
    return {name: float(metric.compute()) for name, metric in metrics.items()}


def random_data(
    num_videos: int,
    num_classes: int,
    seed: int,
    *,
    levels: int | None = None,
    empty_fraction: float = 0.0,
    labels_per_video: float = 3.0,
) -> tuple[np.ndarray, np.ndarray]:
    """float32 probabilities loosely correlated with multi-hot labels.

    ``levels`` quantises the scores to that many values, which creates many ties (within a video
    and across videos); ``empty_fraction`` of the videos get no labels.
    """
    rng = np.random.default_rng(seed)
    target = (rng.random((num_videos, num_classes)) < labels_per_video / num_classes).astype(
        np.float32
    )
    target[rng.random(num_videos) < empty_fraction] = 0.0
    logits = rng.normal(size=(num_videos, num_classes)) + 2.0 * target
    preds = 1.0 / (1.0 + np.exp(-logits))
    if levels is not None:
        preds = np.round(preds * (levels - 1)) / (levels - 1)
    return preds.astype(np.float32), target


def assert_matches_oracle(got: dict, expected: dict) -> None:
    for name, value in expected.items():
        assert got[name] == pytest.approx(value, rel=1e-12, abs=1e-12), name


# ----------------------------------------------------------------------------------------------
# Hand-computed cases

HAND_PREDS = np.array([[0.9, 0.1, 0.5], [0.2, 0.8, 0.3]], dtype=np.float32)
HAND_TARGET = np.array([[1, 0, 1], [0, 0, 1]], dtype=np.float32)


def test_gap_hand_computed() -> None:
    # top-2 pairs ranked: 0.9(+) 0.8(-) 0.5(+) 0.3(+): precisions 1, 2/3, 3/4 over 3 positives.
    got = run_metrics(HAND_PREDS, HAND_TARGET, top_k=2, batch_size=2)
    assert got["gap"] == pytest.approx((1 + 2 / 3 + 3 / 4) / 3, abs=1e-15)


def test_gap_counts_positives_outside_every_top_k() -> None:
    # top-1: 0.9(+) and 0.8(-); the two positives at 0.5 and 0.3 are never ranked: AP = 1/3.
    got = run_metrics(HAND_PREDS, HAND_TARGET, top_k=1, batch_size=2)
    assert got["gap"] == pytest.approx(1 / 3, abs=1e-15)


def test_map_hand_computed() -> None:
    # top-2: class 0 -> [0.9(+)] AP 1; class 1 -> [0.8(-)], no positives, AP 0;
    # class 2 -> [0.5(+), 0.3(+)] AP 1. Authors: mean of 3 = 2/3; Google's: mean of 2 = 1.
    got = run_metrics(HAND_PREDS, HAND_TARGET, top_k=2, batch_size=2)
    assert got["map"] == pytest.approx(2 / 3, abs=1e-15)
    assert got["map_filtered"] == pytest.approx(1.0, abs=1e-15)


def test_map_class_with_positives_outside_top_k_scores_zero_in_both_modes() -> None:
    # top-1: class 2 has 2 positives but never enters a top-1 list -> AP 0 even when filtered.
    got = run_metrics(HAND_PREDS, HAND_TARGET, top_k=1, batch_size=2)
    assert got["map"] == pytest.approx((1 + 0 + 0) / 3, abs=1e-15)
    assert got["map_filtered"] == pytest.approx((1 + 0) / 2, abs=1e-15)


def test_hit_at_one_hand_computed_and_ties_go_to_first_max() -> None:
    got = run_metrics(HAND_PREDS, HAND_TARGET, top_k=2, batch_size=2)
    assert got["hit1"] == pytest.approx(0.5, abs=1e-15)
    metric = HitAtOne()
    # both rows tie classes 0 and 1: the first max index (0) decides.
    tied = torch.tensor([[0.7, 0.7, 0.1], [0.7, 0.7, 0.1]])
    metric.update(tied, torch.tensor([[1.0, 0, 0], [0, 1, 0]]))
    assert float(metric.compute()) == pytest.approx(0.5, abs=1e-15)


def test_perr_hand_computed_with_label_less_video_and_zero_score() -> None:
    preds = torch.tensor([[0.9, 0.1, 0.5], [0.2, 0.8, 0.3], [0.6, 0.4, 0.2], [0.0, 0.3, 0.1]])
    target = torch.tensor([[1.0, 0, 1], [0, 0, 1], [0, 0, 0], [1, 0, 0]])
    # video 0: n=2, top-2 {0,2} both right -> 1; video 1: n=1, top-1 {1} wrong -> 0;
    # video 2: no labels -> 0 but counted; video 3: n=1, top-1 {1} wrong -> 0.
    metric = PrecisionAtEqualRecallRate()
    metric.update(preds, target)
    assert float(metric.compute()) == pytest.approx(1 / 4, abs=1e-15)
    # the [pred > 0] factor: a true label ranked in the top-n with score 0 does not count.
    metric = PrecisionAtEqualRecallRate()
    metric.update(torch.tensor([[0.0, 0.0, 0.0]]), torch.tensor([[1.0, 0, 0]]))
    assert float(metric.compute()) == 0.0


def test_gap_ties_rank_negatives_first() -> None:
    # one positive and one negative tied at 0.5: pessimistic order gives precision 1/2.
    metric = GlobalAveragePrecision(top_k=1)
    metric.update(torch.tensor([[0.5, 0.0], [0.5, 0.0]]), torch.tensor([[1.0, 0], [0, 0]]))
    assert float(metric.compute()) == pytest.approx(0.5, abs=1e-15)
    # same pairs in the other video order: same value (order independent).
    metric = GlobalAveragePrecision(top_k=1)
    metric.update(torch.tensor([[0.5, 0.0], [0.5, 0.0]]), torch.tensor([[0.0, 0], [1, 0]]))
    assert float(metric.compute()) == pytest.approx(0.5, abs=1e-15)


def test_top_k_ties_go_to_lower_class_index() -> None:
    # all four classes tie; top-2 picks classes 0 and 1 -> the positive at class 3 is not ranked.
    metric = GlobalAveragePrecision(top_k=2)
    metric.update(torch.full((1, 4), 0.5), torch.tensor([[0.0, 0, 0, 1]]))
    assert float(metric.compute()) == 0.0
    metric = GlobalAveragePrecision(top_k=2)
    metric.update(torch.full((1, 4), 0.5), torch.tensor([[0.0, 1, 0, 0]]))
    assert float(metric.compute()) == pytest.approx(1 / 2, abs=1e-15)


COMPUTE_BEFORE_UPDATE = "ignore:The ``compute`` method of metric"


@pytest.mark.filterwarnings(COMPUTE_BEFORE_UPDATE)
def test_empty_and_positive_free_inputs_give_zero() -> None:
    for metric in make_metrics(num_classes=3, top_k=2).values():
        assert float(metric.compute()) == 0.0
    preds = torch.rand(4, 3)
    for metric in make_metrics(num_classes=3, top_k=2).values():
        metric.update(preds, torch.zeros(4, 3))
        assert float(metric.compute()) == 0.0


# ----------------------------------------------------------------------------------------------
# Against the oracle


@pytest.mark.parametrize(
    ("num_videos", "num_classes", "top_k", "batch_size", "levels", "empty_fraction"),
    [
        (200, 50, 20, 32, None, 0.0),  # independent ranking check, no ties
        (120, 30, 20, 17, 6, 0.2),  # heavy ties, videos without labels
        (60, 7, 50, 10, None, 0.1),  # top_k larger than the number of classes
        (25, 12, 5, 1, 4, 0.2),  # batches of one, ties
        (40, 1, 20, 8, 3, 0.3),  # a single class
    ],
)
def test_metrics_equal_oracle(
    num_videos, num_classes, top_k, batch_size, levels, empty_fraction
) -> None:
    seed = num_videos + num_classes
    preds, target = random_data(
        num_videos, num_classes, seed, levels=levels, empty_fraction=empty_fraction
    )
    assert_matches_oracle(
        run_metrics(preds, target, top_k, batch_size), oracle_all(preds, target, top_k)
    )


def test_top_k_larger_than_classes_equals_top_k_all_classes() -> None:
    preds, target = random_data(30, 6, seed=3)
    assert run_metrics(preds, target, top_k=1000, batch_size=7) == run_metrics(
        preds, target, top_k=6, batch_size=7
    )


def test_many_updates_equal_one_update_and_video_order_does_not_matter() -> None:
    preds, target = random_data(90, 20, seed=5, levels=5, empty_fraction=0.1)
    one_update = run_metrics(preds, target, top_k=20, batch_size=len(preds))
    many_updates = run_metrics(preds, target, top_k=20, batch_size=13)
    assert many_updates == pytest.approx(one_update, rel=1e-13)
    permutation = np.random.default_rng(0).permutation(len(preds))
    shuffled = run_metrics(preds[permutation], target[permutation], top_k=20, batch_size=11)
    assert shuffled == pytest.approx(one_update, rel=1e-13)


@pytest.mark.filterwarnings(COMPUTE_BEFORE_UPDATE)
def test_compute_after_reset_sees_only_new_data() -> None:
    first_preds, first_target = random_data(50, 15, seed=11)
    preds, target = random_data(40, 15, seed=12, levels=8, empty_fraction=0.2)
    expected = oracle_all(preds, target, top_k=10)
    metrics = make_metrics(num_classes=15, top_k=10)
    for metric in metrics.values():
        metric.update(torch.from_numpy(first_preds), torch.from_numpy(first_target))
        metric.compute()
        metric.reset()
        assert float(metric.compute()) == 0.0
        metric.update(torch.from_numpy(preds), torch.from_numpy(target))
    assert_matches_oracle({n: float(m.compute()) for n, m in metrics.items()}, expected)


def test_gap_and_map_keep_only_top_k_per_video() -> None:
    num_videos, num_classes, top_k = 16, 3862, 20
    preds, target = torch.rand(num_videos, num_classes), torch.zeros(num_videos, num_classes)
    gap, mean_ap = GlobalAveragePrecision(top_k), MeanAveragePrecision(num_classes, top_k)
    for metric in (gap, mean_ap):
        metric.update(preds, target)
        metric.update(preds, target)
    pairs = 2 * num_videos * top_k
    assert sum(t.numel() for t in gap.top_scores + gap.top_labels) == 2 * pairs
    map_states = mean_ap.top_scores + mean_ap.top_labels + mean_ap.top_classes
    assert sum(t.numel() for t in map_states) == 3 * pairs


def test_forward_returns_batch_value_and_accumulates_like_update() -> None:
    batches = [random_data(12, 9, seed=40 + i, levels=5, empty_fraction=0.2) for i in range(3)]
    called, updated = make_metrics(9, top_k=4), make_metrics(9, top_k=4)
    for preds, target in batches:
        expected_batch = oracle_all(preds, target, top_k=4)
        p, t = torch.from_numpy(preds), torch.from_numpy(target)
        got_batch = {name: float(metric(p, t)) for name, metric in called.items()}
        assert_matches_oracle(got_batch, expected_batch)
        for metric in updated.values():
            metric.update(p, t)
    for name in called:
        assert float(called[name].compute()) == float(updated[name].compute()), name


def test_results_are_float64() -> None:
    preds, target = random_data(10, 5, seed=1)
    for metric in make_metrics(num_classes=5, top_k=3).values():
        metric.update(torch.from_numpy(preds), torch.from_numpy(target))
        assert metric.compute().dtype == torch.float64


# ----------------------------------------------------------------------------------------------
# Bad input


@pytest.mark.parametrize("bad_top_k", [0, -3, 2.5, True])
def test_top_k_must_be_positive_int(bad_top_k) -> None:
    with pytest.raises(ValueError, match="top_k"):
        GlobalAveragePrecision(top_k=bad_top_k)
    with pytest.raises(ValueError, match="top_k"):
        MeanAveragePrecision(10, top_k=bad_top_k)


@pytest.mark.parametrize("bad_num_classes", [0, -1, 3.0])
def test_num_classes_must_be_positive_int(bad_num_classes) -> None:
    with pytest.raises(ValueError, match="num_classes"):
        MeanAveragePrecision(bad_num_classes)


@pytest.mark.parametrize(
    ("preds_shape", "target_shape", "message"),
    [
        ((4, 5), (4, 6), "same shape"),
        ((4, 5), (3, 5), "same shape"),
        ((5,), (5,), "preds must be 2-D"),
        ((2, 3, 5), (2, 3, 5), "preds must be 2-D"),
        ((4, 5), (20,), "target must be 2-D"),
        ((4, 0), (4, 0), "at least one class"),
    ],
)
def test_bad_shapes_raise(preds_shape, target_shape, message) -> None:
    for metric in make_metrics(num_classes=5, top_k=3).values():
        with pytest.raises(ValueError, match=message):
            metric.update(torch.rand(preds_shape), torch.zeros(target_shape))


@pytest.mark.parametrize(("dtype", "exact"), [(torch.float16, 2048), (torch.bfloat16, 256)])
def test_map_refuses_a_dtype_that_would_round_its_class_indices(dtype, exact) -> None:
    """Class ids are stored in the metric's dtype: 16-bit floats would merge classes above their
    exact integer range (3862 classes in float16: class 2049 becomes 2048)."""
    from nextvlad.metrics_segments import SegmentMeanAveragePrecision

    MeanAveragePrecision(exact).set_dtype(dtype)  # every index exact: allowed
    for metric in (MeanAveragePrecision(exact + 1), SegmentMeanAveragePrecision(3862)):
        with pytest.raises(ValueError, match=f"set_dtype.*exact up to {exact}, num_classes is {metric.num_classes}"):
            metric.set_dtype(dtype)
    metric = MeanAveragePrecision(3862).set_dtype(torch.float64)
    metric.update(torch.eye(3862)[-2:], torch.eye(3862)[-2:])
    assert metric.compute_per_class()[0][-2:].tolist() == [1.0, 1.0]


def test_map_rejects_wrong_number_of_classes() -> None:
    with pytest.raises(ValueError, match="num_classes"):
        MeanAveragePrecision(7).update(torch.rand(2, 5), torch.zeros(2, 5))


def test_non_binary_target_and_nan_preds_raise() -> None:
    for metric in make_metrics(num_classes=3, top_k=2).values():
        with pytest.raises(ValueError, match="target"):
            metric.update(torch.rand(2, 3), torch.tensor([[0.5, 0, 0], [0, 1, 0]]))
        with pytest.raises(ValueError, match="preds"):
            metric.update(torch.tensor([[float("nan"), 0, 0], [0, 1, 0]]), torch.zeros(2, 3))


# ----------------------------------------------------------------------------------------------
# DDP: metric over uneven shards (one of them possibly empty) equals the metric over all data.


def _ddp_worker(
    rank: int, world_size: int, init_file: str, shards: list, top_k: int, out_dir: str
) -> None:
    dist.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size
    )
    try:
        preds, target = shards[rank]
        metrics = make_metrics(preds.shape[1], top_k)
        for start in range(0, len(preds), 9):
            p = torch.from_numpy(preds[start : start + 9])
            t = torch.from_numpy(target[start : start + 9])
            for metric in metrics.values():
                metric.update(p, t)
        values = {name: float(metric.compute()) for name, metric in metrics.items()}
        torch.save(values, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.timeout(120)
@pytest.mark.parametrize("empty_rank", [False, True])
def test_ddp_two_processes_equal_single_process(tmp_path, empty_rank: bool) -> None:
    preds, target = random_data(70, 25, seed=21, levels=7, empty_fraction=0.15)
    # Interleaved uneven shards, so the gathered order differs from the original one; with
    # ties everywhere this also checks that the tie rule does not depend on order.
    if empty_rank:
        rank0 = np.arange(len(preds))
        rank1 = np.arange(0)
    else:
        rank0 = np.flatnonzero(np.arange(len(preds)) % 3 != 2)
        rank1 = np.flatnonzero(np.arange(len(preds)) % 3 == 2)
    shards = [(preds[rank0], target[rank0]), (preds[rank1], target[rank1])]
    top_k = 10
    mp.spawn(
        _ddp_worker,
        args=(2, str(tmp_path / "init"), shards, top_k, str(tmp_path)),
        nprocs=2,
        join=True,
    )
    expected = oracle_all(preds, target, top_k)
    for rank in range(2):
        assert_matches_oracle(torch.load(tmp_path / f"rank{rank}.pt"), expected)


# ----------------------------------------------------------------------------------------------
# GPU: the same values on CUDA as on CPU.


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_equals_oracle() -> None:
    preds, target = random_data(300, 40, seed=31, levels=9, empty_fraction=0.1)
    metrics = {name: metric.to("cuda") for name, metric in make_metrics(40, 20).items()}
    for start in range(0, len(preds), 64):
        p = torch.from_numpy(preds[start : start + 64]).cuda()
        t = torch.from_numpy(target[start : start + 64]).cuda()
        for metric in metrics.values():
            metric.update(p, t)
    got = {name: float(metric.compute()) for name, metric in metrics.items()}
    assert_matches_oracle(got, oracle_all(preds, target, 20))
