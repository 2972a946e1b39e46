"""The segment reader and data module (SPEC_SEGMENTS 2, 3) against hand-encoded records."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from segment_wire import dequantized, frame_values, int64_feature, sequence_example, write_tfrecord

from nextvlad.data import DataError, YT8MSegmentDataModule
from nextvlad.data.segments import candidate_starts, video_fold

C = 10


def batches(pattern, split="validate", **kwargs) -> list[dict]:
    options = dict(num_workers=0, num_classes=C, num_folds=None, eval_batch_size=4)
    options.update(kwargs)
    key = {"validate": "val_pattern", "predict": "predict_pattern", "fit": "train_pattern"}[split]
    module = YT8MSegmentDataModule(**{key: pattern}, **options)
    module.setup(split)
    loader = {"validate": module.val_dataloader, "predict": module.predict_dataloader,
              "fit": module.train_dataloader}[split]()
    return [module.transform(batch) for batch in loader]


def concat(parts: list[dict]) -> dict:
    out = {"id": [i for b in parts for i in b["id"]]}
    for key in ("rgb", "audio", "lengths", "labels", "label_weights", "has_labels"):
        out[key] = torch.cat([b[key] for b in parts])
    return out


def expected_rows(num_frames: int, start: int, frames: int = 5) -> tuple[np.ndarray, np.ndarray]:
    """float64 oracle: rows [start, start+5) of the video, 0.0 past its real frames."""
    rgb, audio = frame_values(num_frames)
    out_rgb, out_audio = np.zeros((frames, 1024)), np.zeros((frames, 128))
    real = max(0, min(frames, num_frames - start))
    out_rgb[:real] = dequantized(rgb[start:start + real])
    out_audio[:real] = dequantized(audio[start:start + real])
    return out_rgb, out_audio


def test_rated_segments_layout_order_labels_and_weights(tmp_path):
    # SPEC_SEGMENTS 2.2 (observed): starts [55, 10, 30, 10, 55, 30, 0] give segments 55, 10, 30, 0;
    # (10, class 2) is rated twice: the last score (1.0) wins; (55, 1): 1.0 then 0.0 -> 0.0.
    starts = [55, 10, 30, 10, 55, 30, 0]
    classes = [1, 2, 3, 2, 1, 4, 5]
    scores = [1.0, 0.0, 1.0, 1.0, 0.0, 1.0, 1.0]
    path = write_tfrecord(tmp_path / "v.tfrecord", [sequence_example("Va01", 60, starts, classes, scores)])
    batch = concat(batches(path))
    assert batch["id"] == ["Va01:55", "Va01:10", "Va01:30", "Va01:0"]
    assert batch["lengths"].tolist() == [5, 5, 5, 5]
    for row, start in enumerate([55, 10, 30, 0]):
        rgb, audio = expected_rows(60, start)
        np.testing.assert_allclose(batch["rgb"][row].double().numpy(), rgb, rtol=0, atol=1e-6)
        np.testing.assert_allclose(batch["audio"][row].double().numpy(), audio, rtol=0, atol=1e-6)
    want_labels = np.zeros((4, C))
    want_weights = np.zeros((4, C))
    for segment, class_id, score in [(0, 1, 0.0), (1, 2, 1.0), (2, 3, 1.0), (2, 4, 1.0), (3, 5, 1.0)]:
        want_labels[segment, class_id], want_weights[segment, class_id] = score, 1.0
    np.testing.assert_array_equal(batch["labels"].numpy(), want_labels)
    np.testing.assert_array_equal(batch["label_weights"].numpy(), want_weights)
    assert batch["has_labels"].all()


@pytest.mark.parametrize("segment_frames", ["real", 5])
def test_start_past_the_real_frames_gives_padding_counted_and_logged(tmp_path, caplog, segment_frames):
    # 12 frames: start 10 has 2 real frames, start 150 none (start + 5 <= 300: not an error).
    path = write_tfrecord(tmp_path / "v.tfrecord",
                          [sequence_example("v", 12, [10, 150], [1, 2], [1.0, 1.0])])
    with caplog.at_level(logging.WARNING, logger="nextvlad.data"):
        batch = concat(batches(path, segment_frames=segment_frames))
    want = [2, 0] if segment_frames == "real" else [5, 5]
    assert batch["lengths"].tolist() == want
    for row, start in enumerate([10, 150]):
        rgb, _ = expected_rows(12, start)  # rows past the video are exactly 0.0 either way
        np.testing.assert_allclose(batch["rgb"][row].double().numpy(), rgb, rtol=0, atol=1e-6)
    assert batch["label_weights"][1, 2] == 1  # its rating is kept
    assert "1 rated segments start at or past the end of their video" in caplog.text


def test_video_without_ratings_yields_nothing_and_batches_count_videos(tmp_path):
    records = [sequence_example("a", 20), sequence_example("b", 20, [0], [3], [1.0]),
               sequence_example("c", 20, [], [], [])]
    path = write_tfrecord(tmp_path / "v.tfrecord", records)
    parts = batches(path, eval_batch_size=2)
    assert [b["id"] for b in parts] == [["b:0"], []]  # batch 2 holds video c: no segment


@pytest.mark.parametrize("frames, starts, lengths", [
    (1, [0], [1]), (4, [0], [4]), (7, [0, 5], [5, 2]), (13, [0, 5, 10], [5, 5, 3]),
    (60, list(range(0, 60, 5)), [5] * 12), (298, list(range(0, 300, 5)), [5] * 59 + [3]),
    (330, list(range(0, 300, 5)), [5] * 60),
])
def test_candidate_segments_for_prediction(tmp_path, frames, starts, lengths):
    """SPEC_SEGMENTS 3 examples: starts 0, 5, ... < n (at most 60), the last one partial."""
    path = write_tfrecord(tmp_path / "t.tfrecord", [sequence_example("Te07", frames, [5], [1], [1.0])])
    batch = concat(batches(path, split="predict"))
    assert batch["id"] == [f"Te07:{s}" for s in starts]
    assert batch["lengths"].tolist() == lengths
    assert not batch["has_labels"].any() and not batch["label_weights"].any()  # ratings ignored
    last_rgb, _ = expected_rows(frames, starts[-1])
    np.testing.assert_allclose(batch["rgb"][-1].double().numpy(), last_rgb, rtol=0, atol=1e-6)
    assert candidate_starts(0).size == 0


def segment_rows(quantized: np.ndarray, start: int) -> np.ndarray:
    """float64 oracle: rows [start, start+5) of one stream padded with 0.0 on its own."""
    out = np.zeros((5, quantized.shape[1]))
    real = quantized[start:start + 5]
    out[:len(real)] = dequantized(real)
    return out


@pytest.mark.parametrize("segment_frames", ["real", 5])
def test_rgb_audio_mismatch_segments_count_rgb_frames_and_pad_audio_on_its_own(tmp_path, segment_frames):
    """SPEC_SEGMENTS 2.1 / SPEC.md 1.1 step 6: each stream is padded to 300 rows on its own
    (0.0 after dequantizing) before segments are gathered; frames are counted on rgb."""
    streams = {"short_audio": (frame_values(12)[0], frame_values(7)[1]),
               "long_audio": (frame_values(6)[0], frame_values(12)[1])}
    path = write_tfrecord(tmp_path / "v.tfrecord", [
        sequence_example(name, pair, [0, 5, 10], [1, 2, 3], [1.0, 1.0, 1.0])
        for name, pair in streams.items()])
    batch = concat(batches(path, segment_frames=segment_frames))
    assert batch["id"] == [f"{name}:{s}" for name in streams for s in (0, 5, 10)]
    want = [5, 5, 2, 5, 1, 0] if segment_frames == "real" else [5] * 6
    assert batch["lengths"].tolist() == want
    for row, (name, start) in enumerate((name, s) for name in streams for s in (0, 5, 10)):
        for key, quantized in zip(("rgb", "audio"), streams[name]):
            expected, got = segment_rows(quantized, start), batch[key][row].double().numpy()
            np.testing.assert_allclose(got, expected, rtol=0, atol=1e-6, err_msg=f"{key} {row}")
            assert (got[expected == 0] == 0).all()  # 0.0 padding, never Dequantize(0)
    # candidates for prediction: starts 0, 5, ... below the rgb frame count
    predicted = concat(batches(path, split="predict"))
    assert predicted["id"] == ["short_audio:0", "short_audio:5", "short_audio:10",
                               "long_audio:0", "long_audio:5"]
    assert predicted["lengths"].tolist() == [5, 5, 2, 5, 1]


BAD = {
    "start + 5 > 300": (dict(starts=[296], classes=[1], scores=[1.0]), "start time 296 is outside"),
    "negative start": (dict(starts=[-5], classes=[1], scores=[1.0]), "start time -5 is outside"),
    "class out of range": (dict(starts=[0], classes=[C], scores=[1.0]), f"segment label {C} is outside"),
    "negative class": (dict(starts=[0], classes=[-1], scores=[1.0]), "segment label -1 is outside"),
    "labels vs starts": (dict(starts=[0, 5], classes=[1], scores=[1.0]), "different lengths"),
    "scores vs labels": (dict(starts=[0], classes=[1], scores=[1.0, 0.0]), "different lengths"),
    "score outside [0, 1]": (dict(starts=[0], classes=[1], scores=[2.0]), "score 2.0 is outside"),
}


@pytest.mark.parametrize("case", BAD, ids=list(BAD))
def test_bad_ratings_name_file_and_record_or_are_skipped_and_counted(tmp_path, case):
    ratings, message = BAD[case]
    good = sequence_example("good", 20, [0], [1], [1.0])
    path = write_tfrecord(tmp_path / "bad.tfrecord", [good, sequence_example("bad", 20, **ratings)])
    with pytest.raises(DataError, match=rf"bad.tfrecord, record 1: .*{message}"):
        batches(path)
    module = YT8MSegmentDataModule(val_pattern=path, num_workers=0, num_classes=C, num_folds=None,
                                   on_error="skip")
    module.setup("validate")
    ids = [i for b in module.val_dataloader() for i in module.transform(b)["id"]]
    assert ids == ["good:0"] and module.read_stats["skipped_records"] == 1


def test_rating_list_of_the_wrong_type_is_an_error(tmp_path):
    record = sequence_example("v", 20, [0], [1], [1.0], extra_context={"segment_scores": int64_feature([1])})
    path = write_tfrecord(tmp_path / "v.tfrecord", [record])
    with pytest.raises(DataError, match="record 0: context feature 'segment_scores' must be a float_list"):
        batches(path)


def test_folds_split_the_rated_videos_by_id_reproducibly(tmp_path):
    ids = [f"v{i:03d}" for i in range(60)]
    path = write_tfrecord(tmp_path / "v.tfrecord", [sequence_example(i, 10, [0], [1], [1.0]) for i in ids])
    kwargs = dict(num_folds=3, val_fold=1, fold_seed=4, eval_batch_size=8, batch_size=8, drop_last=False)
    val = {i.split(":")[0] for b in batches(path, "validate", **kwargs) for i in b["id"]}
    train = {i.split(":")[0] for b in batches(path, "fit", **kwargs) for i in b["id"]}
    assert val == {i for i in ids if video_fold(i, 3, 4) == 1}
    assert train == set(ids) - val and 0 < len(val) < len(ids)
    assert video_fold("v001", 3, 4) == video_fold("v001", 3, 4)  # a pure function of (seed, id)


def test_bad_module_arguments_are_named():
    with pytest.raises(ValueError, match="segment_frames must be"):
        YT8MSegmentDataModule(val_pattern="x", segment_frames=4)
    with pytest.raises(ValueError, match="num_folds >= 2 and 0 <= val_fold < num_folds"):
        YT8MSegmentDataModule(val_pattern="x", num_folds=3, val_fold=3)
    with pytest.raises(ValueError, match="sample_frames does not apply"):
        YT8MSegmentDataModule(val_pattern="x", sample_frames=5)


def test_data_errors_name_the_segment_module_the_user_configured(tmp_path):
    with pytest.raises(ValueError, match="^YT8MSegmentDataModule: train_pattern is not set, needed for fit$"):
        YT8MSegmentDataModule(val_pattern="x").train_dataloader()
    with pytest.raises(FileNotFoundError, match="^YT8MSegmentDataModule val_pattern: no files match"):
        YT8MSegmentDataModule(val_pattern=str(tmp_path / "nowhere*.tfrecord")).val_dataloader()


def test_workers_and_ddp_ranks_read_every_rated_segment_once(tmp_path):
    for f in range(2):
        write_tfrecord(tmp_path / f"v{f}.tfrecord",
                       [sequence_example(f"f{f}v{i}", 12, [0, 5], [1, 2], [1.0, 0.0]) for i in range(7)])
    pattern = str(tmp_path / "v*.tfrecord")
    single = [i for b in batches(pattern) for i in b["id"]]
    assert len(single) == 28 and len(set(single)) == 28
    assert sorted(i for b in batches(pattern, num_workers=2) for i in b["id"]) == sorted(single)
    from nextvlad.data.segments import YT8MSegmentDataset

    per_rank = []
    for rank in range(2):
        dataset = YT8MSegmentDataset(pattern, batch_size=3, num_classes=C)
        dataset.set_distributed(rank, 2)
        per_rank.append([i for batch in dataset for i in batch["id"]])
    assert sorted(per_rank[0] + per_rank[1]) == sorted(single) and not set(per_rank[0]) & set(per_rank[1])


def test_a_mid_epoch_resume_with_another_fold_is_refused(tmp_path):
    """The fold selection decides which videos' segments train: changed inside an epoch, the rest of
    it would train other videos (maybe validated ones). Refused like another seed; at the same
    folds the position continues."""
    from nextvlad.data.segments import FoldSelection, YT8MSegmentDataset

    write_tfrecord(tmp_path / "v.tfrecord", [sequence_example(f"v{i}", 12, [0, 5], [1, 2], [1.0, 0.0]) for i in range(9)])

    def dataset(val_fold):
        made = YT8MSegmentDataset(str(tmp_path / "v.tfrecord"), batch_size=2, num_classes=C,
                                  folds=FoldSelection(3, val_fold, seed=0, validation=False))
        made.set_epoch(0)
        return made

    saved = dataset(0)
    batches = iter(saved)
    next(batches), next(batches)
    same, other = dataset(0), dataset(1)
    same.load_state_dict(saved.state_dict())
    assert next(iter(same))["id"] == next(batches)["id"]
    other.load_state_dict(saved.state_dict())
    with pytest.raises(ValueError, match="cannot continue the saved data position: it was saved with folds=") as error:
        next(iter(other))
    assert "'val_fold': 0" in str(error.value) and "'val_fold': 1" in str(error.value)
