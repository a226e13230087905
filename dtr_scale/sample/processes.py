"""The processes of a `dtr-scale sample` launch: the torch.distributed group and the work split.

Index i belongs to global rank `i % world`. The group is the caller's if one is initialised, else one
started from the RANK/WORLD_SIZE (and MASTER_ADDR/MASTER_PORT) that torchrun or the deepspeed launcher
set, else a single process.
"""

from __future__ import annotations

import contextlib
import datetime
import os
from collections.abc import Iterator

import torch
import torch.distributed as dist


@contextlib.contextmanager
def process_group(device: torch.device) -> Iterator[tuple[int, int]]:
    """(rank, world): an initialised torch.distributed group, or one started from RANK/WORLD_SIZE
    (and MASTER_ADDR/MASTER_PORT) set by torchrun / the deepspeed launcher, or a single process."""
    if dist.is_available() and dist.is_initialized():
        yield dist.get_rank(), dist.get_world_size()
        return
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        yield 0, 1
        return
    backend = "nccl" if device.type == "cuda" else "gloo"
    # Long timeout: on a resumed run one rank may have far more missing images than another, and the
    # others wait for it at the final barrier.
    dist.init_process_group(
        backend, rank=int(os.environ["RANK"]), world_size=world, timeout=datetime.timedelta(hours=12)
    )
    try:
        yield dist.get_rank(), dist.get_world_size()
    finally:
        dist.destroy_process_group()


def rank_indices(num_samples: int, rank: int, world: int) -> list[int]:
    """The sample indices that global `rank` owns: i % world == rank (disjoint; their union is all)."""
    return list(range(rank, num_samples, world))


def default_device() -> torch.device:
    """cuda:LOCAL_RANK where CUDA is present, else the CPU."""
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count())
        torch.cuda.set_device(device)
        return device
    return torch.device("cpu")
