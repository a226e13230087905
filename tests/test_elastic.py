"""Elastic runs: the same steps at every world size of the family, and resumes at another world size
(tests/distributed.py ranks on 127.0.0.1, gloo; tiny routed DiT)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from distributed import run_ranks
from test_train_distributed import final_weights, read_metrics, train_args

pytestmark = [pytest.mark.multiprocess, pytest.mark.slow]

STEP_LOG = {"DTR_TEST_STEP_LOG": "1"}


def elastic_args(run_dir: Path, manifest: Path, *extra: str, hooks: bool = True) -> list[str]:
    """A tiny run whose micro-batch follows the world size (global batch 16)."""
    return train_args(run_dir, manifest, "train.micro_batch_size=null", "train.max_micro_batch_size=8",
                      *extra, hooks=hooks)  # fmt: skip


def global_steps(run_dir: Path) -> dict[int, list[tuple[str, int]]]:
    """Per step, (sample key, timestep) in global-batch slot order: rank r's j-th sample of a step sits in slot
    j * world + r (train/draws.py). A step logged twice (before a kill and after the resume) keeps the last."""
    slots: dict[int, dict[int, tuple[str, int]]] = {}
    for path in sorted(run_dir.glob("steps_rank*.jsonl")):
        for line in path.read_text().splitlines():
            rec = json.loads(line)
            step = slots.setdefault(rec["step"], {})
            for j, (key, t) in enumerate(zip(rec["keys"], rec["t"], strict=True)):
                step[j * rec["world"] + rec["rank"]] = (key, t)
    return {step: [by_slot[g] for g in sorted(by_slot)] for step, by_slot in sorted(slots.items())}


def max_relative_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    """max over tensors of |a - b|_max / |a|_max."""
    assert a.keys() == b.keys()
    return max(
        float((a[k] - b[k]).abs().max() / a[k].abs().max().clamp_min(1e-12)) for k in a if a[k].numel()
    )


def test_straight_runs_at_world_1_2_and_4_train_the_same_steps(tmp_path, builtin_data):
    steps = ["deepspeed.zero_stage=2", "train.max_steps=8", "train.checkpoint_every=8", "mtl.method=uw"]
    runs = {}
    for world in (1, 2, 4):
        run_dir = tmp_path / f"world{world}"
        run_ranks(elastic_args(run_dir, builtin_data["train"], *steps), world_size=world, env=STEP_LOG)
        runs[world] = run_dir
    reference = global_steps(runs[1])
    assert sorted(reference) == list(range(8)) and all(len(s) == 16 for s in reference.values())
    keys = [key for step in reference.values() for key, _ in step]
    assert len(set(keys)) == len(keys)  # 128 samples of the first epoch: none twice
    weights = {w: {k: v.detach() for k, v in final_weights(runs[w], "step00000008").items()} for w in runs}
    for world in (2, 4):
        assert global_steps(runs[world]) == reference, world  # the same sample and timestep in every slot
        difference = max_relative_difference(weights[1], weights[world])
        print(f"world {world} vs 1: max relative weight difference {difference:.2e}")
        assert difference < 1e-5, (world, difference)
