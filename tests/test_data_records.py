"""TFRecord framing and protobuf parsing against independent oracles.

The oracle here never touches nextvlad's writer or protobuf definitions: CRC32C is computed bit by
bit from the Castagnoli polynomial, SequenceExamples are assembled byte by byte from the protobuf
wire format (varints, tags), and files are framed by hand (length, masked CRC32C).
"""

from __future__ import annotations

import gzip
import struct

import numpy as np
import pytest

from nextvlad.data import iter_videos, read_records, write_records
from nextvlad.data.records import masked_crc32c


# -- independent oracle ---------------------------------------------------------------------------
def crc32c_bitwise(data: bytes) -> int:
    crc = 0xFFFFFFFF
    for byte in data:
        crc ^= byte
        for _ in range(8):
            crc = (crc >> 1) ^ (0x82F63B78 if crc & 1 else 0)
    return crc ^ 0xFFFFFFFF


def masked_crc_oracle(data: bytes) -> int:
    crc = crc32c_bitwise(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) % (1 << 32)


def varint(value: int) -> bytes:
    out = b""
    while value >= 0x80:
        out += bytes([value & 0x7F | 0x80])
        value >>= 7
    return out + bytes([value])


def length_delimited(field: int, payload: bytes) -> bytes:
    return varint(field << 3 | 2) + varint(len(payload)) + payload


def map_entry(key: str, value: bytes, value_first: bool = False) -> bytes:
    parts = [length_delimited(1, key.encode()), length_delimited(2, value)]
    return b"".join(parts[::-1] if value_first else parts)


def bytes_feature(values: list[bytes], extra: bytes = b"") -> bytes:
    return length_delimited(1, b"".join(length_delimited(1, v) for v in values)) + extra


def int64_feature(values: list[int], packed: bool = True) -> bytes:
    if packed:
        return length_delimited(3, length_delimited(1, b"".join(varint(v) for v in values)))
    return length_delimited(3, b"".join(varint(1 << 3 | 0) + varint(v) for v in values))


def features(entries: dict[str, bytes]) -> bytes:
    return b"".join(length_delimited(1, map_entry(k, v)) for k, v in entries.items())


def sequence_example(video_id: bytes, labels: list[int] | None, rgb: np.ndarray, audio: np.ndarray,
                     lists_first: bool = False, packed: bool = True,
                     odd_frame: int | None = None, id_key: str = "id") -> bytes:
    context_entries = {id_key: bytes_feature([video_id])}
    if labels is not None:
        context_entries["labels"] = int64_feature(labels, packed)
    lists = b""
    for name, frames in (("rgb", rgb), ("audio", audio)):
        # `odd_frame`: that frame's Feature carries an unknown extra field (legal protobuf).
        feature_list = b"".join(
            length_delimited(1, bytes_feature([row.tobytes()],
                                              extra=varint(9 << 3) + varint(5) if i == odd_frame else b""))
            for i, row in enumerate(frames))
        lists += length_delimited(1, map_entry(name, feature_list, value_first=name == "audio"))
    parts = [length_delimited(1, features(context_entries)), length_delimited(2, lists)]
    return b"".join(parts[::-1] if lists_first else parts)


def frame_oracle(records: list[bytes]) -> bytes:
    out = b""
    for data in records:
        length = struct.pack("<Q", len(data))
        out += length + struct.pack("<I", masked_crc_oracle(length)) + data
        out += struct.pack("<I", masked_crc_oracle(data))
    return out


def dequantize_oracle(q: np.ndarray) -> np.ndarray:
    return q.astype(np.float64) * 4 / 255 + 4 / 512 - 2


# -- tests ----------------------------------------------------------------------------------------
def test_crc32c_check_value_and_mask():
    assert crc32c_bitwise(b"123456789") == 0xE3069283  # the published CRC-32C check value
    for data in (b"", b"a", b"123456789", bytes(range(256)) * 3):
        assert masked_crc32c(data) == masked_crc_oracle(data)


@pytest.mark.parametrize("compress", [False, True])
def test_reader_reads_hand_built_sequence_examples(tmp_path, compress):
    rng = np.random.default_rng(0)
    videos = []
    for i, (n_rgb, n_audio) in enumerate([(5, 5), (3, 3), (4, 2), (7, 7)]):
        rgb = rng.integers(0, 256, (n_rgb, 1024), dtype=np.uint8)
        audio = rng.integers(0, 256, (n_audio, 128), dtype=np.uint8)
        labels = None if i == 1 else sorted(rng.choice(20, 3, replace=False).tolist())
        videos.append((f"v{i}".encode(), labels, rgb, audio))
    # Legal encoding variants: field order, unpacked labels, unknown fields, map value first.
    records = [sequence_example(*videos[0]),
               sequence_example(*videos[1], lists_first=True),
               sequence_example(*videos[2], packed=False),
               sequence_example(*videos[3], odd_frame=2)]
    raw = frame_oracle(records)
    path = tmp_path / ("data.tfrecord.gz" if compress else "data.tfrecord")
    path.write_bytes(gzip.compress(raw) if compress else raw)

    got = list(iter_videos(str(path), max_frames=6, num_classes=20))
    assert [g["id"] for g in got] == ["v0", "v1", "v2", "v3"]
    for g, (_, labels, rgb, audio) in zip(got, videos):
        n = min(len(rgb), 6)  # frames are counted on rgb; each stream is cut on its own (SPEC 1.1)
        assert g["num_frames"] == n
        np.testing.assert_allclose(g["rgb"], dequantize_oracle(rgb[:n]), rtol=0, atol=1e-6)
        np.testing.assert_allclose(g["audio"], dequantize_oracle(audio[:6]), rtol=0, atol=1e-6)
        expected = np.zeros(20)
        if labels is not None:
            expected[labels] = 1
        np.testing.assert_array_equal(g["labels"], expected)
        assert g["has_labels"] == (labels is not None)
        assert g["label_ids"] == (labels or [])


def test_video_id_key_of_the_download_page_layout(tmp_path):
    rgb, audio = np.full((2, 1024), 3, np.uint8), np.full((2, 128), 4, np.uint8)
    path = tmp_path / "old.tfrecord"
    path.write_bytes(frame_oracle([sequence_example(b"old", [1], rgb, audio, id_key="video_id")]))
    (video,) = iter_videos(str(path), num_classes=3)
    assert video["id"] == "old" and video["num_frames"] == 2


def test_writer_framing_matches_oracle(tmp_path):
    records = [b"", b"x", bytes(range(256)) * 40]
    path = tmp_path / "w.tfrecord"
    assert write_records(str(path), records) == 3
    assert path.read_bytes() == frame_oracle(records)
    assert list(read_records(str(path))) == records
    assert list(read_records(str(path), start=1, count=1)) == [b"x"]
    gz = tmp_path / "w.tfrecord.gz"
    write_records(str(gz), records, compression="gzip")
    assert gzip.decompress(gz.read_bytes()) == frame_oracle(records)
    assert list(read_records(str(gz))) == records
    assert list(read_records(str(gz), start=2)) == records[2:]


def test_tfrecord_package_reads_our_files(synthetic_data):
    """Interop the other way: the `tfrecord` package's own reader parses what we wrote."""
    from tfrecord.reader import sequence_loader

    path = synthetic_data["train"][0]
    ours = list(iter_videos(path, num_classes=synthetic_data["num_classes"]))
    theirs = list(sequence_loader(path, None, {"id": "byte", "labels": "int"},
                                  {"rgb": "byte", "audio": "byte"}))
    assert len(theirs) == len(ours) > 0
    for video, (context, lists) in zip(ours, theirs):
        assert bytes(context["id"]).decode() == video["id"]
        assert sorted(context["labels"].tolist()) == video["label_ids"]
        rgb = np.stack([np.frombuffer(bytes(frame), np.uint8) for frame in lists["rgb"]])
        np.testing.assert_allclose(video["rgb"], dequantize_oracle(rgb), atol=1e-6, rtol=0)


def test_we_read_tfrecord_package_writer_output(tmp_path):
    from tfrecord.writer import TFRecordWriter

    rng = np.random.default_rng(1)
    rgb = rng.integers(0, 256, (4, 1024), dtype=np.uint8)
    audio = rng.integers(0, 256, (4, 128), dtype=np.uint8)
    path = str(tmp_path / "theirs.tfrecord")
    writer = TFRecordWriter(path)
    writer.write({"id": (b"abc", "byte"), "labels": ([2, 7], "int")},
                 {"rgb": ([r.tobytes() for r in rgb], "byte"),
                  "audio": ([a.tobytes() for a in audio], "byte")})
    writer.close()
    (video,) = iter_videos(path, num_classes=10)
    assert video["id"] == "abc" and video["label_ids"] == [2, 7] and video["num_frames"] == 4
    np.testing.assert_allclose(video["rgb"], dequantize_oracle(rgb), atol=1e-6, rtol=0)
    np.testing.assert_allclose(video["audio"], dequantize_oracle(audio), atol=1e-6, rtol=0)


def test_the_gzip_check_of_a_local_file_reads_two_bytes(tmp_path):
    """Run on every file before training: it read a whole 1 MiB buffer of each (3,844 files: 4 GB)."""
    from nextvlad.data.records import is_gzip, open_binary

    plain, packed = tmp_path / "plain.tfrecord", tmp_path / "packed.tfrecord"
    plain.write_bytes(bytes(3 << 20))
    packed.write_bytes(gzip.compress(bytes(3 << 20)))
    assert (is_gzip(str(plain)), is_gzip(str(packed))) == (False, True)
    with open_binary(str(plain), read_ahead=2) as f:
        f.read(2)
        assert f.raw.tell() == 2  # what the operating system was asked for
