"""Sharding over DDP ranks x DataLoader workers, shuffling, and equal batch counts per rank."""

from __future__ import annotations

import itertools
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from nextvlad.data import YT8MDataLoader, YT8MFrameDataset, iter_videos, write_records
from nextvlad.data import sharding
from nextvlad.data.parsing import encode_frame_record

COUNTS = [7, 30, 1, 13, 4]  # uneven files

# 3 workers on a 2-core machine is the point of these tests, not a mistake.
pytestmark = pytest.mark.filterwarnings("ignore:This DataLoader will create")


@pytest.fixture(scope="module")
def uneven_files(tmp_path_factory):
    """Five files with 7, 30, 1, 13 and 4 tiny records; ids f{file}r{record}."""
    out = tmp_path_factory.mktemp("uneven")
    rgb, audio = np.zeros((2, 1024), np.uint8), np.zeros((2, 128), np.uint8)
    paths = []
    for f, count in enumerate(COUNTS):
        path = str(out / f"train{f:02d}.tfrecord")
        write_records(path, [encode_frame_record(f"f{f}r{r}", rgb, audio, [r % 3])
                             for r in range(count)])
        paths.append(path)
    return paths


ALL_IDS = {f"f{f}r{r}" for f, count in enumerate(COUNTS) for r in range(count)}


def epoch_ids(dataset: YT8MFrameDataset, world_size: int, num_workers: int, epoch: int = 0):
    """Iterate every simulated rank through a real DataLoader; returns per-rank lists of batches."""
    per_rank = []
    for rank in range(world_size):
        loader = YT8MDataLoader(dataset, context=lambda r=rank: (epoch, r, world_size),
                                num_workers=num_workers)
        batches = [batch["id"] for batch in loader]
        assert len(batches) == len(loader)  # __len__ is this rank's batch count
        per_rank.append(batches)
    return per_rank


@pytest.mark.parametrize("world_size,num_workers", itertools.product([1, 2, 3, 4], [0, 1, 2, 3]))
def test_every_record_read_exactly_once(uneven_files, world_size, num_workers):
    total = len(ALL_IDS)
    evaluation = YT8MFrameDataset(uneven_files, batch_size=4, num_classes=3)
    per_rank = epoch_ids(evaluation, world_size, num_workers)
    ids = [i for batches in per_rank for batch in batches for i in batch]
    assert sorted(ids) == sorted(ALL_IDS)  # nothing dropped, nothing twice
    rank_records = [sum(map(len, batches)) for batches in per_rank]
    assert max(rank_records) - min(rank_records) <= 1

    training = YT8MFrameDataset(uneven_files, batch_size=4, num_classes=3, training=True, seed=3)
    per_rank = epoch_ids(training, world_size, num_workers, epoch=1)
    ids = [i for batches in per_rank for batch in batches for i in batch]
    assert len(ids) == len(set(ids)) and set(ids) <= ALL_IDS
    assert len({len(batches) for batches in per_rank}) == 1  # ranks stay in step
    assert all(len(batch) == 4 for batches in per_rank for batch in batches)  # drop_last
    dropped = total - len(ids)
    assert dropped == training.records_dropped_per_epoch() < world_size * 4  # < one batch per rank
    assert len(per_rank[0]) == (total // world_size) // 4


@pytest.mark.parametrize("world_size", [1, 3])
def test_training_without_drop_last_keeps_ranks_in_step(uneven_files, world_size):
    dataset = YT8MFrameDataset(uneven_files, batch_size=4, num_classes=3, training=True,
                               drop_last=False)
    per_rank = epoch_ids(dataset, world_size, num_workers=2)
    sizes = [[len(b) for b in batches] for batches in per_rank]
    assert all(sorted(s) == sorted(sizes[0]) for s in sizes)
    assert sum(map(sum, sizes)) == len(ALL_IDS) - len(ALL_IDS) % world_size


def test_shuffle_is_deterministic_per_seed_and_epoch(uneven_files):
    def order(seed, epoch, num_workers=2):
        dataset = YT8MFrameDataset(uneven_files, batch_size=4, num_classes=3, training=True,
                                   seed=seed, shuffle_buffer=8)
        return [i for batches in epoch_ids(dataset, 2, num_workers, epoch) for b in batches for i in b]

    first = order(seed=1, epoch=0)
    assert order(seed=1, epoch=0) == first
    assert order(seed=1, epoch=1) != first
    assert order(seed=2, epoch=0) != first
    assert sharding.epoch_file_order(5, 1, 0, True) == sharding.epoch_file_order(5, 1, 0, True)
    assert sharding.epoch_file_order(5, 1, 0, False) == list(range(5))
    # the shuffle buffer mixes records across files, not only the file order
    assert first != sorted(first, key=lambda i: (int(i[1:].split("r")[0]), int(i.split("r")[1])))


def test_epoch_follows_the_loader_iterations(uneven_files):
    dataset = YT8MFrameDataset(uneven_files, batch_size=4, num_classes=3, training=True, seed=5)
    loader = YT8MDataLoader(dataset, num_workers=0)
    epochs = [[i for b in loader for i in b["id"]] for _ in range(3)]
    assert dataset.epoch == 2 and epochs[0] != epochs[1] != epochs[2]


def test_plan_properties_against_brute_force():
    rng = np.random.default_rng(0)
    for _ in range(200):
        counts = rng.integers(0, 12, rng.integers(1, 6)).tolist()
        total = sum(counts)
        world_size, num_workers, batch = (int(rng.integers(1, 5)), int(rng.integers(1, 4)),
                                          int(rng.integers(1, 6)))
        order = rng.permutation(len(counts)).tolist()
        for training, drop_last in ((False, False), (True, True), (True, False)):
            seen = []
            for rank in range(world_size):
                rank_batches = []
                for worker in range(num_workers):
                    plan = sharding.plan_reader(counts, order, world_size, rank, num_workers,
                                                worker, batch, training, drop_last)
                    assert plan.num_records == sum(s.count for s in plan.segments)
                    for s in plan.segments:
                        assert 0 <= s.start and s.start + s.count <= counts[s.file_index]
                        seen += [(s.file_index, s.start + k) for k in range(s.count)]
                    rank_batches += plan.batch_sizes
                assert len(rank_batches) == sharding.num_batches(counts, world_size, rank, batch,
                                                                 training, drop_last)
            assert len(seen) == len(set(seen))
            dropped = sharding.records_dropped(total, world_size, batch, training, drop_last)
            assert len(seen) == total - dropped
            if not training:
                assert dropped == 0
            elif drop_last:
                assert dropped < world_size * batch
            else:
                assert dropped < world_size


def test_fewer_files_than_readers_splits_inside_files(uneven_files):
    one_file = uneven_files[1]  # 30 records
    dataset = YT8MFrameDataset(one_file, batch_size=2, num_classes=3)
    per_rank = epoch_ids(dataset, world_size=4, num_workers=3)
    ids = [i for batches in per_rank for b in batches for i in b]
    assert sorted(ids) == sorted(v["id"] for v in iter_videos(one_file, num_classes=3))


def test_worker_buffer_reuse_never_corrupts_batches(synthetic_data):
    """Workers reuse shared-memory buffers once finalize_batch released them; a consumer that
    releases (DataModule path) or never releases (raw batches kept) sees the same, right data."""
    from nextvlad.data import finalize_batch, iter_batches

    files = synthetic_data["train"]
    expected = {}
    for batch in iter_batches(files, batch_size=5, max_frames=40, num_classes=10):
        for i, video_id in enumerate(batch["id"]):
            expected[video_id] = (batch["rgb"][i], batch["audio"][i])
    dataset = YT8MFrameDataset(files, batch_size=5, max_frames=40, num_classes=10)
    for release in (True, False):
        loader = YT8MDataLoader(dataset, num_workers=2)
        raw_batches, slots = [], []
        for raw in loader:
            slots.append(raw["buffer_lease"].slot if "buffer_lease" in raw else None)
            if release:
                batch = finalize_batch(raw)  # releases the lease
                for i, video_id in enumerate(batch["id"]):
                    torch.testing.assert_close(batch["rgb"][i], expected[video_id][0], rtol=0, atol=0)
                    torch.testing.assert_close(batch["audio"][i], expected[video_id][1], rtol=0, atol=0)
            else:
                raw_batches.append(raw)
        if release:  # 24 batches from 2 workers with at most 4 buffers each: reused
            assert len(slots) == 24 and None not in slots and max(slots) < 4
        else:  # nothing released: each worker used its 4 buffers once, then fresh ones
            assert slots.count(None) == 24 - 8
            for raw in raw_batches:
                batch = finalize_batch(raw)
                for i, video_id in enumerate(batch["id"]):
                    torch.testing.assert_close(batch["rgb"][i], expected[video_id][0], rtol=0, atol=0)


def test_a_stale_lease_cannot_release_a_reused_buffer():
    """Finalizing a raw batch twice (or releasing a lease late) must not free the buffer that a
    newer batch now occupies: the worker would overwrite frames the consumer has not read."""
    from nextvlad.data.shm_pool import SharedBufferPool

    pool = SharedBufferPool(((2, 3, 4),), torch.uint8, max_slots=2)
    (first,), first_lease = pool.take(2)
    first_lease.release()
    (second,), second_lease = pool.take(2)
    assert second_lease.slot == first_lease.slot  # reused once released
    first_lease.release()  # stale: the slot now belongs to the second batch
    (third,), third_lease = pool.take(2)
    assert third_lease.slot != second_lease.slot
    second_lease.release()
    second_lease.release()  # idempotent
    assert pool.take(1)[1].slot == second_lease.slot


def test_ddp_ranks_take_workers_from_a_forkserver_where_fork_can_deadlock(uneven_files, monkeypatch):
    # CPython before 3.11.10 can leave a forked child blocked inside fork (gh-112275); a DDP
    # rank's workers then come from a forkserver, and read exactly what forked ones read.
    from nextvlad.data import dataset as dataset_module

    training = YT8MFrameDataset(uneven_files, batch_size=4, num_classes=3, training=True, seed=3)

    def rank_batches(affected: bool, world_size: int, **kwargs):
        monkeypatch.setattr(dataset_module, "fork_can_deadlock_in_child", lambda: affected)
        loader = YT8MDataLoader(training, context=lambda: (1, world_size - 1, world_size), num_workers=2, **kwargs)
        batches = [batch["id"] for batch in loader]
        context = loader.multiprocessing_context
        return (context.get_start_method() if context is not None else None), batches

    forked = rank_batches(False, world_size=2)
    assert forked[0] is None  # torch's default (fork on Linux)
    assert rank_batches(True, world_size=2) == ("forkserver", forked[1])
    assert rank_batches(True, world_size=1)[0] is None  # one process: no collectives' threads
    assert rank_batches(True, world_size=2, multiprocessing_context="spawn")[0] == "spawn"  # the user's
    assert dataset_module.fork_can_deadlock_in_child() == (sys.platform.startswith("linux")
                                                          and sys.version_info[:3] < (3, 11, 10))


def test_a_full_dev_shm_is_one_error_line_naming_it_and_the_fix(tmp_path, monkeypatch):
    """Docker's default /dev/shm (64 MB) cannot hold a worker's batches of 160 x 300 frames: torch's
    "unable to allocate shared memory ... No space left on device" from a worker became a
    RuntimeError traceback; now the command's one error line says what is full and what to change."""
    from nextvlad.cli import error_message, is_user_error
    from nextvlad.data import write_synthetic_dataset
    from nextvlad.data.shm_pool import SharedMemoryFull, new_shared

    def no_space(size):
        raise RuntimeError("unable to allocate shared memory(shm) for file </torch_1_2>: No space left on device (28)")

    monkeypatch.setattr(torch.UntypedStorage, "_new_shared", staticmethod(no_space))
    with pytest.raises(SharedMemoryFull, match=r"^/dev/shm is full: a DataLoader worker could not place 3 MiB of a "
                                               r"batch there \(.* free; each worker keeps up to 4 batches there\): give it "
                                               r"more \(docker run --shm-size=4g, or --ipc=host\) or set "
                                               r"--data.init_args.num_workers 0 \(batches made in the main process\)$"):
        new_shared((3, 2**20), torch.uint8)
    files = write_synthetic_dataset(tmp_path, num_train=4, num_validate=0, num_test=0, num_classes=5,
                                    files_per_split=1, min_frames=2, max_frames=4, seed=0)["train"]
    loader = YT8MDataLoader(YT8MFrameDataset(files, batch_size=2, max_frames=4, num_classes=5), num_workers=1)
    with pytest.raises(OSError) as raised:  # from the worker, which inherited the patch
        next(iter(loader))
    assert is_user_error(raised.value)
    assert error_message(raised.value).startswith("/dev/shm is full: a DataLoader worker could not place ")


def test_a_worker_puts_its_whole_batch_in_dev_shm_where_a_full_one_raises(tmp_path, monkeypatch):
    """The labels (2.5 MB a batch of 160) and other small tensors went to /dev/shm in the worker
    queue's feeder thread, which prints an error and drops the batch: the loader waited for good."""
    from nextvlad.cli import is_shared_memory_full
    from nextvlad.data import write_synthetic_dataset

    def no_space(self):
        raise RuntimeError("unable to allocate shared memory(shm) for file </torch_1_2>: No space left on device (28)")

    monkeypatch.setattr(torch.Tensor, "share_memory_", no_space)  # the worker inherits it
    files = write_synthetic_dataset(tmp_path, num_train=4, num_validate=0, num_test=0, num_classes=5,
                                    files_per_split=1, min_frames=2, max_frames=4, seed=0)["train"]
    loader = YT8MDataLoader(YT8MFrameDataset(files, batch_size=2, max_frames=4, num_classes=5), num_workers=1,
                            timeout=60)
    with pytest.raises(RuntimeError) as raised:
        next(iter(loader))
    assert is_shared_memory_full(raised.value)


def test_fit_warns_when_dev_shm_cannot_hold_the_workers_batches(synthetic_data, monkeypatch):
    from nextvlad.data import YT8MDataModule
    from nextvlad.data import datamodule as datamodule_module

    warnings = []
    monkeypatch.setattr(datamodule_module, "rank_zero_warn", warnings.append)
    data = YT8MDataModule(train_pattern=synthetic_data["train"], val_pattern=synthetic_data["validate"],
                          batch_size=8, eval_batch_size=4, num_workers=2, max_frames=60, num_classes=10)
    data.setup("fit")
    one_rank = 2 * 4 * (8 + 4) * 60 * 1152  # 2 workers x 4 batches of training's 8 and validation's 4 videos
    for ranks in (1, 2):  # DDP ranks on this machine: each has its workers, all in one /dev/shm
        data.trainer = SimpleNamespace(num_devices=ranks, global_rank=0, world_size=ranks, current_epoch=0)
        for free, warned in ((ranks * one_rank, False), (ranks * one_rank - 1, True)):
            monkeypatch.setattr(datamodule_module, "shared_memory_free", lambda: free)
            warnings.clear()
            data.train_dataloader()
            assert bool(warnings) == warned
    assert warnings[0] == ("/dev/shm has 13 MiB free and the DataLoader workers may keep up to 13 MiB there (2 per "
                           "loader and rank, training's and validation's at once, 2 rank(s) on this machine); a full "
                           "/dev/shm stops the run: give it more (docker run --shm-size=4g, or --ipc=host) or set "
                           "--data.init_args.num_workers 0 (batches made in the main process)")
