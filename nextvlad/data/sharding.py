"""Which records each reader (DDP rank x DataLoader worker) reads in an epoch, as pure functions.

The epoch's files (shuffled per epoch for training, sorted otherwise) are concatenated into one
sequence of N records. Ranks get contiguous, balanced ranges of that sequence, and each rank's
range is cut into whole batches that are handed to its workers as contiguous runs. So every record
is read by exactly one reader, reads stay sequential within files, and because a range can start
or end inside a file this works with fewer files than readers.

Batch counts per rank:

* training, ``drop_last=True`` (the authors' default): every rank gets ``T = (N // W) // B`` full
  batches; the ``N - W*T*B < W*B`` records at the tail of the (shuffled) sequence are not read this
  epoch, i.e. at most one batch per rank.
* training, ``drop_last=False``: every rank gets ``N // W`` records (``N % W < W`` dropped) and
  therefore the same batch sizes, the last one partial.
* evaluation (``drop_remainder=False``): all N records; ranks differ by at most one record (and so
  at most one batch), which is harmless without gradient synchronisation.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Segment:
    """Records [start, start + count) of file `file_index` (an index into the dataset's files)."""

    file_index: int
    start: int
    count: int


@dataclass(frozen=True)
class ReaderPlan:
    """What one reader does in one epoch: read `segments` in order, emit batches of `batch_sizes`."""

    segments: tuple[Segment, ...]
    batch_sizes: tuple[int, ...]

    @property
    def num_records(self) -> int:
        return sum(self.batch_sizes)


def epoch_file_order(num_files: int, seed: int, epoch: int, shuffle: bool) -> list[int]:
    """The file order for an epoch: a permutation determined by (seed, epoch), or identity."""
    if not shuffle:
        return list(range(num_files))
    return np.random.default_rng([seed, epoch]).permutation(num_files).tolist()


def rank_range(total: int, world_size: int, rank: int, batch_size: int,
               training: bool, drop_last: bool) -> tuple[int, int, list[int]]:
    """(start, end, batch sizes) of `rank`'s slice of a sequence of `total` records."""
    if training and drop_last:
        per_rank_batches = (total // world_size) // batch_size
        per_rank = per_rank_batches * batch_size
        start = rank * per_rank
        return start, start + per_rank, [batch_size] * per_rank_batches
    if training:
        per_rank = total // world_size
        start, end = rank * per_rank, (rank + 1) * per_rank
    else:
        start, end = rank * total // world_size, (rank + 1) * total // world_size
    return start, end, _batch_sizes(end - start, batch_size)


def _batch_sizes(num_records: int, batch_size: int) -> list[int]:
    full, remainder = divmod(num_records, batch_size)
    return [batch_size] * full + ([remainder] if remainder else [])


def records_dropped(total: int, world_size: int, batch_size: int, training: bool,
                    drop_last: bool) -> int:
    """How many of `total` records no rank reads in an epoch (0 for evaluation)."""
    used = sum(len(range(*rank_range(total, world_size, r, batch_size, training, drop_last)[:2]))
               for r in range(world_size))
    return total - used


def plan_reader(counts: Sequence[int], file_order: Sequence[int], world_size: int, rank: int,
                num_workers: int, worker: int, batch_size: int, training: bool,
                drop_last: bool) -> ReaderPlan:
    """The plan of reader (rank, worker) given per-file record counts and the epoch's file order."""
    ordered_counts = [counts[i] for i in file_order]
    start, _, batch_sizes = rank_range(sum(ordered_counts), world_size, rank, batch_size,
                                       training, drop_last)
    # Whole batches to workers, contiguous runs: worker w gets batches [w*T//nw, (w+1)*T//nw).
    num_batches = len(batch_sizes)
    first, last = worker * num_batches // num_workers, (worker + 1) * num_batches // num_workers
    begin = start + sum(batch_sizes[:first])
    my_sizes = batch_sizes[first:last]
    return ReaderPlan(_segments(ordered_counts, file_order, begin, sum(my_sizes)), tuple(my_sizes))


def _segments(ordered_counts: Sequence[int], file_order: Sequence[int], begin: int,
              count: int) -> tuple[Segment, ...]:
    """Map the global range [begin, begin+count) of the concatenated files to per-file segments."""
    segments = []
    offset = 0  # global index of the current file's first record
    for file_index, file_count in zip(file_order, ordered_counts):
        lo, hi = max(begin, offset), min(begin + count, offset + file_count)
        if lo < hi:
            segments.append(Segment(file_index, lo - offset, hi - lo))
        offset += file_count
        if offset >= begin + count:
            break
    return tuple(segments)


def num_batches(counts: Sequence[int], world_size: int, rank: int, batch_size: int,
                training: bool, drop_last: bool) -> int:
    """Batches rank `rank` yields per epoch (independent of the file order and of workers)."""
    return len(rank_range(sum(counts), world_size, rank, batch_size, training, drop_last)[2])

