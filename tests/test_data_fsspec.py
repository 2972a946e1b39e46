"""Data patterns as fsspec URLs (memory://, file://; gs:// and s3:// with the extras) read the same
batches as the local files."""

from __future__ import annotations

import gzip
import os
import uuid

import fsspec
import pytest
import torch

from nextvlad.data import YT8MDataLoader, YT8MFrameDataset
from nextvlad.data.records import DataError, expand_paths, scan_records


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
