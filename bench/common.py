"""What the benchmarks here share, written once: where the repository is, the environment of a one-process rank,
processes stopped politely, a run's logged metrics, timing on a device, and results written atomically (through
dtr_scale.fileio) as JSON or appended to bench/RESULTS.md.

Every script in bench/ is run as `python bench/NAME.py ...` (its folder is then first on sys.path, so the
scripts import this module and each other by name); tests import them the same way.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "RESULTS.md"


def log(message: str) -> None:
    """One time-stamped line on stdout, flushed (logs of long jobs are read while they run)."""
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def tail(path: Path, chars: int = 2500) -> str:
    """The last `chars` characters of a text file ("" when it cannot be read)."""
    try:
        return Path(path).read_text(errors="replace")[-chars:]
    except OSError:
        return ""


def figure(value, unit: str) -> dict:
    """A measured figure with its unit: {"value": float or None where it cannot be had, "unit": text}."""
    return {"value": None if value is None else float(value), "unit": unit}


def write_json(path: Path, document) -> None:
    """`document` as indented JSON, written atomically (a reader never sees half a file)."""
    from dtr_scale.fileio import atomic_write_text

    atomic_write_text(path, json.dumps(document, indent=1, default=str))


def append_results(text: str) -> None:
    """Append a dated section to bench/RESULTS.md."""
    with open(RESULTS, "a") as fh:
        fh.write(text)


def rank_env(
    rank: int, world_size: int, port: int, extra: dict | None = None, tests: bool = False
) -> dict[str, str]:
    """The environment of rank `rank` of `world_size` processes on this machine started without a launcher: the
    torch.distributed variables (rendezvous at 127.0.0.1:`port`), the repository (and tests/, for the test hooks)
    importable, then `extra`."""
    env = dict(os.environ)
    paths = [str(REPO), *([str(REPO / "tests")] if tests else []), os.environ.get("PYTHONPATH", "")]
    env.update(
        RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world_size),
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), PYTHONPATH=os.pathsep.join(p for p in paths if p),
    )  # fmt: skip
    env.update(extra or {})
    return env


def single_rank_env(device: str, extra: dict | None = None, tests: bool = False) -> dict[str, str]:
    """`rank_env` of one process of world size 1 on a free port, with DeepSpeed's accelerator named."""
    from dtr_scale.distributed import free_port

    return rank_env(0, 1, free_port(), {"DS_ACCELERATOR": device, **(extra or {})}, tests)


def stop(*procs: subprocess.Popen, grace: float, drain: bool = False) -> str:
    """SIGTERM each process still running (a launcher passes it on to its workers), wait for them, SIGKILL what is
    left after `grace` seconds. drain=True (processes writing to pipes nobody else reads): read them meanwhile and
    return what they wrote."""
    for proc in procs:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    until = time.time() + grace
    output = ""
    for proc in procs:
        wait = proc.communicate if drain else proc.wait
        try:
            result = wait(timeout=max(0.0, until - time.time()))
        except subprocess.TimeoutExpired:
            proc.kill()
            result = wait()
        output += (result[0] or "") if drain else ""
    return output


def read_metrics(metrics_path: Path) -> list[dict]:
    """The records of a run's metrics.jsonl ([] before the first; a line still being written is left out)."""
    try:
        lines = Path(metrics_path).read_text().splitlines()
    except OSError:
        return []
    records = []
    for line in lines:
        try:
            records.append(json.loads(line))
        except ValueError:
            continue
    return records


def last_logged_step(metrics_path: Path) -> int:
    """The last step a run's metrics.jsonl holds (0 before the first)."""
    records = read_metrics(metrics_path)
    return int(records[-1]["step"]) if records else 0


def timed(fn: Callable[[], object], device) -> tuple[float, float]:
    """Wall-clock and process CPU seconds of `fn()`, with the device synchronised before and after."""
    import torch

    cuda = torch.device(device).type == "cuda"
    if cuda:
        torch.cuda.synchronize(device)
    start_wall, start_cpu = time.perf_counter(), time.process_time()
    fn()
    if cuda:
        torch.cuda.synchronize(device)
    return time.perf_counter() - start_wall, time.process_time() - start_cpu
