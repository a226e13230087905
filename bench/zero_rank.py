"""One rank of bench/zero.py (`python bench/zero.py --worker ...`, started by its launcher): builds the real
Trainer, runs warm-up and timed `train_step`s, and prints one JSON result line (tag RESULT_TAG) with its step times,
its memory (RSS, ru_maxrss, or CUDA's max_memory_allocated), where in the step the peak falls (PhaseRSS) and the
tensor bytes it holds by kind (`tensor_bytes`).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
from pathlib import Path

RESULT_TAG = "ZERO_BENCH_RESULT"
PHASES = ("forward", "backward", "optimizer step", "EMA update")


def share_zero3_fp32_master(optimizer) -> int:
    """Let a ZeRO-3 optimizer's fp32 master partitions share the module's flat partitions when both are fp32
    on the same device (fp32 training); returns the bytes freed (0 when there is nothing to share).

    DeepSpeed 0.19.8 means to alias them in that case (stage3.py `_create_fp32_partitions`, "we don't need
    another copy of the weights"; `_reassign_or_swap_out_partitioned_parameters` then copies a tensor onto
    itself), but it compares `tensor.device` with a device *name* ("cpu", "cuda:0"), which is never equal,
    and so clones: one more fp32 copy of the rank's partition (247 MiB per rank for a 129.6M DiT at world 2,
    bench/RESULTS.md 4c). Call right after `deepspeed.initialize`; the values are equal then (a clone), the
    optimizer state stays keyed by the same tensor objects, and checkpoints keep their layout. Under bf16 the
    dtypes differ and nothing changes.
    """
    lp_flat = getattr(optimizer, "fp16_partitioned_groups_flat", None) or []
    masters = getattr(optimizer, "fp32_partitioned_groups_flat", None) or []
    freed = 0
    for lp, master in zip(lp_flat, masters):
        if lp is None or master is lp or lp.dtype != master.dtype or lp.device != master.device:
            continue
        if lp.shape != master.shape or lp.untyped_storage().data_ptr() == master.untyped_storage().data_ptr():
            continue
        freed += master.untyped_storage().nbytes()
        master.data = lp.data
    return freed


def overrides_for(args: argparse.Namespace, stage: int, manifest: str, run_dir: str) -> list[str]:
    """Config overrides of one benchmark run: the demo config, resized, fp32, nothing but steps."""
    return [
        f"run_dir={run_dir}",
        f"data.shards={manifest}",
        "data.num_workers=0",
        f"model.name={args.model}",
        f"model.hidden_size={args.hidden}",
        f"model.depth={args.depth}",
        f"model.num_heads={args.heads}",
        f"train.micro_batch_size={args.micro_batch}",
        f"train.global_batch_size={args.micro_batch * args.world_size}",  # no gradient accumulation
        f"train.max_steps={args.warmup + args.steps}",
        f"train.precision={args.precision}",
        f"deepspeed.zero_stage={stage}",
        "monitor.sample_every=0",
        "monitor.progress=false",
        "monitor.tensorboard=false",
        "eval.every=0",
        *args.overrides,
    ]


def rss_mib() -> float:
    """Current resident set size of this process (Linux /proc)."""
    pages = int(Path("/proc/self/statm").read_text().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def rss_parts_mib() -> dict[str, float]:
    """This process's resident set split as the kernel reports it (/proc/self/status): anonymous memory
    (heap, mmap'd tensors, stacks) and file-backed pages (the code of Python, torch, DeepSpeed and the other
    shared libraries that have been touched), in MiB."""
    parts = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("RssAnon", "RssFile", "RssShmem"):
            parts[key] = int(value.split()[0]) / 1024  # kB
    return parts


def peak_rss_mib() -> float:
    import resource

    # ru_maxrss is in KiB on Linux (bytes on macOS).
    scale = 1.0 if sys.platform == "darwin" else 1024.0
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / 2**20


CATEGORIES = ("parameters", "gradients", "optimizer states", "ema", "buckets", "other")


def _bucket_tensors(wrapper, tensors_in) -> list:
    """The tensors of DeepSpeed's reduce buckets: its optimizer's attributes named *ipg* / *bucket* (ZeRO-3's
    `ipg_buckets` hold objects with a `.buffer`; ZeRO-1/2's `ipg_buffer` is a list of tensors)."""
    found = []
    for name, value in vars(wrapper).items():
        if "ipg" not in name.lower() and "bucket" not in name.lower():
            continue
        values = (
            value.values()
            if isinstance(value, dict)
            else value
            if isinstance(value, list | tuple)
            else [value]
        )
        for v in values:
            found += tensors_in(getattr(v, "buffer", v))
    return found


def tensor_bytes(trainer) -> dict[str, int]:
    """Bytes of every tensor storage this rank holds, by what holds it (each storage counted once).

    parameters: the module's parameters (at ZeRO-3 each one's local partition `ds_tensor`) and the
    optimizer's own copies of them (DeepSpeed's fp32 master partitions); gradients: `.grad` of both, and
    DeepSpeed's gradient partitions / buckets found as the tensors its optimizer holds under a name with
    "grad" in it; optimizer states: Adam's exp_avg / exp_avg_sq / step; ema: the sharded EMA; buckets:
    DeepSpeed's gradient reduce buckets (its optimizer's attributes named *ipg* / *bucket*); other: any
    other tensor the garbage collector can reach (module buffers, gathered parameters still alive, data).
    """
    import gc

    import torch

    seen: dict[tuple[int, str], tuple[str, int]] = {}

    def claim(tensors, category: str) -> None:
        for t in tensors:
            if not isinstance(t, torch.Tensor) or t.device.type == "meta":
                continue
            storage = t.untyped_storage()
            key = (storage.data_ptr(), str(t.device))
            if storage.nbytes() and key not in seen:
                seen[key] = (category, storage.nbytes())

    def tensors_in(value, depth: int = 0):
        if isinstance(value, torch.Tensor):
            yield value
        elif depth < 3 and isinstance(value, dict):
            for v in value.values():
                yield from tensors_in(v, depth + 1)
        elif depth < 3 and isinstance(value, list | tuple):
            for v in value:
                yield from tensors_in(v, depth + 1)

    engine = trainer.engine
    params = list(engine.module.parameters())
    claim([getattr(p, "ds_tensor", p) for p in params], "parameters")
    wrapper = engine.optimizer
    inner = getattr(wrapper, "optimizer", wrapper)
    master = [p for group in inner.param_groups for p in group["params"]]
    # ZeRO-3 empties its optimizer's param_groups between steps; its fp32 master partitions live here (a
    # separate copy even in fp32 training: DeepSpeed 0.19.8 compares a tensor's device with the string
    # "cpu"/"cuda:N", which is never equal, so it clones instead of sharing the module's flat partition).
    master += [t for t in getattr(wrapper, "fp32_partitioned_groups_flat", []) if isinstance(t, torch.Tensor)]
    claim(master, "parameters")
    claim([v for state in inner.state.values() for v in state.values()], "optimizer states")
    claim(_bucket_tensors(wrapper, tensors_in), "buckets")
    claim([p.grad for p in params + master], "gradients")
    for name, value in vars(wrapper).items():
        if "grad" in name.lower():
            claim(tensors_in(value), "gradients")
    claim([trainer.ema.shard], "ema")
    claim([o for o in gc.get_objects() if isinstance(o, torch.Tensor)], "other")
    totals = dict.fromkeys(CATEGORIES, 0)
    for category, size in seen.values():
        totals[category] += size
    return totals


class PhaseRSS:
    """The highest RSS of this process in each named phase, sampled by a daemon thread every `interval` s.

    `phase` is set by the wrappers around the engine's forward / backward / step and the EMA update; the
    sampler reads /proc/self/statm (no GIL-heavy work: torch's kernels release the GIL while they run)."""

    def __init__(self, interval: float = 0.002) -> None:
        self.phase: str | None = None
        self.peaks: dict[str, float] = {}
        self._stop = threading.Event()
        self._interval = interval
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _sample(self) -> None:
        phase = self.phase
        if phase is not None:
            rss = rss_mib()
            if rss > self.peaks.get(phase, 0.0):
                self.peaks[phase] = rss

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            self._sample()

    def wrap(self, phase: str, fn):
        def wrapped(*a, **kw):
            previous, self.phase = self.phase, phase
            self._sample()
            try:
                return fn(*a, **kw)
            finally:
                self._sample()
                self.phase = previous

        return wrapped

    def stop(self) -> dict[str, float]:
        self._stop.set()
        self._thread.join()
        return self.peaks


def instrument(trainer, warmup: int) -> tuple[PhaseRSS, dict[str, int]]:
    """Wrap the engine's forward / backward / step and the EMA update: a PhaseRSS of where the peak falls,
    and a dict that the first timed step fills with `tensor_bytes` and the RSS (total, anonymous, file) at
    the step's fullest point: after the last backward, before the optimizer step (gradients are whole there;
    ZeRO-0 frees them after the step; Adam's states exist from the first optimizer step on)."""
    counted: dict[str, int] = {}
    engine = trainer.engine
    real_step = engine.step

    def step_and_count(*a, **kw):
        if engine.is_gradient_accumulation_boundary() and trainer.step == warmup:
            counted.update(tensor_bytes(trainer))
            counted["rss"] = int(rss_mib() * 2**20)
            counted.update({k: int(v * 2**20) for k, v in rss_parts_mib().items()})
        return real_step(*a, **kw)

    phases = PhaseRSS()
    engine.forward = phases.wrap("forward", engine.forward)
    engine.backward = phases.wrap("backward", engine.backward)
    engine.step = phases.wrap("optimizer step", step_and_count)
    trainer.ema.update = phases.wrap("EMA update", trainer.ema.update)
    return phases, counted


def worker(args: argparse.Namespace) -> int:
    """One rank: build the Trainer, run warm-up + timed `train_step`s, print a JSON result line."""
    import torch

    torch.set_num_threads(1)  # two processes on two cores: oversubscription makes steps ~20x slower
    from dtr_scale.config import load_config
    from dtr_scale.train.engine import Trainer

    baseline = rss_mib()
    cfg = load_config(args.config, overrides_for(args, args.stage, args.manifest, args.run_dir))
    trainer = Trainer(cfg)
    if args.share_fp32_master:
        share_zero3_fp32_master(trainer.engine.optimizer)
    built_rss = rss_mib()
    cuda = trainer.device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats(trainer.device)
    batches = iter(trainer.stream)
    phases, counted = instrument(trainer, args.warmup)
    times = []
    for step in range(args.warmup + args.steps):
        if step == args.warmup:
            phases.peaks.clear()  # the timed steps only: the warm-up's first step creates Adam's states
        if cuda:
            torch.cuda.synchronize(trainer.device)
        start = time.perf_counter()
        if not trainer.train_step(batches):
            raise RuntimeError(f"step {step + 1} was skipped (non-finite loss): the timing would be wrong")
        trainer.step += 1
        if cuda:
            torch.cuda.synchronize(trainer.device)
        if step >= args.warmup:
            times.append(time.perf_counter() - start)
    result = {
        "rank": trainer.rank,
        "device": f"{trainer.device.type} {trainer.precision}",
        "params": sum(p.numel() for p in trainer.module.model.parameters()),
        "times": times,
        "baseline_mib": baseline,
        "built_mib": built_rss,
        "peak_mib": torch.cuda.max_memory_allocated(trainer.device) / 2**20 if cuda else peak_rss_mib(),
        "phase_peaks_mib": phases.stop(),
        "tensor_bytes": counted,
    }
    if cfg.deepspeed.zero_stage == 3:  # parameters are partitioned: count from DeepSpeed's full sizes
        result["params"] = sum(getattr(p, "ds_numel", p.numel()) for p in trainer.module.model.parameters())
    print(RESULT_TAG, json.dumps(result), flush=True)
    return 0
