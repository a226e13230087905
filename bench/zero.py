"""Step time and peak memory per rank of the real DeepSpeed trainer under ZeRO 0, 1, 2 and 3.

For each stage, launches `--world-size` ranks on 127.0.0.1 (the five torch.distributed variables, one
thread per process, gloo on CPU / NCCL on CUDA) that each build `dtr_scale.train.engine.Trainer` from
`configs/demo-cpu.yaml` plus overrides (model size, micro-batch, fp32, the stage) on the built-in MNIST
latents (4x16x16), then call `Trainer.train_step` in a loop: no checkpoints, sampling or logging in the
timed region. The step time is the median over `--steps` steps after `--warmup` untimed ones, taken on
rank 0 (every step ends in collectives, so the ranks move in lock-step). Memory per rank:

- CPU, two figures per rank: the psutil peak (the launcher polls `psutil.Process(pid).memory_info().rss`
  of each rank's process from a thread in the parent every `--poll-ms` ms, from start to exit: what an
  outside observer such as a job scheduler sees) and `ru_maxrss` (the kernel's high-water mark, read by
  the rank itself at the end; it also catches a spike shorter than the poll interval). Both include the
  Python interpreter, torch and DeepSpeed themselves; the "baseline" column is the RSS just before the
  Trainer was built, so peak - baseline is what the model, optimizer, EMA and activations added.
- CUDA: `torch.cuda.max_memory_allocated` (tensors only) on each rank's device (and the psutil peak of
  the host process).

Prints three markdown tables: time and peak memory with the ratio of each stage's peak to ZeRO-0's
(when ZeRO-0 is among `--stages`); where the peak falls (the highest RSS rank 0 reached in each phase
of the timed steps: forward, backward, the optimizer step, the EMA update; sampled every 2 ms by a
thread in the rank); and the tensor bytes rank 0 holds by kind (`tensor_bytes`: parameters, gradients,
optimizer states = the model states; EMA; reduce buckets; other) next to its RSS at the same moment, split
into file-backed pages (the code of the interpreter and libraries) and anonymous memory, whose excess over
the tensors is Python's own objects plus the allocator's slack (freed blocks not yet returned).

    OMP_NUM_THREADS=1 python bench/zero.py                                  # DiT-S/2 (h384, d12)
    OMP_NUM_THREADS=1 python bench/zero.py --hidden 128 --depth 4 --heads 4 --steps 3 --stages 1 3
    # the ZeRO-3 memory goal (bench/RESULTS.md 4c): 129.6M DiT, world 2, micro-batch 4, ZeRO-0 vs ZeRO-3
    OMP_NUM_THREADS=1 python bench/zero.py --hidden 768 --depth 12 --heads 12 --micro-batch 4 \
        --steps 2 --warmup 1 --stages 0 3 --timeout 1200
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
import threading
import time
from pathlib import Path

from common import REPO, rank_env
from zero_rank import CATEGORIES, PHASES, RESULT_TAG, worker

from dtr_scale.distributed import free_port

HEADER = (
    "| ZeRO | world | model | params | micro-batch | device | ms/step (median) | ms/step (min-max) "
    "| psutil peak rank 0 / 1 (MiB) | ru_maxrss rank 0 / 1 (MiB) | vs ZeRO-0 (psutil / ru_maxrss, max over ranks) "
    "| baseline RSS (MiB) |\n"
    "|---|---|---|---|---|---|---|---|---|---|---|---|"
)
CUDA_HEADER = (
    "| ZeRO | world | model | params | micro-batch | device | ms/step (median) | ms/step (min-max) "
    "| psutil peak rank 0 / 1 (MiB) | max_memory_allocated rank 0 / 1 (MiB) | vs ZeRO-0 (psutil / allocated) "
    "| baseline RSS (MiB) |\n"
    "|---|---|---|---|---|---|---|---|---|---|---|---|"
)
PHASE_HEADER = (
    "| ZeRO | world | RSS after build (MiB) | "
    + " | ".join(f"peak in {p} (MiB)" for p in PHASES)
    + " |\n|---|---|---|"
    + "---|" * len(PHASES)
)
TENSOR_HEADER = (
    "| ZeRO | world | device | parameters (MiB) | gradients (MiB) | optimizer states (MiB) "
    "| model states (MiB) | vs ZeRO-0 | EMA (MiB) | reduce buckets (MiB) | other tensors (MiB) | all tensors (MiB) "
    "| RSS then (MiB) | of which file-backed (MiB) | anonymous RSS - tensors (MiB) |\n"
    "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"
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
    parser.add_argument(
        "--poll-ms", type=float, default=10, help="psutil poll interval of the ranks' RSS (ms)"
    )
    parser.add_argument(
        "--share-fp32-master",
        action="store_true",
        help="ZeRO-3 fp32: call share_zero3_fp32_master after the Trainer is built (DeepSpeed's "
        "duplicate fp32 master partition freed); off = the Trainer exactly as shipped",
    )
    parser.add_argument("--config", type=Path, default=REPO / "configs/demo-cpu.yaml")
    parser.add_argument("overrides", nargs="*", help="extra key.sub=value config overrides")
    # Internal: run as one rank (set by the launcher part of this script).
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--manifest", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--run-dir", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--stage", type=int, default=None, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def launch_stage(args: argparse.Namespace, stage: int, manifest: Path, run_dir: Path) -> list[dict]:
    """Run `--world-size` worker ranks for one ZeRO stage; their result dicts in rank order."""
    port = free_port()
    worker_args = [
        sys.executable, str(Path(__file__).resolve()), "--worker", "--stage", str(stage),
        "--manifest", str(manifest), "--run-dir", str(run_dir),
        "--model", args.model, "--hidden", str(args.hidden), "--depth", str(args.depth),
        "--heads", str(args.heads), "--micro-batch", str(args.micro_batch), "--steps", str(args.steps),
        "--warmup", str(args.warmup), "--precision", args.precision, "--world-size", str(args.world_size), "--config", str(args.config),
        *(["--share-fp32-master"] if args.share_fp32_master else []), *args.overrides,
    ]  # fmt: skip
    procs = []
    for rank in range(args.world_size):
        env = rank_env(rank, args.world_size, port, {"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"})
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
    poller = RSSPoller([p.pid for p in procs], args.poll_ms / 1e3)
    try:
        outputs = [p.communicate(timeout=args.timeout)[0] for p in procs]
    except subprocess.TimeoutExpired:
        poller.stop()
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
    for result, peak in zip(results, poller.stop()):
        result["psutil_peak_mib"] = peak
    return results


class RSSPoller:
    """The peak RSS of each of `pids`, polled with psutil from a thread of this (the launcher) process
    every `interval` s until `stop()`, which returns the peaks in MiB in the order of `pids`."""

    def __init__(self, pids: list[int], interval: float) -> None:
        import psutil

        self._procs = [psutil.Process(pid) for pid in pids]
        self._peaks = [0] * len(pids)
        self._interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        import psutil

        while True:
            for i, proc in enumerate(self._procs):
                try:
                    self._peaks[i] = max(self._peaks[i], proc.memory_info().rss)
                except (psutil.NoSuchProcess, psutil.ZombieProcess, psutil.AccessDenied):
                    pass  # exited (or a zombie until communicate() reaps it): its peak is already recorded
            if self._stop.wait(self._interval):
                return

    def stop(self) -> list[float]:
        self._stop.set()
        self._thread.join()
        return [peak / 2**20 for peak in self._peaks]


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
        stage_results = []
        for stage in args.stages:
            begin = time.perf_counter()
            results = launch_stage(args, stage, manifest, Path(tmp) / f"run-zero{stage}")
            stage_results.append((stage, results))
            print(f"ZeRO-{stage}: done in {time.perf_counter() - begin:.0f} s", file=sys.stderr, flush=True)
    print(format_tables(args, stage_results))
    if args.share_fp32_master:
        print(
            "\n(--share-fp32-master: ZeRO-3's duplicate fp32 master partitions were shared with the module's)"
        )
    return 0


def _per_rank(results: list[dict], key: str) -> str:
    return " / ".join(f"{r[key]:.0f}" for r in results)


def format_tables(args: argparse.Namespace, stage_results: list[tuple[int, list[dict]]]) -> str:
    """The three markdown tables of a run (module docstring), from each stage's per-rank result dicts."""
    cuda = stage_results[0][1][0]["device"].startswith("cuda")
    base = next((results for stage, results in stage_results if stage == 0), None)
    lines = [CUDA_HEADER if cuda else HEADER]
    for stage, results in stage_results:
        times = results[0]["times"]
        ratio = "-"
        if base is not None:
            psutil_ratio = max(r["psutil_peak_mib"] for r in results) / max(
                r["psutil_peak_mib"] for r in base
            )
            own_ratio = max(r["peak_mib"] for r in results) / max(r["peak_mib"] for r in base)
            ratio = f"{psutil_ratio:.3f}x / {own_ratio:.3f}x"
        model = f"{args.model} h{args.hidden} d{args.depth}"
        lines.append(
            f"| {stage} | {args.world_size} | {model} | {results[0]['params'] / 1e6:.1f}M | "
            f"{args.micro_batch} | {results[0]['device']} | {1e3 * statistics.median(times):.0f} | "
            f"{1e3 * min(times):.0f}-{1e3 * max(times):.0f} | {_per_rank(results, 'psutil_peak_mib')} | "
            f"{_per_rank(results, 'peak_mib')} | {ratio} | {results[0]['baseline_mib']:.0f} |"
        )
    lines += [
        "",
        "Highest RSS of rank 0 in each phase of the timed steps (sampled every 2 ms in the rank)",
        "",
    ]
    lines.append(PHASE_HEADER)
    for stage, results in stage_results:
        peaks = results[0]["phase_peaks_mib"]
        cells = " | ".join(f"{peaks[p]:.0f}" if p in peaks else "-" for p in PHASES)
        lines.append(f"| {stage} | {args.world_size} | {results[0]['built_mib']:.0f} | {cells} |")
    lines += [
        "",
        "Tensor bytes held by rank 0 after the last backward of the first timed step (bench/zero_rank.py tensor_bytes),",
        "and its RSS at that moment",
        "",
        TENSOR_HEADER,
    ]
    base_states = None
    for stage, results in stage_results:
        result = results[0]
        b = {k: v / 2**20 for k, v in result["tensor_bytes"].items()}
        states = b["parameters"] + b["gradients"] + b["optimizer states"]
        base_states = states if stage == 0 and base_states is None else base_states
        ratio = f"{states / base_states:.2f}x" if base_states else "-"
        tensors = sum(b[c] for c in CATEGORIES)
        lines.append(
            f"| {stage} | {args.world_size} | {result['device']} | {b['parameters']:.0f} | {b['gradients']:.0f} | "
            f"{b['optimizer states']:.0f} | {states:.0f} | {ratio} | {b['ema']:.0f} | {b['buckets']:.0f} | "
            f"{b['other']:.0f} | "
            f"{tensors:.0f} | {b['rss']:.0f} | {b.get('RssFile', 0):.0f} | "
            f"{b.get('RssAnon', b['rss']) - tensors:.0f} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
