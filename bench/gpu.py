"""Throughput, MFU and peak memory of real training steps, per ZeRO stage, with and without torch.compile.

What `bench/gpu.sh` runs on a GPU box: for each ZeRO stage (1, 2, 3) and compile setting (off, on) it trains
DiT-XL/2 (bf16, DTR + ANT-UW: configs/dit-xl2-dtr-ant.yaml) on synthetic 4x32x32 latent shards through the
public CLI (`torchrun -m dtr_scale train`, all local GPUs, micro-batch 32 per GPU), and reads the run's own
metrics.jsonl after the warm-up steps:

- images/s per GPU: `perf/img_per_s_per_device` (median of the logged steps after warm-up);
- MFU: `perf/mfu`, i.e. 3 x the forward FLOPs per image x images/s / the GPU's dense bf16 peak. Convention:
  FLOPs = 2 x multiply-accumulates of the matmuls (DiT.flops_per_sample: 237.2 GFLOPs for XL/2 at 256^2).
  The DiT paper's "118.6 Gflops" for XL/2 counts multiply-accumulates, i.e. half of this; the table gives
  MFU in both conventions so either can be quoted;
- peak memory: `memory/max_allocated_gib` (torch's allocator, per GPU, rank 0).

    bash bench/gpu.sh                                  # = python bench/gpu.py --append (results into RESULTS.md)
    python bench/gpu.py --model-overrides model.depth=4 --steps 12 --device cpu   # smoke test anywhere

Nothing here is timed by assertions; the figures go to bench/RESULTS.md with the command, machine and date.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", default=str(REPO / "configs/dit-xl2-dtr-ant.yaml"))
    parser.add_argument("--micro-batch", type=int, default=32, help="per GPU")
    parser.add_argument("--steps", type=int, default=60, help="training steps per setting")
    parser.add_argument("--warmup", type=int, default=20, help="logged steps before this are not counted")
    parser.add_argument("--zero", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--compile", choices=("off", "on", "both"), default="both")
    parser.add_argument("--gpus", type=int, default=None, help="processes (default: all visible GPUs, or 1)")
    parser.add_argument("--device", choices=("cuda", "cpu"), default=None, help="default: cuda if present")
    parser.add_argument(
        "--model-overrides", nargs="*", default=[], help="extra key=value overrides (smoke tests)"
    )
    parser.add_argument("--append", action="store_true", help="append the table to bench/RESULTS.md")
    return parser.parse_args(argv)


def run_setting(args, manifest: Path, zero: int, compiled: bool, gpus: int, device: str, work: Path) -> dict:
    run_dir = work / f"zero{zero}-compile{int(compiled)}"
    overrides = [
        f"run_dir={run_dir}", f"data.shards={manifest}", f"deepspeed.zero_stage={zero}",
        f"model.compile={str(compiled).lower()}", f"train.micro_batch_size={args.micro_batch}",
        f"train.global_batch_size={args.micro_batch * gpus}", f"train.max_steps={args.steps}",
        "train.log_every=1", "train.checkpoint_every=1000000", "monitor.sample_every=0", "eval.every=0",
        "monitor.progress=false", "monitor.tensorboard=false", "data.num_workers=2",
        f"train.precision={'bf16' if device == 'cuda' else 'fp32'}", *args.model_overrides,
    ]  # fmt: skip
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={gpus}",
               "-m", "dtr_scale", "train", "--config", args.config, *overrides]  # fmt: skip
    env = {**os.environ, "DS_ACCELERATOR": device}
    result = subprocess.run(command, env=env, cwd=REPO, capture_output=True, text=True)
    if result.returncode != 0:
        return {"error": (result.stdout + result.stderr)[-1500:]}
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    timed = [m for m in metrics if m["step"] > args.warmup] or metrics[-1:]

    def median(key: str) -> float | None:
        values = [m[key] for m in timed if key in m]
        return statistics.median(values) if values else None

    shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)
    return {
        "img_s_per_gpu": median("perf/img_per_s_per_device"),
        "mfu": median("perf/mfu"),
        "peak_gib": max((m.get("memory/max_allocated_gib", 0.0) for m in timed), default=None),
        "rss_gib": median("memory/rss_gib"),
    }


def device_name(device: str) -> str:
    if device == "cuda":
        import torch

        return f"{torch.cuda.device_count()} x {torch.cuda.get_device_name(0)}"
    return f"CPU ({os.cpu_count()} cores)"


def table(rows: list[tuple[int, bool, dict]]) -> str:
    lines = [
        "| ZeRO | compile | images/s per GPU | MFU (2xMAC FLOPs) | MFU (DiT-paper MACs) | peak GiB per GPU |",
        "|---|---|---|---|---|---|",
    ]
    for zero, compiled, r in rows:
        if "error" in r:
            lines.append(
                f"| {zero} | {'on' if compiled else 'off'} | failed: {r['error'].splitlines()[-1][:80]} | | | |"
            )
            continue
        mfu = r["mfu"]
        mfu_text = f"{100 * mfu:.1f}%" if mfu is not None else "-"
        paper = f"{50 * mfu:.1f}%" if mfu is not None else "-"
        peak = r["peak_gib"] if r["peak_gib"] else r["rss_gib"]
        lines.append(f"| {zero} | {'on' if compiled else 'off'} | {r['img_s_per_gpu']:.1f} | {mfu_text} | {paper} | "
                     f"{peak:.2f} |")  # fmt: skip
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    gpus = args.gpus or (max(1, torch.cuda.device_count()) if device == "cuda" else 1)
    compiles = {"off": [False], "on": [True], "both": [False, True]}[args.compile]
    from loader import write_synthetic_shards

    with tempfile.TemporaryDirectory(prefix="dtr-gpu-bench-") as tmp:
        work = Path(tmp)
        (work / "data").mkdir()
        manifest = write_synthetic_shards(work / "data", num_shards=max(4, 2 * gpus), shard_size=256)
        rows = []
        for zero in args.zero:
            for compiled in compiles:
                print(f"ZeRO-{zero}, compile {'on' if compiled else 'off'} ...", flush=True)
                rows.append((zero, compiled, run_setting(args, manifest, zero, compiled, gpus, device, work)))
    command = "python bench/gpu.py " + " ".join(argv if argv is not None else sys.argv[1:])
    report = (
        f"\n## Training throughput on {device_name(device)} ({datetime.date.today().isoformat()})\n\n"
        f"```\n{command}\n```\n\n{Path(args.config).name} {' '.join(args.model_overrides)}, micro-batch "
        f"{args.micro_batch} per GPU, {gpus} process(es), steps {args.warmup + 1}..{args.steps} timed "
        "(medians of per-step figures).\n\n" + table(rows) + "\n"
    )
    print(report)
    if args.append:
        with open(REPO / "bench" / "RESULTS.md", "a") as fh:
            fh.write(report)


if __name__ == "__main__":
    main()
