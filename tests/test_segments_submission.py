"""The 2019 submission (SPEC_SEGMENTS 4): whitelist, top 20 per segment, %g ranking, cap, ties."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from nextvlad.segments import SegmentRanking, read_class_whitelist, round_significant

from conftest import REPO_ROOT

SHARED_WHITELIST = REPO_ROOT.parent / "shared" / "yt8m_segments" / "segment_label_ids.csv"


def submission(ranking: SegmentRanking) -> list[str]:
    return list(ranking.lines())


def test_whitelisted_top_k_per_segment_and_per_class_order():
    # 6 classes, whitelist {1, 3, 4}; top_k 2. Class 5 scores highest everywhere but is not
    # whitelisted: it never takes a place (Google can spend places on it and drop it later).
    probabilities = torch.tensor([
        [0.0, 0.9, 0.0, 0.2, 0.1, 1.0],   # v:0 -> 1 (0.9), 3 (0.2)
        [0.0, 0.3, 0.0, 0.8, 0.7, 1.0],   # v:5 -> 3 (0.8), 4 (0.7)
        [0.0, 0.5, 0.0, 0.5, 0.5, 1.0],   # w:0 -> three-way tie: lower class ids 1, 3 win
    ])
    ranking = SegmentRanking(np.array([1, 3, 4]), top_k=2, segment_max_pred=10)
    ranking.add(["v:0", "v:5", "w:0"], probabilities)
    assert submission(ranking) == [
        "Class,Segments\n",
        "1,v:0 w:0\n",
        "3,v:5 w:0 v:0\n",
        "4,v:5\n",
    ]


def test_scores_rank_after_g_rounding_and_ties_go_by_segment_id():
    # 0.1234561 and 0.1234559 both print as 0.123456 with %g: they tie and the segment id decides,
    # as (video id, start as a number): b:5 before b:10 (the strings would sort the other way).
    ranking = SegmentRanking(np.array([0]), top_k=1, segment_max_pred=10)
    ranking.add(["b:10", "c:0", "b:5", "a:0"],
                torch.tensor([[0.1234561], [0.1234559], [0.1234560], [0.2]]).double())
    assert submission(ranking)[1] == "0,a:0 b:5 b:10 c:0\n"


def test_cap_keeps_the_best_segments_per_class_in_any_arrival_order():
    rng = np.random.default_rng(0)
    scores = rng.integers(0, 20, 500) / 20.0  # many ties
    ids = [f"v{i // 12:03d}:{5 * (i % 12)}" for i in range(500)]
    key = lambda i: (-scores[i], ids[i].split(":")[0], int(ids[i].split(":")[1]))
    expected = "0," + " ".join(ids[i] for i in sorted(range(500), key=key)[:37]) + "\n"
    for seed in range(3):
        order = np.random.default_rng(seed).permutation(500)
        # small flushes, so that the cut at 2 x cap happens many times along the way
        ranking = SegmentRanking(np.array([0]), top_k=1, segment_max_pred=37, flush_entries=10)
        for chunk in np.array_split(order, 23):
            ranking.add([ids[i] for i in chunk], torch.from_numpy(scores[chunk, None]))
            # bounded while it runs: pending entries are flushed, a class is cut past 2 x cap
            assert ranking._pending_entries < 10 and ranking._kept[0].size <= 2 * 37
        assert submission(ranking)[1] == expected


def test_round_significant_equals_percent_g():
    rng = np.random.default_rng(1)
    values = np.concatenate([
        rng.random(200_000, dtype=np.float32), 1 / (1 + np.exp(-rng.normal(0, 8, 200_000))).astype(np.float32),
        np.float32(2.0) ** -np.arange(1, 40, dtype=np.float32), [0.99999994, 1e-5, 0.0, 1.0],
    ]).astype(np.float32)
    expected = np.array([float("%g" % v) for v in values.astype(np.float64)])
    np.testing.assert_array_equal(round_significant(values), expected)


def test_the_shared_whitelist_reads_as_1000_classes():
    if not SHARED_WHITELIST.is_file():
        pytest.skip(f"{SHARED_WHITELIST} not present")
    whitelist = read_class_whitelist(SHARED_WHITELIST, 3862)
    assert len(whitelist) == 1000 and whitelist.min() >= 3 and whitelist.max() <= 1831
    assert (np.diff(whitelist) > 0).all()


def test_whitelist_as_an_editor_saves_it_reads_the_same(tmp_path):
    """A byte order mark, CRLF line ends and blank lines (a trailing one above all) change nothing."""
    path = tmp_path / "ids.csv"
    path.write_bytes(b"\xef\xbb\xbfIndex\r\n7\r\n\r\n3\r\n\r\n")
    np.testing.assert_array_equal(read_class_whitelist(path, 3862), [3, 7])


@pytest.mark.parametrize("text, message", [
    ("Index\n3\nx\n", "line 3: 'x' is not a class id"),
    ("Index\n3\n3862\n", "line 3: class 3862 is outside"),
    ("Index\n3\n7\n3\n", "line 4: class 3 repeats line 2"),
    ("Index\n", "no class ids"),
])
def test_bad_whitelist_is_named(tmp_path, text, message):
    path = tmp_path / "ids.csv"
    path.write_text(text)
    with pytest.raises(ValueError, match=message):
        read_class_whitelist(path, 3862)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_class_whitelist(tmp_path / "missing.csv", 3862)


def test_bad_segment_ids_and_shapes_are_named():
    ranking = SegmentRanking(np.array([1]), top_k=1)
    with pytest.raises(ValueError, match="'v-3' is not '<video id>:<start>'"):
        ranking.add(["v-3"], torch.zeros(1, 2))
    with pytest.raises(ValueError, match="whitelist names class 1"):
        ranking.add(["v:0"], torch.zeros(1, 1))
    with pytest.raises(ValueError, match="for 2 segment ids"):
        ranking.add(["v:0", "v:5"], torch.zeros(1, 2))


def test_write_is_atomic(tmp_path):
    target = tmp_path / "segment_submission.csv"
    target.write_text("old complete file\n")

    class Broken(SegmentRanking):
        def lines(self):
            yield "Class,Segments\n"
            raise RuntimeError("interrupted")

    with pytest.raises(RuntimeError):
        Broken(np.array([0])).write(target)
    assert target.read_text() == "old complete file\n"
    assert [p.name for p in tmp_path.iterdir()] == ["segment_submission.csv"]


def test_ddp_parts_merge_to_the_single_process_file(tmp_path):
    rng = np.random.default_rng(2)
    probabilities = torch.from_numpy(rng.random((90, 6)).astype(np.float32))
    ids = [f"v{i // 9}:{5 * (i % 9)}" for i in range(90)]
    single = SegmentRanking(np.array([0, 2, 5]), top_k=2, segment_max_pred=20)
    single.add(ids, probabilities)
    parts = []
    for rank, rows in enumerate((slice(0, 40), slice(40, 90))):
        part = SegmentRanking(np.array([0, 2, 5]), top_k=2, segment_max_pred=20)
        part.add(ids[rows], probabilities[rows])
        part.save_state(tmp_path / f"rank{rank}.npz")
        parts.append(tmp_path / f"rank{rank}.npz")
    merged = SegmentRanking(np.array([0, 2, 5]), top_k=2, segment_max_pred=20)
    for path in reversed(parts):  # order of the parts does not matter
        merged.merge_state(path)
    assert submission(merged) == submission(single)
