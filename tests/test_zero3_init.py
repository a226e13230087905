"""ZeRO-3 builds the model partitioned (deepspeed.zero.Init): no rank holds it whole, and the initial weights
are exactly those of the plain build with the same seed (the reference DiT initialisation)."""

from __future__ import annotations

import pytest
from distributed import run_ranks
from test_train_distributed import train_args

pytestmark = [pytest.mark.multiprocess, pytest.mark.slow]

SCRIPT = r"""
import sys, deepspeed, torch
from dtr_scale.config import load_config
from dtr_scale.models.build import build_model
from dtr_scale.train.engine import Trainer
from dtr_scale.train.runtime import seed_everything
cfg = load_config(sys.argv[1], sys.argv[2:])
tr = Trainer(cfg)
model = tr.engine.module.model
local = sum(p.ds_tensor.numel() for p in model.parameters())
full = sum(p.ds_numel for p in model.parameters())
with deepspeed.zero.GatheredParameters(list(model.parameters())):
    gathered = {n: p.detach().clone() for n, p in model.named_parameters()}
seed_everything(cfg.train.seed)  # what the Trainer does before building
plain = build_model(cfg, tuple(tr.manifest.latent_shape), len(tr.manifest.labels))
worst = max((gathered[n] - p.detach()).abs().max().item() for n, p in plain.named_parameters())
nonzero = sum(int(p.detach().abs().sum() > 0) for p in plain.parameters())
print(f"RANK {tr.rank} LOCAL {local} FULL {full} WORST {worst!r} NONZERO {nonzero}", flush=True)
from distributed import leave
leave()  # not through interpreter exit while gloo threads still release tensors (tests/distributed.py)
"""


def test_zero3_partitions_at_construction_with_the_reference_initial_weights(tmp_path, builtin_data):
    args = train_args(
        tmp_path / "run",
        builtin_data["train"],
        "deepspeed.zero_stage=3",
        "deepspeed.stage3_param_persistence_threshold=0",
    )
    outs = [r.stdout for r in run_ranks(["-c", SCRIPT, *args[4:]], world_size=2)]
    for rank, out in enumerate(outs):
        line = next(line for line in out.splitlines() if line.startswith(f"RANK {rank} "))
        fields = line.split()
        local, full, worst, nonzero = int(fields[3]), int(fields[5]), float(fields[7]), int(fields[9])
        assert local <= full // 2 + 64, line  # each rank holds about half (partitions padded per parameter)
        assert worst == 0.0, line  # bitwise the plain build's weights
        assert nonzero > 10, line  # and those are not all zero (xavier/normal draws happened)
