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

`--routing both` adds DTR off/on as a third axis (the table then compares DTR's cost side by side); `--syncs` first
counts the host syncs per optimizer step of a short run on the device, as tests/test_step_syncs.py does (calls of
`.item()`, `bool()`, `float()`, `.tolist()`, `.numpy()`, `.cpu()` made from dtr_scale's step code), and on CUDA also
every synchronizing CUDA operation torch reports in `torch.cuda.set_sync_debug_mode("warn")`, by origin (dtr_scale,
deepspeed, torch, other); at gradient accumulation 1 and 4. `--json FILE` writes every result as it comes;
`--deadline EPOCH_S` and `--setting-timeout S` stop a setting that would run past them (it is reported as timed out)
and skip those that would start after the deadline (bench/device_check.sh runs it time-boxed).

    bash bench/gpu.sh                                  # = python bench/gpu.py --append (results into RESULTS.md)
    python bench/gpu.py --model-overrides model.depth=4 --steps 12 --device cpu   # smoke test anywhere
    python bench/gpu.py --zero 2 --routing both --syncs --json gpu.json   # what device_check.sh runs

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
import time
from pathlib import Path

from common import REPO, append_results, last_logged_step, read_metrics, single_rank_env, stop, write_json


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
    parser.add_argument(
        "--routing",
        choices=("config", "on", "off", "both"),
        default="config",
        help="DTR on/off (config: as is)",
    )
    parser.add_argument("--syncs", action="store_true", help="first count host syncs per optimizer step")
    parser.add_argument("--syncs-only", action="store_true", help="count host syncs and stop")
    parser.add_argument("--json", default=None, help="write every result to this JSON file as it comes")
    parser.add_argument("--deadline", type=float, default=None, help="epoch seconds: nothing runs past it")
    parser.add_argument("--setting-timeout", type=float, default=None, help="seconds per setting at most")
    return parser.parse_args(argv)


def start_process(command: list[str], env: dict) -> subprocess.Popen:
    return subprocess.Popen(
        command, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )


def finish_process(proc: subprocess.Popen, timeout: float | None) -> tuple[int | None, str]:
    """(exit status, or None when stopped at `timeout`; output). A stopped process gets SIGTERM (torchrun passes
    it on to its workers), then SIGKILL 20 s later."""
    try:
        output, _ = proc.communicate(timeout=timeout)
        return proc.returncode, output
    except subprocess.TimeoutExpired:
        return None, stop(proc, grace=20, drain=True)  # (communicate keeps what it read before the timeout)


def run_until_logged(
    command: list[str], env: dict, metrics_path: Path, steps: int, timeout: float | None
) -> tuple[int | None, str]:
    """Run a training command until its metrics.jsonl logs `steps`, then stop it (SIGTERM): (0, output) when it
    got there, (None, output) when `timeout` came first, (its exit status, output) when it ended before."""
    import threading

    proc = start_process(command, env)
    chunks: list[str] = []
    reader = threading.Thread(target=lambda: chunks.extend(proc.stdout), daemon=True)
    reader.start()
    stop_at = None if timeout is None else time.time() + timeout
    reached = False
    while proc.poll() is None:
        if last_logged_step(metrics_path) >= steps:
            reached = True
            break
        if stop_at is not None and time.time() > stop_at:
            break
        time.sleep(0.5)
    stop(proc, grace=20)
    reader.join(timeout=5)
    output = "".join(chunks)
    if reached or last_logged_step(metrics_path) >= steps:
        return 0, output
    return (proc.returncode if stop_at is None or time.time() <= stop_at else None), output


def run_time_boxed(command: list[str], env: dict, timeout: float | None) -> tuple[int | None, str]:
    """finish_process of `command` started now."""
    return finish_process(start_process(command, env), timeout)


def time_left(args) -> float | None:
    """Seconds a setting may run: the smaller of --setting-timeout and what is left before --deadline."""
    limits = [args.setting_timeout] if args.setting_timeout else []
    if args.deadline is not None:
        limits.append(args.deadline - time.time())
    return min(limits) if limits else None


SYNC_SCRIPT = r"""
import json, os, sys
from bench.host_syncs import count_host_syncs
from dtr_scale.config import load_config
from dtr_scale.train.engine import Trainer

out_path, config, overrides = sys.argv[1], sys.argv[2], sys.argv[3:]
tr = Trainer(load_config(config, overrides))
batches = iter(tr.stream)
for _ in range(2):  # warm-up: first-use set-up is not what is counted
    assert tr.train_step(batches)
report = count_host_syncs(tr, batches, steps=5)
if tr.rank == 0:
    with open(out_path, "w") as fh:
        json.dump(report, fh)
# not through interpreter exit while gloo threads still release tensors (as tests/distributed.py's leave())
sys.stdout.flush()
sys.stderr.flush()
os._exit(0)
"""


def count_syncs(args, device: str, work: Path) -> dict:
    """Host syncs per optimizer step of a short DTR + ANT-UW run on the built-in digits, at accumulation 1 and 4."""
    from dtr_scale.data.builtin import prepare_builtin

    manifest = prepare_builtin(work / "digits", image_size=16)["train"]
    runs = {}
    for micro in (16, 4):  # both at once: nothing is timed here
        out = work / f"syncs-micro{micro}.json"
        overrides = [
            f"run_dir={work / f'syncs-micro{micro}'}", f"data.shards={manifest}", "deepspeed.zero_stage=2",
            "train.global_batch_size=16", f"train.micro_batch_size={micro}", "train.max_steps=1000",
            "train.checkpoint_every=1000000", "monitor.sample_every=0", "eval.every=0", "monitor.progress=false",
            "monitor.tensorboard=false", "data.num_workers=0", "routing.enabled=true", "mtl.method=uw",
            f"train.precision={'bf16' if device == 'cuda' else 'fp32'}",
        ]  # fmt: skip
        command = [
            sys.executable,
            "-c",
            SYNC_SCRIPT,
            str(out),
            str(REPO / "configs/demo-cpu.yaml"),
            *overrides,
        ]
        runs[micro] = (out, start_process(command, single_rank_env(device)))
    results = {}
    for micro, (out, proc) in runs.items():
        code, output = finish_process(proc, time_left(args))
        key = f"accumulation_{16 // micro}"
        if not out.is_file():  # (the file is the result: an exit status after it was written does not matter)
            results[key] = {"error": "timed out" if code is None else output[-1500:]}
            continue
        report = json.loads(out.read_text())
        steps = report["steps"]
        results[key] = {
            "accumulation": report["accumulation"],
            "dtr_scale_calls_per_step": sum(report["calls"].values()) / steps,
            "dtr_scale_call_sites": report["calls"],
            "cuda_sync_debug": report["cuda_sync_debug"],
            "device_syncs_per_step": {k: v / steps for k, v in report["device_syncs"].items()},
            "device_sync_sites": report["device_sync_sites"],
        }
    return results


def run_setting(
    args,
    manifest: Path,
    zero: int,
    compiled: bool,
    gpus: int,
    device: str,
    work: Path,
    routing: bool | None = None,
) -> dict:
    run_dir = work / f"zero{zero}-compile{int(compiled)}-routing{routing}"
    overrides = [
        f"run_dir={run_dir}", f"data.shards={manifest}", f"deepspeed.zero_stage={zero}",
        f"model.compile={str(compiled).lower()}", f"train.micro_batch_size={args.micro_batch}",
        f"train.global_batch_size={args.micro_batch * gpus}", "train.max_steps=1000000",
        "train.log_every=1", "train.checkpoint_every=1000000", "monitor.sample_every=0", "eval.every=0",
        "monitor.progress=false", "monitor.tensorboard=false", "data.num_workers=2",
        f"train.precision={'bf16' if device == 'cuda' else 'fp32'}", *args.model_overrides,
    ]  # fmt: skip
    if routing is not None:
        overrides.append(f"routing.enabled={str(routing).lower()}")
    if gpus == 1:  # one process: no launcher, so a time-boxed stop reaches the trainer itself
        command = [sys.executable, "-m", "dtr_scale", "train", "--config", args.config, *overrides]
        env = single_rank_env(device)
    else:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={gpus}",
                   "-m", "dtr_scale", "train", "--config", args.config, *overrides]  # fmt: skip
        env = {**os.environ, "DS_ACCELERATOR": device}
    started = time.time()
    # Stopped once --steps are logged: the checkpoint a run writes at its last step (12 GB for XL/2) is not
    # what is measured here and would cost seconds to minutes of the budget.
    code, output = run_until_logged(command, env, run_dir / "metrics.jsonl", args.steps, time_left(args))
    if code is not None and code != 0:
        return {"error": output[-1500:], "timed_out": False, "seconds": round(time.time() - started, 1)}
    if code is None:
        return {"error": "timed out", "timed_out": True, "seconds": round(time.time() - started, 1)}
    metrics = [m for m in read_metrics(run_dir / "metrics.jsonl") if m["step"] <= args.steps]
    timed = [m for m in metrics if m["step"] > args.warmup] or metrics[-1:]

    def median(key: str) -> float | None:
        values = [m[key] for m in timed if key in m]
        return statistics.median(values) if values else None

    shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)
    return {
        "img_s_per_gpu": median("perf/img_per_s_per_device"),
        "mfu": median("perf/mfu"),
        "peak_gib": max(
            (m["memory/max_allocated_gib"] for m in timed if "memory/max_allocated_gib" in m), default=None
        ),
        "rss_gib": median("memory/rss_gib"),
        "step_time_s": median("perf/step_time_s"),
        "timed_steps": len(timed),
        "seconds": round(time.time() - started, 1),
    }


def device_name(device: str) -> str:
    if device == "cuda":
        import torch

        return f"{torch.cuda.device_count()} x {torch.cuda.get_device_name(0)}"
    return f"CPU ({os.cpu_count()} cores)"


def table(rows: list[tuple]) -> str:
    """Markdown table of (zero, compiled, result) or (zero, compiled, routing, result) rows."""
    with_routing = any(len(row) == 4 for row in rows)
    lines = [
        "| ZeRO | compile |" + (" DTR |" if with_routing else "")
        + " images/s per GPU | MFU (2xMAC FLOPs) | MFU (DiT-paper MACs) | peak GiB per GPU |",
        "|---|---|" + ("---|" if with_routing else "") + "---|---|---|---|",
    ]  # fmt: skip
    for row in rows:
        zero, compiled, r = row[0], row[1], row[-1]
        dtr = (" " + {True: "on", False: "off", None: "config"}[row[2]] + " |") if with_routing else ""
        if "error" in r:
            reason = (r["error"].strip().splitlines() or ["?"])[-1][:80]
            lines.append(f"| {zero} | {'on' if compiled else 'off'} |{dtr} failed: {reason} | | | |")
            continue
        mfu = r["mfu"]
        mfu_text = f"{100 * mfu:.1f}%" if mfu is not None else "-"
        paper = f"{50 * mfu:.1f}%" if mfu is not None else "-"
        peak = r["peak_gib"] if r["peak_gib"] else r["rss_gib"]
        lines.append(f"| {zero} | {'on' if compiled else 'off'} |{dtr} {r['img_s_per_gpu']:.1f} | {mfu_text} | "
                     f"{paper} | {peak:.2f} |")  # fmt: skip
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    gpus = args.gpus or (max(1, torch.cuda.device_count()) if device == "cuda" else 1)
    compiles = {"off": [False], "on": [True], "both": [False, True]}[args.compile]
    routings = {"config": [None], "on": [True], "off": [False], "both": [True, False]}[args.routing]
    from loader import write_synthetic_shards

    document: dict = {"device": device_name(device), "gpus": gpus, "settings": []}

    def save() -> None:
        if args.json:
            write_json(Path(args.json), document)

    with tempfile.TemporaryDirectory(prefix="dtr-gpu-bench-") as tmp:
        work = Path(tmp)
        if args.syncs or args.syncs_only:
            print("host syncs per optimizer step ...", flush=True)
            document["syncs"] = count_syncs(args, device, work)
            save()
            print(json.dumps(document["syncs"], indent=1), flush=True)
            if args.syncs_only:
                return
        (work / "data").mkdir()
        manifest = write_synthetic_shards(work / "data", num_shards=max(4, 2 * gpus), shard_size=256)
        rows = []
        for zero in args.zero:
            for compiled in compiles:
                for routing in routings:
                    name = f"ZeRO-{zero}, compile {'on' if compiled else 'off'}, DTR {routing}"
                    left = time_left(args)
                    if left is not None and left < 5:
                        result = {"error": "skipped: no time left before the deadline", "skipped": True}
                    else:
                        print(f"{name} ...", flush=True)
                        result = run_setting(args, manifest, zero, compiled, gpus, device, work, routing)
                    print(f"{name}: {json.dumps(result)[:400]}", flush=True)
                    rows.append((zero, compiled, routing, result) if args.routing != "config" else
                                (zero, compiled, result))  # fmt: skip
                    document["settings"].append(
                        {"zero": zero, "compile": compiled, "routing": routing, **result}
                    )
                    save()
    command = "python bench/gpu.py " + " ".join(argv if argv is not None else sys.argv[1:])
    report = (
        f"\n## Training throughput on {device_name(device)} ({datetime.date.today().isoformat()})\n\n"
        f"```\n{command}\n```\n\n{Path(args.config).name} {' '.join(args.model_overrides)}, micro-batch "
        f"{args.micro_batch} per GPU, {gpus} process(es), steps {args.warmup + 1}..{args.steps} timed "
        "(medians of per-step figures).\n\n" + table(rows) + "\n"
    )
    print(report)
    if args.append:
        append_results(report)


if __name__ == "__main__":
    main()
