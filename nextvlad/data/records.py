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
import json
import os
import struct
import zlib
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import BinaryIO, Literal

import fsspec
import google_crc32c
from fsspec.implementations.local import LocalFileSystem

Compression = Literal["auto", "none", "gzip"]

_HEADER = struct.Struct("<QI")  # length, masked crc of the length
_FOOTER = struct.Struct("<I")  # masked crc of the data
_GZIP_MAGIC = b"\x1f\x8b"
_MASK_DELTA = 0xA282EAD8
# The longest record read from a GZIP file (whose decompressed size is unknown until the end):
# a YouTube-8M frame-level record (300 frames x 1152 bytes + protobuf framing) is under 0.5 MiB,
# so a longer length means a corrupted header, reported before anything is allocated for it.
MAX_GZIP_RECORD_BYTES = 64 << 20


class DataError(ValueError):
    """A bad input file or record. The message names the file and, where known, the record index."""

    def __init__(self, path: str, index: int | None, reason: str):
        self.path = path
        self.index = index
        self.reason = reason
        where = f"{path}" if index is None else f"{path}, record {index}"
        super().__init__(f"{where}: {reason}")

    def __reduce__(self):
        # Exceptions pickle as type(*args), args being the message: rebuild from the fields
        # instead, so that the error crosses from a DataLoader worker as itself (see dataset.py).
        return type(self), (self.path, self.index, self.reason), self.__dict__


class FramingError(DataError):
    """The framing itself is broken (truncated file, bad length CRC): the rest of the file is unreadable."""


class ChangedSinceCounted(FramingError):
    """A file read to its counted end does not end there: it changed after its records were
    counted (the reader forgets its cached count, so the next start counts it anew)."""


def _changed_since_counted(path: str, index: int, how: str) -> ChangedSinceCounted:
    return ChangedSinceCounted(path, index, f"the file has changed since its records were counted ({how}); "
                                            "start again to count it anew")


def masked_crc32c(data: bytes | memoryview) -> int:
    """TFRecord's masked CRC32C of `data`."""
    crc = google_crc32c.value(data)
    return (((crc >> 15) | (crc << 17)) + _MASK_DELTA) & 0xFFFFFFFF


def expand_paths(pattern_or_files: str | os.PathLike | Iterable[str | os.PathLike]) -> list[str]:
    """Glob patterns / paths (a string, possibly comma-separated, or a list) -> sorted unique files.

    A pattern with a scheme (``gs://``, ``s3://``, ``file://``, ``memory://``...) is listed through
    fsspec and its files keep the scheme. A file matched under several spellings (relative and
    absolute, through a link, as ``file://``) is listed once, under the first. Raises
    FileNotFoundError naming the pattern when a pattern matches nothing.
    """
    if isinstance(pattern_or_files, (str, os.PathLike)):
        patterns = [p for p in str(pattern_or_files).split(",") if p.strip()]
    else:
        patterns = [str(p) for p in pattern_or_files]
    if not patterns:
        raise FileNotFoundError("no data files given (empty pattern / file list)")
    files: dict[str, str] = {}  # the file itself -> the name it was first matched under
    for pattern in patterns:
        pattern = os.path.expanduser(pattern.strip())
        matches = _glob_url(pattern) if is_url(pattern) else _glob_local(pattern)
        if not matches:
            raise FileNotFoundError(f"no files match {pattern!r}")
        for match in sorted(matches):
            files.setdefault(_file_identity(match), match)
    return sorted(files.values())


def _glob_local(pattern: str) -> list[str]:
    """The files ``pattern`` matches (folders are passed over). A link whose target is missing is
    an error naming it: a shard on a mount that is not there would be left out of every epoch."""
    matches = glob.glob(pattern)
    for match in matches:
        if os.path.islink(match) and not os.path.exists(match):
            raise FileNotFoundError(f"{match} (matched by {pattern!r}) is a link to {os.readlink(match)!r}, "
                                    "which does not exist")
    return [m for m in matches if os.path.isfile(m)]


def _file_identity(path: str) -> str:
    """One key per file however it is named: a local file (also as file://) by its resolved path,
    so that overlapping patterns do not feed its videos twice; a remote one by its URL."""
    if is_url(path):
        fs, stripped = url_file_system(path)
        if not isinstance(fs, LocalFileSystem):
            return fs.unstrip_protocol(stripped)
        path = stripped
    return os.path.realpath(path)


#: The install extra (pyproject.toml) that brings an object store's fsspec implementation.
STORE_EXTRAS = {"gs": "gcs", "gcs": "gcs", "s3": "s3", "s3a": "s3"}


def url_file_system(url: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """fsspec's (file system, path) of ``url``. A store whose package is not installed is a
    ValueError naming the URL and what to install: fsspec's ImportError names neither."""
    try:
        return fsspec.core.url_to_fs(url)
    except ImportError as error:
        scheme = url.split("://", 1)[0]
        extra = STORE_EXTRAS.get(scheme)
        install = f"pip install 'nextvlad[{extra}]' (in a clone: pip install -e '.[{extra}]')" if extra else "install it"
        raise ValueError(f"{url}: {scheme}:// needs a package that is not installed ({error}); {install}") from error


def is_url(path: str | os.PathLike) -> bool:
    """Whether `path` names a file through fsspec (has a scheme such as gs:// or memory://)."""
    return "://" in str(path)


def _glob_url(pattern: str) -> list[str]:
    fs, path = url_file_system(pattern)
    return [fs.unstrip_protocol(info["name"])
            for info in fs.glob(path, detail=True).values() if info["type"] == "file"]


#: Remote files are read in blocks this large, one ahead (fsspec's "readahead" cache): a few large
#: ranged reads per file instead of one request per record.
READ_AHEAD_BYTES = 16 << 20


def open_binary(path: str, read_ahead: int = READ_AHEAD_BYTES) -> BinaryIO:
    """A local file or an fsspec URL opened for reading, whose reads fetch up to ``read_ahead``
    bytes beyond what they ask for (a few to look at a header; a local file's buffer is at most
    1 MiB)."""
    if not is_url(path):
        return open(path, "rb", buffering=min(read_ahead, 1 << 20))
    # Through the file system's open: fsspec.open() would hand these options to the file system's
    # constructor, where gcsfs takes block_size and s3fs takes neither.
    fs, stripped = url_file_system(path)
    return fs.open(stripped, "rb", block_size=read_ahead, cache_type="readahead")


def file_size(path: str) -> int:
    if not is_url(path):
        return os.path.getsize(path)
    fs, stripped = url_file_system(path)
    return fs.size(stripped)


#: fsspec `info` fields that change when a stored file is rewritten (GCS, S3, HTTP, fsspec's local,
#: SFTP/HDFS-like stores, memory://): together they name the file's version.
VERSION_FIELDS = ("generation", "ETag", "etag", "md5Hash", "crc32c", "VersionId", "mtime", "created",
                  "ino", "LastModified", "updated", "Last-Modified", "Content-MD5", "Digest")


def remote_file_version(url: str) -> tuple[int, str | None]:
    """(size, version) of a remote file from one metadata request: the `VERSION_FIELDS` its store
    gives, or None where it gives none of them."""
    fs, stripped = url_file_system(url)
    info = fs.info(stripped)
    version = {name: str(info[name]) for name in VERSION_FIELDS if info.get(name) is not None}
    return info["size"], json.dumps(version, sort_keys=True) if version else None


def is_gzip(path: str) -> bool:
    """Whether the file starts with the GZIP magic bytes."""
    with open_binary(path, read_ahead=len(_GZIP_MAGIC)) as f:  # not 16 MiB of a remote file for 2 bytes
        return f.read(2) == _GZIP_MAGIC


def open_records_file(path: str, compression: Compression = "auto") -> BinaryIO:
    """Open a TFRecord file for reading; `auto` detects GZIP from the magic bytes.

    A GZIP file's stream ends where it breaks: read its `.raw.error` to tell that from a clean end.
    """
    if compression == "auto":
        compression = "gzip" if is_gzip(path) else "none"
    if compression == "gzip":
        return io.BufferedReader(GzipStream(path), buffer_size=1 << 20)
    if compression == "none":
        return open_binary(path)
    raise ValueError(f"compression must be 'auto', 'none' or 'gzip', got {compression!r}")


class GzipStream(io.RawIOBase):
    """The decompressed bytes of a GZIP file (one or more members), ending where the stream breaks.

    gzip.GzipFile raises in the middle of a buffered read and so loses every byte that read had
    already decompressed (up to a buffer of intact records) and the position of the damage. Here
    a broken stream (bad deflate data, trailer CRC or size mismatch, truncation) first hands out
    everything decoded before the damage, then reads as the end of the file, with the reason kept
    in `error` for the record reader to report at the record that cannot be completed.
    """

    _CHUNK = 1 << 16  # compressed bytes per file read

    def __init__(self, path: str):
        super().__init__()
        self._file = open_binary(path)
        self._decompressor = zlib.decompressobj(16 + zlib.MAX_WBITS)  # GZIP header and trailer
        self._input = b""  # compressed bytes not yet given to the decompressor
        self._output = bytearray()  # decompressed bytes not yet read
        self._ended = False
        self.error: str | None = None

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        while not self._output and not self._ended:
            self._decompress(len(buffer))
        size = min(len(buffer), len(self._output))
        buffer[:size] = self._output[:size]
        del self._output[:size]
        return size

    def close(self) -> None:
        self._file.close()
        super().close()

    def _decompress(self, max_length: int) -> None:
        decompressor = self._decompressor
        if decompressor.eof:
            self._next_member(decompressor.unused_data)
            return
        if not self._input:
            self._input = self._file.read(self._CHUNK)
            if not self._input:
                self._end("compressed file ended before the end-of-stream marker was reached")
                return
        before = decompressor.copy()
        try:
            self._output += decompressor.decompress(self._input, max_length)
            self._input = decompressor.unconsumed_tail
        except zlib.error as error:
            self._output += _decoded_before_error(before, self._input)
            self._end(str(error))

    def _next_member(self, rest: bytes) -> None:
        """Start the next member; like gzip.GzipFile, zero bytes between members are padding."""
        while not rest.lstrip(b"\0"):
            rest = self._file.read(self._CHUNK)
            if not rest:
                self._end(None)
                return
        self._decompressor = zlib.decompressobj(16 + zlib.MAX_WBITS)
        self._input = rest.lstrip(b"\0")

    def _end(self, error: str | None) -> None:
        self._ended, self.error = True, error


def _decoded_before_error(decompressor, data: bytes) -> bytes:
    """What `decompressor` makes of `data` before failing on it: fed one byte at a time, only the
    output of the byte where zlib detects the damage is lost (it belongs to the damaged record)."""
    output = bytearray()
    for i in range(len(data)):
        try:
            output += decompressor.decompress(data[i:i + 1])
        except zlib.error:
            break
    return bytes(output)


def _empty_file_error(path: str) -> FramingError | None:
    """A YouTube-8M shard is never empty: a 0-byte file means a failed download or copy."""
    if file_size(path) == 0:
        return FramingError(path, None, "empty file (0 bytes, no records)")
    return None


def _no_records_error(path: str) -> FramingError:
    """A GZIP file of nothing, which is not empty, is refused as an empty file is."""
    return FramingError(path, None, "no records (a GZIP stream of 0 bytes)")


def _runs_past_end(path: str, index: int, length: int, left: int) -> FramingError:
    return FramingError(path, index, f"truncated file: record of {length} bytes runs past the end "
                                     f"of the file ({left} bytes left)")


class _RecordReader:
    """Reads the frames of one open TFRecord file in order. Every length is bounded before a byte
    is allocated for it: by the bytes left in a plain file, by MAX_GZIP_RECORD_BYTES in a GZIP one
    (its decompressed size is unknown up front); a corrupted length could otherwise claim 2**64."""

    def __init__(self, path: str, compression: Compression):
        self.path = path
        self.file = open_records_file(path, compression)
        self.stream = getattr(self.file, "raw", self.file)  # an fsspec file has no raw layer
        self.size = None if isinstance(self.stream, GzipStream) else file_size(path)
        self.offset = 0  # in a plain file
        self.index = 0  # of the next record

    def __enter__(self) -> _RecordReader:
        return self

    def __exit__(self, *exc_info) -> None:
        self.file.close()

    def next_length(self) -> int | None:
        """The next record's checked length; None at a clean end of file."""
        header = self.file.read(_HEADER.size)
        if len(header) < _HEADER.size:
            self._check_stream()
            if not header:
                return None
            raise self._error(f"truncated file: record header has {len(header)} of "
                              f"{_HEADER.size} bytes")
        length, length_crc = _HEADER.unpack(header)
        if masked_crc32c(header[:8]) != length_crc:
            raise self._error("corrupted record header (length CRC32C mismatch)")
        if self.size is None and length > MAX_GZIP_RECORD_BYTES:
            raise self._error(f"corrupted record header: length {length} is over the maximum "
                              f"record size of a GZIP file ({MAX_GZIP_RECORD_BYTES} bytes, "
                              "nextvlad.data.records.MAX_GZIP_RECORD_BYTES)")
        if self.size is not None:
            self.offset += _HEADER.size
            left = self.size - self.offset
            if length + _FOOTER.size > left:
                raise _runs_past_end(self.path, self.index, length, left)
            self.offset += length + _FOOTER.size
        return length

    def read(self, length: int) -> tuple[bytes, int]:
        """The record's data and its stored masked CRC."""
        data = self.file.read(length)
        footer = self.file.read(_FOOTER.size)
        if len(data) < length or len(footer) < _FOOTER.size:
            self._check_stream()
            raise self._error(f"truncated file: record needs {length} data + 4 CRC bytes, only "
                              f"{len(data) + len(footer)} left")
        return data, _FOOTER.unpack(footer)[0]

    def skip(self, length: int) -> None:
        if self.size is not None:  # plain: the length was checked against the file size
            self.file.seek(length + _FOOTER.size, io.SEEK_CUR)
        else:
            self.read(length)

    def _check_stream(self) -> None:
        """Data ran out early: say so if it is because the GZIP stream broke there."""
        error = getattr(self.stream, "error", None)
        if error is not None:
            raise self._error(f"broken GZIP stream: {error}")

    def _error(self, reason: str) -> FramingError:
        return FramingError(self.path, self.index, reason)


def read_records(path: str, compression: Compression = "auto", start: int = 0,
                 count: int | None = None, check_crc: bool = True,
                 yield_errors: bool = False, counted: int | None = None) -> Iterator[bytes | DataError]:
    """Yield the data of records [start, start+count) of one TFRecord file.

    Records before `start` are skipped (by seeking in a plain file; their length CRC is still
    checked). A data CRC mismatch raises DataError naming the file and record index (or, with
    `yield_errors`, yields that DataError in the record's place and goes on). An empty file, a
    truncated file, a corrupted or impossible length or a broken GZIP stream raises FramingError
    naming the first record that cannot be read, after every intact record before it: nothing
    after that point can be located.

    `count` records are expected: a file that ends before start+count raises FramingError. With
    `counted` (the file's record count that planned the reads) that is a `ChangedSinceCounted`,
    and so is a file that goes on past `counted` when start+count reaches it.
    """
    empty = _empty_file_error(path)
    if empty is not None:
        raise empty
    with _RecordReader(path, compression) as records:
        while count is None or records.index < start + count:
            length = records.next_length()
            if length is None:
                if records.index == 0:
                    raise _no_records_error(path)
                if count is not None and counted is not None:
                    raise _changed_since_counted(path, records.index, f"it ends after {records.index} "
                                                                      f"records, {counted} were counted")
                if count is not None:
                    raise FramingError(path, records.index, f"the file ends after {records.index} records; "
                                                            f"records {start} to {start + count - 1} were asked for")
                return
            if records.index < start:
                records.skip(length)
            else:
                data, crc = records.read(length)
                if check_crc and masked_crc32c(data) != crc:
                    error = DataError(path, records.index,
                                      "corrupted record data (CRC32C mismatch)")
                    if not yield_errors:
                        raise error
                    yield error
                else:
                    yield data
            records.index += 1
        if counted is not None and start + count == counted and records.next_length() is not None:
            raise _changed_since_counted(path, counted, f"it holds more than the {counted} records counted")


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
    empty = _empty_file_error(path)
    if empty is not None:
        return FileScan(path, 0, empty)
    if not is_url(path) and (compression == "none" or (compression == "auto" and not is_gzip(path))):
        return _scan_plain(path)
    with _RecordReader(path, compression) as records:
        try:
            while (length := records.next_length()) is not None:
                records.skip(length)
                records.index += 1
        except FramingError as error:
            return FileScan(path, records.index, error)
        return FileScan(path, records.index, None if records.index else _no_records_error(path))


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
            offset += _HEADER.size
            if length + _FOOTER.size > size - offset:
                return FileScan(path, num_records,
                                _runs_past_end(path, num_records, length, size - offset))
            offset += length + _FOOTER.size
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
