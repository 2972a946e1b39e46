"""Bad input: every case fails with an error naming the file and record, or is skipped and counted."""

from __future__ import annotations

import contextlib
import io
import logging
import pickle

import numpy as np
import pytest

from segment_wire import dequantized, frame_values, sequence_example, write_tfrecord

from nextvlad.data import DataError, FramingError, YT8MFrameDataset, iter_videos, write_records
from nextvlad.data import protos
from nextvlad.data.dataset import STAT_NAMES
from nextvlad.data.parsing import encode_frame_record, encode_video_level_record
from nextvlad.data.records import frame_record

NUM_CLASSES = 10


def good_record(i: int, frames: int = 3) -> bytes:
    rng = np.random.default_rng(i)
    return encode_frame_record(f"good{i}", rng.integers(0, 256, (frames, 1024), dtype=np.uint8),
                               rng.integers(0, 256, (frames, 128), dtype=np.uint8), [i % NUM_CLASSES])


def custom_record(rgb_sizes=(1024,) * 3, audio_sizes=(128,) * 3, labels=(1,), lists=("rgb", "audio")):
    message = protos.SequenceExample()
    message.context.feature["id"].bytes_list.value.append(b"bad")
    message.context.feature["labels"].int64_list.value.extend(labels)
    for name, sizes in (("rgb", rgb_sizes), ("audio", audio_sizes)):
        if name in lists:
            feature_list = message.feature_lists.feature_list[name]
            for size in sizes:
                feature_list.feature.add().bytes_list.value.append(bytes(size))
    return message.SerializeToString()


def write(tmp_path, records, name="bad.tfrecord") -> str:
    path = str(tmp_path / name)
    write_records(path, records)
    return path


def ids_read(path, on_error="raise"):
    return [v["id"] for v in iter_videos(path, num_classes=NUM_CLASSES, on_error=on_error,
                                         level="frame")]


def dataset_ids(path, on_error="raise", caplog=None):
    dataset = YT8MFrameDataset(path, batch_size=2, num_classes=NUM_CLASSES, on_error=on_error)
    ids, skipped = [], 0
    for batch in dataset:
        ids += batch["id"]
        skipped += int(batch["read_stats"][0])
    return ids, skipped


BAD_RECORDS = {
    "not a SequenceExample": (b"\xff\xff\xff\xff", "not a tf.train.SequenceExample"),
    "missing rgb": (custom_record(lists=("audio",)), "no 'rgb' feature list"),
    "missing audio": (custom_record(lists=("rgb",)), "no 'audio' feature list"),
    "wrong bytes per frame": (custom_record(rgb_sizes=(1024, 1000, 1024)),
                              "'rgb' frame 1 has 1000 bytes, expected 1024"),
    "label >= num_classes": (custom_record(labels=(3, NUM_CLASSES)),
                             f"label {NUM_CLASSES} is outside [0, num_classes={NUM_CLASSES})"),
    "negative label": (custom_record(labels=(-1,)), "label -1 is outside"),
    "0 frames": (custom_record(rgb_sizes=(), audio_sizes=()), "has 0 frames"),
    # frames are counted on rgb (SPEC 1.1 step 6): audio alone is still a video of 0 frames
    "0 rgb frames": (custom_record(rgb_sizes=(), audio_sizes=(128,) * 3),
                     "has 0 frames (0 rgb frames, 3 audio frames)"),
    "video-level record": (encode_video_level_record("vl", np.zeros(1024), np.zeros(128), [1]),
                           "the models and their data modules need frame-level records; iter_videos(level='video') reads"),
}


@pytest.mark.parametrize("case", sorted(BAD_RECORDS))
def test_bad_record_raises_with_file_and_index_or_is_skipped(tmp_path, case, caplog):
    record, message = BAD_RECORDS[case]
    path = write(tmp_path, [good_record(0), record, good_record(2)])
    for read in (ids_read, lambda p: dataset_ids(p)[0]):
        with pytest.raises(DataError) as error:
            read(path)
        assert f"{path}, record 1:" in str(error.value) and message in str(error.value)
        assert error.value.path == path and error.value.index == 1
    assert ids_read(path, on_error="skip") == ["good0", "good2"]
    with caplog.at_level(logging.WARNING, logger="nextvlad.data"):
        ids, skipped = dataset_ids(path, on_error="skip")
    assert ids == ["good0", "good2"] and skipped == 1
    assert "skipped 1 bad records" in caplog.text and f"{path}, record 1" in caplog.text


def test_corrupted_data_crc(tmp_path):
    path = write(tmp_path, [good_record(0), good_record(1), good_record(2)])
    raw = bytearray(open(path, "rb").read())
    first = len(good_record(0)) + 16
    raw[first + 12 + 100] ^= 0x01  # one bit inside record 1's data
    open(path, "wb").write(bytes(raw))
    with pytest.raises(DataError, match=rf"{path}, record 1: corrupted record data \(CRC32C"):
        ids_read(path)
    assert ids_read(path, on_error="skip") == ["good0", "good2"]
    assert dataset_ids(path, on_error="skip") == (["good0", "good2"], 1)


def test_corrupted_length_crc(tmp_path):
    path = write(tmp_path, [good_record(0), good_record(1), good_record(2)])
    raw = bytearray(open(path, "rb").read())
    raw[len(good_record(0)) + 16] ^= 0x01  # record 1's length field
    open(path, "wb").write(bytes(raw))
    with pytest.raises(FramingError, match=rf"{path}, record 1: corrupted record header"):
        ids_read(path)
    with pytest.raises(FramingError, match=rf"{path}, record 1: corrupted record header"):
        YT8MFrameDataset(path, num_classes=NUM_CLASSES)  # found by the scan, before any training
    # Nothing after a broken length can be located: the rest of the file is given up, loudly.
    assert ids_read(path, on_error="skip") == ["good0"]
    assert dataset_ids(path, on_error="skip")[0] == ["good0"]


@pytest.mark.parametrize("cut", [5, 30, 2000])
def test_truncated_file(tmp_path, cut):
    path = write(tmp_path, [good_record(0), good_record(1)])
    raw = open(path, "rb").read()
    open(path, "wb").write(raw[: len(good_record(0)) + 16 + cut])
    with pytest.raises(FramingError, match=rf"{path}, record 1: truncated file"):
        ids_read(path)
    with pytest.raises(FramingError, match=rf"{path}, record 1: truncated file"):
        YT8MFrameDataset(path, num_classes=NUM_CLASSES)
    assert ids_read(path, on_error="skip") == ["good0"]
    assert dataset_ids(path, on_error="skip")[0] == ["good0"]


def test_truncated_gzip_file(tmp_path):
    path = str(tmp_path / "bad.tfrecord.gz")
    write_records(path, [good_record(0), good_record(1)], compression="gzip")
    raw = open(path, "rb").read()
    open(path, "wb").write(raw[: len(raw) - 200])
    with pytest.raises(FramingError, match=rf"{path}, record \d"):
        ids_read(path)
    with pytest.raises(FramingError, match=rf"{path}, record \d"):
        YT8MFrameDataset(path, num_classes=NUM_CLASSES)


def test_empty_file(tmp_path):
    empty = str(tmp_path / "empty.tfrecord")
    open(empty, "wb").close()
    good = write(tmp_path, [good_record(0)], name="good.tfrecord")
    with pytest.raises(FramingError, match=rf"{empty}: empty file"):
        YT8MFrameDataset([empty, good], num_classes=NUM_CLASSES)
    dataset = YT8MFrameDataset([empty, good], num_classes=NUM_CLASSES, on_error="skip")
    assert [i for b in dataset for i in b["id"]] == ["good0"]
    with pytest.raises(DataError, match="no readable records"):
        YT8MFrameDataset([empty], num_classes=NUM_CLASSES, on_error="skip")


def test_pattern_matching_nothing(tmp_path):
    pattern = str(tmp_path / "nothing*.tfrecord")
    with pytest.raises(FileNotFoundError, match="nothing\\*.tfrecord"):
        YT8MFrameDataset(pattern)
    with pytest.raises(FileNotFoundError, match="nothing\\*.tfrecord"):
        list(iter_videos(pattern))


def test_a_dangling_link_among_the_matches_is_an_error_naming_it(tmp_path):
    """A shard linked from a mount that is not there was left out of every epoch without a word."""
    from nextvlad.data import expand_paths

    (tmp_path / "train0000.tfrecord").write_bytes(frame_record(good_record(0)))
    (tmp_path / "train0001.tfrecord").symlink_to(tmp_path / "mount" / "train0001.tfrecord")
    (tmp_path / "train0002.tfrecord").mkdir()  # a folder is not a record file: passed over
    pattern = str(tmp_path / "train*.tfrecord")
    message = f"{tmp_path}/train0001.tfrecord \\(matched by .*\\) is a link to .*mount/train0001.tfrecord.*does not exist"
    with pytest.raises(FileNotFoundError, match=message):
        YT8MFrameDataset(pattern, num_classes=NUM_CLASSES)
    (tmp_path / "mount").mkdir()
    (tmp_path / "mount" / "train0001.tfrecord").write_bytes(frame_record(good_record(1)))
    assert expand_paths(pattern) == [str(tmp_path / f"train000{i}.tfrecord") for i in (0, 1)]


# (rgb frames, audio frames) of records whose streams differ; read with max_frames = 6.
MISMATCHED = {"short_audio": (5, 3), "long_audio": (3, 5), "no_audio": (4, 0), "both_cut": (8, 7)}
MISMATCH_MAX_FRAMES = 6


def mismatched_file(tmp_path) -> str:
    """Records written by the independent wire encoder: rgb frame f is all f, audio frame f all f+1."""
    records = [sequence_example(name, (frame_values(n_rgb)[0], frame_values(n_audio)[1]))
               for name, (n_rgb, n_audio) in MISMATCHED.items()]
    return write_tfrecord(tmp_path / "mismatch.tfrecord", records)


def expected_matrix(quantized: np.ndarray, max_frames: int) -> np.ndarray:
    """SPEC 1.1 steps 3-4 for one stream: dequantize, then cut or pad with 0.0 to max_frames."""
    out = np.zeros((max_frames, quantized.shape[1]))
    real = dequantized(quantized[:max_frames])
    out[:len(real)] = real
    return out


@pytest.mark.parametrize("route", ["cpu", "device_path", "dequantize_in_workers", "worker_shm"])
def test_rgb_audio_mismatch_follows_the_authors_reader(tmp_path, monkeypatch, route, caplog):
    """SPEC 1.1 step 6 / 7.5: the mask length is the rgb frame count (capped at max_frames) and
    the audio stream is padded (exactly 0.0, after dequantizing) or cut on its own."""
    from nextvlad.data import YT8MDataModule, transforms
    from nextvlad.data.transforms import finalize_batch

    path = mismatched_file(tmp_path)
    options = dict(num_classes=NUM_CLASSES, max_frames=MISMATCH_MAX_FRAMES)
    if route == "device_path":  # the GPU's masked_fill dequantization, run on CPU tensors
        monkeypatch.setattr(transforms, "_dequantize_padded_cpu", transforms._dequantize_padded_torch)
    if route == "worker_shm":  # a DataLoader worker filling its shared-memory buffers
        module = YT8MDataModule(val_pattern=path, eval_batch_size=4, num_workers=1, **options)
        module.setup("validate")
        raw = list(module.val_dataloader())
        batches = [module.transform(batch) for batch in raw]
        read_stats = [module.read_stats[name] for name in STAT_NAMES]
    else:
        dataset = YT8MFrameDataset(path, batch_size=4, **options,
                                   dequantize_in_workers=route == "dequantize_in_workers")
        with caplog.at_level(logging.WARNING, logger="nextvlad.data"):
            raw = list(dataset)
        batches = [finalize_batch(batch) for batch in raw]
        read_stats = sum(batch["read_stats"] for batch in raw).tolist()
        assert "4 rgb/audio frame-count mismatches" in caplog.text
    (batch,) = batches
    assert batch["id"] == list(MISMATCHED)  # the video without audio is read, not rejected
    assert batch["lengths"].tolist() == [5, 3, 4, 6]
    for row, (n_rgb, n_audio) in enumerate(MISMATCHED.values()):
        for key, quantized in (("rgb", frame_values(n_rgb)[0]), ("audio", frame_values(n_audio)[1])):
            want = expected_matrix(quantized, MISMATCH_MAX_FRAMES)
            got = batch[key][row].double().numpy()
            np.testing.assert_allclose(got, want, rtol=0, atol=1e-6, err_msg=f"{key} {row}")
            assert (got[want == 0] == 0).all()  # padding is 0.0, not Dequantize(0) = -1.99
    # long_audio keeps its audio rows 3-4 past its mask, as the authors' 300-row matrix does
    assert (batch["audio"][1, 3:5] != 0).all() and batch["lengths"][1] == 3
    assert read_stats == [0, 4, 1]  # every record mismatched; both_cut lost frames to max_frames


def test_iter_videos_shapes_for_mismatched_records(tmp_path):
    videos = list(iter_videos(mismatched_file(tmp_path), max_frames=MISMATCH_MAX_FRAMES,
                              num_classes=NUM_CLASSES))
    assert [v["id"] for v in videos] == list(MISMATCHED)
    for video, (n_rgb, n_audio) in zip(videos, MISMATCHED.values()):
        n, a = min(n_rgb, MISMATCH_MAX_FRAMES), min(n_audio, MISMATCH_MAX_FRAMES)
        assert video["num_frames"] == n
        assert video["rgb"].shape == (n, 1024) and video["audio"].shape == (a, 128)
        np.testing.assert_allclose(video["rgb"], dequantized(frame_values(n_rgb)[0][:n]), atol=1e-6)
        np.testing.assert_allclose(video["audio"], dequantized(frame_values(n_audio)[1][:a]), atol=1e-6)


def test_skipped_records_in_ddp_training_cannot_silently_unbalance_ranks(tmp_path):
    records = [good_record(i) for i in range(8)]
    records[1] = records[2] = records[3] = b"\xff\xff"
    path = write(tmp_path, records)
    dataset = YT8MFrameDataset(path, batch_size=2, num_classes=NUM_CLASSES, training=True,
                               on_error="skip", shuffle_buffer=0)
    dataset.set_distributed(0, 2)  # rank 0 reads records 0-3: 3 of them bad
    with pytest.raises(ValueError, match="DDP ranks would fall out of step"):  # a user error: one line
        list(dataset)
    dataset.set_distributed(1, 2)
    assert sum(len(b["id"]) for b in dataset) == 4


def test_missing_eigenvalues_file_is_a_clear_error_before_training(tmp_path):
    from nextvlad.data import YT8MDataModule

    missing = tmp_path / "yt8m_pca" / "eigenvals.npy"
    with pytest.raises(FileNotFoundError, match=r"eigenvalues_path: .*eigenvals.npy does not exist"):
        YT8MDataModule(train_pattern="unused*.tfrecord", eigenvalues_path=str(missing))


@pytest.mark.parametrize("bad_at", [[4, 5], [2, 3, 4, 5], [1, 4, 5]])
def test_skips_after_the_last_batch_still_reach_read_stats(tmp_path, bad_at):
    """read_stats travels with batches: skips after a reader's last good record must still be
    counted (on the last batch), not only logged."""
    records = [b"\xff\xff" if i in bad_at else good_record(i) for i in range(6)]
    path = write(tmp_path, records)
    ids, skipped = dataset_ids(path, on_error="skip")
    assert ids == [f"good{i}" for i in range(6) if i not in bad_at]
    assert skipped == len(bad_at)


@pytest.mark.parametrize("num_workers", [0, 1])
def test_a_reader_whose_whole_share_is_bad_hands_its_counts_to_the_loader(tmp_path, num_workers):
    """Rank 1 of 2 reads records 4-7, all bad: no batch carries its counts. With workers a message
    did; in the loader's own process (num_workers 0) they were logged but never counted."""
    from nextvlad.data.dataset import YT8MDataLoader

    path = write(tmp_path, [good_record(i) if i < 4 else b"\xff\xff" for i in range(8)])
    dataset = YT8MFrameDataset(path, batch_size=2, num_classes=NUM_CLASSES, on_error="skip")
    counted = []
    loader = YT8MDataLoader(dataset, context=lambda: (0, 1, 2), num_workers=num_workers,
                            on_unreported_read_stats=counted.append)
    assert list(loader) == []
    assert [stats.tolist() for stats in counted] == [[4, 0, 0]]


# One file of 7 videos in batches of 4 (planned: 4 + 3), record 5 bad: the skip falls in the last,
# partial batch, which is the last one a consumer that knows len() (Lightning) asks for.
LAST_BATCH_BAD = 5


def file_with_a_bad_record_in_the_last_batch(tmp_path) -> str:
    return write(tmp_path, [b"\xff\xff" if i == LAST_BATCH_BAD else good_record(i) for i in range(7)])


@contextlib.contextmanager
def data_log_lines(tmp_path):
    """The nextvlad.data warnings, also from DataLoader workers (forked: a file handler written
    in the child reaches the same file; caplog's handler would keep the child's records)."""
    path = tmp_path / "data.log"
    handler = logging.FileHandler(path)
    handler.setLevel(logging.WARNING)
    data_logger = logging.getLogger("nextvlad.data")
    data_logger.addHandler(handler)
    lines: list[str] = []
    try:
        yield lines
    finally:
        data_logger.removeHandler(handler)
        handler.close()
        lines += path.read_text().splitlines()


@pytest.mark.filterwarnings("ignore::UserWarning")  # Lightning's CPU/worker hints
@pytest.mark.parametrize("num_workers", [0, 1])
@pytest.mark.parametrize("stage", ["fit", "predict"])
def test_a_skip_in_the_last_batch_is_counted_and_logged_once_under_lightning(tmp_path, stage,
                                                                            num_workers):
    """Lightning takes len(loader) batches and asks no more: the reader's report must not wait
    for a request past its last batch (with num_workers 0 it used to be dropped silently)."""
    from test_data_datamodule import Recorder, trainer

    from nextvlad.data import YT8MDataModule

    path = file_with_a_bad_record_in_the_last_batch(tmp_path)
    datamodule = YT8MDataModule(train_pattern=path, val_pattern=path, predict_pattern=path,
                                batch_size=4, eval_batch_size=4, drop_last=False,
                                num_workers=num_workers, max_frames=5, num_classes=NUM_CLASSES,
                                on_error="skip")
    model = Recorder(NUM_CLASSES)
    with data_log_lines(tmp_path) as lines:
        if stage == "fit":
            # without validation: the only reader of the file is the training one
            trainer(max_epochs=1, limit_val_batches=0).fit(model, datamodule)
        else:
            trainer().predict(model, datamodule, return_predictions=False)
    received = model.received["train" if stage == "fit" else "predict"]
    assert [len(batch["id"]) for batch in received] == [4, 2]
    assert sorted(i for batch in received for i in batch["id"]) == \
        [f"good{i}" for i in range(7) if i != LAST_BATCH_BAD]
    assert datamodule.read_stats["skipped_records"] == 1
    skip_lines = [line for line in lines if "skipped 1 bad records" in line]
    assert len(skip_lines) == 1 and f"{path}, record {LAST_BATCH_BAD}" in skip_lines[0]


@pytest.mark.parametrize("training", [False, True])
def test_a_skip_in_the_last_batch_is_reported_by_the_last_batch_and_never_again(tmp_path, caplog,
                                                                                training):
    """Taking exactly the planned batches, the skip is counted and logged; asking past the end,
    or resuming from the position saved at the last batch, logs nothing more."""
    path = file_with_a_bad_record_in_the_last_batch(tmp_path)
    dataset = YT8MFrameDataset(path, batch_size=4, num_classes=NUM_CLASSES, training=training,
                               drop_last=False, on_error="skip")
    batches = iter(dataset)
    with caplog.at_level(logging.WARNING, logger="nextvlad.data"):
        planned = [next(batches) for _ in range(len(dataset))]
        assert caplog.text.count("skipped 1 bad records") == 1
        assert sum(int(batch["read_stats"][0]) for batch in planned) == 1
        saved = dataset.state_dict()
        assert list(batches) == []
        resumed = YT8MFrameDataset(path, batch_size=4, num_classes=NUM_CLASSES, training=training,
                                   drop_last=False, on_error="skip")
        resumed.load_state_dict(saved)
        assert list(resumed) == []
    assert caplog.text.count("skipped 1 bad records") == 1


def test_iter_videos_skips_are_logged_with_file_and_record(tmp_path, caplog):
    path = write(tmp_path, [good_record(0), b"\xff\xff", good_record(2)])
    with caplog.at_level(logging.WARNING, logger="nextvlad.data"):
        assert ids_read(path, on_error="skip") == ["good0", "good2"]
    assert f"{path}, record 1" in caplog.text
    caplog.clear()
    raw = open(path, "rb").read()
    open(path, "wb").write(raw[:-10])  # record 2 truncated: the rest of the file is given up
    with caplog.at_level(logging.WARNING, logger="nextvlad.data"):
        assert ids_read(path, on_error="skip") == ["good0"]
    assert f"{path}, record 1" in caplog.text and f"{path}, record 2: truncated" in caplog.text


def write_eigenvalues(tmp_path, name: str, array) -> str:
    path = str(tmp_path / name)
    np.save(path, np.asarray(array), allow_pickle=True)
    return path


def good_eigenvalues(dtype=np.float32) -> np.ndarray:
    return np.linspace(4.0, 0.5, 2048).astype(dtype)[:, None]


def one_line_error(path: str) -> str:
    from nextvlad.data.transforms import whitening_scale

    with pytest.raises(ValueError) as error:
        whitening_scale(path)
    message = str(error.value)
    assert "\n" not in message and message.startswith(f"{path}: ")
    return message


@pytest.mark.parametrize("bad_value, shown", [(np.inf, "inf"), (1e300, "1e+300")])
def test_eigenvalues_not_finite_as_float32_are_refused_naming_the_first(tmp_path, bad_value, shown):
    """inf, or a float64 beyond float32's range (inf once cast), passes "> 0" but would turn every
    rgb input into inf/NaN: an error naming the file, the first bad index and its value."""
    eigenvalues = good_eigenvalues(np.float64)
    eigenvalues[[7, 900], 0] = bad_value
    message = one_line_error(write_eigenvalues(tmp_path, "eigenvals.npy", eigenvalues))
    assert f"eigenvalue 7 is {shown}, not a finite float32" in message


def test_eigenvalues_beyond_the_first_1024_are_not_checked(tmp_path):
    """Only e[:1024] scales rgb (SPEC 2): an inf further on is harmless."""
    from nextvlad.data.transforms import whitening_scale

    eigenvalues = good_eigenvalues(np.float64)
    eigenvalues[1500, 0] = np.inf
    scale = whitening_scale(write_eigenvalues(tmp_path, "eigenvals.npy", eigenvalues))
    np.testing.assert_array_equal(scale, np.sqrt(eigenvalues[:1024, 0].astype(np.float32)) + np.float32(1e-4))


def npy_bytes(array) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, np.asarray(array), allow_pickle=True)
    return buffer.getvalue()


@pytest.mark.parametrize("content, expected", [
    (npy_bytes(good_eigenvalues())[:600], "not a readable .npy array of eigenvalues (Failed to read all data"),
    (npy_bytes(good_eigenvalues())[:20], "not a readable .npy array of eigenvalues"),  # cut in the header
    (npy_bytes(np.array([1.0] * 2048, dtype=object)),
     "not a readable .npy array of eigenvalues (Object arrays cannot be loaded"),
    (b"", "not a .npy file"),
    (b"0.5\n0.4\n", "not a .npy file"),
    (pickle.dumps(good_eigenvalues()), "not a .npy file"),
], ids=["truncated", "truncated header", "pickled objects", "empty", "text", "pickle"])
def test_unreadable_eigenvalues_file_is_one_line_naming_it(tmp_path, content, expected):
    path = tmp_path / "eigenvals.npy"
    path.write_bytes(content)
    assert expected in one_line_error(str(path))


def test_npz_archive_as_eigenvalues_is_refused(tmp_path):
    path = str(tmp_path / "eigenvals.npz")
    np.savez(path, eigenvalues=good_eigenvalues())
    assert "not a .npy file" in one_line_error(path)


@pytest.mark.parametrize("array, dtype", [
    (np.ones(2048, dtype=bool), "bool"),
    (np.ones((2048, 1), dtype=np.complex64), "complex64"),
    (np.array(["1.5"] * 2048), "<U3"),
    (np.array([b"1.5"] * 2048), "|S3"),
])
def test_non_numeric_eigenvalues_are_refused(tmp_path, array, dtype):
    message = one_line_error(write_eigenvalues(tmp_path, "eigenvals.npy", array))
    assert message.endswith(f"eigenvalues must be real numbers, got dtype {dtype}")


def test_integer_eigenvalues_are_accepted(tmp_path):
    """Integers are real numbers: the scale is float32 sqrt(e) + 1e-4 as for floats."""
    from nextvlad.data.transforms import whitening_scale

    scale = whitening_scale(write_eigenvalues(tmp_path, "eigenvals.npy", np.arange(2048, 0, -1, dtype=np.int64)))
    assert scale.dtype == np.float32
    np.testing.assert_allclose(scale[[0, 1023]], [np.sqrt(2048) + 1e-4, np.sqrt(1025) + 1e-4], rtol=1e-6)


@pytest.mark.parametrize("array, message", [
    (np.ones((1000, 1), np.float32), "expected at least 1024 eigenvalues of shape (N, 1) or (N,), got shape (1000, 1)"),
    (np.ones((2048, 2), np.float32), "got shape (2048, 2)"),
    (np.concatenate([np.ones(5), [np.nan], np.ones(2042)]), "the first 1024 eigenvalues must be > 0"),
    (np.concatenate([np.ones(5), [0.0], np.ones(2042)]), "the first 1024 eigenvalues must be > 0"),
])
def test_existing_eigenvalue_errors_are_kept(tmp_path, array, message):
    assert message in one_line_error(write_eigenvalues(tmp_path, "eigenvals.npy", array))
