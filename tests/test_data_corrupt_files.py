"""Corrupt files (issue 13.1): huge lengths, broken GZIP streams, breaks found by the scan, errors
and skip counts from DataLoader workers, empty files.

Each file is made by writing good records (`write_records`, or gzip with flush points placed by
hand) and then changing bytes; what must come out is worked out from where the damage was put:
every complete, CRC-valid record before it, an error naming the first record that cannot be read,
and in skip mode every readable record, with each skip counted in read_stats.
"""

from __future__ import annotations

import gzip
import logging
import os
import pathlib
import pickle
import struct
import zlib

import numpy as np
import pytest

from nextvlad.data import (DataError, FramingError, YT8MFrameDataset, iter_videos, read_records,
                           write_records)
from nextvlad.data.dataset import YT8MDataLoader
from nextvlad.data.parsing import encode_frame_record
from nextvlad.data.records import MAX_GZIP_RECORD_BYTES, frame_record
from test_data_bad_input import NUM_CLASSES, good_record
from test_data_records import masked_crc_oracle


def ids_read(path, on_error="raise"):
    return [v["id"] for v in iter_videos(path, num_classes=NUM_CLASSES, on_error=on_error,
                                         level="frame")]


def read_until_error(path):
    """(ids yielded before the error, the error) from iter_videos in raise mode."""
    ids = []
    with pytest.raises(DataError) as error:
        for video in iter_videos(path, num_classes=NUM_CLASSES, level="frame"):
            ids.append(video["id"])
    return ids, error.value


def loader_ids(path, on_error="skip", num_workers=0, batch_size=2):
    """ids and summed read_stats[0] (skipped records) through YT8MDataLoader, as Lightning sees."""
    dataset = YT8MFrameDataset(path, batch_size=batch_size, num_classes=NUM_CLASSES,
                               on_error=on_error)
    ids, skipped = [], 0
    loader = YT8MDataLoader(dataset, num_workers=num_workers)
    for batch in loader:
        ids += batch["id"]
        skipped += int(batch["read_stats"][0])
    return ids, skipped + int(loader.unreported_read_stats[0])  # counts after the last batch


def good_ids(indices):
    return [f"good{i}" for i in indices]


def compressible_record(i: int) -> bytes:
    """A good record whose frames take 4 values: deflate Huffman-codes it instead of storing it."""
    rng = np.random.default_rng(i)
    return encode_frame_record(f"good{i}", rng.integers(0, 4, (20, 1024), dtype=np.uint8),
                               rng.integers(0, 4, (20, 128), dtype=np.uint8), [i % NUM_CLASSES])


def header(length: int) -> bytes:
    """A record header claiming `length` bytes, with a *valid* length CRC."""
    length_bytes = struct.pack("<Q", length)
    return length_bytes + struct.pack("<I", masked_crc_oracle(length_bytes))


def write_gzip(path, records, flush_after=(), level=9) -> list[int]:
    """Frame and GZIP `records`, with a full flush (byte-aligned, no back-references across it)
    after each index in `flush_after`; returns the compressed offset of each flush."""
    offsets = []
    with open(path, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", compresslevel=level) as f:
        for i, record in enumerate(records):
            f.write(frame_record(record))
            if i in flush_after:
                f.flush(zlib.Z_FULL_FLUSH)
                offsets.append(raw.tell())
    return offsets


def assert_given_up_at(path, index, reason, caplog):
    """Records [0, index) are intact and record `index` cannot be read: raise mode yields the
    intact ones, then a FramingError naming that record (the Dataset's scan raises it up front);
    skip mode yields them, logs the break, and read_stats count it once."""
    ids, error = read_until_error(path)
    assert ids == good_ids(range(index)) and isinstance(error, FramingError)
    assert str(error).startswith(f"{path}, record {index}: {reason}")
    assert (error.path, error.index) == (path, index)
    with pytest.raises(FramingError) as scan_error:
        YT8MFrameDataset(path, num_classes=NUM_CLASSES)
    assert str(scan_error.value).startswith(f"{path}, record {index}: {reason}")
    with caplog.at_level(logging.WARNING, logger="nextvlad.data"):
        assert ids_read(path, on_error="skip") == good_ids(range(index))
    assert f"gave up the rest of the file: {path}, record {index}: {reason}" in caplog.text
    assert loader_ids(path) == (good_ids(range(index)), 1)


# -- lengths that claim more than the file can hold ---------------------------------------------
@pytest.mark.parametrize("length", [2**40, 2**63, 2**64 - 1])
@pytest.mark.parametrize("compression", ["none", "gzip"])
def test_huge_length_with_valid_crc_is_a_framing_error(tmp_path, length, compression, caplog):
    raw = frame_record(good_record(0)) + frame_record(good_record(1)) + header(length) + b"x" * 99
    path = str(tmp_path / f"huge.tfrecord{'.gz' if compression == 'gzip' else ''}")
    with open(path, "wb") as f:
        f.write(gzip.compress(raw) if compression == "gzip" else raw)
    if compression == "none":
        reason = f"truncated file: record of {length} bytes runs past the end of the file (99 bytes"
    else:
        reason = (f"corrupted record header: length {length} is over the maximum record size of a "
                  f"GZIP file ({MAX_GZIP_RECORD_BYTES} bytes")
    assert_given_up_at(path, 2, reason, caplog)


def test_gzip_length_at_the_maximum_is_read_up_to_the_end_of_the_stream(tmp_path):
    """The cap rejects only lengths above it; a length at it reads what the stream has."""
    path = str(tmp_path / "long.tfrecord.gz")
    with open(path, "wb") as f:
        f.write(gzip.compress(frame_record(good_record(0)) + header(MAX_GZIP_RECORD_BYTES)
                              + b"x" * 99))
    ids, error = read_until_error(path)
    assert ids == good_ids([0]) and error.index == 1 and "truncated file" in str(error)


def test_readme_states_the_gzip_record_cap():
    readme = (pathlib.Path(__file__).parents[1] / "README.md").read_text()
    assert f"nor {MAX_GZIP_RECORD_BYTES >> 20} MiB in a GZIP file" in readme


# -- GZIP stream errors: keep every intact record before the damage ------------------------------
def test_gzip_trailer_crc_flip_keeps_all_records(tmp_path, caplog):
    path = str(tmp_path / "trailer.tfrecord.gz")
    write_gzip(path, [good_record(i) for i in range(12)])
    raw = bytearray(open(path, "rb").read())
    raw[-8] ^= 0x01  # the trailer's CRC32 of the uncompressed data
    open(path, "wb").write(bytes(raw))
    assert_given_up_at(path, 12, "broken GZIP stream: Error -3 while decompressing data: "
                                 "incorrect data check", caplog)


def test_gzip_truncated_after_four_records_keeps_them(tmp_path, caplog):
    path = str(tmp_path / "cut.tfrecord.gz")
    (after_four,) = write_gzip(path, [good_record(i) for i in range(12)], flush_after=(3,))
    raw = open(path, "rb").read()
    open(path, "wb").write(raw[:after_four + 100])  # record 4 is cut short
    assert_given_up_at(path, 4, "broken GZIP stream: compressed file ended before the "
                                "end-of-stream marker was reached", caplog)


def test_gzip_flipped_stored_byte_is_a_crc_error_at_its_record(tmp_path, caplog):
    """compresslevel 0 stores the bytes: a flip inside record 6 decodes to wrong data that the
    record's CRC32C catches; the records after it decode fine, and the trailer CRC fails at the
    end of the stream."""
    path = str(tmp_path / "flip.tfrecord.gz")
    records = [good_record(i) for i in range(12)]
    before_six, after_six = write_gzip(path, records, flush_after=(5, 6), level=0)
    raw = bytearray(open(path, "rb").read())
    raw[(before_six + after_six) // 2] ^= 0x10
    open(path, "wb").write(bytes(raw))
    ids, error = read_until_error(path)
    assert ids == good_ids(range(6))
    assert error.index == 6 and "corrupted record data (CRC32C mismatch)" in str(error)
    with caplog.at_level(logging.WARNING, logger="nextvlad.data"):
        assert ids_read(path, on_error="skip") == good_ids([0, 1, 2, 3, 4, 5, 7, 8, 9, 10, 11])
    assert f"{path}, record 6: corrupted record data" in caplog.text
    assert f"{path}, record 12: broken GZIP stream" in caplog.text
    assert loader_ids(path) == (good_ids([0, 1, 2, 3, 4, 5, 7, 8, 9, 10, 11]), 2)


def test_gzip_flipped_compressed_byte_names_its_record(tmp_path):
    """A flip inside record 6's Huffman-coded bytes: whatever zlib makes of it (an error, or wrong
    bytes for the CRC32C to catch), records 0-5 come out and the error names record 6."""
    path = str(tmp_path / "flip.tfrecord.gz")
    records = [compressible_record(i) for i in range(12)]
    before_six, after_six = write_gzip(path, records, flush_after=(5, 6))
    raw = bytearray(open(path, "rb").read())
    assert len(raw) < sum(map(len, records)) / 2  # Huffman-coded, not stored
    raw[(before_six + after_six) // 2] ^= 0x10
    open(path, "wb").write(bytes(raw))
    ids, error = read_until_error(path)
    assert ids == good_ids(range(6)) and error.index == 6


# -- breaks found by the up-front scan are counted ------------------------------------------------
@pytest.mark.parametrize("damage", ["truncated", "length CRC", "huge length"])
def test_breaks_found_by_the_scan_are_counted(tmp_path, damage):
    raw = b"".join(frame_record(good_record(i)) for i in range(3))
    second = len(frame_record(good_record(0)))
    if damage == "truncated":
        raw = raw[:-10]  # record 2
    elif damage == "length CRC":
        raw = raw[:second] + bytes([raw[second] ^ 1]) + raw[second + 1:]  # record 1
    else:
        raw = raw[:second] + header(2**40) + raw[second + 12:]  # record 1
    path = str(tmp_path / "broken.tfrecord")
    open(path, "wb").write(raw)
    expected = good_ids([0, 1]) if damage == "truncated" else good_ids([0])
    assert loader_ids(path) == (expected, 1)
    assert loader_ids(path, num_workers=2, batch_size=1) == (expected, 1)


# -- DataLoader workers ---------------------------------------------------------------------------
@pytest.mark.parametrize("error", [DataError("a.tfrecord", 3, "bad"), DataError("a", None, "x"),
                                   FramingError("b.tfrecord", 7, "truncated file")])
def test_data_errors_survive_pickling(error):
    copy = pickle.loads(pickle.dumps(error))
    assert type(copy) is type(error) and str(copy) == str(error)
    assert (copy.path, copy.index, copy.reason) == (error.path, error.index, error.reason)


@pytest.mark.parametrize("bad_at", [1, 5])  # in worker 0's share, in worker 1's share
def test_a_data_error_in_a_worker_reaches_the_caller_as_itself(tmp_path, bad_at):
    records = [b"\xff\xff" if i == bad_at else good_record(i) for i in range(8)]
    path = str(tmp_path / "bad.tfrecord")
    write_records(path, records)
    with pytest.raises(DataError) as error:
        loader_ids(path, on_error="raise", num_workers=2)
    assert type(error.value) is DataError
    assert (error.value.path, error.value.index) == (path, bad_at)
    assert f"{path}, record {bad_at}: not a tf.train.SequenceExample" in str(error.value)


@pytest.mark.parametrize("count,bad_at", [
    (12, {3, 6, 7, 8, 9, 10, 11}),  # worker 0: records 0-5 (one bad); worker 1: 6-11, all bad
    (4, {2, 3}),  # worker 0: one batch; worker 1's count can only come after it
])
def test_a_worker_with_no_good_record_still_reports_its_skips(tmp_path, count, bad_at):
    records = [b"\xff\xff" if i in bad_at else good_record(i) for i in range(count)]
    path = str(tmp_path / "bad.tfrecord")
    write_records(path, records)
    expected = (good_ids(i for i in range(count) if i not in bad_at), len(bad_at))
    assert loader_ids(path) == expected
    assert loader_ids(path, num_workers=2) == expected


# -- empty files ----------------------------------------------------------------------------------
def test_an_empty_file_is_an_error_for_iter_videos_too(tmp_path, caplog):
    empty = str(tmp_path / "a_empty.tfrecord")
    open(empty, "wb").close()
    good = str(tmp_path / "b_good.tfrecord")
    write_records(good, [good_record(0)])
    with pytest.raises(FramingError, match=rf"{empty}: empty file"):
        ids_read([empty, good])
    with caplog.at_level(logging.WARNING, logger="nextvlad.data"):
        assert ids_read([empty, good], on_error="skip") == ["good0"]
    assert f"{empty}: empty file" in caplog.text


def test_a_gzip_file_of_no_records_is_refused_as_an_empty_file_is(tmp_path, caplog):
    """20 bytes of GZIP holding nothing: a failed write, read as a file of 0 videos without a word."""
    nothing = str(tmp_path / "a_nothing.tfrecord")
    with open(nothing, "wb") as f:
        f.write(gzip.compress(b""))
    good = str(tmp_path / "b_good.tfrecord")
    write_records(good, [good_record(0)])
    with pytest.raises(FramingError, match=rf"^{nothing}: no records \(a GZIP stream of 0 bytes\)$"):
        ids_read([nothing, good])
    with pytest.raises(FramingError, match=rf"^{nothing}: no records"):
        YT8MFrameDataset([nothing, good], num_classes=NUM_CLASSES)
    with caplog.at_level(logging.WARNING, logger="nextvlad.data"):
        assert ids_read([nothing, good], on_error="skip") == ["good0"]
        dataset = YT8MFrameDataset([nothing, good], num_classes=NUM_CLASSES, on_error="skip")
        assert [i for batch in dataset for i in batch["id"]] == ["good0"]
    assert f"{nothing}: no records" in caplog.text


# -- many random corruptions: never wrong data, never a foreign exception ------------------------
def damaged_variants(raw: bytes, rng: np.random.Generator, count: int):
    """(kind, bytes) pairs: a bit flip, a byte set to a random value, a cut, appended garbage."""
    for _ in range(count):
        kind = rng.choice(["flip", "byte", "cut", "garbage"])
        damaged = bytearray(raw)
        position = int(rng.integers(len(raw)))
        if kind == "flip":
            damaged[position] ^= 1 << int(rng.integers(8))
        elif kind == "byte":
            damaged[position] = (damaged[position] + int(rng.integers(1, 256))) % 256
        elif kind == "cut":
            del damaged[position:]
        else:
            damaged += rng.integers(0, 256, int(rng.integers(1, 40)), dtype=np.uint8).tobytes()
        yield f"{kind} at {position}", bytes(damaged)


def intact_records(damaged: bytes, records: list[bytes], compression: str) -> int:
    """How many of `records` the damaged file still holds unchanged from its start: what zlib,
    fed one byte at a time, decodes from a GZIP file, compared with what was written."""
    if compression == "gzip":
        decoder, decoded = zlib.decompressobj(16 + zlib.MAX_WBITS), bytearray()
        for i in range(len(damaged)):
            try:
                decoded += decoder.decompress(damaged[i:i + 1])
            except zlib.error:
                break
        damaged = bytes(decoded)
    framed = [frame_record(r) for r in records]
    common = len(os.path.commonprefix([damaged, b"".join(framed)]))
    ends = np.cumsum([len(f) for f in framed])
    return int(np.sum(ends <= common))


@pytest.mark.parametrize("compression", ["none", "gzip"])
def test_random_damage_yields_every_intact_record_and_names_the_first_unreadable(tmp_path,
                                                                                compression):
    """Raise mode yields every record before the damage exactly as written, then a DataError
    naming the next one (or nothing more); skip mode yields the same, then each record as
    written or a DataError in its place, up to a FramingError naming the first it cannot locate."""
    records = [good_record(i) for i in range(8)]
    path = str(tmp_path / "damaged.tfrecord")
    framed = b"".join(frame_record(r) for r in records)
    raw = gzip.compress(framed, mtime=0) if compression == "gzip" else framed
    for where, damaged in damaged_variants(raw, np.random.default_rng(13), 100):
        open(path, "wb").write(damaged)
        intact = intact_records(damaged, records, compression)
        read = []
        try:
            for data in read_records(path, compression):
                read.append(data)
        except DataError as error:
            assert (error.path, error.index) == (path, len(read)), where
        assert read == records[:intact], where
        items, end = [], None
        try:
            for item in read_records(path, compression, yield_errors=True):
                items.append(item)
        except FramingError as error:
            end = error
        assert items[:intact] == records[:intact], where
        for index, item in enumerate(items):
            assert item == records[index] or (isinstance(item, DataError)
                                              and (item.path, item.index) == (path, index)), where
        assert end is None or (end.path, end.index) == (path, len(items)), where


@pytest.mark.filterwarnings("ignore::UserWarning")  # Lightning's CPU/worker hints
def test_through_lightning_with_workers(tmp_path):
    """What a user of YT8MDataModule sees: the DataError itself, or every skip in read_stats."""
    from nextvlad.data import YT8MDataModule
    from test_data_datamodule import Recorder, trainer

    bad_at = {3, 6, 7, 8, 9, 10, 11}  # worker 1's share (records 6-11) is all bad
    path = str(tmp_path / "bad.tfrecord")
    write_records(path, [b"\xff\xff" if i in bad_at else good_record(i) for i in range(12)])
    for on_error in ("raise", "skip"):
        datamodule = YT8MDataModule(val_pattern=path, batch_size=2, num_workers=2,
                                    num_classes=NUM_CLASSES, on_error=on_error)
        model = Recorder(NUM_CLASSES)
        if on_error == "raise":
            with pytest.raises(DataError) as error:
                trainer().validate(model, datamodule)
            # the first bad record in the batch order: workers read their shares side by side
            assert error.value.path == path and error.value.index in bad_at
        else:
            trainer().validate(model, datamodule)
            assert [i for b in model.received["val"] for i in b["id"]] == good_ids([0, 1, 2, 4, 5])
            assert datamodule.read_stats["skipped_records"] == len(bad_at)
