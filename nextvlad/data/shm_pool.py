"""Reusable shared-memory frame buffers for DataLoader workers.

A DataLoader worker must put every batch in shared memory. Allocating a fresh shared-memory
segment per batch costs more than parsing the records (a new file in /dev/shm, and a page fault
per 4 KiB page: ~13,000 for a 160 x 300 x 1152 uint8 batch). So each worker keeps a few segments
and reuses one once the main process has *released* it, i.e. once `finalize_batch` has turned the
quantized frames into new float tensors (on the device or on the CPU). The release travels as a
`BufferLease` in the batch dict (a plain object: pinning and device transfer leave it alone).

Nothing depends on the release happening: a consumer that never calls `finalize_batch` (or keeps
raw batches) only exhausts the pool, and the worker falls back to a fresh segment per batch.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass

import torch

#: Where torch's DataLoader workers place batches on Linux (Docker's default size: 64 MB).
SHARED_MEMORY = "/dev/shm"
#: Buffer sets a worker's pool keeps (see module docstring).
MAX_SLOTS = 4
#: What to change when SHARED_MEMORY is too small.
SHARED_MEMORY_ADVICE = ("give it more (docker run --shm-size=4g, or --ipc=host) or set --data.init_args.num_workers 0 "
                        "(batches made in the main process)")


class SharedMemoryFull(OSError):
    """No room in /dev/shm for a worker's batch (torch's RuntimeError says only "No space left")."""


def shared_memory_free() -> int | None:
    """Free bytes in /dev/shm, None where there is none (not Linux)."""
    try:
        return shutil.disk_usage(SHARED_MEMORY).free
    except OSError:
        return None


def shared_memory_full_message(placed: str = "a tensor of a batch", free: int | None = None) -> str:
    """What a user reads when a DataLoader worker finds /dev/shm full."""
    room = "" if free is None else f"{mebibytes(free)} free; "
    return (f"{SHARED_MEMORY} is full: a DataLoader worker could not place {placed} there ({room}each worker "
            f"keeps up to {MAX_SLOTS} batches there): {SHARED_MEMORY_ADVICE}")


def mebibytes(size: int) -> str:
    return f"{size:,} bytes" if size < 2**20 else f"{size / 2**20:,.0f} MiB"


class BufferLease:
    """Travels with a batch; `release()` tells the worker its frame buffers may be reused."""

    def __init__(self, flag: torch.Tensor, slot: int, generation: int):
        # flag: int32 (1,) in shared memory, 0 when free, else the generation of the batch that
        # holds the slot. Only that batch's lease may free it: a stale one (a raw batch finalized
        # twice) must not hand a newer batch's buffers back to the worker.
        self._flag = flag
        self.slot = slot
        self.generation = generation

    def release(self) -> None:
        if int(self._flag[0]) == self.generation:  # only the worker changes a non-zero flag
            self._flag.zero_()

    def __repr__(self) -> str:
        return f"BufferLease(slot={self.slot})"


def new_shared(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """An uninitialized tensor in shared memory (what torch's default_collate does in workers)."""
    numel = 1
    for size in shape:
        numel *= size
    try:
        storage = torch.UntypedStorage._new_shared(numel * dtype.itemsize)
    except RuntimeError as error:
        if "No space left on device" not in str(error):
            raise
        raise SharedMemoryFull(shared_memory_full_message(f"{mebibytes(numel * dtype.itemsize)} of a batch",
                                                          shared_memory_free())) from error
    return torch.empty(0, dtype=dtype).set_(storage).view(shape)


@dataclass
class _Slot:
    tensors: tuple[torch.Tensor, ...]
    flag: torch.Tensor
    generation: int = 0

    def lease(self, index: int, leading: int) -> tuple[tuple[torch.Tensor, ...], BufferLease]:
        self.generation = self.generation % (2**31 - 1) + 1  # never 0 (free)
        self.flag.fill_(self.generation)
        return tuple(t[:leading] for t in self.tensors), BufferLease(self.flag, index,
                                                                      self.generation)


class SharedBufferPool:
    """Per-worker pool of shared-memory buffer sets of fixed shapes (see module docstring)."""

    def __init__(self, shapes: tuple[tuple[int, ...], ...], dtype: torch.dtype, max_slots: int = MAX_SLOTS):
        self.shapes = shapes
        self.dtype = dtype
        self.max_slots = max_slots
        self.slots: list[_Slot] = []

    def take(self, leading: int) -> tuple[tuple[torch.Tensor, ...], BufferLease | None]:
        """Buffers whose first dimension is `leading` (<= the pool's), and their lease."""
        for index, slot in enumerate(self.slots):
            if int(slot.flag[0]) == 0:
                return slot.lease(index, leading)
        if len(self.slots) < self.max_slots:
            flag = new_shared((1,), torch.int32).zero_()
            self.slots.append(_Slot(tuple(new_shared(s, self.dtype) for s in self.shapes), flag))
            return self.slots[-1].lease(len(self.slots) - 1, leading)
        # Every slot is still held by the consumer: a one-off segment, freed with the batch.
        return tuple(new_shared((leading, *shape[1:]), self.dtype) for shape in self.shapes), None
