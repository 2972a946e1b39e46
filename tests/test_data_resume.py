"""Mid-epoch resume at every batch boundary, for small batch sizes: the resumed reader yields
exactly the batches the uninterrupted one still had to yield (the oracle: that same epoch read
without interruption)."""

from __future__ import annotations

import copy

import pytest
import torch

from nextvlad.data import YT8MDataLoader, YT8MFrameDataset, write_synthetic_dataset

NUM_CLASSES = 5


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> list[str]:
    """13 short videos in 3 files (5, 4 and 4 records)."""
    out = tmp_path_factory.mktemp("resume")
    paths = write_synthetic_dataset(out, num_train=13, num_validate=0, num_test=0,
                                    num_classes=NUM_CLASSES, files_per_split=3, min_frames=2,
                                    max_frames=3, seed=5)
    return paths["train"]


def _dataset(files, batch_size, training=True, drop_last=True, shuffle_buffer=4):
    dataset = YT8MFrameDataset(files, batch_size=batch_size, max_frames=3, num_classes=NUM_CLASSES,
                               training=training, drop_last=drop_last, seed=2,
                               shuffle_buffer=shuffle_buffer)
    dataset.set_epoch(1)
    return dataset


def _summary(batch: dict) -> tuple:
    """What must match: the videos, in order, their frames, and the counters the batch carries."""
    return batch["id"], batch["rgb"].clone(), batch["lengths"].tolist(), batch["read_stats"].tolist()


def _same(a: list[tuple], b: list[tuple]) -> bool:
    return len(a) == len(b) and all(
        x[0] == y[0] and torch.equal(x[1], y[1]) and x[2:] == y[2:] for x, y in zip(a, b))


@pytest.mark.parametrize("batch_size", [1, 2, 3])
@pytest.mark.parametrize("training, drop_last, shuffle_buffer",
                         [(True, True, 4), (True, False, 4), (True, True, 0), (False, False, 4)])
def test_dataset_resumes_from_every_batch(files, batch_size, training, drop_last, shuffle_buffer):
    """The dataset's own state_dict, as a DataLoader worker saves it after each batch."""
    make = lambda: _dataset(files, batch_size, training, drop_last, shuffle_buffer)  # noqa: E731
    dataset = make()
    full, states = [], []
    for batch in dataset:
        full.append(_summary(batch))
        states.append(copy.deepcopy(dataset.state_dict()))
    assert all(len(ids) == batch_size for ids, *_ in full[:-1]) and len(full) == len(dataset)
    for taken, state in enumerate(states, 1):
        resumed = make()
        resumed.load_state_dict(state)
        rest = [_summary(batch) for batch in resumed]
        assert _same(rest, full[taken:]), (taken, [r[0] for r in rest], [f[0] for f in full[taken:]])


def _loader(files, batch_size, workers):
    return YT8MDataLoader(_dataset(files, batch_size), context=lambda: (1, 0, 1), num_workers=workers)


def _ids_after_resume(files, batch_size, workers, taken, tmp_path) -> list[list[str]]:
    loader = _loader(files, batch_size, workers)
    iterator = iter(loader)
    first = [next(iterator)["id"] for _ in range(taken)]
    torch.save(loader.state_dict(), tmp_path / "state.pt")  # as a checkpoint would
    del iterator
    resumed = _loader(files, batch_size, workers)
    resumed.load_state_dict(torch.load(tmp_path / "state.pt", weights_only=True))
    return first + [batch["id"] for batch in resumed]


@pytest.mark.parametrize("batch_size", [1, 2, 3])
def test_loader_resumes_from_every_batch_without_workers(files, batch_size, tmp_path):
    full = [batch["id"] for batch in _loader(files, batch_size, 0)]
    assert [len(ids) for ids in full] == [batch_size] * (13 // batch_size)  # drop_last
    for taken in range(len(full) + 1):
        assert _ids_after_resume(files, batch_size, 0, taken, tmp_path) == full, taken


@pytest.mark.parametrize("batch_size", [1, 2, 3])
@pytest.mark.parametrize("workers", [1, 2])
def test_loader_resumes_from_every_batch_with_workers(files, batch_size, workers, tmp_path):
    """Workers put each batch in a shared-memory slot of batch_size videos: a merged batch
    overflowed it (IndexError in the worker)."""
    full = [batch["id"] for batch in _loader(files, batch_size, workers)]
    for taken in range(1, len(full)):
        assert _ids_after_resume(files, batch_size, workers, taken, tmp_path) == full, taken
