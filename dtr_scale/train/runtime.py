"""Process-level set-up shared by every entry point: launcher environments, process group, seeds, RNG.

Ranks are always the GLOBAL rank and world size of torch.distributed, whatever launched us.
"""

from __future__ import annotations

import atexit
import os
import random
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from dtr_scale.distributed import cuda_device, map_launcher_env


@dataclass
class DistInfo:
    """This process in the job: global rank, world size, local rank and its device."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device


def init_distributed() -> DistInfo:
    """Initialise torch.distributed from the environment (torchrun, deepspeed launcher or SLURM_* mapped), or
    a single process; NCCL on CUDA, gloo on CPU. Returns DistInfo."""
    map_launcher_env()
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    accelerator = get_accelerator()
    if accelerator.device_name() == "cpu":
        # The shared-memory comm op is JIT-compiled at process-group start (~1 min); gloo suffices here.
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    if not dist.is_initialized():
        deepspeed.init_distributed(dist_backend=accelerator.communication_backend_name(), verbose=False)
        # Tear the process group down before the interpreter does: a script (or a test) that returns
        # without destroy_process_group() otherwise lets its communication threads be destroyed at exit,
        # which can abort the process ("terminate called without an active exception").
        atexit.register(_destroy_process_group)
    local_rank = int(os.environ["LOCAL_RANK"])
    if accelerator.device_name() == "cuda":
        device = cuda_device(local_rank)
    else:
        device = torch.device("cpu")
    return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank, device)


def _destroy_process_group() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def seed_everything(seed: int) -> None:
    """Seed Python's, numpy's and torch's global generators with `seed`."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict[str, Any]:
    """Python, numpy and torch (and CUDA) global RNG states, as checkpointable nested state."""
    np_state = np.random.get_state()
    state = {
        "python": list(random.getstate()),
        "numpy": {
            "keys": torch.from_numpy(np_state[1].astype(np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "cached_gaussian": float(np_state[4]),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def load_rng_state(state: dict[str, Any]) -> None:
    """Restore `rng_state` (a checkpoint's step "generator", from before per-sample draws, is not used)."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    n = state["numpy"]
    np.random.set_state(
        ("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"])
    )
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


M_MMAP_THRESHOLD = -3  # glibc mallopt parameter (malloc.h)


def pin_mmap_threshold(threshold_bytes: int = 1 << 20) -> bool:
    """Make glibc serve (and return to the OS on free) every block of >= `threshold_bytes` by mmap.

    For ZeRO-3 on the CPU: each forward and backward gathers whole parameters and frees them again. glibc
    raises its mmap threshold after the first large frees (up to 32 MiB), after which such blocks come from
    the heap and stay in the process when freed, so the resident set grows with the churn (measured: peak
    RSS 3.99 GiB at ZeRO-3 vs 3.32 at ZeRO-0 for a 129.6M DiT at world 2; 3.00 GiB with the threshold
    pinned, bench/RESULTS.md). Pinning it (mallopt(M_MMAP_THRESHOLD)) also switches off that adjustment.
    Returns False where the C library is not glibc (nothing is changed).
    """
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    if name is None or "libc.so" not in name:
        return False
    try:
        libc = ctypes.CDLL(name)
        return bool(libc.mallopt(M_MMAP_THRESHOLD, int(threshold_bytes)))
    except (OSError, AttributeError):
        return False
