"""GPU first light: one time-boxed command that checks a GPU machine end to end and measures it.

    make device-wheels                                   # here: what the GPU machine lacks, into the ignored .whl/
    bash bench/device_check.sh OUT_DIR                   # there (<= 9 min on one H200; carry [".whl"])
    bash bench/device_check.sh --cpu-smoke OUT_DIR       # anywhere: the same script on CPU, tiny sizes (< 3 min)

bench/device_check.sh installs the carried wheels with `pip install --target` into a temporary folder (step
`install`), then runs the steps below, each under `timeout` so that a slow one cannot eat the others' time, and
finally `report`. This file is the command line; each part lives in its own module:

    device_smoke.py    step cuda_smoke: tests marked `cuda`, train + kill-and-resume + convert at ZeRO-1/2/3, sample
    device_speed.py    step gpu_bench: DiT-XL/2 images/s, MFU, peak memory (bench/gpu.py), host syncs per step
    device_race.py     step convergence: vanilla / DTR / ANT-UW / DTR+UW on the digits at DiT-S/2 width
    device_report.py   the output, written down once (`template()`, `SCHEMA`), and device_check.json / .md
    device_wheels.py   what `make device-wheels` calls: `pins`, `pack-inception`, `size`

With --cpu-smoke every step runs on the CPU with tiny sizes from the project venv (no .whl/ needed; the convergence
race trains one seed per variant for 4 steps), and torch.compile settings are listed as skipped (a cold compile
takes minutes on 2 cores; tests/test_dit.py covers it in `make test-slow`).

Output, in OUT_DIR (the GPU machine returns at most 8 files, at most 2 folders deep): device_check.json (every key:
device_report.template()), device_check.md, convergence.png, samples.png, logs/install.log, logs/cuda_smoke.log,
logs/gpu_bench.log, logs/convergence.log.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from device_report import STEPS, report
from device_wheels import CARRY_LIMIT_MIB, pack_inception, pins, tree_mib


def deterministic_main(argv: list[str]) -> None:
    """`device_check.py deterministic MODULE ARGS...`: run `python -m MODULE ARGS` with deterministic algorithms."""
    import runpy

    import torch
    import torch.utils.deterministic

    torch.use_deterministic_algorithms(True, warn_only=True)
    # Deterministic mode also fills fresh memory with NaN; DeepSpeed's padded flat buffers must not read as NaN.
    torch.utils.deterministic.fill_uninitialized_memory = False
    sys.argv = [argv[0], *argv[1:]]
    runpy.run_module(argv[0], run_name="__main__", alter_sys=True)


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    step = sub.add_parser("step", help="run one step (device_check.sh runs each under timeout)")
    step.add_argument("name", choices=STEPS[1:])
    written = sub.add_parser("report", help="write OUT/device_check.json and .md from the steps' results")
    for p in (step, written):
        p.add_argument("--work", required=True, type=Path)
        p.add_argument("--out", required=True, type=Path)
        p.add_argument("--cpu-smoke", action="store_true")
    written.add_argument("--started", type=float, required=True)
    written.add_argument("--budget", type=float, required=True)
    sub.add_parser("pins", help="NAME==VERSION from this environment").add_argument("names", nargs="+")
    sub.add_parser("pack-inception", help="write the carried fp16 Inception").add_argument("path", type=Path)
    sub.add_parser("size", help="MiB a `run` call would carry (working tree + .whl/)")
    return parser.parse_args(argv)


def run_step(name: str, work: Path, out: Path, smoke: bool) -> int:
    """One step, imported only when it runs (the report and the wheel helpers need no step code)."""
    import torch

    torch.set_num_threads(1)
    if name == "cuda_smoke":
        from device_smoke import step_cuda_smoke as step
    elif name == "gpu_bench":
        from device_speed import step_gpu_bench as step
    else:
        from device_race import step_convergence as step
    return 0 if step(work, out, smoke).get("ok") else 1


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "deterministic":
        deterministic_main(argv[1:])
        return 0
    args = parse_args(argv)
    if args.command == "pins":
        print(pins(args.names))
    elif args.command == "pack-inception":
        pack_inception(args.path)
    elif args.command == "size":
        mib = tree_mib()
        print(f"carried: {mib:.1f} MiB (working tree + .whl/; limit {CARRY_LIMIT_MIB:g} MiB)")
        return 0 if mib < CARRY_LIMIT_MIB else 1
    elif args.command == "step":
        return run_step(args.name, args.work, args.out, args.cpu_smoke)
    elif args.command == "report":
        document = report(args.work, args.out, args.cpu_smoke, args.started, args.budget)
        print(json.dumps({s["name"]: s["status"] for s in document["steps"]}))
        print(f"{args.out / 'device_check.json'}; {args.out / 'device_check.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
