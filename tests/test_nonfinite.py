"""A diverging run is logged truthfully: skipped steps are counted (metrics.jsonl and TensorBoard alike), their
loss is absent, never 0.0, and the stop is one line naming the step and the last good checkpoint (REPA #46:
NaN steps logged as a perfect loss, then a raw FloatingPointError traceback)."""

from __future__ import annotations

import json
import math

import pytest
from distributed import run_ranks
from test_cli_errors import _ranks
from test_train_distributed import read_metrics, train_args

pytestmark = [pytest.mark.multiprocess, pytest.mark.slow]

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

    def refuse(name):  # strict JSON (jq, other languages' parsers): no NaN / Infinity constants
        raise AssertionError(f"metrics.jsonl holds the non-JSON constant {name}")

    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        json.loads(line, parse_constant=refuse)
    assert [m["skipped_steps"] for m in records] == [0, 1, 2, 3]
    assert all(math.isfinite(records[0][k]) and records[0][k] > 0 for k in LOSS_KEYS)
    for m in records[1:]:  # the skipped steps: no loss at all, and no cluster loss
        assert not any(k in m for k in LOSS_KEYS) and not any(k.startswith("cluster/loss_") for k in m), m
    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("skipped_steps")] == [(1, 0), (2, 1), (3, 2), (4, 3)]
    assert [e.step for e in events.Scalars("loss/mean")] == [1]


POISON_SCRIPT = r"""
import json, sys
from dtr_scale.config import load_config
from dtr_scale.train.engine import Trainer
cfg = load_config(sys.argv[1], sys.argv[2:])
tr = Trainer(cfg)
losses = tr.engine.module.diffusion.training_losses
calls = {"n": 0}
def poisoned(*args, **kwargs):  # two micro-batches a step: the second of step 2 and the first of step 3 are NaN
    calls["n"] += 1
    out = losses(*args, **kwargs)
    if calls["n"] in (4, 5):
        out["loss"] = out["loss"] * float("nan")
    return out
tr.engine.module.diffusion.training_losses = poisoned
seen = []  # what each micro-batch fed the logged sums: step, objective, mean per-sample loss, mean MSE
add = tr.log_sums.add
def record(loss, mse, finite, repa=None):
    seen.append([tr.step + 1, float(loss), float(tr.cluster_buffer_last), float(mse.double().mean())])
    add(loss, mse, finite, repa)
tr.log_sums.add = record
buffer_add = tr.cluster_buffer.add
def keep(per_sample, cluster_idx, t=None):
    tr.cluster_buffer_last = per_sample.double().mean()
    buffer_add(per_sample, cluster_idx, t)
tr.cluster_buffer.add = keep
tr.fit()
print("SEEN", json.dumps(seen))
"""


def test_logged_losses_are_means_over_the_applied_steps_only(tmp_path, builtin_data):
    # Steps 2 and 3 each have one NaN and one finite micro-batch (of two), so both are skipped; records every third
    # step. A record's losses must be the means over the applied steps of its window, computed here from what each
    # micro-batch fed the sums: the finite halves of the skipped steps were not trained on and must not count. A
    # skipped step between two records gets a record of its own with the counter and no loss.
    args = train_args(tmp_path, builtin_data["train"], "train.max_steps=5", "train.global_batch_size=16",
                      "train.checkpoint_every=100", "train.log_every=3")  # fmt: skip
    out = run_ranks(["-c", POISON_SCRIPT, *args[4:]], world_size=1)[0].stdout
    seen = json.loads(next(line for line in out.splitlines() if line.startswith("SEEN "))[5:])
    assert [s[0] for s in seen] == [1, 1, 2, 2, 3, 3, 4, 4, 5, 5]
    assert [math.isnan(s[1]) for s in seen[2:6]] == [False, True, True, False]
    records = {m["step"]: m for m in read_metrics(tmp_path)}
    assert sorted(records) == [1, 2, 3, 5]
    assert records[2] == {"step": 2, "skipped_steps": 1.0}  # its own record: the counter, no loss
    assert records[3]["skipped_steps"] == 2 and not any(k in records[3] for k in LOSS_KEYS)
    for column, key in enumerate(("loss/objective", "loss/mean", "loss/mse_rank0"), start=1):
        assert records[1][key] == pytest.approx(sum(s[column] for s in seen[:2]) / 2, rel=1e-6)
        # the four micro-batches (8 samples each) of steps 4 and 5; none of the skipped steps 2 and 3
        assert records[5][key] == pytest.approx(sum(s[column] for s in seen[6:]) / 4, rel=1e-6)
    assert records[5]["skipped_steps"] == 2
