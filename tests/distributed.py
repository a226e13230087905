"""Launch N local ranks of a command on 127.0.0.1 (gloo), the way torchrun would, for tests; `leave` ends a
rank of such a script."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import NoReturn

from dtr_scale.distributed import free_port

REPO = Path(__file__).resolve().parents[1]


def rank_env(rank: int, world_size: int, port: int, extra: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_RANK=str(rank),
        LOCAL_WORLD_SIZE=str(world_size),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        OMP_NUM_THREADS="1",
        DS_ACCELERATOR="cpu",
        PYTHONPATH=os.pathsep.join([str(REPO), str(REPO / "tests"), env.get("PYTHONPATH", "")]),
        HF_HUB_OFFLINE="1",
    )
    env.update(extra or {})
    return env


def launcher_env() -> dict[str, str]:
    """Environment for a launcher (torchrun, deepspeed) that sets the rank variables itself."""
    env = rank_env(0, 1, 0)
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key)
    return env


def leave() -> NoReturn:
    """The end of a rank's script: meet the other ranks, then exit without finalizing the interpreter.

    DeepSpeed keeps its process groups referenced (its engine, ZeRO-3 parameters), so destroy_process_group()
    cannot join their gloo worker threads, and a worker that has just completed a collective still drops its
    tensors afterwards, taking the GIL to release their Python objects. If it gets the GIL while the
    interpreter finalizes, CPython ends the thread (pthread_exit) and the unwinding through torch's noexcept
    decref aborts the rank: "terminate called without an active exception" after the work was done.
    os._exit never finalizes, so nothing is left to race it.
    """
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()  # no rank leaves while another still communicates
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def run_ranks(
    args: list[str],
    world_size: int = 2,
    env: dict[str, str] | None = None,
    timeout: float = 300,
    expect_kill: bool = False,
    cwd: Path | None = None,
) -> list[subprocess.CompletedProcess]:
    """Run `python ARGS` as `world_size` ranks; fail with every rank's output if one fails.

    expect_kill: rank 0 is expected to die by SIGKILL (fault injection); the others are then killed
    too, as a launcher would do, and no failure is raised.
    """
    port = free_port()
    procs = [
        subprocess.Popen(
            [sys.executable, *args],
            env=rank_env(r, world_size, port, env),
            cwd=cwd or REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
        for r in range(world_size)
    ]
    deadline = time.time() + timeout
    try:
        while any(p.poll() is None for p in procs):
            if time.time() > deadline:
                raise TimeoutError(f"ranks did not finish in {timeout} s: {args}")
            if expect_kill and procs[0].poll() is not None:
                for p in procs[1:]:
                    if p.poll() is None:
                        os.killpg(p.pid, signal.SIGKILL)
            time.sleep(0.1)
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
    results = [subprocess.CompletedProcess(p.args, p.wait(), p.stdout.read(), None) for p in procs]
    if expect_kill:
        if results[0].returncode != -signal.SIGKILL:
            raise AssertionError(
                f"rank 0 was expected to be SIGKILLed, exited {results[0].returncode}:\n{results[0].stdout}"
            )
        return results
    failed = [r for r, res in enumerate(results) if res.returncode != 0]
    if failed:
        report = "\n".join(
            f"--- rank {r} exited {results[r].returncode}:\n{results[r].stdout[-4000:]}" for r in failed
        )
        raise AssertionError(report)
    return results
