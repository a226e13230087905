"""A training step forces no host sync per micro-batch (issue: a lean step).

On a GPU, `.item()`, `bool(tensor)`, `float(tensor)`, `.tolist()`, `.numpy()` and `.cpu()` of a device
tensor wait for the device. On this CPU nothing waits, so the test counts the *calls* that would: every
one made from dtr_scale's step code (the model, diffusion, balancers, cluster losses, the step) while
`Trainer.train_step` runs, leaving out what DeepSpeed itself does and the CPU-side data pipeline (which
builds batches on the host before they are moved). The expectation is hand-derived: exactly one per
optimizer step (the non-finite flag read, train/step.py), the same with 1 or 4 micro-batches per step.
"""

from __future__ import annotations

import json

import pytest
from distributed import run_ranks
from test_train_distributed import train_args

pytestmark = [pytest.mark.multiprocess, pytest.mark.slow]

COUNT_SCRIPT = r"""
import json, sys
from bench.host_syncs import count_host_syncs  # the counter bench/gpu.py --syncs uses on a GPU
from dtr_scale.config import load_config
from dtr_scale.train.engine import Trainer

trainer = Trainer(load_config(sys.argv[1], sys.argv[2:]))
batches = iter(trainer.stream)
assert trainer.train_step(batches)  # warm-up step: first-use set-up is not what is counted
report = count_host_syncs(trainer, batches, steps=3)
if trainer.rank == 0:
    print("COUNTS " + json.dumps(report))
from distributed import leave
leave()  # not through interpreter exit while gloo threads still release tensors (tests/distributed.py)
"""


@pytest.mark.parametrize(("world_size", "micro"), [(1, 16), (1, 4), (2, 4)])
def test_one_host_sync_per_optimizer_step_whatever_the_accumulation(
    tmp_path, builtin_data, world_size, micro
):
    args = train_args(tmp_path / "run", builtin_data["train"], f"train.micro_batch_size={micro}")
    out = run_ranks(["-c", COUNT_SCRIPT, *args[4:]], world_size=world_size)[0].stdout
    line = next(line for line in out.splitlines() if line.startswith("COUNTS "))
    report = json.loads(line[len("COUNTS ") :])
    assert report["accumulation"] == 16 // (micro * world_size)
    calls = report["calls"]
    assert sum(calls.values()) == report["steps"], calls  # one per step, none per micro-batch
    assert all(key.startswith("item train/step.py") for key in calls), calls
