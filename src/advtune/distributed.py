"""The one home for the facts of a torch.distributed run: this process's rank, the world size, and
whether it is the main process (rank 0), the only one that creates folders and writes records.
Without a process group there is one process, rank 0 of 1."""

from __future__ import annotations

import torch.distributed as dist


def rank_and_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_main_process() -> bool:
    """Rank 0 (or no process group): the one process that writes records."""
    return rank_and_world()[0] == 0
