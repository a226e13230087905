"""The torch.distributed helpers that both training (train/) and sampling (sample/) use: a free loopback
port for a process group started here, and a barrier that is a no-op on one process."""

from __future__ import annotations

import socket

import torch
import torch.distributed as dist


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
