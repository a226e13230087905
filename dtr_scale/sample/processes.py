"""The processes of a `dtr-scale sample` launch: the torch.distributed group and the work split.

Index i belongs to global rank `i % world`. The group is the caller's if one is initialised, else one
started from the launcher's ranks (torchrun, the deepspeed launcher, or SLURM with MASTER_ADDR exported:
dtr_scale/distributed.py), else a single process.
"""

from __future__ import annotations

import contextlib
import datetime
from collections.abc import Iterator

import torch
import torch.distributed as dist

from dtr_scale.distributed import cuda_device, launcher_ranks, map_launcher_env


@contextlib.contextmanager
def process_group(device: torch.device) -> Iterator[tuple[int, int]]:
    """(rank, world): an initialised torch.distributed group, or one started from the launcher's ranks
    (torchrun / the deepspeed launcher, or `srun` with MASTER_ADDR exported: dtr_scale.distributed), or a
    single process."""
    if dist.is_available() and dist.is_initialized():
        yield dist.get_rank(), dist.get_world_size()
        return
    rank, world, _ = launcher_ranks()
    if world <= 1:
        yield 0, 1
        return
    map_launcher_env()  # SLURM's variables -> torch's, for the env:// rendezvous
    backend = "nccl" if device.type == "cuda" else "gloo"
    # Long timeout: on a resumed run one rank may have far more missing images than another, and the
    # others wait for it at the final barrier.
    dist.init_process_group(backend, rank=rank, world_size=world, timeout=datetime.timedelta(hours=12))
    try:
        yield dist.get_rank(), dist.get_world_size()
    finally:
        dist.destroy_process_group()


def rank_indices(num_samples: int, rank: int, world: int) -> list[int]:
    """The sample indices that global `rank` owns: i % world == rank (disjoint; their union is all)."""
    return list(range(rank, num_samples, world))


def default_device() -> torch.device:
    """This local rank's GPU where CUDA is present (made current), else the CPU."""
    if torch.cuda.is_available():
        return cuda_device(launcher_ranks()[2])
    return torch.device("cpu")
