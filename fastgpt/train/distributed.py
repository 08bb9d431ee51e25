"""Joining torchrun's process group: `init_distributed()` and this process's place in it.

Run any training command under `torchrun --nproc_per_node N`: WORLD_SIZE > 1 makes the trainer
join the group (NCCL on CUDA, gloo on CPU) and wrap the model in DistributedDataParallel; rank
0 alone prints and writes files.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from fastgpt.errors import UsageError


@dataclass
class DistInfo:
    """This process's place under torchrun (rank 0 of 1 without it)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    created_group: bool = False  # whether we initialized the process group (and destroy it)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        """Wait until every rank gets here (nothing to wait for alone)."""
        if self.world_size > 1 and dist.is_initialized():
            dist.barrier()

    def close(self) -> None:
        """Leave the process group if this process created it."""
        if self.created_group and dist.is_initialized():
            dist.destroy_process_group()


def init_distributed() -> DistInfo:
    """Join the process group when launched by torchrun with WORLD_SIZE > 1 (NCCL on CUDA,
    gloo on CPU; MASTER_ADDR/PORT, RANK, LOCAL_RANK come from the environment)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return DistInfo()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if dist.is_initialized():
        return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank, False)
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        backend = "nccl"
    else:
        backend = "gloo"
    missing = [v for v in ("MASTER_ADDR", "MASTER_PORT", "RANK") if v not in os.environ]
    if missing:  # WORLD_SIZE set by hand, not by torchrun
        raise UsageError(
            f"WORLD_SIZE={world_size} but {', '.join(missing)} not set: launch with torchrun "
            "(torchrun --nproc_per_node N -m fastgpt ...), or unset WORLD_SIZE"
        )
    dist.init_process_group(backend=backend)
    return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank, True)


def is_main_process() -> bool:
    """True outside torchrun and on rank 0 (the rank that prints and writes files); before the
    process group exists (or after it is destroyed), torchrun's RANK variable tells."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank() == 0
    return int(os.environ.get("RANK", "0")) == 0
