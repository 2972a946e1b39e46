"""Distributed helpers: per-rank state in a checkpoint that only rank 0 writes, and ending process groups cleanly."""

from __future__ import annotations

import atexit
import functools
import random
from typing import Any

import numpy as np
import torch


def rank_and_world_size() -> tuple[int, int]:
    """(rank, world size) from torch.distributed when it is initialized, else (0, 1)."""
    if has_process_group():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def shutdown_process_group() -> None:
    """End a finished distributed run in step: a barrier, then destroy the default process group.

    Lightning leaves the group to an atexit hook, which each rank runs whenever it gets there: a
    rank that exits first closes its gloo connections while another still holds them, and that
    rank can then die in gloo's teardown ("Connection closed by peer") after the work is done,
    with a non-zero exit (and Lightning's process observer kills the launching rank). Call on
    every rank, after the run succeeded; a no-op without a process group.
    """
    if has_process_group():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


@functools.cache  # registered once per process
def destroy_process_group_at_exit() -> None:
    """Have this process destroy its process group when it exits, if it has one by then.

    Lightning registers that exit hook for NCCL only. A gloo rank that exits with its group alive
    (a ddp_spawn worker always does: its run ends inside Lightning) now and then aborts in the
    group's destructor ("terminate called without an active exception", SIGABRT, after the work
    is done): 5 of 40 two-rank spawns of plain torch.distributed on a loaded 2-core machine, 0 of
    40 with the group destroyed (no barrier needed). No barrier here: at exit after an error the
    other ranks may never come. Registered once per process; a no-op without a group.
    """
    atexit.register(_destroy_process_group_if_any)


def _destroy_process_group_if_any() -> None:
    if has_process_group():
        torch.distributed.destroy_process_group()


def has_process_group() -> bool:
    """Whether this process is a rank of an initialized torch.distributed group."""
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def gather_per_rank(state: Any) -> list[Any]:
    """Every rank's `state`, indexed by rank (a collective: call it on all ranks together).

    Lightning writes the checkpoint on rank 0 only, from rank 0's hooks; what differs per rank
    (data position, random generators) has to travel to rank 0 first.
    """
    _, world_size = rank_and_world_size()
    if world_size == 1:
        return [state]
    states: list[Any] = [None] * world_size
    torch.distributed.all_gather_object(states, state)
    return states


def rng_states() -> dict[str, Any]:
    """This process's global random generators, as types a weights-only torch.load accepts
    (Lightning's `_collect_rng_states` keeps numpy's key array, which it refuses)."""
    name, keys, position, has_gauss, cached = np.random.get_state()
    return {"torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "numpy": [name, keys.tolist(), position, has_gauss, cached],
            "python": random.getstate()}


def set_rng_states(states: dict[str, Any]) -> None:
    """Restore what `rng_states` returned."""
    torch.set_rng_state(states["torch"])
    if states["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])
    name, keys, position, has_gauss, cached = states["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), position, has_gauss, cached))
    random.setstate(states["python"])
