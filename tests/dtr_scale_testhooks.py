"""`python -m dtr_scale_testhooks ...` = `python -m dtr_scale ...` with test-only hooks (never in the product).

- DTR_TEST_KILL_AFTER_STEP=N: rank 0 SIGKILLs itself once step N is complete (its checkpoint, if any,
  written), as a crashed node would: the kill-and-resume tests.
- DTR_TEST_CHECKSUM=1: after training, every rank prints the float64 sum of its whole parameters (ZeRO 0-2)
  and its MASTER_ADDR, so a test can check that the ranks of a launcher agree and where they met.
"""

from __future__ import annotations

import os
import signal
import sys

import torch

from dtr_scale import cli
from dtr_scale.train import engine

KILL_AFTER = int(os.environ.get("DTR_TEST_KILL_AFTER_STEP", "0"))
_train_step = engine.Trainer.train_step
_fit = engine.Trainer.fit


def train_step(self, batches):
    if KILL_AFTER and self.step == KILL_AFTER and self.rank == 0:
        os.kill(os.getpid(), signal.SIGKILL)
    return _train_step(self, batches)


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
