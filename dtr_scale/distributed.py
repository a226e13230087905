"""Launch and process-group helpers shared by training (train/), sampling (sample/) and preprocessing (data/):
the ranks a launcher gave this process (torchrun, the deepspeed launcher, SLURM, or none), the mapping of SLURM's
variables to torch's, this rank's CUDA device, a free loopback port and a barrier that is a no-op on one process.
Ranks are always GLOBAL ranks."""

from __future__ import annotations

import os
import socket

import torch
import torch.distributed as dist

from dtr_scale.errors import UserError

Env = dict[str, str] | os._Environ


def launcher_ranks(env: Env = os.environ) -> tuple[int, int, int]:
    """(global rank, world size, local rank) as the launcher set them: RANK/WORLD_SIZE/LOCAL_RANK (torchrun, the
    deepspeed launcher), else SLURM_PROCID/SLURM_NTASKS/SLURM_LOCALID (`srun`), else one process (0, 1, 0)."""
    if "RANK" in env:
        return int(env["RANK"]), int(env.get("WORLD_SIZE", "1")), int(env.get("LOCAL_RANK", "0"))
    if "SLURM_PROCID" in env:
        return int(env["SLURM_PROCID"]), int(env.get("SLURM_NTASKS", "1")), int(env.get("SLURM_LOCALID", "0"))
    return 0, 1, 0


def map_launcher_env(env: Env = os.environ) -> None:
    """Make RANK/WORLD_SIZE/LOCAL_RANK/MASTER_* present for every way of launching.

    SLURM with one task per GPU (`srun python -m dtr_scale train ...`): DeepSpeed would look for
    mpi4py, so SLURM_PROCID/SLURM_NTASKS/SLURM_LOCALID are mapped here (MASTER_ADDR must be exported
    by the batch script, see launch/slurm.sbatch; UserError otherwise). A bare single process gets rank 0
    of 1 on a free loopback port.
    """
    rank, world, local = launcher_ranks(env)
    if "RANK" not in env and world > 1:
        if "MASTER_ADDR" not in env:
            raise UserError(
                "running under SLURM without torchrun: export MASTER_ADDR (first node's host name)"
            )
        env.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(local))
        env.setdefault("MASTER_PORT", "29500")
    if "RANK" not in env:
        env.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
        env.setdefault("MASTER_ADDR", "127.0.0.1")
        env.setdefault("MASTER_PORT", str(free_port()))
    env.setdefault("LOCAL_RANK", "0")


def device_index(local_rank: int, visible_devices: int) -> int:
    """The CUDA device of a local rank: local_rank modulo the visible devices. Under SLURM with one GPU bound
    per task (CUDA_VISIBLE_DEVICES of one device), SLURM_LOCALID can be 3 while only device 0 exists.
    UserError when no device is visible."""
    if visible_devices < 1:
        raise UserError(
            "no CUDA device is visible to this process (check CUDA_VISIBLE_DEVICES / the job's GPUs)"
        )
    return local_rank % visible_devices


def cuda_device(local_rank: int) -> torch.device:
    """This local rank's CUDA device (`device_index`), made the current device."""
    device = torch.device("cuda", device_index(local_rank, torch.cuda.device_count()))
    torch.cuda.set_device(device)
    return device


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (the OS picks it), for MASTER_PORT of a group
    started on this machine. Another process may take it before it is bound again; local use only."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def barrier(device: torch.device | None = None) -> None:
    """Wait for every rank of the default group; nothing when no group is initialised or it has one rank.
    Under NCCL the barrier names `device` (this rank's GPU), so it does not guess a device of its own."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() <= 1:
        return
    if device is not None and device.type == "cuda" and dist.get_backend() == "nccl":
        dist.barrier(device_ids=[device.index or 0])
    else:
        dist.barrier()
