"""Segment-rated records written byte by byte in the protobuf wire format and TFRecord framing,
independently of the package's encoders (the oracle for the reader tests).

Import as ``from segment_wire import ...`` (pytest puts tests/ on sys.path).
"""

from __future__ import annotations

import struct

import google_crc32c
import numpy as np


def varint(value: int) -> bytes:
    value &= (1 << 64) - 1  # int64 two's complement, as protobuf encodes negative int64
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def field(number: int, payload: bytes) -> bytes:
    """A length-delimited field (wire type 2)."""
    return varint(number << 3 | 2) + varint(len(payload)) + payload


def bytes_feature(*values: bytes) -> bytes:
    return field(1, b"".join(field(1, v) for v in values))  # Feature.bytes_list{value}


def int64_feature(values) -> bytes:
    return field(3, field(1, b"".join(varint(int(v)) for v in values)))  # packed Int64List


def float_feature(values) -> bytes:
    return field(2, field(1, b"".join(struct.pack("<f", float(v)) for v in values)))  # packed


def sequence_example(video_id: str, frames: int | np.ndarray, starts=None, classes=None,
                     scores=None, extra_context: dict[str, bytes] | None = None) -> bytes:
    """A frame-level SequenceExample: rgb frame f is all (f % 251), audio all (f + 1) % 251, unless
    ``frames`` is a (rgb, audio) pair of uint8 arrays; ``None`` rating lists are left out."""
    rgb, audio = frame_values(frames) if isinstance(frames, int) else frames
    context = {"id": bytes_feature(video_id.encode())}
    for name, values, encode in (("segment_labels", classes, int64_feature),
                                 ("segment_start_times", starts, int64_feature),
                                 ("segment_scores", scores, float_feature)):
        if values is not None:
            context[name] = encode(values)
    context.update(extra_context or {})
    features = b"".join(field(1, field(1, k.encode()) + field(2, v)) for k, v in context.items())
    lists = b""
    for name, matrix in (("rgb", rgb), ("audio", audio)):
        feature_list = b"".join(field(1, bytes_feature(row.tobytes())) for row in matrix)
        lists += field(1, field(1, name.encode()) + field(2, feature_list))
    return field(1, features) + field(2, lists)


def frame_values(num_frames: int) -> tuple[np.ndarray, np.ndarray]:
    index = np.arange(num_frames)
    rgb = np.repeat((index % 251).astype(np.uint8)[:, None], 1024, axis=1)
    audio = np.repeat(((index + 1) % 251).astype(np.uint8)[:, None], 128, axis=1)
    return rgb, audio


def _masked_crc(data: bytes) -> int:
    crc = google_crc32c.value(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def write_tfrecord(path, records: list[bytes]) -> str:
    with open(path, "wb") as f:
        for data in records:
            length = struct.pack("<Q", len(data))
            f.write(length + struct.pack("<I", _masked_crc(length)) + data
                    + struct.pack("<I", _masked_crc(data)))
    return str(path)


def dequantized(q: np.ndarray) -> np.ndarray:
    """SPEC.md 1.1 dequantization in float64: q * 4/255 + 4/512 - 2."""
    return q.astype(np.float64) * (4.0 / 255.0) + (4.0 / 512.0 - 2.0)
