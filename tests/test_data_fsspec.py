"""Data patterns as fsspec URLs (memory://, file://; gs:// and s3:// with the extras) read the same
batches as the local files."""

from __future__ import annotations

import gzip
import os
import uuid

import fsspec
import pytest
import torch
from fsspec.spec import AbstractBufferedFile, AbstractFileSystem

from nextvlad.data import YT8MDataLoader, YT8MFrameDataset, iter_videos
from nextvlad.data.records import READ_AHEAD_BYTES, DataError, expand_paths, is_gzip, open_binary, scan_records


@pytest.fixture()
def memory_copy(synthetic_data):
    """The synthetic train files in memory://<unique>/ (plain) and memory://<unique>/gz/ (GZIP)."""
    fs = fsspec.filesystem("memory")
    root = f"/{uuid.uuid4().hex}"
    for path in synthetic_data["train"]:
        data = open(path, "rb").read()
        fs.pipe(f"{root}/{os.path.basename(path)}", data)
        fs.pipe(f"{root}/gz/{os.path.basename(path)}", gzip.compress(data))
    yield f"memory://{root}"
    fs.rm(root, recursive=True)


def _batches(files, workers: int) -> list[dict]:
    dataset = YT8MFrameDataset(files, batch_size=16, max_frames=40, num_classes=10, training=True,
                               shuffle_buffer=32, seed=5)
    loader = YT8MDataLoader(dataset, context=lambda: (1, 0, 1), num_workers=workers)
    return [{k: v for k, v in b.items() if k != "buffer_lease"} for b in loader]


def _assert_same(batches, expected):
    assert len(batches) == len(expected) == 120 // 16
    for got, want in zip(batches, expected):
        assert got["id"] == want["id"]
        for key in ("rgb", "audio", "lengths", "labels", "has_labels", "read_stats"):
            assert torch.equal(got[key], want[key]), key


@pytest.mark.parametrize("workers", [0, 2])
def test_memory_copy_gives_the_same_batches_as_local_files(synthetic_data, memory_copy, workers):
    local = _batches(synthetic_data["train"], workers)
    files = expand_paths(memory_copy + "/train*.tfrecord")
    assert files == [f"{memory_copy}/train000{i}.tfrecord" for i in range(3)]
    _assert_same(_batches(files, workers), local)
    _assert_same(_batches(memory_copy + "/gz/train*.tfrecord", workers), local)


def test_file_url_gives_the_same_batches_as_local_files(synthetic_data):
    url = "file://" + os.path.join(synthetic_data["dir"], "train*.tfrecord")
    assert all(f.startswith("file://") for f in expand_paths(url))
    _assert_same(_batches(url, 0), _batches(synthetic_data["train"], 0))


def test_bad_remote_input_names_the_url(memory_copy):
    with pytest.raises(FileNotFoundError, match="memory://.*/nothing\\*.tfrecord"):
        expand_paths(memory_copy + "/nothing*.tfrecord")
    fs = fsspec.filesystem("memory")
    good = fs.cat_file(memory_copy[len("memory://"):] + "/train0000.tfrecord")
    fs.pipe(memory_copy[len("memory://"):] + "/cut.tfrecord", good[:-100])
    scan = scan_records(memory_copy + "/cut.tfrecord")
    assert scan.num_records == 39 and isinstance(scan.error, DataError)
    assert f"{memory_copy}/cut.tfrecord, record 39: truncated file" in str(scan.error)


class RangedFileSystem(AbstractFileSystem):
    """In-memory files fetched by byte ranges, as gcsfs and s3fs files are (fsspec's buffered file
    and its caches over _fetch_range); every range asked for is recorded. memory:// has no caches."""

    protocol = "ranged"
    files: dict[str, bytes] = {}
    fetched: list[tuple[str, int, int]] = []

    def ls(self, path, detail=True, **kwargs):
        entries = [{"name": name, "size": len(data), "type": "file"} for name, data in self.files.items()
                   if name.rsplit("/", 1)[0] == self._strip_protocol(path).rstrip("/")]
        return entries if detail else [entry["name"] for entry in entries]

    def info(self, path, **kwargs):
        name = self._strip_protocol(path)
        if name not in self.files:
            raise FileNotFoundError(path)
        return {"name": name, "size": len(self.files[name]), "type": "file"}

    def _open(self, path, mode="rb", block_size=None, cache_type="readahead", **kwargs):
        return RangedFile(self, self._strip_protocol(path), mode, block_size=block_size, cache_type=cache_type,
                          size=len(self.files[self._strip_protocol(path)]))


class RangedFile(AbstractBufferedFile):
    def _fetch_range(self, start, end):
        self.fs.fetched.append((self.path, start, end))
        return self.fs.files[self.path][start:end]


def test_remote_files_are_fetched_in_read_ahead_blocks_and_probed_for_gzip_by_a_few_bytes(synthetic_data):
    """A file of a bucket is read in few large ranged requests (README: 16 MiB read-ahead blocks),
    and telling GZIP from plain files costs a few bytes, not a block, per open."""
    fsspec.register_implementation("ranged", RangedFileSystem, clobber=True)
    local = synthetic_data["train"][:2]
    RangedFileSystem.files = {f"/bucket/{os.path.basename(path)}": open(path, "rb").read() for path in local}
    RangedFileSystem.fetched = []
    urls = [f"ranged:///bucket/{os.path.basename(path)}" for path in local]
    assert [is_gzip(url) for url in urls] == [False, False]
    assert sum(end - start for _, start, end in RangedFileSystem.fetched) <= 2 * 8
    RangedFileSystem.fetched = []
    batches = _batches(urls, workers=0)
    assert [b["id"] for b in batches] == [b["id"] for b in _batches(local, workers=0)]
    size = sum(len(data) for data in RangedFileSystem.files.values())
    fetched = sum(end - start for _, start, end in RangedFileSystem.fetched)
    # counting pass + reading pass, each about the file once (two probes of a few bytes each)
    assert 2 * size <= fetched <= 2 * size + 64
    # a file larger than the block, read as the reader does (1 MiB at a time): 16 MiB ranges
    RangedFileSystem.files["/bucket/large"] = bytes(40 << 20)
    RangedFileSystem.fetched = []
    with open_binary("ranged:///bucket/large") as handle:
        while handle.read(1 << 20):
            pass
    ranges = [end - start for _, start, end in RangedFileSystem.fetched]
    assert sum(ranges) == 40 << 20 and len(ranges) == 3 and max(ranges) == READ_AHEAD_BYTES + (1 << 20)


def test_a_file_under_several_spellings_is_read_once(synthetic_data, tmp_path, monkeypatch):
    """Overlapping patterns (relative and absolute, a link, file://) must not feed a file's videos
    twice: each file once, under the first name it was matched by."""
    data_dir = synthetic_data["dir"]
    (tmp_path / "link.tfrecord").symlink_to(os.path.join(data_dir, "train0000.tfrecord"))
    monkeypatch.chdir(data_dir)
    patterns = ["train*.tfrecord", os.path.join(data_dir, "train000[01].tfrecord"), "./train0002.tfrecord",
                "file://" + os.path.join(data_dir, "train0001.tfrecord"), str(tmp_path / "link.tfrecord")]
    assert expand_paths(patterns) == ["train0000.tfrecord", "train0001.tfrecord", "train0002.tfrecord"]
    assert expand_paths(",".join(reversed(patterns[1:]))) == sorted(
        [str(tmp_path / "link.tfrecord"), "./train0002.tfrecord", "file://" + os.path.join(data_dir, "train0001.tfrecord")])
    videos = [video["id"] for video in iter_videos(patterns, num_classes=10)]
    assert sorted(videos) == sorted(video["id"] for video in iter_videos(synthetic_data["train"], num_classes=10))


@pytest.mark.parametrize("url, extra", [("gs://a-bucket/yt8m/validate*.tfrecord", "gcs"),
                                        ("s3://a-bucket/yt8m/validate*.tfrecord", "s3")])
def test_a_store_whose_package_is_missing_is_one_line_naming_the_extra(tmp_path, url, extra):
    """fsspec raises ImportError ("Please install gcsfs ...") without the URL: through the console
    script that was a double traceback. Oracle: the pyproject extras."""
    import importlib.util
    import subprocess
    import sys
    from pathlib import Path

    if importlib.util.find_spec({"gcs": "gcsfs", "s3": "s3fs"}[extra]) is not None:
        pytest.skip(f"the {extra} extra is installed here")
    with pytest.raises(ValueError, match=rf"^{url.split('://')[0]}://.*needs a package that is not installed .*"
                                         rf"pip install 'nextvlad\[{extra}\]' \(in a clone: pip install -e '\.\[{extra}\]'\)$"):
        expand_paths(url)
    demo = Path(__file__).resolve().parents[1] / "configs" / "demo.yaml"
    result = subprocess.run([str(Path(sys.executable).parent / "nextvlad"), "validate", "--config", str(demo),
                             "--data.init_args.val_pattern", url], cwd=tmp_path, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert result.stderr.strip().splitlines()[-1].startswith(f"nextvlad validate: error: {url}: ")
