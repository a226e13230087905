"""A diverging run is logged truthfully: skipped steps are counted (metrics.jsonl and TensorBoard alike), their
loss is absent, never 0.0, and the stop is one line naming the step and the last good checkpoint (REPA #46:
NaN steps logged as a perfect loss, then a raw FloatingPointError traceback)."""

from __future__ import annotations

import math

import pytest
from distributed import run_ranks
from test_cli_errors import _ranks
from test_train_distributed import read_metrics, train_args

pytestmark = pytest.mark.multiprocess

LOSS_KEYS = ("loss/mean", "loss/objective", "loss/mse_rank0")


def test_two_process_diverging_run_counts_skipped_steps_and_stops_in_one_line(tmp_path, builtin_data):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir = tmp_path / "run"
    # Adam's first step moves every weight by about lr: at 1e30 the next forward overflows, and every step after
    # it is non-finite. Step 1 (finite loss) is checkpointed; checkpoints of skipped steps wait for a finite one.
    args = train_args(run_dir, builtin_data["train"], "train.lr=1e30", "train.warmup_steps=0",
                      "train.max_steps=20", "train.checkpoint_every=1", "train.max_nonfinite_steps=3",
                      "monitor.tensorboard=true")  # fmt: skip
    results = _ranks(args[2:])
    assert [r.returncode for r in results] == [2, 2], results[0].stderr[-3000:]
    for r in results:
        assert "Traceback" not in r.stderr + r.stdout and "FloatingPointError" not in r.stderr + r.stdout
    errors = [line for line in results[0].stderr.splitlines() if "error:" in line]
    assert errors == [
        "dtr-scale train: error: step 4: stopping after 3 non-finite losses in a row (train.max_nonfinite_steps=3);"
        f" last complete checkpoint: {run_dir}/checkpoints/step00000001 (a rerun resumes from it) (a lower "
        "train.lr or train.grad_clip may help)"
    ]
    assert "error:" not in results[1].stderr  # one line, on rank 0
    assert (run_dir / "checkpoints/latest").read_text() == "step00000001"
    assert not (run_dir / "checkpoints/step00000002").exists()

    records = read_metrics(run_dir)
    assert [m["step"] for m in records] == [1, 2, 3, 4]
    assert [m["skipped_steps"] for m in records] == [0, 1, 2, 3]
    assert all(math.isfinite(records[0][k]) and records[0][k] > 0 for k in LOSS_KEYS)
    for m in records[1:]:  # the skipped steps: no loss at all, and no cluster loss
        assert not any(k in m for k in LOSS_KEYS) and not any(k.startswith("cluster/loss_") for k in m), m
    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("skipped_steps")] == [(1, 0), (2, 1), (3, 2), (4, 3)]
    assert [e.step for e in events.Scalars("loss/mean")] == [1]


POISON_SCRIPT = r"""
import sys
from dtr_scale.config import load_config
from dtr_scale.train.engine import Trainer
cfg = load_config(sys.argv[1], sys.argv[2:])
tr = Trainer(cfg)
losses = tr.engine.module.diffusion.training_losses
calls = {"n": 0}
def poisoned(*args, **kwargs):  # the micro-batches of steps 2 and 3 (one each) give a NaN loss
    calls["n"] += 1
    out = losses(*args, **kwargs)
    if calls["n"] in (2, 3):
        out["loss"] = out["loss"] * float("nan")
    return out
tr.engine.module.diffusion.training_losses = poisoned
tr.fit()
"""


def test_logged_losses_are_means_over_the_applied_steps_only(tmp_path, builtin_data):
    # The same poisoned run logged every step and every third step: a record's loss must be the mean over the
    # applied steps of its window (what the every-step log gives for each), a skipped step between two
    # records gets a record of its own with the counter and no loss.
    def run(name: str, log_every: int) -> list[dict]:
        args = train_args(tmp_path / name, builtin_data["train"], "train.max_steps=5", "train.global_batch_size=8",
                          "train.checkpoint_every=100", f"train.log_every={log_every}")  # fmt: skip
        run_ranks(["-c", POISON_SCRIPT, *args[4:]], world_size=1)
        return read_metrics(tmp_path / name)

    every = {m["step"]: m for m in run("every", 1)}
    third = {m["step"]: m for m in run("third", 3)}
    assert [every[s]["skipped_steps"] for s in range(1, 6)] == [0, 1, 2, 2, 2]
    assert all(k not in every[s] for s in (2, 3) for k in LOSS_KEYS)
    assert sorted(third) == [1, 2, 3, 5]
    assert third[2] == {"step": 2, "skipped_steps": 1.0}  # its own record: the counter, no loss
    assert third[3]["skipped_steps"] == 2 and not any(k in third[3] for k in LOSS_KEYS)
    for key in LOSS_KEYS:  # steps 4 and 5, one micro-batch each; the skipped ones are not in the mean
        assert third[5][key] == pytest.approx((every[4][key] + every[5][key]) / 2, rel=1e-12)
    assert third[1]["loss/mean"] == every[1]["loss/mean"]
