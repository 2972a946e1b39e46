"""Parsing YouTube-8M records (SPEC 1.1 frame-level SequenceExamples, SPEC 1.2 video-level Examples).

Frame-level parsing keeps the frames quantized (uint8); dequantization happens later, on whatever
device the batch ends up on (see `nextvlad.data.transforms`).

The fast path: a frame-level feature list is a repeated `Feature{bytes_list{value: <frame>}}`,
and protobuf encodes each element as the same 9 bytes of tags and lengths followed by the frame
(for 1024-byte frames: ``0a 86 08 0a 83 08 0a 80 08``). The serialized list is therefore a
(frames, 9 + frame_size) uint8 matrix: if its length is a multiple of the stride and every row
starts with that exact header, sequential protobuf parsing would read exactly those fields, so the
strided view *is* the parse. Anything else (other sizes, non-minimal varints, extra fields) goes
through the full upb parse, which also produces the precise error message.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from google.protobuf.message import DecodeError

from nextvlad.data import protos
from nextvlad.data.records import DataError

RGB_SIZE = 1024
AUDIO_SIZE = 128
FRAME_FEATURES = (("rgb", RGB_SIZE), ("audio", AUDIO_SIZE))


@dataclass
class QuantizedVideo:
    """One frame-level video as stored: uint8 frames, not yet dequantized or padded."""

    id: str
    rgb: np.ndarray  # uint8 (rgb_frames, 1024)
    audio: np.ndarray  # uint8 (audio_frames, 128)
    labels: np.ndarray  # int64 (k,) class indices, checked to be in [0, num_classes)
    has_labels: bool  # False for records without a (non-empty) labels feature, e.g. the test set

    @property
    def num_frames(self) -> int:
        """The video's frames: its rgb frames, as the authors' reader counts them (SPEC 1.1 step 6,
        7.5); the audio stream is padded with 0.0 or cut to the frame axis on its own."""
        return len(self.rgb)

    @property
    def frame_count_mismatch(self) -> bool:
        return len(self.rgb) != len(self.audio)


@dataclass
class VideoLevelRecord:
    """One video-level record (SPEC 1.2): already-dequantized mean features."""

    id: str
    mean_rgb: np.ndarray  # float32 (1024,)
    mean_audio: np.ndarray  # float32 (128,)
    labels: np.ndarray  # int64 (k,)
    has_labels: bool


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _length_delimited(field_number: int, payload_length: int) -> bytes:
    return _varint(field_number << 3 | 2) + _varint(payload_length)


@lru_cache(maxsize=None)
def frame_header(frame_size: int) -> bytes:
    """Wire bytes preceding each frame in a serialized FeatureList of single-bytes features."""
    bytes_value = _length_delimited(1, frame_size)  # BytesList.value
    bytes_list = _length_delimited(1, len(bytes_value) + frame_size)  # Feature.bytes_list
    feature = _length_delimited(1, len(bytes_list) + len(bytes_value) + frame_size)  # FeatureList.feature
    return feature + bytes_list + bytes_value


@lru_cache(maxsize=None)
def _frame_header_array(frame_size: int) -> np.ndarray:
    return np.frombuffer(frame_header(frame_size), np.uint8)


def encode_feature_list(frames: np.ndarray) -> bytes:
    """Serialize a uint8 (frames, size) matrix as a FeatureList of one bytes value per frame."""
    frames = np.ascontiguousarray(frames, dtype=np.uint8)
    num_frames, frame_size = frames.shape
    header = _frame_header_array(frame_size)
    rows = np.empty((num_frames, len(header) + frame_size), np.uint8)
    rows[:, : len(header)] = header
    rows[:, len(header):] = frames
    return rows.tobytes()


def decode_feature_list(raw: bytes, frame_size: int, name: str, path: str, index: int) -> np.ndarray:
    """Serialized FeatureList -> uint8 (frames, frame_size) view (fast path, see module doc)."""
    header = _frame_header_array(frame_size)
    stride = len(header) + frame_size
    num_frames, remainder = divmod(len(raw), stride)
    if remainder == 0:
        rows = np.frombuffer(raw, np.uint8).reshape(num_frames, stride)
        if (rows[:, : len(header)] == header).all():
            return rows[:, len(header):]
    return _decode_feature_list_slow(raw, frame_size, name, path, index)


def _decode_feature_list_slow(raw: bytes, frame_size: int, name: str, path: str,
                              index: int) -> np.ndarray:
    feature_list = protos.FeatureList()
    try:
        feature_list.ParseFromString(raw)
    except DecodeError as error:
        raise DataError(path, index, f"feature list {name!r} is not valid protobuf: {error}") from None
    frames = []
    for frame_index, feature in enumerate(feature_list.feature):
        if feature.WhichOneof("kind") != "bytes_list" or len(feature.bytes_list.value) != 1:
            raise DataError(path, index, f"{name!r} frame {frame_index} is not a single bytes "
                                         f"value (kind {feature.WhichOneof('kind')!r})")
        value = feature.bytes_list.value[0]
        if len(value) != frame_size:
            raise DataError(path, index, f"{name!r} frame {frame_index} has {len(value)} bytes, "
                                         f"expected {frame_size}")
        frames.append(value)
    return np.frombuffer(b"".join(frames), np.uint8).reshape(len(frames), frame_size)


def _context_id(features, path: str, index: int) -> str:
    # 2018+ files use "id"; the 2017 release and the download page's example say "video_id".
    feature = features.feature.get("id") or features.feature.get("video_id")
    if feature is None or feature.WhichOneof("kind") != "bytes_list" or len(feature.bytes_list.value) != 1:
        raise DataError(path, index, "missing or malformed context feature 'id' (one bytes value)")
    try:
        return feature.bytes_list.value[0].decode("utf-8")
    except UnicodeDecodeError as error:
        raise DataError(path, index, f"video id is not UTF-8: {error}") from None


def _context_labels(features, num_classes: int, path: str, index: int) -> tuple[np.ndarray, bool]:
    feature = features.feature.get("labels")
    if feature is None:
        return np.zeros(0, np.int64), False
    kind = feature.WhichOneof("kind")
    if kind not in ("int64_list", None):
        raise DataError(path, index, f"context feature 'labels' must be an int64 list, got {kind}")
    labels = np.asarray(feature.int64_list.value, np.int64)
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        bad = int(labels[(labels < 0) | (labels >= num_classes)][0])
        raise DataError(path, index, f"label {bad} is outside [0, num_classes={num_classes})")
    return labels, labels.size > 0


def _parse(message, data: bytes, kind: str, path: str, index: int):
    """``message`` filled from ``data``; a DecodeError becomes a DataError naming path and index."""
    try:
        message.ParseFromString(data)
    except DecodeError as error:
        raise DataError(path, index, f"not a {kind}: {error}") from None
    return message


def parse_frame_record(data: bytes, num_classes: int, path: str = "<bytes>",
                       index: int = 0) -> QuantizedVideo:
    """Parse one serialized frame-level SequenceExample (SPEC 1.1); errors name path and index."""
    return video_from_message(parse_sequence_example(data, path, index), num_classes, path, index)


def parse_sequence_example(data: bytes, path: str = "<bytes>", index: int = 0):
    """A serialized SequenceExample as a message whose feature lists stay raw bytes (lazy)."""
    return _parse(protos.LazySequenceExample(), data, "tf.train.SequenceExample", path, index)


def video_from_message(message, num_classes: int, path: str, index: int) -> QuantizedVideo:
    """`parse_frame_record` on an already parsed `parse_sequence_example` message."""
    video_id = _context_id(message.context, path, index)
    labels, has_labels = _context_labels(message.context, num_classes, path, index)
    feature_lists = message.feature_lists.feature_list
    streams = []
    for name, size in FRAME_FEATURES:
        raw = feature_lists.get(name)
        if raw is None:
            hint = ("; it looks like a video-level record (context has mean_rgb): the models and their "
                    "data modules need frame-level records; iter_videos(level='video') reads "
                    "video-level ones" if "mean_rgb" in message.context.feature else "")
            raise DataError(path, index, f"video {video_id!r} has no {name!r} feature list "
                                         f"(found {sorted(feature_lists)}){hint}")
        streams.append(decode_feature_list(raw, size, name, path, index))
    video = QuantizedVideo(video_id, streams[0], streams[1], labels, has_labels)
    if video.num_frames == 0:  # frames are counted on rgb: audio alone gives the model no frame
        raise DataError(path, index, f"video {video_id!r} has 0 frames (0 rgb frames, "
                                     f"{len(video.audio)} audio frames)")
    return video


def parse_video_level_record(data: bytes, num_classes: int, path: str = "<bytes>",
                             index: int = 0) -> VideoLevelRecord:
    """Parse one serialized video-level Example (SPEC 1.2)."""
    features = _parse(protos.Example(), data, "tf.train.Example", path, index).features
    video_id = _context_id(features, path, index)
    labels, has_labels = _context_labels(features, num_classes, path, index)
    means = []
    for name, size in (("mean_rgb", RGB_SIZE), ("mean_audio", AUDIO_SIZE)):
        feature = features.feature.get(name)
        if feature is None or len(feature.float_list.value) != size:
            got = "missing" if feature is None else f"{len(feature.float_list.value)} floats"
            raise DataError(path, index, f"video {video_id!r}: {name!r} must hold {size} floats, "
                                         f"got {got}")
        means.append(np.asarray(feature.float_list.value, np.float32))
    return VideoLevelRecord(video_id, means[0], means[1], labels, has_labels)


def _set_id_and_labels(features, video_id: str, labels: np.ndarray | list[int] | None) -> None:
    """The context ``id`` and (unless None) ``labels`` features shared by both record levels."""
    features.feature["id"].bytes_list.value.append(video_id.encode("utf-8"))
    if labels is not None:
        features.feature["labels"].int64_list.value.extend(int(x) for x in labels)


def encode_frame_record(video_id: str, rgb: np.ndarray, audio: np.ndarray,
                        labels: np.ndarray | list[int] | None) -> bytes:
    """Serialize a frame-level SequenceExample in the official layout (labels None: omitted)."""
    message = protos.LazySequenceExample()
    _set_id_and_labels(message.context, video_id, labels)
    message.feature_lists.feature_list["rgb"] = encode_feature_list(rgb)
    message.feature_lists.feature_list["audio"] = encode_feature_list(audio)
    return message.SerializeToString()


def encode_video_level_record(video_id: str, mean_rgb: np.ndarray, mean_audio: np.ndarray,
                              labels: np.ndarray | list[int] | None) -> bytes:
    """Serialize a video-level Example (SPEC 1.2)."""
    message = protos.Example()
    _set_id_and_labels(message.features, video_id, labels)
    message.features.feature["mean_rgb"].float_list.value.extend(np.asarray(mean_rgb, np.float32).tolist())
    message.features.feature["mean_audio"].float_list.value.extend(np.asarray(mean_audio, np.float32).tolist())
    return message.SerializeToString()
