"""Process set-up: which device a rank uses."""

from __future__ import annotations

import sys

import pytest


def test_local_rank_maps_onto_the_visible_devices():
    # SLURM with one GPU bound per task: every task sees device 0 whatever its SLURM_LOCALID.
    from dtr_scale.errors import UserError
    from dtr_scale.train.runtime import device_index

    assert [device_index(r, 1) for r in range(4)] == [0, 0, 0, 0]
    assert [device_index(r, 4) for r in range(6)] == [0, 1, 2, 3, 0, 1]
    with pytest.raises(UserError, match="no CUDA device is visible"):
        device_index(0, 0)


RSS_SCRIPT = r"""
import sys
import torch
from dtr_scale.train.runtime import pin_mmap_threshold
def rss():
    return int(open("/proc/self/statm").read().split()[1]) * 4096 / 2**20
if sys.argv[1] == "pinned":
    assert pin_mmap_threshold()
torch.empty(8 << 20, dtype=torch.uint8).fill_(1)  # one large free: glibc would raise its threshold here
before = rss()
blocks = [torch.ones(1 << 20) for _ in range(64)]  # 64 x 4 MiB, allocated and touched
del blocks
print(rss() - before)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc mallopt and /proc are Linux's")
def test_pinned_mmap_threshold_returns_freed_blocks_to_the_os():
    import subprocess

    def grown(mode: str) -> float:
        out = subprocess.run(
            [sys.executable, "-c", RSS_SCRIPT, mode], capture_output=True, text=True, check=True
        )
        return float(out.stdout.split()[-1])

    assert grown("pinned") < 16  # MiB still held after freeing 256 MiB of blocks
    assert grown("default") > 128  # what glibc keeps without it (the heap-fragmentation the pin avoids)
