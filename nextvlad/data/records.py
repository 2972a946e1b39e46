"""TFRecord framing: reading and writing records, uncompressed or GZIP, with masked CRC32C checks.

A TFRecord file is a sequence of records, each framed as::

    uint64 length (little endian) | uint32 masked_crc32c(length bytes) | data | uint32 masked_crc32c(data)

with ``masked_crc(x) = ((crc32c(x) >> 15 | crc32c(x) << 17) + 0xa282ead8) mod 2**32``.
Both CRCs are checked on every read: a flipped bit fails loudly instead of becoming a wrong label.
"""

from __future__ import annotations

import glob
import gzip
import io
import os
import struct
import zlib
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import BinaryIO, Literal

import fsspec
import google_crc32c

Compression = Literal["auto", "none", "gzip"]

_HEADER = struct.Struct("<QI")  # length, masked crc of the length
_FOOTER = struct.Struct("<I")  # masked crc of the data
_GZIP_MAGIC = b"\x1f\x8b"
_MASK_DELTA = 0xA282EAD8


class DataError(ValueError):
    """A bad input file or record. The message names the file and, where known, the record index."""

    def __init__(self, path: str, index: int | None, reason: str):
        self.path = path
        self.index = index
        self.reason = reason
        where = f"{path}" if index is None else f"{path}, record {index}"
        super().__init__(f"{where}: {reason}")


class FramingError(DataError):
    """The framing itself is broken (truncated file, bad length CRC): the rest of the file is unreadable."""


def masked_crc32c(data: bytes | memoryview) -> int:
    """TFRecord's masked CRC32C of `data`."""
    crc = google_crc32c.value(data)
    return (((crc >> 15) | (crc << 17)) + _MASK_DELTA) & 0xFFFFFFFF


def expand_paths(pattern_or_files: str | os.PathLike | Iterable[str | os.PathLike]) -> list[str]:
    """Glob patterns / paths (a string, possibly comma-separated, or a list) -> sorted unique files.

    A pattern with a scheme (``gs://``, ``s3://``, ``file://``, ``memory://``...) is listed through
    fsspec and its files keep the scheme. Raises FileNotFoundError naming the pattern when a
    pattern matches nothing.
    """
    if isinstance(pattern_or_files, (str, os.PathLike)):
        patterns = [p for p in str(pattern_or_files).split(",") if p.strip()]
    else:
        patterns = [str(p) for p in pattern_or_files]
    if not patterns:
        raise FileNotFoundError("no data files given (empty pattern / file list)")
    files: set[str] = set()
    for pattern in patterns:
        pattern = os.path.expanduser(pattern.strip())
        matches = _glob_url(pattern) if is_url(pattern) else [
            m for m in glob.glob(pattern) if os.path.isfile(m)]
        if not matches:
            raise FileNotFoundError(f"no files match {pattern!r}")
        files.update(matches)
    return sorted(files)


def is_url(path: str | os.PathLike) -> bool:
    """Whether `path` names a file through fsspec (has a scheme such as gs:// or memory://)."""
    return "://" in str(path)


def _glob_url(pattern: str) -> list[str]:
    fs, path = fsspec.core.url_to_fs(pattern)
    return [fs.unstrip_protocol(info["name"])
            for info in fs.glob(path, detail=True).values() if info["type"] == "file"]


#: Remote files are read in blocks this large, one ahead (fsspec's "readahead" cache): a few large
#: ranged reads per file instead of one request per record.
READ_AHEAD_BYTES = 16 << 20


def open_binary(path: str) -> BinaryIO:
    """A local file (1 MiB buffer) or an fsspec URL (read-ahead blocks) opened for reading."""
    if not is_url(path):
        return open(path, "rb", buffering=1 << 20)
    return fsspec.open(path, "rb", block_size=READ_AHEAD_BYTES, cache_type="readahead").open()


def file_size(path: str) -> int:
    if not is_url(path):
        return os.path.getsize(path)
    fs, stripped = fsspec.core.url_to_fs(path)
    return fs.size(stripped)


def is_gzip(path: str) -> bool:
    """Whether the file starts with the GZIP magic bytes."""
    with open_binary(path) as f:
        return f.read(2) == _GZIP_MAGIC


def open_records_file(path: str, compression: Compression = "auto") -> BinaryIO:
    """Open a TFRecord file for reading; `auto` detects GZIP from the magic bytes."""
    if compression == "auto":
        compression = "gzip" if is_gzip(path) else "none"
    if compression == "gzip":
        # gzip's own buffering is small; a BufferedReader on top keeps small header reads cheap.
        if is_url(path):  # fsspec's OpenFile closes the decompressor and the file together
            return io.BufferedReader(fsspec.open(path, "rb", compression="gzip",
                                                 block_size=READ_AHEAD_BYTES,
                                                 cache_type="readahead").open(),
                                     buffer_size=1 << 20)
        return io.BufferedReader(gzip.GzipFile(path, "rb"), buffer_size=1 << 20)
    if compression == "none":
        return open_binary(path)
    raise ValueError(f"compression must be 'auto', 'none' or 'gzip', got {compression!r}")


def _read_header(f: BinaryIO, path: str, index: int) -> int | None:
    """Read and check one record header; None at a clean end of file."""
    header = f.read(_HEADER.size)
    if not header:
        return None
    if len(header) < _HEADER.size:
        raise FramingError(path, index, f"truncated file: record header has {len(header)} of "
                                        f"{_HEADER.size} bytes")
    length, length_crc = _HEADER.unpack(header)
    if masked_crc32c(header[:8]) != length_crc:
        raise FramingError(path, index, "corrupted record header (length CRC32C mismatch)")
    return length


def read_records(path: str, compression: Compression = "auto", start: int = 0,
                 count: int | None = None, check_crc: bool = True,
                 yield_errors: bool = False) -> Iterator[bytes | DataError]:
    """Yield the data of records [start, start+count) of one TFRecord file.

    Records before `start` are skipped by seeking past them (their length CRC is still checked).
    A data CRC mismatch raises DataError naming the file and record index (or, with
    `yield_errors`, yields that DataError in the record's place and goes on). A truncated file, a
    corrupted length or a broken GZIP stream always raises FramingError: nothing after that point
    can be located.
    """
    index = 0
    try:
        with open_records_file(path, compression) as f:
            while count is None or index < start + count:
                length = _read_header(f, path, index)
                if length is None:
                    return
                if index < start:
                    _skip(f, length + _FOOTER.size, path, index)
                    index += 1
                    continue
                data = f.read(length)
                footer = f.read(_FOOTER.size)
                if len(data) < length or len(footer) < _FOOTER.size:
                    raise FramingError(path, index, f"truncated file: record needs {length} data "
                                                    f"+ 4 CRC bytes, only "
                                                    f"{len(data) + len(footer)} left")
                if check_crc and masked_crc32c(data) != _FOOTER.unpack(footer)[0]:
                    error = DataError(path, index, "corrupted record data (CRC32C mismatch)")
                    if not yield_errors:
                        raise error
                    yield error
                else:
                    yield data
                index += 1
    except (EOFError, zlib.error, gzip.BadGzipFile) as error:
        raise FramingError(path, index, f"broken GZIP stream: {error}") from error


def _skip(f: BinaryIO, num_bytes: int, path: str, index: int) -> None:
    """Seek forward over one record's data, failing if the file ends first."""
    target = f.tell() + num_bytes
    reached = f.seek(num_bytes, io.SEEK_CUR)
    # A GZIP stream stops seeking at its end; a plain file seeks past its end without complaint.
    if reached < target or reached > _plain_file_size(f):
        raise FramingError(path, index, f"truncated file: record of {num_bytes - 4} bytes runs "
                                        "past the end of the file")


def _plain_file_size(f: BinaryIO) -> float:
    raw = getattr(f, "raw", f)
    if isinstance(raw, io.FileIO):
        return os.fstat(raw.fileno()).st_size
    if isinstance(getattr(raw, "size", None), int):  # an fsspec file (seeks past its end, too)
        return raw.size
    return float("inf")


@dataclass(frozen=True)
class FileScan:
    """Result of a quick header scan: how many complete, well-framed records a file holds."""

    path: str
    num_records: int
    error: FramingError | None  # set when the scan stopped at a truncated/corrupted record


def scan_records(path: str, compression: Compression = "auto") -> FileScan:
    """Count records by walking the headers (seeking over the data; length CRCs checked).

    Cheap for uncompressed files (one 12-byte read per record); GZIP files are decompressed once.
    An empty (0-byte) file is reported as an error: a YouTube-8M shard is never empty, so an empty
    file means a failed download or copy.
    """
    if file_size(path) == 0:
        return FileScan(path, 0, FramingError(path, None, "empty file (0 bytes, no records)"))
    if not is_url(path) and (compression == "none" or (compression == "auto" and not is_gzip(path))):
        return _scan_plain(path)
    num_records = 0
    try:
        with open_records_file(path, compression) as f:
            while True:
                length = _read_header(f, path, num_records)
                if length is None:
                    return FileScan(path, num_records, None)
                _skip(f, length + _FOOTER.size, path, num_records)
                num_records += 1
    except FramingError as error:
        return FileScan(path, num_records, error)
    except (EOFError, zlib.error, gzip.BadGzipFile) as error:
        return FileScan(path, num_records,
                        FramingError(path, num_records, f"broken GZIP stream: {error}"))


def _scan_plain(path: str) -> FileScan:
    """`scan_records` for an uncompressed file: one 12-byte pread per record, no read-ahead, so
    a cold scan touches one page per record instead of the whole file."""
    size = os.path.getsize(path)
    fd = os.open(path, os.O_RDONLY)
    try:
        if hasattr(os, "posix_fadvise"):
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
        offset, num_records = 0, 0
        while offset < size:
            header = os.pread(fd, _HEADER.size, offset)
            if len(header) < _HEADER.size:
                return FileScan(path, num_records, FramingError(
                    path, num_records, f"truncated file: record header has {len(header)} of "
                                       f"{_HEADER.size} bytes"))
            length, length_crc = _HEADER.unpack(header)
            if masked_crc32c(header[:8]) != length_crc:
                return FileScan(path, num_records, FramingError(
                    path, num_records, "corrupted record header (length CRC32C mismatch)"))
            offset += _HEADER.size + length + _FOOTER.size
            if offset > size:
                return FileScan(path, num_records, FramingError(
                    path, num_records, f"truncated file: record of {length} bytes runs past the "
                                       "end of the file"))
            num_records += 1
        return FileScan(path, num_records, None)
    finally:
        os.close(fd)


def frame_record(data: bytes) -> bytes:
    """One record's bytes in TFRecord framing."""
    length = struct.pack("<Q", len(data))
    return b"".join((length, struct.pack("<I", masked_crc32c(length)), data,
                     struct.pack("<I", masked_crc32c(data))))


def write_records(path: str, records: Iterable[bytes], compression: Literal["none", "gzip"] = "none") -> int:
    """Write records to a TFRecord file (GZIP if asked); returns the number written."""
    opener = gzip.open if compression == "gzip" else open
    count = 0
    with opener(path, "wb") as f:
        for data in records:
            f.write(frame_record(data))
            count += 1
    return count


def count_records(paths: Sequence[str], compression: Compression = "auto") -> list[FileScan]:
    """Scan every file (see `scan_records`)."""
    return [scan_records(p, compression) for p in paths]
