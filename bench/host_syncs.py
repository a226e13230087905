"""Counting the host syncs a training step forces; used by tests/test_step_syncs.py and `bench/gpu.py --syncs`.

On a GPU, `.item()`, `bool()`, `float()`, `int()`, `.tolist()`, `.numpy()` and `.cpu()` of a device tensor wait for
the device. `count_host_syncs` counts those calls made from dtr_scale's own code while `Trainer.train_step` runs
(leaving out DeepSpeed and the CPU-side data pipeline, which builds batches on the host before they are moved), so
the count is the same on a CPU, where nothing waits. On CUDA it also counts every synchronizing operation torch
reports under `torch.cuda.set_sync_debug_mode("warn")`, by origin (dtr_scale, deepspeed, torch, other).
"""

from __future__ import annotations

import collections
import contextlib
import sys
import warnings
from collections.abc import Iterator

import torch

SYNC_METHODS = ("item", "__bool__", "__float__", "__int__", "tolist", "numpy", "cpu")
ORIGINS = (("dtr_scale/data", "/dtr_scale/data/"), ("dtr_scale", "/dtr_scale/"), ("deepspeed", "/deepspeed/"),
           ("torch", "/torch/"))  # fmt: skip


@contextlib.contextmanager
def calls_from_dtr_scale(calls: collections.Counter) -> Iterator[None]:
    """While inside: count each SYNC_METHODS call on a tensor made from dtr_scale (not dtr_scale/data) into
    `calls`, keyed "METHOD FILE:LINE" with FILE relative to the package."""
    originals = {name: getattr(torch.Tensor, name) for name in SYNC_METHODS}

    def counted(name, original):
        def wrapper(self, *args, **kwargs):
            frame = sys._getframe(1)
            caller = frame.f_code.co_filename.replace("\\", "/")
            if "/dtr_scale/" in caller and "/dtr_scale/data/" not in caller:
                calls[f"{name} {caller.split('/dtr_scale/')[-1]}:{frame.f_lineno}"] += 1
            return original(self, *args, **kwargs)

        return wrapper

    for name, original in originals.items():
        setattr(torch.Tensor, name, counted(name, original))
    try:
        yield
    finally:
        for name, original in originals.items():
            setattr(torch.Tensor, name, original)


def origin(filename: str) -> tuple[str, str]:
    """(origin, path within it) of a source file: dtr_scale/data, dtr_scale, deepspeed, torch or other."""
    path = filename.replace("\\", "/")
    for key, mark in ORIGINS:
        if mark in path:
            return key, path.split(mark)[-1]
    return "other", path


def count_host_syncs(trainer, batches: Iterator, steps: int) -> dict:
    """Run `steps` optimizer steps of `trainer` (warmed up by the caller) and count their host syncs.

    Returns {"steps", "accumulation", "calls": {"METHOD FILE:LINE": n}, "cuda_sync_debug": bool,
    "device_syncs": {origin: n}, "device_sync_sites": {"ORIGIN FILE:LINE": n}}; totals over all the steps."""
    cuda = trainer.device.type == "cuda"
    calls, device_syncs, sites = collections.Counter(), collections.Counter(), collections.Counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode("warn")
        with calls_from_dtr_scale(calls):
            for _ in range(steps):
                assert trainer.train_step(batches)
        if cuda:
            torch.cuda.set_sync_debug_mode("default")
    for warning in caught:
        if "synchroniz" in str(warning.message):
            key, path = origin(warning.filename)
            device_syncs[key] += 1
            sites[f"{key} {path}:{warning.lineno}"] += 1
    return {"steps": steps, "accumulation": trainer.accumulation, "calls": dict(calls), "cuda_sync_debug": cuda,
            "device_syncs": dict(device_syncs), "device_sync_sites": dict(sites)}  # fmt: skip
