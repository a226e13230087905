"""Expected errors are one clear line on rank 0 and a non-zero exit on every rank, never a traceback."""

from __future__ import annotations

import subprocess
import sys

import pytest
from distributed import REPO, free_port, rank_env


def _ranks(args: list[str], world_size: int = 2) -> list[subprocess.CompletedProcess]:
    port = free_port()
    procs = [
        subprocess.Popen([sys.executable, "-m", "dtr_scale", *args], env=rank_env(r, world_size, port),
                         cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for r in range(world_size)
    ]  # fmt: skip
    return [subprocess.CompletedProcess(p.args, p.wait(timeout=240), *p.communicate()) for p in procs]


@pytest.mark.multiprocess
@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["train", "--config", "configs/nope.yaml"], "config file configs/nope.yaml does not exist"),
        (["train", "--config", "configs/demo-cpu.yaml", "train.lr=-1"], "train.lr must be > 0, got -1"),
        (
            ["train", "--config", "configs/demo-cpu.yaml", "train.micro_batch_size=128"],
            "train.global_batch_size (128) is not divisible by train.micro_batch_size (128) x world size (2)",
        ),
        (
            [
                "train",
                "--config",
                "configs/demo-cpu.yaml",
                "data.shards=/nonexistent/manifest.json",
                "train.micro_batch_size=64",
            ],
            "/nonexistent/manifest.json: no such manifest",
        ),
        (["convert", "/nonexistent-run", "--out", "/tmp/x"], "nonexistent-run"),
        (["sample", "--model", "/nonexistent-model", "--out", "/tmp/x"], "nonexistent-model"),
    ],
)
def test_expected_errors_are_one_line_on_rank_0_and_exit_2_everywhere(args, message):
    results = _ranks(args)
    assert [r.returncode for r in results] == [2, 2], [r.stderr[-2000:] for r in results]
    lines = [line for line in results[0].stderr.splitlines() if "error" in line.lower()]
    assert any(message in line for line in lines), results[0].stderr[-2000:]
    for r in results:
        assert "Traceback" not in r.stderr and "Traceback" not in r.stdout
    assert message not in results[1].stderr  # rank 1 stays quiet: one line, not one per rank
