"""A checkpoint that cannot be written (full disk, I/O error, a vanished mount) is one line naming the path, the
OS error and what is still safe, on every rank that met it; the run exits non-zero, `latest` stays where it
was and no half-written tag is left (ChatGLM-6B #1166, dolly #139: two C++ tracebacks, "basic_ios::clear" and
"inline_container.cc ... unexpected pos", naming neither the path nor the disk).

Where the error comes from: /dev/full, which answers every write with ENOSPC (a rank's DeepSpeed file made a
link to it: a real kernel error through DeepSpeed's real write path, no privileges needed); a real tmpfs of a
few hundred KiB filled by the run itself (needs mount rights: root); and, for the errors a disk cannot be made
to give on demand (EIO from a write or an fsync, ENOSPC on `latest`), an OSError raised at the file-write layer
by monkeypatching it in the process (the unit tests without DeepSpeed).
"""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from test_checkpoint import _FakeEngine
from test_cli_errors import _ranks
from test_train_distributed import read_metrics, train_args

from dtr_scale.checkpoint_format import read_latest
from dtr_scale.train import checkpoint
from dtr_scale.train.checkpoint import Checkpointer, TrainProgress
from dtr_scale.train.checkpoint_write import CheckpointWriteError, WriteFailures, guard_engine_writes


class _Stream:
    def state_dict(self):
        return {"position": 3}


def _checkpointer(tmp_path: Path) -> Checkpointer:
    return Checkpointer(tmp_path, _FakeEngine(0), {"progress": TrainProgress(step=5)}, {"stream": _Stream()})


def _fail_on(name: str, code: int):
    def fail(*args, **kwargs):
        raise OSError(code, os.strerror(code), f"/somewhere/{name}")

    return fail


def test_an_io_error_writing_state_is_one_line_and_latest_stays(tmp_path, monkeypatch):
    ckpt = _checkpointer(tmp_path)
    ckpt.save(5)
    monkeypatch.setattr(checkpoint, "write_state_file", _fail_on("rank00000.safetensors", errno.EIO))
    with pytest.raises(CheckpointWriteError) as caught:
        ckpt.save(10)
    assert str(caught.value) == (
        "rank 0: checkpoint step00000010 not written: /somewhere/rank00000.safetensors: [Errno 5] Input/output "
        f"error (EIO); latest stays at step 5 ({tmp_path}/checkpoints/step00000005), which a rerun resumes from"
    )
    assert caught.value.every_rank
    assert (tmp_path / "checkpoints/latest").read_text() == "step00000005"
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["latest", "step00000005"]


def test_an_fsync_error_is_a_failed_checkpoint_too(tmp_path, monkeypatch):
    # fsync is where a lost write-back surfaces (EIO); the file looked written until then
    real = checkpoint.fsync_path

    def fsync(path):
        if Path(path).name == "mp_rank_00_model_states.pt":
            raise OSError(errno.EIO, os.strerror(errno.EIO), str(path))
        real(path)

    monkeypatch.setattr(checkpoint, "fsync_path", fsync)
    with pytest.raises(CheckpointWriteError, match=r"mp_rank_00_model_states\.pt: \[Errno 5\] Input/output error "
                       r"\(EIO\); no checkpoint has been written yet \(a rerun starts from step 0\)"):  # fmt: skip
        _checkpointer(tmp_path).save(5)
    assert not (tmp_path / "checkpoints/latest").exists()
    assert not (tmp_path / "checkpoints/step00000005").exists()


def test_no_space_for_latest_keeps_the_old_latest_and_removes_the_new_tag(tmp_path, monkeypatch):
    from dtr_scale import fileio

    ckpt = _checkpointer(tmp_path)
    ckpt.save(5)
    monkeypatch.setattr(checkpoint, "atomic_write_text", _fail_on("checkpoints/.latest.tmp", errno.ENOSPC))
    with pytest.raises(
        CheckpointWriteError, match=r"No space left on device \(ENOSPC\); latest stays at step 5"
    ):
        ckpt.save(10)
    assert (tmp_path / "checkpoints/latest").read_text() == "step00000005"
    assert not (tmp_path / "checkpoints/step00000010").exists()
    monkeypatch.setattr(checkpoint, "atomic_write_text", fileio.atomic_write_text)
    assert ckpt.save(15) == "step00000015"  # the next checkpoint, with space again, is written as usual


def test_deepspeeds_writer_keeps_the_os_error_of_a_full_device(tmp_path):
    # torch.save to a path reports ENOSPC as "[enforce fail at inline_container.cc] unexpected pos"; the guarded
    # engine writes through a Python file, so errno and path survive, and it records instead of raising.
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

    class Engine:
        checkpoint_engine = TorchCheckpointEngine()

    engine, failures = Engine(), WriteFailures()
    guard_engine_writes(engine, failures)
    target = tmp_path / "optim_states.pt"
    target.symlink_to("/dev/full")
    engine.checkpoint_engine.save({"w": torch.zeros(10_000)}, str(target))
    assert failures.message() == f"{target}: [Errno 28] No space left on device (ENOSPC)"
    engine.checkpoint_engine.save({"w": torch.zeros(1)}, str(tmp_path / "later.pt"))
    assert not (tmp_path / "later.pt").exists()  # this checkpoint already failed here: no more writes
    failures.reset()
    engine.checkpoint_engine.save({"w": torch.arange(3.0)}, str(tmp_path / "ok.pt"))
    assert torch.equal(torch.load(tmp_path / "ok.pt", weights_only=True)["w"], torch.arange(3.0))


@pytest.mark.multiprocess
@pytest.mark.slow
def test_two_process_disk_full_on_one_rank_stops_every_rank_and_latest_stays(tmp_path, builtin_data):
    run_dir = tmp_path / "run"
    # rank 1's optimizer partition of step 4 lands on a device that is always full; step 2's is written as usual
    partition = run_dir / "checkpoints/step00000004/zero_pp_rank_1_mp_rank_00_optim_states.pt"
    partition.parent.mkdir(parents=True)
    partition.symlink_to("/dev/full")
    args = train_args(run_dir, builtin_data["train"], "train.max_steps=6", "train.checkpoint_every=2")
    results = _ranks(args[2:])
    assert [r.returncode for r in results] == [2, 2], results[1].stderr[-3000:]
    latest = f"latest stays at step 2 ({run_dir}/checkpoints/step00000002), which a rerun resumes from"
    own = (f"dtr-scale train: error: rank 1: checkpoint step00000004 not written: {partition}: [Errno 28] No "
           f"space left on device (ENOSPC); {latest}")  # fmt: skip
    told = (f"dtr-scale train: error: checkpoint step00000004 not written: rank 1 could not write {partition}: "
            f"[Errno 28] No space left on device (ENOSPC); {latest}")  # fmt: skip
    assert [line for line in results[1].stderr.splitlines() if "error" in line.lower()] == [own]
    assert [line for line in results[0].stderr.splitlines() if "error" in line.lower()] == [told]
    for r in results:
        assert "Traceback" not in r.stderr + r.stdout and "inline_container" not in r.stderr + r.stdout
    assert read_latest(run_dir / "checkpoints") == "step00000002"  # complete, so a rerun resumes from it
    assert sorted(p.name for p in (run_dir / "checkpoints").glob("step*")) == ["step00000002"]
    assert [m["step"] for m in read_metrics(run_dir)] == [1, 2, 3, 4]


def _mount_tmpfs(where: Path, size_bytes: int) -> bool:
    where.mkdir()
    mount = shutil.which("mount")
    if mount is None or os.geteuid() != 0:
        return False
    out = subprocess.run([mount, "-t", "tmpfs", "-o", f"size={size_bytes}", "tmpfs", str(where)],
                         capture_output=True)  # fmt: skip
    return out.returncode == 0


@pytest.mark.minutes  # two runs (~25 s); the /dev/full test above is the same path in `make test`
def test_a_run_that_fills_its_disk_stops_in_one_line_with_latest_intact(tmp_path, builtin_data):
    # A real full disk: the run's first checkpoint is written in a tmpfs with room for about 1.5 of them, then the
    # same command resumes there and its next checkpoint fills the disk.
    first = tmp_path / "first"
    args = ["train.max_steps=2", "train.checkpoint_every=2", "train.keep_last=5", "train.global_batch_size=8"]
    assert [r.returncode for r in _ranks(train_args(first, builtin_data["train"], *args)[2:], 1)] == [0]
    used = sum(-(-p.stat().st_size // 4096) * 4096 for p in first.rglob("*") if p.is_file())  # tmpfs pages
    tag_size = sum(p.stat().st_size for p in (first / "checkpoints/step00000002").rglob("*") if p.is_file())
    disk = tmp_path / "disk"
    if not _mount_tmpfs(disk, used + tag_size // 2):
        pytest.skip(
            "mounting a tmpfs needs root (CAP_SYS_ADMIN); the /dev/full tests cover ENOSPC without it"
        )
    try:
        run_dir = disk / "run"
        shutil.copytree(first, run_dir)
        more = [*args, "train.max_steps=4"]
        results = _ranks(train_args(run_dir, builtin_data["train"], *more)[2:], 1)
        assert [r.returncode for r in results] == [2], results[0].stderr[-3000:]
        errors = [line for line in results[0].stderr.splitlines() if "error" in line.lower()]
        assert len(errors) == 1 and "Traceback" not in results[0].stderr, results[0].stderr[-3000:]
        assert errors[0].startswith(
            f"dtr-scale train: error: rank 0: checkpoint step00000004 not written: {run_dir}"
        )
        assert errors[0].endswith(
            f": [Errno 28] No space left on device (ENOSPC); latest stays at step 2 "
            f"({run_dir}/checkpoints/step00000002), which a rerun resumes from"
        )
        assert (run_dir / "checkpoints/latest").read_text() == "step00000002"
        assert sorted(p.name for p in (run_dir / "checkpoints").glob("step*")) == ["step00000002"]
    finally:
        subprocess.run(["umount", str(disk)], check=False)


def test_a_metrics_record_the_disk_refuses_is_one_line_and_training_goes_on(tmp_path, capsys):
    # Records are written every log_every, checkpoints rarely: a full disk meets metrics.jsonl first. Rank 0 alone
    # must not die there (the others would wait in their next collective); the next checkpoint stops the run.
    from dtr_scale.train.monitor import Monitor

    monitor = Monitor(tmp_path, 0, 1, 10, 1.0, None, tensorboard=False, progress=False)
    monitor.record(1, {"loss/mean": 0.5})
    (tmp_path / "metrics.jsonl").rename(tmp_path / "kept.jsonl")
    (tmp_path / "metrics.jsonl").symlink_to("/dev/full")
    monitor.record(2, {"loss/mean": 0.4})
    monitor.record(3, {"loss/mean": 0.3})
    lines = capsys.readouterr().out.splitlines()
    assert lines == [
        f"{tmp_path}/metrics.jsonl: the record of step 2 was not written (No space left on device); training "
        "goes on, and the next checkpoint stops the run if the disk is full"
    ]
    (tmp_path / "metrics.jsonl").unlink()
    monitor.record(4, {"loss/mean": 0.2})
    assert (tmp_path / "metrics.jsonl").read_text() == '{"step": 4, "loss/mean": 0.2}\n'
    assert monitor.metrics_failing is False
