"""`python -m dtr_scale_testhooks ...` = `python -m dtr_scale ...` with test-only hooks (never in the product).

- DTR_TEST_KILL_AFTER_STEP=N: rank 0 SIGKILLs itself once step N is complete (its checkpoint, if any,
  written), as a crashed node would: the kill-and-resume tests.
- DTR_TEST_HOLD_AFTER_STEP=N with DTR_TEST_HOLD_MARK=path: once step N is complete (its checkpoint, if any,
  written), rank 0 writes the mark and then waits until it is killed, unless the mark already exists (a
  requeued attempt runs on). A test that requeues or kills a job mid-run waits for the mark, so the run
  cannot finish before the test acts, however fast the machine.
- DTR_TEST_STEP_LOG=1: every rank appends, per optimizer step, the keys of its samples and their timesteps in
  its micro-batch order to run_dir/steps_rank{R}.jsonl (with world size and micro-batch size, so a test can
  put them in global-batch slot order): what the elastic tests compare across world sizes.
- DTR_TEST_CHECKSUM=1: after training, every rank prints the float64 sum of its whole parameters (ZeRO 0-2)
  and its MASTER_ADDR, so a test can check that the ranks of a launcher agree and where they met.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time

import torch

from dtr_scale import cli
from dtr_scale.train import engine

KILL_AFTER = int(os.environ.get("DTR_TEST_KILL_AFTER_STEP", "0"))
HOLD_AFTER = int(os.environ.get("DTR_TEST_HOLD_AFTER_STEP", "0"))
HOLD_MARK = os.environ.get("DTR_TEST_HOLD_MARK", "")
_train_step = engine.Trainer.train_step
_fit = engine.Trainer.fit


def train_step(self, batches):
    if KILL_AFTER and self.step == KILL_AFTER and self.rank == 0:
        os.kill(os.getpid(), signal.SIGKILL)
    if HOLD_AFTER and self.step == HOLD_AFTER and self.rank == 0 and not os.path.exists(HOLD_MARK):
        with open(HOLD_MARK, "w") as fh:
            fh.write(f"held after step {self.step}\n")
        while True:  # the other ranks wait in their next collective; the test requeues or kills the job
            time.sleep(1)
    if not os.environ.get("DTR_TEST_STEP_LOG"):
        return _train_step(self, batches)
    record = {"step": self.step, "world": self.world, "rank": self.rank, "keys": [], "t": []}
    record["micro_batch_size"] = self.layout.micro_batch_size
    module = self.engine.module
    forward = type(module).forward

    def logged_forward(x, t, *args, **kwargs):
        record["t"] += t.tolist()
        return forward(module, x, t, *args, **kwargs)

    class LoggedBatches:
        def __iter__(self):
            return self

        def __next__(inner):
            batch = next(batches)
            record["keys"] += self.stream.last_keys
            return batch

    module.forward = logged_forward
    try:
        applied = _train_step(self, LoggedBatches())
    finally:
        del module.forward
    with open(self.run_dir / f"steps_rank{self.rank}.jsonl", "a") as fh:
        fh.write(json.dumps(record) + "\n")
    return applied


def fit(self):
    result = _fit(self)
    if os.environ.get("DTR_TEST_CHECKSUM") and self.cfg.deepspeed.zero_stage < 3:
        with torch.no_grad():
            checksum = sum(p.double().sum().item() for p in self.engine.module.model.parameters())
        # One write per line: ranks share a pipe, and an unbuffered print writes the text and the newline
        # apart, so two ranks' lines could interleave. MASTER_ADDR says where this rank met the others.
        line = f"rank {self.rank}: parameter checksum {checksum!r} master {os.environ.get('MASTER_ADDR')}\n"
        sys.stdout.flush()
        os.write(sys.stdout.fileno(), line.encode())
    return result


engine.Trainer.train_step = train_step
engine.Trainer.fit = fit

if __name__ == "__main__":
    sys.exit(cli.main())
