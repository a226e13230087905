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
import collections, json, sys, torch
from dtr_scale.config import load_config
from dtr_scale.train.engine import Trainer

cfg = load_config(sys.argv[1], sys.argv[2:])
tr = Trainer(cfg)
batches = iter(tr.stream)
assert tr.train_step(batches)  # warm-up step: first-use set-up is not what is counted
counts = collections.Counter()
counting = [False]

def counted(name, original):
    def wrapper(self, *args, **kwargs):
        if counting[0]:
            caller = sys._getframe(1).f_code.co_filename.replace("\\", "/")
            if "/dtr_scale/" in caller and "/dtr_scale/data/" not in caller:
                counts[f"{name} {caller.split('/dtr_scale/')[-1]}:{sys._getframe(1).f_lineno}"] += 1
        return original(self, *args, **kwargs)
    return wrapper

for name in ("item", "__bool__", "__float__", "__int__", "tolist", "numpy", "cpu"):
    setattr(torch.Tensor, name, counted(name, getattr(torch.Tensor, name)))
steps = 3
counting[0] = True
for _ in range(steps):
    assert tr.train_step(batches)
counting[0] = False
if tr.rank == 0:
    print("COUNTS " + json.dumps({"steps": steps, "accumulation": tr.accumulation, "calls": counts}))
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
