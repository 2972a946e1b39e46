"""The record-count cache: a start or a resume counts a file's records once per version of the file.

A "new process" is the data module's in-process cache emptied; the scanner is then replaced by one
that records what it is asked to count, against counts made by the scanner itself.
"""

from __future__ import annotations

import json
import logging
import os
import uuid

import fsspec
import pytest

from nextvlad.data import YT8MFrameDataset, dataset, records, write_synthetic_dataset
from nextvlad.data.records import scan_records


@pytest.fixture()
def files(tmp_path, monkeypatch):
    monkeypatch.setenv("NEXTVLAD_CACHE_DIR", str(tmp_path / "cache"))
    written = write_synthetic_dataset(tmp_path / "data", num_train=40, num_validate=0, num_test=0, num_classes=10,
                                      files_per_split=4, min_frames=2, max_frames=5, seed=11)
    return written["train"]


@pytest.fixture()
def new_process(monkeypatch):
    """Returns a function that starts a "process": an empty in-process cache and a scanner that
    records the files it counts (into the list it returns)."""
    def start() -> list[str]:
        scanned: list[str] = []

        def counted(path, compression="auto"):
            scanned.append(path)
            return scan_records(path, compression)

        monkeypatch.setattr(dataset, "_SCAN_CACHE", {})
        monkeypatch.setattr(dataset, "scan_records", counted)
        return scanned

    return start


def _counts(files) -> list[int]:
    return YT8MFrameDataset(files, batch_size=4, num_classes=10, on_error="skip").counts


def _saved(tmp_path) -> dict:
    return json.loads((tmp_path / "cache" / "record_counts.json").read_text())["counts"]


def test_a_second_start_counts_no_file_again(files, new_process, tmp_path):
    expected = [scan_records(path).num_records for path in files]
    first = new_process()
    assert _counts(files) == expected and first == files
    second = new_process()
    assert _counts(files) == expected and second == []
    assert sorted(_saved(tmp_path).values()) == sorted(expected)
    assert all(os.path.abspath(path) in name for path, name in zip(files, sorted(_saved(tmp_path))))


def test_a_file_rewritten_grown_or_touched_is_counted_again(files, new_process):
    new_process()
    before = _counts(files)
    with open(files[1], "ab") as grown, open(files[0], "rb") as other:
        grown.write(other.read())  # files[0]'s records appended: a longer file
    stat = os.stat(files[2])
    os.utime(files[2], ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))  # same bytes, newer
    scanned = new_process()
    assert _counts(files) == [before[0], before[1] + before[0], before[2], before[3]]
    assert scanned == [files[1], files[2]]


def test_a_damaged_file_is_counted_and_reported_again_at_every_start(files, new_process, tmp_path, caplog):
    with open(files[3], "r+b") as cut:
        cut.truncate(os.path.getsize(files[3]) - 7)
    new_process()
    counts = _counts(files)
    assert counts[3] == scan_records(files[3]).num_records > 0
    scanned = new_process()
    with caplog.at_level(logging.WARNING, logger="nextvlad.data"):
        assert _counts(files) == counts
    assert scanned == [files[3]] and "truncated file" in caplog.text
    assert len(_saved(tmp_path)) == 3


def test_remote_files_are_kept_by_their_stores_version_tag(files, new_process, monkeypatch):
    fs, root = fsspec.filesystem("memory"), f"/{uuid.uuid4().hex}"
    urls = []
    for path in files:
        fs.pipe(f"{root}/{os.path.basename(path)}", open(path, "rb").read())
        urls.append(f"memory://{root}/{os.path.basename(path)}")
    try:
        first = new_process()
        counts = _counts(urls)
        assert first == urls
        scanned = new_process()
        assert _counts(urls) == counts and scanned == []
        fs.pipe(f"{root}/{os.path.basename(files[0])}", open(files[1], "rb").read())  # rewritten
        scanned = new_process()
        assert _counts(urls) == [counts[1], *counts[1:]] and scanned == [urls[0]]
        monkeypatch.setattr(records, "VERSION_FIELDS", ())  # a store that gives no version tag
        new_process()
        _counts(urls)
        scanned = new_process()
        assert _counts(urls) == [counts[1], *counts[1:]] and scanned == urls
    finally:
        fs.rm(root, recursive=True)


def test_an_unreadable_cache_is_a_warning_and_is_written_anew(files, new_process, tmp_path, caplog):
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / "record_counts.json").write_text('{"format": 1, "counts": [')
    new_process()
    with caplog.at_level(logging.WARNING, logger="nextvlad.data"):
        counts = _counts(files)
    assert counts == [scan_records(path).num_records for path in files]
    assert f"could not read the record-count cache {tmp_path / 'cache' / 'record_counts.json'}" in caplog.text
    assert sorted(_saved(tmp_path).values()) == sorted(counts)


def test_a_cache_folder_that_cannot_be_made_is_a_warning_and_counts_as_before(files, new_process, tmp_path,
                                                                              monkeypatch, caplog):
    (tmp_path / "a-file").write_text("")
    monkeypatch.setenv("NEXTVLAD_CACHE_DIR", str(tmp_path / "a-file" / "cache"))
    new_process()
    with caplog.at_level(logging.WARNING, logger="nextvlad.data"):
        counts = _counts(files)
    assert counts == [scan_records(path).num_records for path in files]
    assert "could not write the record-count cache" in caplog.text and "NEXTVLAD_CACHE_DIR" in caplog.text
    scanned = new_process()
    assert _counts(files) == counts and scanned == files  # nothing kept: counted again


def test_the_default_folder_is_the_users_cache(monkeypatch, tmp_path):
    from nextvlad.data import count_cache

    monkeypatch.delenv("NEXTVLAD_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert count_cache.cache_path() == tmp_path / "nextvlad" / "record_counts.json"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert count_cache.cache_path() == tmp_path / "home" / ".cache" / "nextvlad" / "record_counts.json"
