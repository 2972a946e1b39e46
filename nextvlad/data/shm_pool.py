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

from dataclasses import dataclass

import torch


class BufferLease:
    """Travels with a batch; `release()` tells the worker its frame buffers may be reused."""

    def __init__(self, flag: torch.Tensor, slot: int):
        self._flag = flag  # int32 (1,) in shared memory: 1 while the main process may read
        self.slot = slot

    def release(self) -> None:
        self._flag.zero_()

    def __repr__(self) -> str:
        return f"BufferLease(slot={self.slot})"


def new_shared(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """An uninitialized tensor in shared memory (what torch's default_collate does in workers)."""
    numel = 1
    for size in shape:
        numel *= size
    storage = torch.UntypedStorage._new_shared(numel * dtype.itemsize)
    return torch.empty(0, dtype=dtype).set_(storage).view(shape)


@dataclass
class _Slot:
    tensors: tuple[torch.Tensor, ...]
    flag: torch.Tensor


class SharedBufferPool:
    """Per-worker pool of shared-memory buffer sets of fixed shapes (see module docstring)."""

    def __init__(self, shapes: tuple[tuple[int, ...], ...], dtype: torch.dtype, max_slots: int = 4):
        self.shapes = shapes
        self.dtype = dtype
        self.max_slots = max_slots
        self.slots: list[_Slot] = []

    def take(self, leading: int) -> tuple[tuple[torch.Tensor, ...], BufferLease | None]:
        """Buffers whose first dimension is `leading` (<= the pool's), and their lease."""
        for index, slot in enumerate(self.slots):
            if int(slot.flag[0]) == 0:
                slot.flag.fill_(1)
                return tuple(t[:leading] for t in slot.tensors), BufferLease(slot.flag, index)
        if len(self.slots) < self.max_slots:
            flag = torch.ones(1, dtype=torch.int32).share_memory_()
            slot = _Slot(tuple(new_shared(shape, self.dtype) for shape in self.shapes), flag)
            self.slots.append(slot)
            return tuple(t[:leading] for t in slot.tensors), BufferLease(flag, len(self.slots) - 1)
        # Every slot is still held by the consumer: a one-off segment, freed with the batch.
        return tuple(new_shared((leading, *shape[1:]), self.dtype) for shape in self.shapes), None
