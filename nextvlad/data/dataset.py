"""`YT8MFrameDataset`: a sharded, shuffled, batching IterableDataset over frame-level TFRecords.

It yields whole batches (use it with ``DataLoader(batch_size=None)``; `YT8MDataLoader` does that),
because only the dataset knows which batch sizes keep the DDP ranks in step (see `sharding`).
A yielded batch is *quantized*: ``rgb`` uint8 (B, M, 1024), ``audio`` uint8 (B, M, 128) padded at
the end, ``lengths`` int64, ``labels`` uint8 multi-hot, ``has_labels`` bool, ``id`` list[str], and
``read_stats`` int64 (3,) counters (skipped records, rgb/audio frame-count mismatches, videos
truncated to max_frames) accumulated since the previous batch, and from DataLoader workers a
``buffer_lease`` (see `shm_pool`). `transforms.finalize_batch` turns it into the float contract;
`YT8MDataModule` does so in ``on_after_batch_transfer``.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from nextvlad._validation import check_choice, check_positive
from nextvlad.data import sharding
from nextvlad.data.parsing import AUDIO_SIZE, RGB_SIZE, QuantizedVideo, parse_frame_record
from nextvlad.data.records import (Compression, DataError, FileScan, FramingError, expand_paths,
                                   read_records, scan_records)
from nextvlad.data.shm_pool import SharedBufferPool
from nextvlad.data.transforms import dequantize_rows_into

logger = logging.getLogger("nextvlad.data")

OnError = Literal["raise", "skip"]
STAT_NAMES = ("skipped_records", "frame_count_mismatches", "truncated_videos")

_SCAN_CACHE: dict[tuple[str, int, int, str], FileScan] = {}


def scan_files(paths: Sequence[str], compression: Compression = "auto") -> list[FileScan]:
    """Record counts per file (header scan), cached per (path, size, mtime) within the process."""
    scans = []
    for path in paths:
        stat = os.stat(path)
        key = (os.path.abspath(path), stat.st_size, stat.st_mtime_ns, compression)
        if key not in _SCAN_CACHE:
            _SCAN_CACHE[key] = scan_records(path, compression)
        scans.append(_SCAN_CACHE[key])
    return scans


@dataclass
class ReadStats:
    """Counters a reader keeps; nothing is dropped without being counted here and logged."""

    records: int = 0
    skipped_records: int = 0
    frame_count_mismatches: int = 0
    truncated_videos: int = 0
    skip_reasons: list[str] = field(default_factory=list)

    def as_tensor(self) -> torch.Tensor:
        return torch.tensor([self.skipped_records, self.frame_count_mismatches,
                             self.truncated_videos], dtype=torch.int64)

    def skip(self, error: DataError, max_reasons: int = 20) -> None:
        self.skipped_records += 1
        if len(self.skip_reasons) < max_reasons:
            self.skip_reasons.append(str(error))


def collate_quantized(videos: Sequence[QuantizedVideo], max_frames: int, num_classes: int,
                      dequantized: bool = False,
                      buffers: tuple[torch.Tensor, torch.Tensor] | None = None) -> dict:
    """Pad/truncate videos to max_frames and stack them into a batch dict (frames uint8).

    The uint8 padding value is irrelevant (0 is used): `dequantize_padded` zeroes every frame at
    index >= length after dequantizing. With `dequantized`, frames are float32, dequantized and
    zero-padded (the CPU float path). `buffers` are (rgb, audio) tensors to fill, e.g. shared
    memory in a DataLoader worker; by default new ones are allocated.
    """
    size = len(videos)
    if buffers is None:
        dtype = np.float32 if dequantized else np.uint8
        # numpy's allocator asks for transparent huge pages on big arrays; torch.empty's large
        # allocations page-fault 4 KiB at a time, which costs ~3x more than the copy itself here.
        buffers = (torch.from_numpy(np.empty((size, max_frames, RGB_SIZE), dtype)),
                   torch.from_numpy(np.empty((size, max_frames, AUDIO_SIZE), dtype)))
    rgb, audio = buffers
    rgb_np, audio_np = rgb.numpy(), audio.numpy()
    lengths = np.empty(size, np.int64)
    labels = np.zeros((size, num_classes), np.uint8)
    has_labels = np.empty(size, np.bool_)
    for i, video in enumerate(videos):
        n = min(video.num_frames, max_frames)
        for out, frames in ((rgb_np, video.rgb), (audio_np, video.audio)):
            if dequantized:
                dequantize_rows_into(out[i, :n], frames[:n])
            else:
                out[i, :n] = frames[:n]
            out[i, n:] = 0
        lengths[i] = n
        labels[i, video.labels] = 1
        has_labels[i] = video.has_labels
    return {"id": [video.id for video in videos], "rgb": rgb, "audio": audio,
            "lengths": torch.from_numpy(lengths), "labels": torch.from_numpy(labels),
            "has_labels": torch.from_numpy(has_labels)}


class YT8MFrameDataset(IterableDataset):
    """Frame-level YouTube-8M records -> quantized padded batches, sharded over ranks and workers.

    Args:
        files: glob pattern(s) (comma-separated string or list) or file paths.
        batch_size: videos per batch.
        max_frames: pad/truncate every video to this many frames.
        num_classes: length of the multi-hot label vector; labels >= num_classes are bad input.
        training: shuffle (files per epoch + shuffle buffer) and equalize batch counts over ranks.
        drop_last: in training, drop the remainder so that every batch is full (the authors'
            `allow_smaller_final_batch=False`). Evaluation never drops a record.
        seed: with the epoch, determines the file order and the shuffle buffer.
        shuffle_buffer: records held per reader for shuffling (training only).
        on_error: "raise" (default) stops at the first bad record with a DataError naming the file
            and record index; "skip" skips it, counts it and logs the count when a reader ends.
        compression: "auto" (detect GZIP by its magic bytes), "none" or "gzip".
        dequantize_in_workers: emit float32 (dequantized, zero-padded) frames instead of uint8.
    """

    #: Workers fill (batch_size, max_frames, ...) shared-memory buffers; off where batches differ.
    uses_buffer_pool = True

    def __init__(self, files: str | Sequence[str], batch_size: int = 160, max_frames: int = 300,
                 num_classes: int = 3862, training: bool = False, drop_last: bool = True,
                 seed: int = 0, shuffle_buffer: int = 512, on_error: OnError = "raise",
                 compression: Compression = "auto", dequantize_in_workers: bool = False):
        super().__init__()
        check_choice("on_error", on_error, ("raise", "skip"))
        check_choice("compression", compression, ("auto", "none", "gzip"))
        check_positive(batch_size=batch_size, max_frames=max_frames, num_classes=num_classes)
        self.files = expand_paths(files)
        self.batch_size = batch_size
        self.max_frames = max_frames
        self.num_classes = num_classes
        self.training = training
        self.drop_last = drop_last
        self.seed = seed
        self.shuffle_buffer = shuffle_buffer
        self.on_error = on_error
        self.compression = compression
        self.dequantize_in_workers = dequantize_in_workers
        self.epoch = 0
        self.rank, self.world_size = 0, 1
        self.counts = self._count_records()

    # -- set-up, in the main process ------------------------------------------------------------
    def _count_records(self) -> list[int]:
        counts = []
        for scan in scan_files(self.files, self.compression):
            if scan.error is not None:
                if self.on_error == "raise":
                    raise scan.error
                logger.warning("on_error=skip: %s; using the %d records before it",
                               scan.error, scan.num_records)
            counts.append(scan.num_records)
        if sum(counts) == 0:
            raise DataError(",".join(self.files), None, "no readable records in these files")
        return counts

    @property
    def num_records(self) -> int:
        return sum(self.counts)

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch (file order and shuffle); call before iterating."""
        self.epoch = int(epoch)

    def set_distributed(self, rank: int, world_size: int) -> None:
        """Select this process's DDP rank; call before iterating."""
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}")
        self.rank, self.world_size = int(rank), int(world_size)

    def records_dropped_per_epoch(self) -> int:
        """Records no rank reads in an epoch to keep ranks in step (0 when evaluating)."""
        return sharding.records_dropped(self.num_records, self.world_size, self.batch_size,
                                        self.training, self.drop_last)

    def __len__(self) -> int:
        """Batches this rank yields per epoch (over all of its workers)."""
        return sharding.num_batches(self.counts, self.world_size, self.rank, self.batch_size,
                                    self.training, self.drop_last)

    def plan(self, worker: int = 0, num_workers: int = 1) -> sharding.ReaderPlan:
        order = sharding.epoch_file_order(len(self.files), self.seed, self.epoch, self.training)
        return sharding.plan_reader(self.counts, order, self.world_size, self.rank, num_workers,
                                    worker, self.batch_size, self.training, self.drop_last)

    # -- iteration, in each worker ----------------------------------------------------------------
    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        plan = self.plan(worker, num_workers)
        stats = ReadStats()
        videos = self._videos(plan, stats)
        if self.training and self.shuffle_buffer > 1:
            rng = np.random.default_rng([self.seed, self.epoch, self.rank, worker])
            videos = shuffled(videos, self.shuffle_buffer, rng)
        pool = None
        # a worker: batches go to shared memory, reuse it (see shm_pool)
        if info is not None and self.uses_buffer_pool:
            dtype = torch.float32 if self.dequantize_in_workers else torch.uint8
            pool = SharedBufferPool(((self.batch_size, self.max_frames, RGB_SIZE),
                                     (self.batch_size, self.max_frames, AUDIO_SIZE)), dtype,
                                    max_slots=0 if self.dequantize_in_workers else 4)
        yield from self._batches(videos, plan, stats, pool)
        self._report(stats, plan, worker, num_workers)

    def _videos(self, plan: sharding.ReaderPlan, stats: ReadStats) -> Iterator[QuantizedVideo]:
        for segment in plan.segments:
            path = self.files[segment.file_index]
            index = segment.start
            try:
                for data in read_records(path, self.compression, segment.start, segment.count,
                                         yield_errors=self.on_error == "skip"):
                    video = self._parse(data, path, index, stats)
                    index += 1
                    if video is not None:
                        yield video
            except FramingError as error:
                if self.on_error == "raise":
                    raise
                stats.skip(error)  # the rest of this segment cannot be located

    def _parse(self, data: bytes | DataError, path: str, index: int,
               stats: ReadStats) -> QuantizedVideo | None:
        try:
            if isinstance(data, DataError):
                raise data
            video = self._parse_record(data, path, index)
        except DataError as error:
            if self.on_error == "raise":
                raise
            stats.skip(error)
            return None
        stats.records += 1
        if video.frame_count_mismatch:
            stats.frame_count_mismatches += 1
        if video.num_frames > self.max_frames:
            stats.truncated_videos += 1
        return video

    def _parse_record(self, data: bytes, path: str, index: int) -> QuantizedVideo:
        """One record -> one video (a hook: the segment reader parses ratings too)."""
        return parse_frame_record(data, self.num_classes, path, index)

    def _collate(self, videos: list[QuantizedVideo],
                 buffers: tuple[torch.Tensor, torch.Tensor] | None) -> dict:
        """Videos -> one quantized batch (a hook: the segment reader makes segment batches)."""
        return collate_quantized(videos, self.max_frames, self.num_classes,
                                 self.dequantize_in_workers, buffers)

    def _batches(self, videos: Iterable[QuantizedVideo], plan: sharding.ReaderPlan,
                 stats: ReadStats, pool: SharedBufferPool | None) -> Iterator[dict]:
        sizes = list(plan.batch_sizes)
        reported = ReadStats()
        pending: list[QuantizedVideo] = []
        emitted = 0
        # A finished batch is held until the next good record arrives: if the reader ends first,
        # records skipped after its last video are added to its read_stats instead of being lost.
        held: dict | None = None
        for video in videos:
            if held is not None:
                yield held
                held = None
            pending.append(video)
            if emitted < len(sizes) and len(pending) == sizes[emitted]:
                held = self._make_batch(pending, stats, reported, pool)
                pending, emitted = [], emitted + 1
        if pending:  # records were skipped, so the planned batches could not all be filled
            held = self._make_batch(pending, stats, reported, pool)  # (nothing was held)
            emitted += 1
        if held is not None:
            held["read_stats"] += stats.as_tensor() - reported.as_tensor()
            yield held
        if emitted < len(sizes) and self.training and self.world_size > 1:
            raise RuntimeError(
                f"rank {self.rank}: {stats.skipped_records} bad records were skipped, leaving "
                f"{emitted} of the {len(sizes)} planned batches; DDP ranks would fall out of step "
                f"and hang. Fix or remove the bad files: {stats.skip_reasons[:5]}")

    def _make_batch(self, videos: list[QuantizedVideo], stats: ReadStats, reported: ReadStats,
                    pool: SharedBufferPool | None) -> dict:
        buffers, lease = pool.take(len(videos)) if pool is not None else (None, None)
        batch = self._collate(videos, buffers)
        if lease is not None:
            batch["buffer_lease"] = lease
        now = stats.as_tensor()
        batch["read_stats"] = now - reported.as_tensor()
        (reported.skipped_records, reported.frame_count_mismatches,
         reported.truncated_videos) = now.tolist()
        return batch

    def _report(self, stats: ReadStats, plan: sharding.ReaderPlan, worker: int,
                num_workers: int) -> None:
        where = f"rank {self.rank}/{self.world_size} worker {worker}/{num_workers}"
        if stats.skipped_records or stats.frame_count_mismatches:
            logger.warning(
                "%s epoch %d: read %d records, skipped %d bad records%s, %d rgb/audio frame-count "
                "mismatches (used the shorter stream)", where, self.epoch, stats.records,
                stats.skipped_records,
                f" (e.g. {stats.skip_reasons[:3]})" if stats.skip_reasons else "",
                stats.frame_count_mismatches)
        else:
            logger.debug("%s epoch %d: read %d records", where, self.epoch, stats.records)


def shuffled(items: Iterable, buffer_size: int, rng: np.random.Generator) -> Iterator:
    """Shuffle-buffer sampling (as tf.data / shuffle_batch): hold `buffer_size` items, emit a
    random one as each new item arrives, then the rest in random order."""
    buffer: list = []
    for item in items:
        if len(buffer) < buffer_size:
            buffer.append(item)
            continue
        j = int(rng.integers(buffer_size))
        buffer[j], item = item, buffer[j]
        yield item
    rng.shuffle(buffer)
    yield from buffer


class YT8MDataLoader(DataLoader):
    """DataLoader over a `YT8MFrameDataset` (batch_size=None: the dataset batches) that tells the
    dataset its epoch and DDP rank each time an epoch's iteration starts.

    `context` returns (epoch, rank, world_size); by default the epoch counts iterations and rank
    and world size come from torch.distributed when it is initialized.
    """

    def __init__(self, dataset: YT8MFrameDataset, context=None, **kwargs):
        kwargs.setdefault("pin_memory", torch.cuda.is_available())
        if kwargs.get("num_workers", 0) == 0:
            kwargs.pop("persistent_workers", None)
        elif kwargs.get("persistent_workers"):
            raise ValueError("persistent_workers would freeze the epoch seen by the workers")
        super().__init__(dataset, batch_size=None, **kwargs)
        self._context = context
        self._iterations = 0

    def __iter__(self):
        if self._context is not None:
            epoch, rank, world_size = self._context()
        else:
            epoch, (rank, world_size) = self._iterations, _torch_distributed()
        self.dataset.set_distributed(rank, world_size)
        self.dataset.set_epoch(epoch)
        self._iterations += 1
        return super().__iter__()


def _torch_distributed() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1
