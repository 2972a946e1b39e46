"""The record-count cache: a start or a resume counts a file's records once per version of the file.

A "new process" is the data module's in-process cache emptied; the scanner is then replaced by one
that records what it is asked to count, against counts made by the scanner itself.
"""

from __future__ import annotations

import json
import logging
import os
import pathlib
import shutil
import uuid

import fsspec
import pytest

from nextvlad.data import YT8MFrameDataset, dataset, records, write_synthetic_dataset
from nextvlad.data.records import scan_records


SIZES = (7, 9, 11, 13)  # records per file: a count filed under another file's key shows


@pytest.fixture()
def files(tmp_path, monkeypatch):
    monkeypatch.setenv("NEXTVLAD_CACHE_DIR", str(tmp_path / "cache"))
    return [write_synthetic_dataset(tmp_path / f"data{size:02d}", num_train=size, num_validate=0, num_test=0,
                                    num_classes=10, files_per_split=1, min_frames=2, max_frames=5,
                                    seed=size)["train"][0] for size in SIZES]


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
    expected = list(SIZES)
    first = new_process()
    assert _counts(files) == expected and first == files
    second = new_process()
    assert _counts(files) == expected and second == []
    assert {json.loads(name)[0]: count for name, count in _saved(tmp_path).items()} == dict(zip(files, expected))


def test_a_file_rewritten_grown_touched_or_copied_over_is_counted_again(files, new_process, tmp_path):
    new_process()
    assert _counts(files) == list(SIZES)
    with open(files[1], "ab") as grown, open(files[0], "rb") as other:
        grown.write(other.read())  # files[0]'s records appended: a longer file
    stat = os.stat(files[2])
    os.utime(files[2], ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))  # same bytes, newer
    before = os.stat(files[3])
    shutil.copy2(files[3], tmp_path / "copy")  # `cp -p` / `rsync -t`: size and modification time kept
    os.replace(tmp_path / "copy", files[3])
    after = os.stat(files[3])
    assert (after.st_size, after.st_mtime_ns) == (before.st_size, before.st_mtime_ns) and after.st_ino != before.st_ino
    scanned = new_process()
    assert _counts(files) == [7, 9 + 7, 11, 13]
    assert scanned == files[1:]


def test_a_damaged_file_is_counted_and_reported_again_at_every_start(files, new_process, tmp_path, caplog):
    with open(files[3], "r+b") as cut:
        cut.truncate(os.path.getsize(files[3]) - 7)
    new_process()
    counts = _counts(files)
    assert counts == [*SIZES[:3], 12]
    scanned = new_process()
    with caplog.at_level(logging.WARNING, logger="nextvlad.data"):
        assert _counts(files) == counts
    assert scanned == [files[3]] and "truncated file" in caplog.text
    assert len(_saved(tmp_path)) == 3


def test_remote_files_are_kept_by_their_stores_version_tags(files, new_process, monkeypatch):
    fs, root = fsspec.filesystem("memory"), f"/{uuid.uuid4().hex}"
    urls = [f"memory://{root}/{index}.tfrecord" for index in range(len(files))]
    for url, path in zip(urls, files):
        fs.pipe(url.removeprefix("memory://"), open(path, "rb").read())
    try:
        first = new_process()
        assert _counts(urls) == list(SIZES) and first == urls
        scanned = new_process()
        assert _counts(urls) == list(SIZES) and scanned == []
        fs.pipe(urls[0].removeprefix("memory://"), open(files[1], "rb").read())  # rewritten: 9 records
        scanned = new_process()
        assert _counts(urls) == [9, *SIZES[1:]] and scanned == [urls[0]]
        monkeypatch.setattr(records, "VERSION_FIELDS", ())  # a store that gives no version tag
        new_process()
        _counts(urls)
        scanned = new_process()
        assert _counts(urls) == [9, *SIZES[1:]] and scanned == urls
    finally:
        fs.rm(root, recursive=True)


def test_an_unreadable_cache_is_a_warning_and_is_written_anew(files, new_process, tmp_path, caplog):
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / "record_counts.json").write_text('{"format": 1, "counts": [')
    new_process()
    with caplog.at_level(logging.WARNING, logger="nextvlad.data"):
        counts = _counts(files)
    assert counts == list(SIZES)
    assert f"could not read the record-count cache {tmp_path / 'cache' / 'record_counts.json'}" in caplog.text
    assert sorted(_saved(tmp_path).values()) == list(SIZES)


def test_a_cache_folder_that_cannot_be_made_is_a_warning_and_counts_as_before(files, new_process, tmp_path,
                                                                              monkeypatch, caplog):
    (tmp_path / "a-file").write_text("")
    monkeypatch.setenv("NEXTVLAD_CACHE_DIR", str(tmp_path / "a-file" / "cache"))
    new_process()
    with caplog.at_level(logging.WARNING, logger="nextvlad.data"):
        counts = _counts(files)
    assert counts == list(SIZES)
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


def test_no_home_folder_is_a_warning_and_counts_as_before(files, new_process, monkeypatch, caplog):
    """A container run with --user of no passwd entry and no HOME: Path.home() raises."""
    for variable in ("NEXTVLAD_CACHE_DIR", "XDG_CACHE_HOME", "HOME"):
        monkeypatch.delenv(variable, raising=False)

    def no_home(cls):
        raise RuntimeError("Could not determine home directory.")

    monkeypatch.setattr(pathlib.Path, "home", classmethod(no_home))
    new_process()
    with caplog.at_level(logging.WARNING, logger="nextvlad.data"):
        assert _counts(files) == list(SIZES)
    assert "could not find the record-count cache (no home folder)" in caplog.text


@pytest.mark.parametrize("on_error", ["raise", "skip"])
@pytest.mark.parametrize("change", ["grown", "cut"])
def test_a_file_that_changed_since_it_was_counted_is_an_error_at_its_read(files, change, on_error):
    """A count that is no longer the file's (changed during the run, or a cache fooled by a file
    of the same size, times and inode) never leaves records unread, nor an epoch short, in silence."""
    dataset = YT8MFrameDataset(files[:2], batch_size=4, num_classes=10, on_error=on_error)
    if change == "grown":
        with open(files[1], "ab") as grown, open(files[0], "rb") as other:
            grown.write(other.read())
    else:
        cut = list(records.read_records(files[1]))[:5]
        records.write_records(files[1], cut)
    message = (f"{files[1]}, record {9 if change == 'grown' else 5}: the file has changed since its records were "
               f"counted ({'it holds more than the 9 records counted' if change == 'grown' else 'it ends after 5 records, 9 were counted'}); "
               "start again to count it anew")
    if on_error == "raise":
        with pytest.raises(records.FramingError) as raised:
            list(dataset)
        assert str(raised.value) == message
    else:
        batches = list(dataset)
        assert sum(len(batch["id"]) for batch in batches) == 7 + (9 if change == "grown" else 5)
        assert sum(int(batch["read_stats"][0]) for batch in batches) == 1  # one skip: the change


def test_a_cached_count_that_reading_finds_wrong_is_dropped(files, new_process, tmp_path):
    """A store whose version fields missed a change (an SFTP or HTTP time in whole seconds): the
    read that finds the count wrong is an error, and the next start counts the file anew."""
    new_process()
    _counts(files)
    cache = tmp_path / "cache" / "record_counts.json"
    saved = json.loads(cache.read_text())
    (name,) = [name for name in saved["counts"] if json.loads(name)[0] == files[1]]
    saved["counts"][name] = 12  # files[1] holds 9
    cache.write_text(json.dumps(saved))
    new_process()
    dataset = YT8MFrameDataset(files[:2], batch_size=4, num_classes=10)
    assert dataset.counts == [7, 12]
    with pytest.raises(records.ChangedSinceCounted, match="it ends after 9 records, 12 were counted"):
        list(dataset)
    assert all(json.loads(name)[0] != files[1] for name in _saved(tmp_path))
    scanned = new_process()
    assert _counts(files) == list(SIZES) and scanned == [files[1]]


def test_read_records_asked_for_more_than_the_file_holds_says_so(files):
    with pytest.raises(records.FramingError) as raised:
        list(records.read_records(files[0], start=5, count=4))
    assert str(raised.value) == f"{files[0]}, record 7: the file ends after 7 records; records 5 to 8 were asked for"
