"""`YT8MFrameDataset`: a sharded, shuffled, batching IterableDataset over frame-level TFRecords.

It yields whole batches (use it with `YT8MDataLoader`, a ``DataLoader(batch_size=None)``),
because only the dataset knows which batch sizes keep the DDP ranks in step (see `sharding`).
A yielded batch is *quantized*: ``rgb`` uint8 (B, M, 1024), ``audio`` uint8 (B, M, 128) padded at
the end, ``lengths`` int64 (rgb frames: the frame mask), ``audio_lengths`` int64 (audio rows, see
`collate_quantized`), ``labels`` uint8 multi-hot, ``has_labels`` bool, ``id`` list[str], and
``read_stats`` int64 (3,) counters (skipped records, rgb/audio frame-count mismatches, videos
with a stream cut to max_frames) accumulated since the previous batch, and from DataLoader
workers a ``buffer_lease`` (see `shm_pool`). `transforms.finalize_batch` turns it into the float
contract; `YT8MDataModule` does so in ``on_after_batch_transfer``. DataLoader workers also send
`ReaderMessage`s (a DataError, or the counts of a worker left without a batch), which
`YT8MDataLoader` takes out of the stream.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
import sys
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import Literal

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info
from torchdata.stateful_dataloader import StatefulDataLoader

from nextvlad._distributed import gather_per_rank, rank_and_world_size
from nextvlad._validation import check_choice, check_positive_int, is_integer
from nextvlad.data import count_cache, sharding
from nextvlad.data.parsing import AUDIO_SIZE, RGB_SIZE, QuantizedVideo, parse_frame_record
from nextvlad.data.records import (ChangedSinceCounted, Compression, DataError, FileScan, FramingError,
                                   expand_paths, is_url, read_records, remote_file_version, scan_records)
from nextvlad.data.shm_pool import MAX_SLOTS, SharedBufferPool
from nextvlad.data.transforms import dequantize_rows_into

logger = logging.getLogger("nextvlad.data")

OnError = Literal["raise", "skip"]
STAT_NAMES = ("skipped_records", "frame_count_mismatches", "truncated_videos")

_SCAN_CACHE: dict[tuple[str, int, str | None, str], FileScan] = {}


def scan_files(paths: Sequence[str], compression: Compression = "auto") -> list[FileScan]:
    """Record counts per file (header scan), kept per file version in the process and across runs
    (`count_cache`): counting reads the whole of a remote or GZIP file."""
    return [scan for _, scan in _keyed_scans(paths, compression)]


def _keyed_scans(paths: Sequence[str], compression: Compression) -> list[tuple[tuple, FileScan]]:
    """`scan_files` with each file's `_scan_key` (a metadata request for a remote file)."""
    keys = [_scan_key(path, compression) for path in paths]
    missing = {key: path for key, path in zip(keys, paths) if key not in _SCAN_CACHE}
    saved = count_cache.load([key for key in missing if _persistent(key)])
    for key, count in saved.items():
        _SCAN_CACHE[key] = FileScan(missing.pop(key), count, None)
    if saved:
        logger.info("record counts of %d files from %s", len(saved), count_cache.cache_path())
    for key, path in missing.items():
        _SCAN_CACHE[key] = scan_records(path, compression)
    _remember(missing)
    return [(key, _SCAN_CACHE[key]) for key in keys]


def _persistent(key: tuple) -> bool:
    """Whether a file's count may be kept across runs: its key names its version."""
    return key[2] is not None


def _remember(keys) -> None:
    """Keep the counts of `keys` (in `_SCAN_CACHE`) across runs: those of whole files (a scan that
    stopped at a damaged record is made again, to report it again) whose version is known."""
    count_cache.store({key: _SCAN_CACHE[key].num_records for key in keys
                       if _persistent(key) and _SCAN_CACHE[key].error is None})


def forget_count(path: str) -> None:
    """Drop a file's count in this process and across runs: reading found it no longer the file's
    (`ChangedSinceCounted`), and the next start has to count it anew."""
    name = path if is_url(path) else os.path.abspath(path)
    for key in [key for key in _SCAN_CACHE if key[0] == name]:
        del _SCAN_CACHE[key]
    count_cache.forget(name)


def _as_seen_by_other_ranks(error: Exception, rank: int) -> Exception:
    """`error` of `rank` for the others to raise: its class where one message rebuilds it (an
    OSError, ValueError), so that the command still shows a user's error as one line."""
    message = f"rank {rank}: {error}"
    if isinstance(error, (OSError, ValueError)):
        for kind in (type(error), OSError if isinstance(error, OSError) else ValueError):
            try:
                return kind(message)
            except TypeError:  # a constructor of other arguments (DataError)
                continue
    return RuntimeError(message)


def _scan_key(path: str, compression: Compression) -> tuple[str, int, str | None, str]:
    """(path, size, version, compression). A local file's version is its modification and change
    times and inode (a copy that keeps the modification time, `cp -p` or `rsync -t`, is another
    file), a remote one's the version tags of its store (None where it has none: such a count is
    kept in this process only)."""
    if is_url(path):
        return (path, *remote_file_version(path), compression)
    stat = os.stat(path)
    return (os.path.abspath(path), stat.st_size, f"{stat.st_mtime_ns}:{stat.st_ctime_ns}:{stat.st_ino}",
            compression)


def share_scans(paths: Sequence[str], compression: Compression = "auto") -> None:
    """Scan every world_size-th file on each DDP rank and give every rank all the scans (a
    collective: call it on every rank with the same paths). A start then reads the data once over
    the ranks rather than once per rank: the headers of local files, but the whole of a remote
    one (a TFRecord has no index), about 1 TB per rank for YouTube-8M's training files."""
    rank, world_size = rank_and_world_size()
    if world_size == 1:
        return
    failure: Exception | None = None
    try:
        mine = paths[rank::world_size]
        share: dict | Exception = dict(zip(mine, _keyed_scans(mine, compression)))
    except Exception as error:  # every rank raises: none may wait in a collective that one has left
        failure, share = error, _as_seen_by_other_ranks(error, rank)
    shares = gather_per_rank(share)
    if failure is not None:
        raise failure
    for scans in shares:
        if isinstance(scans, Exception):
            raise scans
    same_file = []
    for sender, scans in enumerate(shares):
        for path, (scanned_key, scan) in scans.items():
            key = scanned_key if sender == rank else _scan_key(path, compression)
            _SCAN_CACHE[key] = scan
            if key == scanned_key:  # not another node's copy of it, which may differ
                same_file.append(key)
    _remember(same_file)  # by every rank: the last of their concurrent writes then holds all counts


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


def files_fingerprint(files: Sequence[str], counts: Sequence[int]) -> str:
    """The files of an epoch plan in a few characters: how many, their records, and a digest of
    each file's name and record count in order. Folders are left out: a run may be resumed from a
    copy of the same files elsewhere (another machine's local disk)."""
    named = [[os.path.basename(path.rstrip("/")), count] for path, count in zip(files, counts)]
    digest = hashlib.sha256(json.dumps(named).encode()).hexdigest()[:12]
    return f"[{len(files)} files, {sum(counts)} records, digest {digest}]"


def describe_changes(saved: dict, now: dict, what: str) -> str | None:
    """'saved with a=1, b=2, this <what> has a=3, b=4' for the settings that differ, or None."""
    changed = [name for name in saved if saved[name] != now.get(name)]
    if not changed:
        return None
    return (f"saved with {', '.join(f'{name}={saved[name]}' for name in changed)}, this {what} has "
            f"{', '.join(f'{name}={now.get(name)}' for name in changed)}")


def check_shuffle_buffer(shuffle_buffer: int) -> None:
    """Raise ValueError unless shuffle_buffer is an integer >= 0 (0 and 1 hold nothing back)."""
    if not is_integer(shuffle_buffer) or shuffle_buffer < 0:
        raise ValueError(f"shuffle_buffer must be an integer >= 0 (0 or 1: no shuffle buffer), "
                         f"got {shuffle_buffer!r}")


def collate_quantized(videos: Sequence[QuantizedVideo], max_frames: int, num_classes: int,
                      dequantized: bool = False,
                      buffers: tuple[torch.Tensor, torch.Tensor] | None = None) -> dict:
    """Pad/truncate videos to max_frames and stack them into a batch dict (frames uint8).

    As the authors' reader (SPEC 1.1 steps 4-6): ``lengths`` (the frame mask) counts the rgb
    frames, and each stream is padded or cut to max_frames on its own, so a video whose audio is
    shorter has audio padding inside its mask, and one whose audio is longer keeps audio rows past
    its length (hidden by the mask; like the authors' padded rows they enter the cluster-BN
    statistics and the mixture gate mean, SPEC 7.3). ``audio_lengths`` (B,) int64 holds the audio
    rows. The uint8 padding value is irrelevant (0 is used): `dequantize_padded` zeroes every row
    at index >= lengths (rgb) or audio_lengths (audio) after dequantizing. With `dequantized`,
    frames are float32, dequantized and zero-padded (the CPU float path). `buffers` are
    (rgb, audio) tensors to fill, e.g. shared memory in a DataLoader worker; by default new ones
    are allocated.
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
    audio_lengths = np.empty(size, np.int64)
    labels = np.zeros((size, num_classes), np.uint8)
    has_labels = np.empty(size, np.bool_)
    for i, video in enumerate(videos):
        n_rgb, n_audio = min(video.num_frames, max_frames), min(len(video.audio), max_frames)
        for out, frames, n in ((rgb_np, video.rgb, n_rgb), (audio_np, video.audio, n_audio)):
            if dequantized:
                dequantize_rows_into(out[i, :n], frames[:n])
            else:
                out[i, :n] = frames[:n]
            out[i, n:] = 0
        lengths[i], audio_lengths[i] = n_rgb, n_audio
        labels[i, video.labels] = 1
        has_labels[i] = video.has_labels
    return {"id": [video.id for video in videos], "rgb": rgb, "audio": audio,
            "lengths": torch.from_numpy(lengths), "audio_lengths": torch.from_numpy(audio_lengths),
            "labels": torch.from_numpy(labels), "has_labels": torch.from_numpy(has_labels)}


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
            and record index; "skip" skips it, counts it and logs the count when a reader has
            read its share (before its last batch: a consumer may stop at ``len()`` batches).
            A break in the framing (truncation, corrupted length, broken GZIP stream) gives up the
            rest of that file, counted as one skipped record.
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
        check_positive_int(batch_size=batch_size, max_frames=max_frames, num_classes=num_classes)
        check_shuffle_buffer(shuffle_buffer)
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
        self.scan_errors: list[FramingError] = []  # counted as skips every epoch (see _Reader)
        self.whole_file_counts: list[int | None] = []
        # Counts of a reader in this process that had no batch to carry them: YT8MDataLoader takes them.
        self.unbatched_read_stats = torch.zeros(len(STAT_NAMES), dtype=torch.int64)
        self.counts = self._count_records()
        self.files_fingerprint = files_fingerprint(self.files, self.counts)
        self._reader: _Reader | None = None  # the epoch being read (in this process)
        self._resume_from: dict | None = None  # a position to continue from (load_state_dict)

    # -- set-up, in the main process ------------------------------------------------------------
    def _count_records(self) -> list[int]:
        counts = []
        for scan in scan_files(self.files, self.compression):
            if scan.error is not None:
                if self.on_error == "raise":
                    raise scan.error
                logger.warning("on_error=skip: %s; using the %d records before it",
                               scan.error, scan.num_records)
                self.scan_errors.append(scan.error)
            counts.append(scan.num_records)
            # A file read to its counted end is checked for more records, unless its count stopped
            # at damage (reported once per epoch through scan_errors).
            self.whole_file_counts.append(scan.num_records if scan.error is None else None)
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

    def shared_memory_per_worker(self) -> int:
        """Bytes of /dev/shm a DataLoader worker may hold: its pool's uint8 batches, or float32
        batches in flight (the prefetched two and the one being made) with dequantize_in_workers.
        0 without a pool (segment batches: a few frames per row)."""
        if not self.uses_buffer_pool:
            return 0
        batches, itemsize = (3, 4) if self.dequantize_in_workers else (MAX_SLOTS, 1)
        return batches * self.batch_size * self.max_frames * (RGB_SIZE + AUDIO_SIZE) * itemsize

    def records_dropped_per_epoch(self) -> int:
        """Records no rank reads in an epoch to keep ranks in step (0 when evaluating)."""
        return sharding.records_dropped(self.num_records, self.world_size, self.batch_size,
                                        self.training, self.drop_last)

    def __len__(self) -> int:
        """Batches this rank yields per epoch (over all of its workers)."""
        return sharding.num_batches(self.counts, self.world_size, self.rank, self.batch_size,
                                    self.training, self.drop_last)

    def epoch_plan(self) -> dict:
        """The settings that, with the epoch, ranks and workers, decide which records each reader
        reads, in which order and batches: a position saved inside an epoch holds only under the
        same ones. max_frames, num_classes, on_error and compression are not among them: they
        change what a video becomes, not which videos come when (a scan's early end for
        on_error="skip" shows in the record counts)."""
        return {"files": self.files_fingerprint, "training": self.training, "seed": self.seed,
                "batch_size": self.batch_size, "drop_last": self.drop_last,
                "shuffle_buffer": self.shuffle_buffer}

    def plan(self, worker: int = 0, num_workers: int = 1) -> sharding.ReaderPlan:
        order = sharding.epoch_file_order(len(self.files), self.seed, self.epoch, self.training)
        return sharding.plan_reader(self.counts, order, self.world_size, self.rank, num_workers,
                                    worker, self.batch_size, self.training, self.drop_last)

    # -- iteration, in each worker ----------------------------------------------------------------
    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        position = ReaderPosition(self.epoch, self.rank, self.world_size, worker, num_workers,
                                  plan=self.epoch_plan())
        if self._resume_from:
            position = self._checked_resume(position, self._resume_from)
        self._resume_from = None
        pool = None
        # a worker: batches go to shared memory, reuse it (see shm_pool)
        if info is not None and self.uses_buffer_pool:
            dtype = torch.float32 if self.dequantize_in_workers else torch.uint8
            pool = SharedBufferPool(((self.batch_size, self.max_frames, RGB_SIZE),
                                     (self.batch_size, self.max_frames, AUDIO_SIZE)), dtype,
                                    max_slots=0 if self.dequantize_in_workers else MAX_SLOTS)
        try:
            self._reader = _Reader(self, self.plan(worker, num_workers), position, pool)
            yield from self._reader
        except DataError as error:
            if info is None:
                raise
            # torch rebuilds a worker's exception from its message alone (a RuntimeError for
            # DataError): send the error itself for YT8MDataLoader to raise in the main process.
            yield ReaderMessage(error=error)

    # -- the position in the epoch: torchdata's StatefulDataLoader calls these in each worker after
    #    every batch, and Lightning keeps what they return in the checkpoint (see YT8MDataLoader) --
    def state_dict(self) -> dict:
        """Where this reader stands (plain types); {} when it has not started an epoch."""
        if self._reader is not None:
            return self._reader.snapshot()
        return copy.deepcopy(self._resume_from or {})

    def load_state_dict(self, state: dict) -> None:
        """Make the next iteration continue exactly where `state` (from `state_dict`) stood."""
        # A copy: the reader changes its position's lists in place, and torchdata diffs a worker's
        # later states against this very object, which would then seem unchanged.
        self._resume_from = copy.deepcopy(state) or None
        self._reader = None

    def _checked_resume(self, expected: ReaderPosition, state: dict) -> ReaderPosition:
        saved = ReaderPosition(**state)
        names = ("epoch", "rank", "world_size", "worker", "num_workers")
        was = {name: getattr(saved, name) for name in names} | (saved.plan or {})
        now = {name: getattr(expected, name) for name in names} | expected.plan
        # A position saved before the plan was recorded (plan None) is taken as made under this one.
        changes = describe_changes(was, now, "reader")
        if changes:
            raise ValueError(
                f"cannot continue the saved data position: it was {changes} (saved: epoch "
                f"{saved.epoch}, rank {saved.rank} of {saved.world_size}, worker {saved.worker} of "
                f"{saved.num_workers}). Resume with the same ranks, workers, files, seed and "
                "batching, or from a checkpoint saved at the end of an epoch.")
        saved.plan = expected.plan
        return saved

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
        if max(len(video.rgb), len(video.audio)) > self.max_frames:
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

    def _make_batch(self, videos: list[QuantizedVideo], stats: ReadStats, reported: ReadStats,
                    pool: SharedBufferPool | None) -> dict:
        buffers, lease = pool.take(len(videos)) if pool is not None else (None, None)
        batch = self._collate(videos, buffers)
        if lease is not None:
            batch["buffer_lease"] = lease
        now = stats.as_tensor()
        batch["read_stats"] = now - reported.as_tensor()
        if get_worker_info() is not None:
            # Into /dev/shm here, where a full one raises: the queue's feeder thread, which would
            # do it otherwise, prints the error and drops the batch, and the loader waits for good.
            for value in batch.values():
                if isinstance(value, torch.Tensor) and not value.is_shared():
                    value.share_memory_()
        (reported.skipped_records, reported.frame_count_mismatches,
         reported.truncated_videos) = now.tolist()
        return batch

    def _report(self, stats: ReadStats, plan: sharding.ReaderPlan, worker: int,
                num_workers: int) -> None:
        where = f"rank {self.rank}/{self.world_size} worker {worker}/{num_workers}"
        if stats.skipped_records or stats.frame_count_mismatches:
            logger.warning(
                "%s epoch %d: read %d records, skipped %d bad records%s, %d rgb/audio frame-count "
                "mismatches (frames counted on rgb, audio zero-padded or cut on its own, as the "
                "authors' reader)", where, self.epoch, stats.records,
                stats.skipped_records,
                f" (e.g. {stats.skip_reasons[:3]})" if stats.skip_reasons else "",
                stats.frame_count_mismatches)
        else:
            logger.debug("%s epoch %d: read %d records", where, self.epoch, stats.records)


@dataclass
class ReaderMessage:
    """What a DataLoader worker sends besides batches: the read_stats of a reader that had no
    batch to carry them (every record of its share was bad), or the DataError that stopped it.
    `YT8MDataLoader` takes these out of the batch stream."""

    read_stats: torch.Tensor | None = None
    error: DataError | None = None


@dataclass
class ReaderPosition:
    """Where one reader (rank, worker) stands in its epoch: all it takes to continue exactly.

    Records are named by their position in the reader's plan (its segments read in order), so the
    shuffle buffer and a partly filled batch are saved as a few integers and read again on resume.
    """

    epoch: int
    rank: int
    world_size: int
    worker: int
    num_workers: int
    next_record: int = 0  # plan records read so far (bad ones included)
    shuffle_buffer: list[int] = field(default_factory=list)  # plan positions, in buffer order
    draining: bool = False  # the plan is read; the buffer is being emitted in its final order
    pending: list[int] = field(default_factory=list)  # plan positions of the partly filled batch
    batches: int = 0  # batches emitted
    rng: dict | None = None  # the shuffle generator's bit_generator.state
    stats: dict = field(default_factory=dict)  # ReadStats fields so far
    reported: dict = field(default_factory=dict)  # ReadStats fields already sent with batches
    reported_end: bool = False  # the whole plan is read and its counts are logged
    plan: dict | None = None  # YT8MFrameDataset.epoch_plan() (None: saved before it was recorded)


class _Reader:
    """One epoch of one reader: plan records -> shuffle buffer -> batches, resumable from a
    `ReaderPosition` that it keeps current (torchdata snapshots it after each yielded batch)."""

    def __init__(self, dataset: YT8MFrameDataset, plan: sharding.ReaderPlan,
                 position: ReaderPosition, pool: SharedBufferPool | None):
        self.dataset, self.plan, self.position, self.pool = dataset, plan, position, pool
        self.stats, self.reported = ReadStats(**position.stats), ReadStats(**position.reported)
        self.shuffle = dataset.training and dataset.shuffle_buffer > 1
        self.rng = np.random.default_rng([dataset.seed, position.epoch, position.rank,
                                          position.worker])
        if position.rng is not None:
            self.rng.bit_generator.state = position.rng
        # Records held when the position was saved are read again (without counting them twice).
        held = self._read_positions(position.shuffle_buffer + position.pending)
        self.buffer = [(p, held[p]) for p in position.shuffle_buffer]
        self.pending = [held[p] for p in position.pending]
        fresh = position.next_record == 0 and position.batches == 0
        if fresh and position.rank == 0 and position.worker == 0:
            # The rest of a file given up by the scan is read by no reader: the first reader of
            # the epoch counts each such break, so that read_stats sum to every skip once.
            for error in dataset.scan_errors:
                self.stats.skip(error)

    def __iter__(self) -> Iterator[dict]:
        position, sizes = self.position, self.plan.batch_sizes
        # A finished batch is held until the next good record arrives: if the reader ends first,
        # records skipped after its last video are added to its read_stats instead of being lost.
        held: dict | None = None
        # A position saved at the `yield held` below already holds the next video. If that video
        # completed a batch (always, with batch size 1), the batch is not made yet: make it now,
        # or the loop would only ever see the batch over-full.
        if self._pending_full():
            held = self._make_batch()
        for index, video in self._shuffled():
            self.pending.append(video)
            position.pending.append(index)
            if held is not None:
                yield held
                held = None
            if self._pending_full():
                held = self._make_batch()
        if self.pending:  # records were skipped, so the planned batches could not all be filled
            held = self._make_batch()  # (nothing was held)
        unreported = self.stats.as_tensor() - self.reported.as_tensor()
        self.reported = ReadStats(**asdict(self.stats))
        dataset = self.dataset
        if not position.reported_end:
            # Before the last batch: a consumer that knows how many batches to expect (Lightning)
            # stops asking once it has them, so code after the final yield may never run. Once:
            # a reader resumed from a position saved at its end has been reported already.
            position.reported_end = True
            dataset._report(self.stats, self.plan, position.worker, position.num_workers)
        if held is not None:
            held["read_stats"] += unreported
            yield held
        elif unreported.any():  # no batch to carry them
            if get_worker_info() is not None:
                yield ReaderMessage(read_stats=unreported)  # to YT8MDataLoader in the main process
            else:
                dataset.unbatched_read_stats += unreported  # YT8MDataLoader, in this process, takes them
        if position.batches < len(sizes) and dataset.training and dataset.world_size > 1:
            raise ValueError(  # the data's fault: one error line, as for a bad record under "raise"
                f"rank {dataset.rank}: {self.stats.skipped_records} bad records were skipped, "
                f"leaving {position.batches} of the {len(sizes)} planned batches; DDP ranks would "
                f"fall out of step and hang. Fix or remove the bad files: "
                f"{self.stats.skip_reasons[:5]}")

    def _pending_full(self) -> bool:
        sizes = self.plan.batch_sizes
        return self.position.batches < len(sizes) and len(self.pending) == sizes[self.position.batches]

    def _make_batch(self) -> dict:
        batch = self.dataset._make_batch(self.pending, self.stats, self.reported, self.pool)
        self.pending = []
        self.position.pending = []
        self.position.batches += 1
        return batch

    def snapshot(self) -> dict:
        """The current position as plain types (for a checkpoint)."""
        state = asdict(self.position)
        state.update(rng=self.rng.bit_generator.state if self.shuffle else None,
                     stats=asdict(self.stats), reported=asdict(self.reported))
        return state

    def _shuffled(self) -> Iterator[tuple[int, QuantizedVideo]]:
        """Shuffle-buffer sampling (as tf.data / shuffle_batch): hold `shuffle_buffer` records,
        emit a random one as each new record arrives, then the rest in random order."""
        position, size = self.position, self.dataset.shuffle_buffer
        if not self.shuffle:
            yield from self._records()
            return
        if not position.draining:
            for item in self._records():
                if len(self.buffer) < size:
                    self.buffer.append(item)
                    position.shuffle_buffer.append(item[0])
                    continue
                j = int(self.rng.integers(size))
                self.buffer[j], item = item, self.buffer[j]
                position.shuffle_buffer[j] = self.buffer[j][0]
                yield item
            self.rng.shuffle(self.buffer)
            position.draining = True
            position.shuffle_buffer = [index for index, _ in self.buffer]
        while self.buffer:
            item = self.buffer.pop(0)
            position.shuffle_buffer.pop(0)
            yield item

    def _records(self) -> Iterator[tuple[int, QuantizedVideo]]:
        """(plan position, video) of the plan's good records from position.next_record on."""
        position = self.position
        for segment, first in self._segments_from(position.next_record):
            path = self.dataset.files[segment.file_index]
            index = segment.start + first
            records = read_records(path, self.dataset.compression, index, segment.count - first,
                                   yield_errors=self.dataset.on_error == "skip",
                                   counted=self.dataset.whole_file_counts[segment.file_index])
            try:
                for data in records:
                    video = self.dataset._parse(data, path, index, self.stats)
                    at = position.next_record
                    position.next_record += 1
                    index += 1
                    if video is not None:
                        yield at, video
            except FramingError as error:
                if isinstance(error, ChangedSinceCounted):
                    forget_count(path)
                if self.dataset.on_error == "raise":
                    raise
                self.stats.skip(error)  # the rest of this segment cannot be located
                position.next_record += segment.start + segment.count - index

    def _segments_from(self, record: int) -> Iterator[tuple[sharding.Segment, int]]:
        """The plan's segments from plan position `record` on, each with its first record."""
        offset = 0
        for segment in self.plan.segments:
            if record < offset + segment.count:
                yield segment, max(0, record - offset)
            offset += segment.count

    def _read_positions(self, positions: list[int]) -> dict[int, QuantizedVideo]:
        """Read the records at these plan positions again (one pass over each file's range)."""
        wanted: dict[int, list[tuple[int, int]]] = {}  # segment index -> (position, record)
        offset = 0
        bounds = []
        for segment in self.plan.segments:
            bounds.append(offset)
            offset += segment.count
        for p in positions:
            s = int(np.searchsorted(bounds, p, side="right")) - 1
            wanted.setdefault(s, []).append((p, self.plan.segments[s].start + p - bounds[s]))
        videos = {}
        for s, items in wanted.items():
            path = self.dataset.files[self.plan.segments[s].file_index]
            first = min(record for _, record in items)
            last = max(record for _, record in items)
            by_record = {record: p for p, record in items}
            # Under on_error "skip" a bad record between held ones was skipped (and counted) when
            # first read: passed over here, not raised.
            for record, data in enumerate(read_records(path, self.dataset.compression, first, last - first + 1,
                                                       yield_errors=self.dataset.on_error == "skip"), first):
                if record in by_record:
                    if isinstance(data, DataError):
                        raise data  # held, so it was good when first read: the file changed since
                    videos[by_record[record]] = self.dataset._parse_record(data, path, record)
        return videos


def fork_can_deadlock_in_child() -> bool:
    """Whether os.fork here can leave the child blocked for good inside fork itself: CPython
    gh-112275 (3.11 before 3.11.10, and 3.10, taken as affected throughout; on Linux, where
    DataLoader workers are forked).
    The child waits for the interpreter's thread-state lock when another thread held it at the
    instant of the fork, which a thread creating or deleting its thread state without the GIL
    (a native thread entering Python) does. Seen in this project's 2-rank gloo runs: a worker
    stuck in `PyOS_AfterFork_Child`, its rank waiting for its first batch for good."""
    return sys.platform.startswith("linux") and sys.version_info[:3] < (3, 11, 10)


def forkserver_context():
    """A forkserver multiprocessing context whose server has imported this module (and torch),
    so that each worker it forks starts at once: the server is single-threaded, so no lock can
    be held when it forks."""
    context = torch.multiprocessing.get_context("forkserver")
    context.set_forkserver_preload([__name__])
    return context


class YT8MDataLoader(StatefulDataLoader):
    """DataLoader over a `YT8MFrameDataset` (batch_size=None: the dataset batches) that tells the
    dataset its epoch and DDP rank each time an epoch's iteration starts, and whose position in
    the epoch can be saved and restored exactly (Lightning keeps it in every checkpoint).

    `context` returns (epoch, rank, world_size); by default the epoch counts iterations and rank
    and world size come from torch.distributed when it is initialized.

    The position is torchdata's StatefulDataLoader state: after each batch it snapshots the
    producing worker's `YT8MFrameDataset.state_dict()` and keeps, per worker, the snapshot of the
    last batch handed out, so batches prefetched by the workers are not counted as consumed.
    `state_dict` adds every rank's state (Lightning saves rank 0's hooks only) and the settings
    the epoch was planned with (`YT8MFrameDataset.epoch_plan`); resuming mid-epoch needs the same
    ranks, workers, files, seed and batching and is refused with a clear error otherwise.
    Lightning keeps the state in its fit loop's state; `YT8MDataModule` keeps it too (see its
    `state_dict`).
    """

    def __init__(self, dataset: YT8MFrameDataset, context=None, on_unreported_read_stats=None, **kwargs):
        kwargs.setdefault("pin_memory", torch.cuda.is_available())
        if kwargs.get("num_workers", 0) == 0:
            kwargs.pop("persistent_workers", None)
        elif kwargs.get("persistent_workers"):
            raise ValueError("persistent_workers would freeze the epoch seen by the workers")
        # A DataLoader draws its workers' base seed from `generator`, by default the global RNG
        # that dropout uses: one extra draw per epoch or validation would make a resumed run's
        # dropout differ from the uninterrupted one. The dataset seeds its own shuffling.
        kwargs.setdefault("generator", torch.Generator().manual_seed(dataset.seed))
        with warnings.catch_warnings():  # torchdata 0.11 calls an API that torch now deprecates
            warnings.filterwarnings("ignore", "'set_vital' is deprecated", UserWarning)
            super().__init__(dataset, batch_size=None, **kwargs)
        self._context = context
        self._iterations = 0
        # Counts that no batch could carry (see _batches); YT8MDataModule passes its counter here.
        self.unreported_read_stats = torch.zeros(len(STAT_NAMES), dtype=torch.int64)
        self.on_unreported_read_stats = on_unreported_read_stats
        self._position: dict = {}
        self._to_load: dict | None = None

    def __iter__(self):
        return self._batches()

    def _batches(self):
        # A generator: the epoch is read at the first batch, not by iter(). Resuming from a
        # checkpoint saved at an epoch's last batch, Lightning calls iter() before it moves on to
        # the next epoch.
        if self._context is not None:
            epoch, rank, world_size = self._context()
        else:
            epoch, (rank, world_size) = self._iterations, rank_and_world_size()
        self._iterations += 1
        if world_size > 1 and self.num_workers > 0 and self.multiprocessing_context is None \
                and fork_can_deadlock_in_child():
            # Where the hang was seen: a rank of a multi-process run, whose native threads may
            # enter Python while it forks. One process, as far as seen, has none that do.
            self.multiprocessing_context = forkserver_context()
        self.dataset.set_distributed(rank, world_size)
        self.dataset.set_epoch(epoch)
        done = 0  # batches of this epoch already handed out (before a resume)
        if self._to_load is not None:
            saved, self._to_load = self._to_load, None
            rank_state = self._saved_rank_state(saved, epoch, rank, world_size)
            super().load_state_dict(rank_state.get("loader", {}))
            done = rank_state.get("batches", 0)
        self._position = {"epoch": epoch, "rank": rank, "world_size": world_size,
                          "num_workers": self.num_workers, "batches": done,
                          "total": len(self.dataset), "plan": self.dataset.epoch_plan()}
        self.unreported_read_stats = torch.zeros(len(STAT_NAMES), dtype=torch.int64)
        self.dataset.unbatched_read_stats.zero_()
        for item in super().__iter__():
            if isinstance(item, ReaderMessage):
                if item.error is not None:
                    raise item.error
                self.unreported_read_stats += item.read_stats  # carried by the next batch
                continue
            item["read_stats"] += self.unreported_read_stats
            self.unreported_read_stats.zero_()
            self._position["batches"] += 1
            yield item
        self.unreported_read_stats += self.dataset.unbatched_read_stats  # num_workers 0
        if self.unreported_read_stats.any():
            # A worker's counts came after every batch: nothing carries them to the training loop,
            # so they stay here (YT8MDataModule adds them to its read_stats). Holding a batch back
            # until the end instead would put the saved data position one batch ahead.
            logger.warning("read_stats %s of this epoch arrived after its last batch (see the "
                           "workers' warnings)", self.unreported_read_stats.tolist())
            if self.on_unreported_read_stats is not None:
                self.on_unreported_read_stats(self.unreported_read_stats.clone())

    def state_dict(self) -> dict:
        """Every rank's position (call on all ranks together, as Lightning's checkpointing does)."""
        local = {**self._position, "loader": super().state_dict()} if self._position else {}
        return {"ranks": gather_per_rank(local)}  # {} per rank: no epoch started yet

    def load_state_dict(self, state: dict) -> None:
        """Continue from `state` at the next iteration (checked against its epoch, ranks, workers
        and plan)."""
        self._to_load = state

    def _saved_rank_state(self, saved: dict, epoch: int, rank: int, world_size: int) -> dict:
        """This rank's saved position, {} (start afresh) if that epoch was complete. A position
        inside the epoch must have been saved under this loader's ranks, workers and plan; one
        saved before the plan was recorded is taken as planned alike (with a warning): refusing it
        would leave a run that predates the check no way to continue its epoch."""
        ranks = saved["ranks"]
        if not all(ranks):  # saved before an epoch started
            return {}
        first = ranks[0]
        if all(r["batches"] >= r["total"] for r in ranks) and first["epoch"] < epoch:
            return {}
        where = (f"epoch {first['epoch']}, {first['batches']} of {first['total']} batches, "
                 f"{len(ranks)} ranks x {first['num_workers']} DataLoader workers")
        if first["epoch"] != epoch:
            raise ValueError(f"the checkpoint's data position ({where}) is not in the epoch being "
                             f"resumed ({epoch})")
        saved_plan = first.get("plan")
        if saved_plan is None:
            logger.warning("the checkpoint's data position (%s) predates the record of the files, "
                           "seed and batching it was planned with: it is continued as if they were "
                           "unchanged (other values would repeat or skip videos)", where)
        was = {"ranks": len(ranks), "num_workers": first["num_workers"]} | (saved_plan or {})
        now = {"ranks": world_size, "num_workers": self.num_workers} | self.dataset.epoch_plan()
        changes = describe_changes(was, now, "run")
        if changes:
            raise ValueError(
                f"cannot resume mid-epoch: the checkpoint's data position ({where}) was {changes}; "
                "each rank and worker continues its own share of the epoch as planned with the "
                "saved files, seed and batching, so other ones would repeat or skip videos. Resume "
                "with the saved values (ranks: --trainer.devices/--trainer.num_nodes), or from a "
                "checkpoint saved at an epoch's end.")
        return ranks[rank]
