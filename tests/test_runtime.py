"""Process set-up: which device a rank uses."""

from __future__ import annotations

import sys

import pytest


def test_local_rank_maps_onto_the_visible_devices():
    # SLURM with one GPU bound per task: every task sees device 0 whatever its SLURM_LOCALID.
    from dtr_scale.distributed import device_index
    from dtr_scale.errors import UserError

    assert [device_index(r, 1) for r in range(4)] == [0, 0, 0, 0]
    assert [device_index(r, 4) for r in range(6)] == [0, 1, 2, 3, 0, 1]
    with pytest.raises(UserError, match="no CUDA device is visible"):
        device_index(0, 0)


RSS_SCRIPT = r"""
import ctypes
import sys
import torch
from dtr_scale.train.runtime import pin_mmap_threshold
def rss():
    return int(open("/proc/self/statm").read().split()[1]) * 4096 / 2**20
if sys.argv[1] == "pinned":
    assert pin_mmap_threshold()
torch.empty(8 << 20, dtype=torch.uint8).fill_(1)  # one large free: glibc would raise its threshold here
# M_TRIM_THRESHOLD (-1) past anything freed below, in both runs: the heap's top is never trimmed. Set after the
# large free, as any mallopt of a threshold also switches glibc's raising of them off.
assert ctypes.CDLL(None).mallopt(-1, 1 << 30)
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

    # MiB still held after freeing 256 MiB of 4 MiB blocks. Without the pin, glibc's first large free raised
    # its mmap threshold (to 8 MiB), so the blocks came from the heap and all of them stay; with it every
    # block was mmapped and went straight back. The trim threshold is fixed because otherwise how much of the
    # heap is given back is chance: freed blocks that coalesce into the top chunk are trimmed once it passes
    # 2x the raised threshold, and which do depends on where glibc put the process's other small allocations
    # (unpinned runs held 1, 17, 33 or 257 MiB).
    assert grown("pinned") < 4
    assert grown("default") > 200
