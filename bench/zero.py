"""Step time and peak memory per rank of the real DeepSpeed trainer under ZeRO 0, 1, 2 and 3.

For each stage, launches `--world-size` ranks on 127.0.0.1 (the five torch.distributed variables, one
thread per process, gloo on CPU / NCCL on CUDA) that each build `dtr_scale.train.engine.Trainer` from
`configs/demo-cpu.yaml` plus overrides (model size, micro-batch, fp32, the stage) on the built-in MNIST
latents (4x16x16), then call `Trainer.train_step` in a loop: no checkpoints, sampling or logging in the
timed region. The step time is the median over `--steps` steps after `--warmup` untimed ones, taken on
rank 0 (every step ends in collectives, so the ranks move in lock-step). Memory per rank:

- CPU: peak resident set size of the process (`resource.getrusage(RUSAGE_SELF).ru_maxrss`), which
  includes the Python interpreter, torch and DeepSpeed themselves; the "baseline" column is the RSS
  just before the Trainer was built, so peak - baseline is what the model, optimizer, EMA and
  activations added.
- CUDA: `torch.cuda.max_memory_allocated` (tensors only) on each rank's device.

Prints two markdown tables: time and peak memory, and the tensor bytes each rank holds by kind
(`tensor_bytes`: parameters, gradients, optimizer states = the model states; EMA; other).

    OMP_NUM_THREADS=1 python bench/zero.py                                  # DiT-S/2 (h384, d12)
    OMP_NUM_THREADS=1 python bench/zero.py --hidden 128 --depth 4 --heads 4 --steps 3 --stages 1 3
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from dtr_scale.distributed import free_port

REPO = Path(__file__).resolve().parents[1]
RESULT_TAG = "ZERO_BENCH_RESULT"

HEADER = (
    "| ZeRO | world | model | params | micro-batch | device | ms/step (median) | ms/step (min-max) "
    "| peak mem rank 0 (MiB) | peak mem rank 1 (MiB) | baseline RSS (MiB) |\n"
    "|---|---|---|---|---|---|---|---|---|---|---|"
)
TENSOR_HEADER = (
    "| ZeRO | world | device | parameters (MiB) | gradients (MiB) | optimizer states (MiB) "
    "| model states (MiB) | vs ZeRO-0 | EMA (MiB) | other tensors (MiB) |\n"
    "|---|---|---|---|---|---|---|---|---|---|"
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--stages", type=int, nargs="+", default=[0, 1, 2, 3], choices=[0, 1, 2, 3])
    parser.add_argument("--world-size", type=int, default=2, help="ranks on this machine")
    parser.add_argument("--model", default="DiT-S/2", help="model.name (patch size and defaults)")
    parser.add_argument("--hidden", type=int, default=384, help="model.hidden_size")
    parser.add_argument("--depth", type=int, default=12, help="model.depth")
    parser.add_argument("--heads", type=int, default=6, help="model.num_heads")
    parser.add_argument("--micro-batch", type=int, default=16, help="train.micro_batch_size per rank")
    parser.add_argument(
        "--precision", default="auto", choices=["auto", "fp32", "bf16"], help="auto: fp32 on CPU, bf16 on GPU"
    )
    parser.add_argument("--steps", type=int, default=5, help="timed optimizer steps")
    parser.add_argument("--warmup", type=int, default=1, help="untimed optimizer steps first")
    parser.add_argument("--data", type=Path, default=None, help="built-in data dir (default: a temp dir)")
    parser.add_argument("--timeout", type=float, default=600, help="seconds per stage before giving up")
    parser.add_argument("--config", type=Path, default=REPO / "configs/demo-cpu.yaml")
    parser.add_argument("overrides", nargs="*", help="extra key.sub=value config overrides")
    # Internal: run as one rank (set by the launcher part of this script).
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--manifest", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--run-dir", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--stage", type=int, default=None, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


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


def peak_rss_mib() -> float:
    import resource

    # ru_maxrss is in KiB on Linux (bytes on macOS).
    scale = 1.0 if sys.platform == "darwin" else 1024.0
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / 2**20


CATEGORIES = ("parameters", "gradients", "optimizer states", "ema", "other")


def tensor_bytes(trainer) -> dict[str, int]:
    """Bytes of every tensor storage this rank holds, by what holds it (each storage counted once).

    parameters: the module's parameters (at ZeRO-3 each one's local partition `ds_tensor`) and the
    optimizer's own copies of them (DeepSpeed's fp32 master partitions); gradients: `.grad` of both, and
    DeepSpeed's gradient partitions / buckets found as the tensors its optimizer holds under a name with
    "grad" in it; optimizer states: Adam's exp_avg / exp_avg_sq / step; ema: the sharded EMA; other:
    any other tensor the garbage collector can reach (buffers, communication buckets, data).
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
    claim(master, "parameters")
    claim([v for state in inner.state.values() for v in state.values()], "optimizer states")
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


def worker(args: argparse.Namespace) -> int:
    """One rank: build the Trainer, run warm-up + timed `train_step`s, print a JSON result line."""
    import torch

    torch.set_num_threads(1)  # two processes on two cores: oversubscription makes steps ~20x slower
    from dtr_scale.config import load_config
    from dtr_scale.train.engine import Trainer

    baseline = rss_mib()
    cfg = load_config(args.config, overrides_for(args, args.stage, args.manifest, args.run_dir))
    trainer = Trainer(cfg)
    cuda = trainer.device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats(trainer.device)
    batches = iter(trainer.stream)
    # Count the tensors at the step's fullest point: after the last backward, before the optimizer step
    # (gradients are whole there; ZeRO-0 frees them after the step), in the first timed step (Adam's
    # states are created by the first optimizer step).
    counted: dict[str, int] = {}
    real_step = trainer.engine.step

    def step_and_count(*a, **kw):
        if trainer.engine.is_gradient_accumulation_boundary() and trainer.step == args.warmup:
            counted.update(tensor_bytes(trainer))  # a step after the first: Adam's states exist
        return real_step(*a, **kw)

    trainer.engine.step = step_and_count
    times = []
    for step in range(args.warmup + args.steps):
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
        "peak_mib": torch.cuda.max_memory_allocated(trainer.device) / 2**20 if cuda else peak_rss_mib(),
        "tensor_bytes": counted,
    }
    if cfg.deepspeed.zero_stage == 3:  # parameters are partitioned: count from DeepSpeed's full sizes
        result["params"] = sum(getattr(p, "ds_numel", p.numel()) for p in trainer.module.model.parameters())
    print(RESULT_TAG, json.dumps(result), flush=True)
    return 0


def launch_stage(args: argparse.Namespace, stage: int, manifest: Path, run_dir: Path) -> list[dict]:
    """Run `--world-size` worker ranks for one ZeRO stage; their result dicts in rank order."""
    port = free_port()
    worker_args = [
        sys.executable, str(Path(__file__).resolve()), "--worker", "--stage", str(stage),
        "--manifest", str(manifest), "--run-dir", str(run_dir),
        "--model", args.model, "--hidden", str(args.hidden), "--depth", str(args.depth),
        "--heads", str(args.heads), "--micro-batch", str(args.micro_batch), "--steps", str(args.steps),
        "--warmup", str(args.warmup), "--precision", args.precision, "--world-size", str(args.world_size), "--config", str(args.config),
        *args.overrides,
    ]  # fmt: skip
    procs = []
    for rank in range(args.world_size):
        env = dict(os.environ)
        env.update(
            RANK=str(rank),
            WORLD_SIZE=str(args.world_size),
            LOCAL_RANK=str(rank),
            LOCAL_WORLD_SIZE=str(args.world_size),
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(port),
            OMP_NUM_THREADS="1",
            PYTHONPATH=str(REPO) + os.pathsep + env.get("PYTHONPATH", ""),
            HF_HUB_OFFLINE="1",
        )
        env.setdefault("DS_ACCELERATOR", "cpu" if not _cuda_available() else "cuda")
        procs.append(
            subprocess.Popen(
                worker_args,
                env=env,
                cwd=REPO,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
                start_new_session=True,
            )  # fmt: skip
        )
    try:
        outputs = [p.communicate(timeout=args.timeout)[0] for p in procs]
    except subprocess.TimeoutExpired:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
        raise RuntimeError(
            f"ZeRO-{stage}: ranks did not finish within --timeout {args.timeout:.0f} s"
        ) from None
    results = []
    for rank, (proc, out) in enumerate(zip(procs, outputs)):
        lines = [line for line in out.splitlines() if line.startswith(RESULT_TAG)]
        if proc.returncode != 0 or not lines:
            raise RuntimeError(
                f"ZeRO-{stage}: rank {rank} exited {proc.returncode}; its output:\n{out[-4000:]}"
            )
        results.append(json.loads(lines[-1][len(RESULT_TAG) :]))
    return results


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker:
        return worker(args)
    if args.steps < 1:
        raise SystemExit(f"--steps must be >= 1, got {args.steps}")
    from dtr_scale.data.builtin import prepare_builtin

    with tempfile.TemporaryDirectory(prefix="zero-bench-") as tmp:
        data_dir = args.data or Path(tmp) / "data"
        manifest = prepare_builtin(data_dir)["train"]
        rows, tensor_rows = [], []
        for stage in args.stages:
            begin = time.perf_counter()
            results = launch_stage(args, stage, manifest, Path(tmp) / f"run-zero{stage}")
            times = results[0]["times"]
            tensor_rows.append((stage, results[0]))
            peaks = " | ".join(f"{r['peak_mib']:.0f}" for r in results[:2])
            if len(results) < 2:
                peaks += " | -"
            model = f"{args.model} h{args.hidden} d{args.depth}"
            rows.append(
                f"| {stage} | {args.world_size} | {model} | {results[0]['params'] / 1e6:.1f}M | "
                f"{args.micro_batch} | {results[0]['device']} | {1e3 * statistics.median(times):.0f} | "
                f"{1e3 * min(times):.0f}-{1e3 * max(times):.0f} | {peaks} | {results[0]['baseline_mib']:.0f} |"
            )
            print(f"ZeRO-{stage}: done in {time.perf_counter() - begin:.0f} s", file=sys.stderr, flush=True)
    print(HEADER)
    print("\n".join(rows))
    print()
    print(
        "Tensor bytes held by rank 0 after the last backward of the first timed step (bench/zero.py tensor_bytes)"
    )
    print()
    print(TENSOR_HEADER)
    base = None
    for stage, result in tensor_rows:
        b = {k: v / 2**20 for k, v in result["tensor_bytes"].items()}
        states = b["parameters"] + b["gradients"] + b["optimizer states"]
        base = states if stage == 0 and base is None else base
        ratio = f"{states / base:.2f}x" if base else "-"
        print(
            f"| {stage} | {args.world_size} | {result['device']} | {b['parameters']:.0f} | {b['gradients']:.0f} | "
            f"{b['optimizer states']:.0f} | {states:.0f} | {ratio} | {b['ema']:.0f} | {b['other']:.0f} |"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
