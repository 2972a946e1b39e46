"""The 2019 segment task's data: segment-rated records to 5-frame segment batches (SPEC_SEGMENTS).

Two kinds of examples come out of frame-level records (SPEC.md 1.1), read by the same CRC-checked
reader and uint8 path as video-level training:

* **rated** segments (validation records with ``segment_labels``, ``segment_start_times`` and
  ``segment_scores``, SPEC_SEGMENTS 1.2 and 2): one example per distinct start time, in the order
  of first occurrence, with the frames ``[start, start + 5)``, ``labels`` = the rated scores and
  ``label_weights`` = 1 on the rated (segment, class) entries; a repeated (start, class) keeps the
  last score, as Google's ``SparseToDense`` does. A video without ratings gives no example.
* **candidate** segments (any record, for prediction, SPEC_SEGMENTS 3): starts 0, 5, ... < n
  (at most 60), the last one partial; ids ``"<video id>:<start>"``.

A segment's ``lengths`` is its number of real frames, ``min(5, n - start)`` with n the rgb frames
(0 for a rated start at or past the end of the video: those are counted and logged), in training,
evaluation and inference alike; its audio rows come from the audio stream padded (0.0) or cut to
300 rows on its own, as Google's video matrix (SPEC.md 1.1 step 6); ``segment_frames=5`` makes
every length 5 as Google's reader does (the rows past the video are then 0.0 frames the model
sees). Bad ratings (start < 0, start + 5 > 300, a class
out of range, a score outside [0, 1], lists of different lengths) are a DataError naming the file
and record, skipped and counted with ``on_error="skip"``. (``nextvlad score-segments`` reads the
ratings with `rating_lists` instead: Google's metric counts every start and score, SPEC_SEGMENTS 5.1.)

Batches hold a fixed number of *videos* (records), as video-level batches do, so the sharding over
DDP ranks and workers and its equal step counts (`sharding`) carry over unchanged; the number of
segments per batch varies (about 5 rated segments per video, up to 60 candidates).
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import Literal

import numpy as np
import torch

from nextvlad.data import sharding
from nextvlad.data.dataset import ReadStats, YT8MFrameDataset
from nextvlad.data.parsing import (AUDIO_SIZE, RGB_SIZE, QuantizedVideo, encode_feature_list,
                                   parse_sequence_example, video_from_message)
from nextvlad.data import protos
from nextvlad.data.records import DataError

logger = logging.getLogger("nextvlad.data")

#: Frames per segment (Google's ``segment_size``) and the frames a video is cut to before segments
#: are gathered (``resize_axis(..., 300)``), SPEC_SEGMENTS 2.
SEGMENT_SIZE = 5
VIDEO_FRAMES = 300
#: At most this many candidate segments per video (starts 0, 5, ..., 295).
MAX_CANDIDATES = VIDEO_FRAMES // SEGMENT_SIZE

SegmentMode = Literal["rated", "candidates"]
SegmentFrames = Literal["real", 5]


@dataclass
class SegmentVideo(QuantizedVideo):
    """A video with its segments: ``starts`` (S,) and the rated entries as parallel arrays."""

    starts: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    entry_segment: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))  # into starts
    entry_class: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    entry_score: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float32))
    rated: bool = False  # whether the entries are ratings (False for prediction candidates)

    @property
    def usable_frames(self) -> int:
        """The frames segments are cut from: the real frames, at most 300."""
        return min(self.num_frames, VIDEO_FRAMES)

    def segment_lengths(self) -> np.ndarray:
        """Real frames of each segment, ``min(5, n - start)``, 0 when the start is past the end."""
        return self._rows_per_segment(self.usable_frames)

    def audio_segment_lengths(self) -> np.ndarray:
        """Real audio rows of each segment: the audio stream is padded or cut to 300 rows on its
        own (SPEC.md 1.1 step 6), so its rows past the rgb frames are kept, and missing ones are
        0.0 padding inside the segment's length."""
        return self._rows_per_segment(min(len(self.audio), VIDEO_FRAMES))

    def _rows_per_segment(self, rows: int) -> np.ndarray:
        """Of a stream with ``rows`` real rows, how many each segment holds (0 past the end)."""
        return np.clip(rows - self.starts, 0, SEGMENT_SIZE)


def _context_list(context, name: str, kind: str, path: str, index: int) -> np.ndarray:
    feature = context.feature.get(name)
    if feature is None:
        return np.zeros(0, np.float32 if kind == "float_list" else np.int64)
    found = feature.WhichOneof("kind")
    if found not in (kind, None):
        raise DataError(path, index, f"context feature {name!r} must be a {kind}, got {found}")
    values = getattr(feature, kind).value
    return np.asarray(values, np.float32 if kind == "float_list" else np.int64)


def rating_lists(context, num_classes: int, path: str, index: int
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The three parallel rating lists of one record as stored -> (classes, starts, scores).

    Checked only for what every reader of them needs: equal lengths and classes in
    [0, num_classes). ``nextvlad score-segments`` counts every entry as it is (SPEC_SEGMENTS 5.1);
    the training reader (`parse_ratings`) also checks the starts and scores.
    """
    classes = _context_list(context, "segment_labels", "int64_list", path, index)
    starts = _context_list(context, "segment_start_times", "int64_list", path, index)
    scores = _context_list(context, "segment_scores", "float_list", path, index)
    if not len(classes) == len(starts) == len(scores):
        raise DataError(path, index, f"segment lists of different lengths: segment_labels "
                                     f"{len(classes)}, segment_start_times {len(starts)}, "
                                     f"segment_scores {len(scores)}")
    bad_class = (classes < 0) | (classes >= num_classes)
    if bad_class.any():
        raise DataError(path, index, f"segment label {int(classes[bad_class][0])} is outside "
                                     f"[0, num_classes={num_classes})")
    return classes, starts, scores


def parse_ratings(context, num_classes: int, path: str, index: int
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The segment ratings of one record -> (starts, entry_segment, entry_class, entry_score).

    ``starts`` are the distinct start times in order of first occurrence (Google's ``tf.unique``);
    each rated entry points at its segment; a repeated (start, class) keeps its last score.
    """
    classes, starts, scores = rating_lists(context, num_classes, path, index)
    _check_training_ratings(starts, scores, path, index)
    if not len(starts):
        empty = np.zeros(0, np.int64)
        return empty, empty, empty, np.zeros(0, np.float32)
    distinct, first, inverse = np.unique(starts, return_index=True, return_inverse=True)
    by_first = np.argsort(first, kind="stable")
    position = np.empty_like(by_first)
    position[by_first] = np.arange(len(by_first))
    segment_of_entry = position[inverse.reshape(-1)]
    # Last occurrence of each (segment, class): np.unique on the reversed keys finds it first.
    keys = segment_of_entry * num_classes + classes
    _, last_reversed = np.unique(keys[::-1], return_index=True)
    keep = np.sort(len(keys) - 1 - last_reversed)
    return distinct[by_first], segment_of_entry[keep], classes[keep], scores[keep]


def _check_training_ratings(starts: np.ndarray, scores: np.ndarray, path: str, index: int) -> None:
    """Starts whose 5 frames lie in the 300 a video is cut to, scores that are targets in [0, 1]."""
    bad_start = (starts < 0) | (starts + SEGMENT_SIZE > VIDEO_FRAMES)
    if bad_start.any():
        raise DataError(path, index, f"segment start time {int(starts[bad_start][0])} is outside "
                                     f"[0, {VIDEO_FRAMES - SEGMENT_SIZE}] (a segment is frames "
                                     f"[start, start+{SEGMENT_SIZE}) of at most {VIDEO_FRAMES})")
    bad_score = ~((scores >= 0) & (scores <= 1))  # also NaN
    if bad_score.any():
        raise DataError(path, index, f"segment score {float(scores[bad_score][0])} is outside "
                                     "[0, 1] (1 = positive, 0 = rated negative)")


def candidate_starts(num_frames: int) -> np.ndarray:
    """Google's inference segments (SPEC_SEGMENTS 3): 0, 5, ... < min(n, 300)."""
    return np.arange(0, min(num_frames, VIDEO_FRAMES), SEGMENT_SIZE, dtype=np.int64)


def parse_segment_record(data: bytes, num_classes: int, mode: SegmentMode, path: str = "<bytes>",
                         index: int = 0) -> SegmentVideo:
    """One frame-level record -> a `SegmentVideo` with its rated or candidate segments."""
    message = parse_sequence_example(data, path, index)
    video = video_from_message(message, num_classes, path, index)
    fields = {name: getattr(video, name) for name in ("id", "rgb", "audio", "labels", "has_labels")}
    if mode == "candidates":
        return SegmentVideo(**fields, starts=candidate_starts(video.num_frames))
    starts, entry_segment, entry_class, entry_score = parse_ratings(message.context, num_classes,
                                                                    path, index)
    return SegmentVideo(**fields, starts=starts, entry_segment=entry_segment,
                        entry_class=entry_class, entry_score=entry_score, rated=True)


def encode_segment_record(video_id: str, rgb: np.ndarray, audio: np.ndarray,
                          starts: Sequence[int], classes: Sequence[int], scores: Sequence[float],
                          labels: Sequence[int] | None = None) -> bytes:
    """Serialize a segment-rated frame-level SequenceExample (SPEC_SEGMENTS 1.2)."""
    message = protos.LazySequenceExample()
    context = message.context.feature
    context["id"].bytes_list.value.append(video_id.encode("utf-8"))
    if labels is not None:
        context["labels"].int64_list.value.extend(int(c) for c in labels)
    context["segment_labels"].int64_list.value.extend(int(c) for c in classes)
    context["segment_start_times"].int64_list.value.extend(int(s) for s in starts)
    context["segment_scores"].float_list.value.extend(float(s) for s in scores)
    message.feature_lists.feature_list["rgb"] = encode_feature_list(rgb)
    message.feature_lists.feature_list["audio"] = encode_feature_list(audio)
    return message.SerializeToString()


def collate_segments(videos: Sequence[SegmentVideo], num_classes: int) -> dict:
    """Videos -> one quantized batch of all their segments (S = total segments).

    Keys as `dataset.collate_quantized` with M = 5 (``rgb`` uint8 (S, 5, 1024), ``audio``,
    ``lengths`` = real (rgb) frames, ``audio_lengths`` = real audio rows, ``labels`` float32
    scores, ``has_labels``: rated) plus
    ``label_weights`` float32 (S, C), 1 on rated entries; ``id`` are the segment ids
    ``"<video id>:<start>"``.
    """
    total = sum(len(video.starts) for video in videos)
    rgb = np.zeros((total, SEGMENT_SIZE, RGB_SIZE), np.uint8)
    audio = np.zeros((total, SEGMENT_SIZE, AUDIO_SIZE), np.uint8)
    lengths = np.zeros(total, np.int64)
    audio_lengths = np.zeros(total, np.int64)
    labels = np.zeros((total, num_classes), np.float32)
    weights = np.zeros((total, num_classes), np.float32)
    has_labels = np.zeros(total, np.bool_)
    ids: list[str] = []
    first = 0
    for video in videos:
        segment_lengths, audio_rows = video.segment_lengths(), video.audio_segment_lengths()
        for offset, (start, length, audio_length) in enumerate(
                zip(video.starts.tolist(), segment_lengths.tolist(), audio_rows.tolist())):
            rgb[first + offset, :length] = video.rgb[start:start + length]
            audio[first + offset, :audio_length] = video.audio[start:start + audio_length]
            ids.append(f"{video.id}:{start}")
        count = len(video.starts)
        lengths[first:first + count] = segment_lengths
        audio_lengths[first:first + count] = audio_rows
        labels[first + video.entry_segment, video.entry_class] = video.entry_score
        weights[first + video.entry_segment, video.entry_class] = 1.0
        has_labels[first:first + count] = video.rated
        first += count
    return {"id": ids, "rgb": torch.from_numpy(rgb), "audio": torch.from_numpy(audio),
            "lengths": torch.from_numpy(lengths), "audio_lengths": torch.from_numpy(audio_lengths),
            "labels": torch.from_numpy(labels), "label_weights": torch.from_numpy(weights),
            "has_labels": torch.from_numpy(has_labels)}


def video_fold(video_id: str, num_folds: int, seed: int = 0) -> int:
    """A video's fold in [0, num_folds): a hash of (seed, id), the same on every machine and run."""
    digest = hashlib.blake2b(f"{seed}:{video_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") % num_folds


@dataclass(frozen=True)
class FoldSelection:
    """Which videos of the rated partition a split reads: ``fold == val_fold`` or the others."""

    num_folds: int
    val_fold: int
    seed: int
    validation: bool

    def __post_init__(self):
        if self.num_folds < 2 or not 0 <= self.val_fold < self.num_folds:
            raise ValueError(f"need num_folds >= 2 and 0 <= val_fold < num_folds, got num_folds="
                             f"{self.num_folds}, val_fold={self.val_fold}")

    def keeps(self, video_id: str) -> bool:
        return (video_fold(video_id, self.num_folds, self.seed) == self.val_fold) == self.validation


class YT8MSegmentDataset(YT8MFrameDataset):
    """`YT8MFrameDataset` yielding segment batches (see the module docstring).

    Args (beyond the parent's; ``max_frames`` is not one: videos are cut at 300 frames):
        mode: "rated" (training/evaluation on segment ratings) or "candidates" (prediction).
        folds: keep only the videos of this fold selection (rated partition split by video id);
            the others still count toward the batch size, so ranks stay in step.
    """

    uses_buffer_pool = False  # the number of segments per batch varies

    def __init__(self, files, mode: SegmentMode = "rated", folds: FoldSelection | None = None,
                 **kwargs):
        if mode not in ("rated", "candidates"):
            raise ValueError(f"mode must be 'rated' or 'candidates', got {mode!r}")
        if kwargs.pop("dequantize_in_workers", False):
            raise ValueError("dequantize_in_workers is not supported for segment batches")
        super().__init__(files, max_frames=VIDEO_FRAMES, **kwargs)
        self.mode = mode
        self.folds = folds
        self.past_end_segments = 0  # rated segments starting at or past the real frames

    def epoch_plan(self) -> dict:
        """The parent's plan and which videos' segments are read (mode, fold selection): another
        fold mid-epoch would train the rest of the epoch on other videos (and could train on the
        ones validated), though the records and batches stay the same."""
        folds = asdict(self.folds) if self.folds is not None else None
        return super().epoch_plan() | {"mode": self.mode, "folds": folds}

    def _parse_record(self, data: bytes, path: str, index: int) -> SegmentVideo:
        video = parse_segment_record(data, self.num_classes, self.mode, path, index)
        if self.folds is not None and not self.folds.keeps(video.id):
            video.starts = video.starts[:0]
            video.entry_segment = video.entry_class = video.entry_segment[:0]
            video.entry_score = video.entry_score[:0]
        past_end = int((video.segment_lengths() == 0).sum())
        if past_end:
            self.past_end_segments += past_end
            logger.debug("%s, record %d: %d rated segment(s) of video %r start at or past its %d "
                         "frames (padding rows)", path, index, past_end, video.id, video.num_frames)
        return video

    def _collate(self, videos: list[SegmentVideo], buffers) -> dict:
        return collate_segments(videos, self.num_classes)

    def __iter__(self) -> Iterator[dict]:
        self.past_end_segments = 0
        yield from super().__iter__()

    def _report(self, stats: ReadStats, plan: sharding.ReaderPlan, worker: int,
                num_workers: int) -> None:
        super()._report(stats, plan, worker, num_workers)
        if self.past_end_segments:
            logger.warning("rank %d/%d worker %d/%d epoch %d: %d rated segments start at or past "
                           "the end of their video; their frames are padding (length 0, or 5 "
                           "zero rows with segment_frames=5)", self.rank, self.world_size, worker,
                           num_workers, self.epoch, self.past_end_segments)
