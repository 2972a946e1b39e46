"""Plain iterators for looking at YouTube-8M data outside of training."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterable, Iterator
from typing import Literal, TypeVar

import numpy as np
from google.protobuf.message import DecodeError

from nextvlad.data import protos
from nextvlad.data.dataset import OnError, YT8MFrameDataset
from nextvlad.data.parsing import parse_frame_record, parse_video_level_record
from nextvlad.data.records import Compression, DataError, FramingError, expand_paths, read_records
from nextvlad.data.transforms import ReverseWhitening, dequantize, finalize_batch

logger = logging.getLogger("nextvlad.data")

Level = Literal["auto", "frame", "video"]
T = TypeVar("T")


def iter_videos(pattern_or_files: str | os.PathLike | Iterable[str], max_frames: int = 300,
                num_classes: int = 3862, *, level: Level = "auto", compression: Compression = "auto",
                on_error: OnError = "raise") -> Iterator[dict]:
    """Yield every video of the given TFRecord files, in file order, one dict per video.

    Frame-level records (SPEC 1.1) give::

        {"id": str, "rgb": float32 (n, 1024), "audio": float32 (a, 128), "num_frames": n,
         "labels": float32 (num_classes,) multi-hot, "label_ids": list[int], "has_labels": bool}

    with frames dequantized (``q*4/255 + 4/512 - 2``), *not* padded, each stream truncated to
    max_frames on its own: n = min(rgb frames, max_frames) (frames are counted on rgb, as the
    authors' reader does) and a = min(audio frames, max_frames). A record whose streams differ in
    length has a != n: 10 rgb and 6 audio frames give rgb (10, 1024), audio (6, 128),
    num_frames 10 (a batch pads the 4 missing audio rows with 0.0 inside the mask); 6 rgb and 10
    audio frames give rgb (6, 1024), audio (10, 128), num_frames 6 (a batch keeps the 4 extra
    audio rows, past the mask). Video-level records (SPEC 1.2) give
    ``mean_rgb`` (1024,) / ``mean_audio`` (128,) float32 instead of rgb/audio/num_frames.
    `level="auto"` decides per record: a record that is not a valid frame-level record but has a
    ``mean_rgb`` feature and no feature lists is video-level. Bad records raise DataError naming file and record (or are skipped with
    on_error="skip").

    Example::

        for video in iter_videos("data/yt8m/frame/validate00.tfrecord"):
            print(video["id"], video["num_frames"], video["label_ids"])
    """
    yield from parse_records(
        pattern_or_files, lambda data, path, index: _decode(data, path, index, max_frames, num_classes, level),
        on_error, compression)


def parse_records(pattern_or_files: str | os.PathLike | Iterable[str], parse: Callable[[bytes, str, int], T],
                  on_error: OnError = "raise", compression: Compression = "auto",
                  on_skip: Callable[[DataError], object] | None = None) -> Iterator[T]:
    """``parse(data, path, index)`` of every record of the files, in file order, through the
    CRC-checked reader.

    A bad record (a DataError of the reader or of ``parse``) raises, or with ``on_error="skip"``
    is logged, handed to ``on_skip`` (to count it) and skipped; so is the rest of a file whose
    framing breaks (empty, truncated: nothing after it can be located), as one skip.
    """
    for path in expand_paths(pattern_or_files):
        try:
            for index, data in enumerate(read_records(path, compression, yield_errors=on_error == "skip")):
                try:
                    if isinstance(data, DataError):
                        raise data
                    parsed = parse(data, path, index)
                except DataError as error:
                    _skip(error, "skipped", on_error, on_skip)
                    continue
                yield parsed
        except FramingError as error:
            _skip(error, "gave up the rest of the file:", on_error, on_skip)


def _skip(error: DataError, what: str, on_error: OnError, on_skip: Callable[[DataError], object] | None) -> None:
    if on_error == "raise":
        raise error
    logger.warning("on_error=skip: %s %s", what, error)
    if on_skip is not None:
        on_skip(error)


def _decode(data: bytes, path: str, index: int, max_frames: int, num_classes: int,
            level: Level) -> dict:
    if level == "video":
        return _video_level(data, path, index, num_classes)
    try:
        video = parse_frame_record(data, num_classes, path, index)
    except DataError:
        if level == "auto" and _is_video_level(data):
            return _video_level(data, path, index, num_classes)
        raise
    n = min(video.num_frames, max_frames)
    return {"id": video.id, "rgb": dequantize(video.rgb[:n]),
            "audio": dequantize(video.audio[:max_frames]), "num_frames": n,
            **_labels(video.labels, video.has_labels, num_classes)}


def _is_video_level(data: bytes) -> bool:
    """An Example parses as a SequenceExample with only a context: look for mean_rgb there."""
    message = protos.LazySequenceExample()
    try:
        message.ParseFromString(data)
    except DecodeError:
        return False
    return not message.feature_lists.feature_list and "mean_rgb" in message.context.feature


def _video_level(data: bytes, path: str, index: int, num_classes: int) -> dict:
    record = parse_video_level_record(data, num_classes, path, index)
    return {"id": record.id, "mean_rgb": record.mean_rgb, "mean_audio": record.mean_audio,
            **_labels(record.labels, record.has_labels, num_classes)}


def _labels(label_ids: np.ndarray, has_labels: bool, num_classes: int) -> dict:
    multi_hot = np.zeros(num_classes, np.float32)
    multi_hot[label_ids] = 1.0
    return {"labels": multi_hot, "label_ids": sorted(set(label_ids.tolist())),
            "has_labels": has_labels}


def iter_batches(pattern_or_files: str | os.PathLike | Iterable[str], batch_size: int = 160,
                 max_frames: int = 300, num_classes: int = 3862, *,
                 eigenvalues_path: str | None = None, on_error: OnError = "raise",
                 compression: Compression = "auto") -> Iterator[dict]:
    """Yield float batches in the training batch contract, on the CPU, in file order, no drops.

    Same keys, dtypes and values as what `YT8MDataModule` hands a LightningModule: ``id``,
    ``rgb`` float32 (B, max_frames, 1024), ``audio`` float32 (B, max_frames, 128) zero-padded after
    dequantizing (and reverse-whitened if `eigenvalues_path` is given), ``lengths`` int64,
    ``labels`` float32 multi-hot, ``has_labels`` bool. Single process; for inference scripts and
    tests.
    """
    dataset = YT8MFrameDataset(list(expand_paths(pattern_or_files)), batch_size=batch_size,
                               max_frames=max_frames, num_classes=num_classes, training=False,
                               on_error=on_error, compression=compression)
    whitening = ReverseWhitening(eigenvalues_path) if eigenvalues_path else None
    for batch in dataset:
        yield finalize_batch(batch, whitening)
