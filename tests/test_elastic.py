"""Elastic runs: the same steps at every world size of the family, and resumes at another world size
(tests/distributed.py ranks on 127.0.0.1, gloo; tiny routed DiT)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from distributed import run_ranks
from test_train_distributed import final_weights, train_args

pytestmark = [pytest.mark.multiprocess, pytest.mark.slow]

STEP_LOG = {"DTR_TEST_STEP_LOG": "1"}


def elastic_args(run_dir: Path, manifest: Path, *extra: str, max_micro: int = 8) -> list[str]:
    """A tiny run whose micro-batch follows the world size (global batch 16; max_micro 8: accumulation 2 at
    world 1, 1 at worlds 2 and 4)."""
    return train_args(run_dir, manifest, "train.micro_batch_size=null", f"train.max_micro_batch_size={max_micro}",
                      *extra, hooks=True)  # fmt: skip


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


@pytest.mark.minutes  # (~35 s; make test keeps the kill-at-2, resume-at-1 run, which compares worlds 2 and 1)
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


def ema_and_balancer(run_dir: Path, tag: str) -> tuple[dict[str, torch.Tensor], list[float]]:
    """The full fp32 EMA (every rank's shard put together) and the balancer's weights of a checkpoint."""
    from dtr_scale.checkpoint_format import (
        assemble_ema_shards,
        global_state_path,
        rank_state_path,
        read_state_file,
    )

    global_state = read_state_file(global_state_path(run_dir / "checkpoints" / tag))
    world = int(global_state["world_size"])
    states = [read_state_file(rank_state_path(run_dir / "checkpoints" / tag, r))["ema"] for r in range(world)]
    names = {name for st in states for name, _, _ in st["segments"]}
    sizes = {
        name: sum(length for st in states for n, _, length in st["segments"] if n == name) for name in names
    }
    ema = assemble_ema_shards(states, {n: (s,) for n, s in sizes.items()})
    return ema, global_state["balancer"]["weights"]


def assert_resumed_like_straight(resumed: Path, straight: Path) -> None:
    """Same samples and timesteps in every slot of every step; weights, EMA and balancer within 1e-5 relative."""
    expected = global_steps(straight)
    assert global_steps(resumed) == expected  # every sample of the epoch seen once, in the same slot
    keys = [key for step in expected.values() for key, _ in step]
    assert len(set(keys)) == len(keys)
    tag = "step00000008"
    wa = {k: v.detach() for k, v in final_weights(straight, tag).items()}
    wb = {k: v.detach() for k, v in final_weights(resumed, tag).items()}
    (ema_a, bal_a), (ema_b, bal_b) = ema_and_balancer(straight, tag), ema_and_balancer(resumed, tag)
    balancer = float(
        (torch.tensor(bal_a) - torch.tensor(bal_b)).abs().max() / torch.tensor(bal_a).abs().max()
    )
    # the balancer moved: Nash's weights differ per cluster; UW's left their start 0.5 exp(0) / k = 0.125
    assert max(max(bal_a) - min(bal_a), abs(bal_a[0] - 0.125)) > 1e-3
    figures = (max_relative_difference(wa, wb), max_relative_difference(ema_a, ema_b), balancer)
    weights, ema, weights_of_balancer = figures
    print(
        f"relative to the straight run: weights {weights:.2e}, EMA {ema:.2e}, balancer {weights_of_balancer:.2e}"
    )
    assert max(figures) < 1e-5, figures
    weights_flat = {name: wa[f"model.{name}"].flatten() for name in ema_a}
    assert max_relative_difference(weights_flat, ema_a) > 1e-3  # the EMA is not just the weights


def run_steps(zero_stage: int, method: str) -> list[str]:
    return [f"deepspeed.zero_stage={zero_stage}", "train.max_steps=8", "train.checkpoint_every=4",
            f"mtl.method={method}", "mtl.update_every=3"]  # fmt: skip


def check_kill_and_reshard(tmp_path, manifest, before, after, zero_before, zero_after, method) -> None:
    # NashMTL's Gram is estimated on each rank's first micro-batch, i.e. on the first world x micro-batch slots
    # of the step: without gradient accumulation (max micro 16) that is the whole step at every world size.
    micro = 16 if method == "nash" else 8
    straight = tmp_path / "straight"
    args = elastic_args(straight, manifest, *run_steps(zero_after, method), max_micro=micro)
    run_ranks(args, world_size=after, env=STEP_LOG)
    run_dir = tmp_path / "resumed"
    first = elastic_args(run_dir, manifest, *run_steps(zero_before, method), max_micro=micro)
    run_ranks(first, world_size=before, env={**STEP_LOG, "DTR_TEST_KILL_AFTER_STEP": "5"}, expect_kill=True)
    assert (run_dir / "checkpoints/latest").read_text() == "step00000004"
    second = elastic_args(run_dir, manifest, *run_steps(zero_after, method), max_micro=micro)
    out = run_ranks(second, world_size=after, env=STEP_LOG)[0].stdout
    stages = f" (ZeRO-{zero_before} -> ZeRO-{zero_after})" if zero_before != zero_after else ""
    assert f"resharding step 4 from world {before} to world {after}{stages}\n" in out, out[-2000:]
    assert (run_dir / "checkpoints/step00000004/universal").is_dir()  # kept beside the original tag
    assert_resumed_like_straight(run_dir, straight)


def test_run_killed_at_world_2_resumes_at_world_1_like_the_straight_world_1_run(tmp_path, builtin_data):
    check_kill_and_reshard(tmp_path, builtin_data["train"], 2, 1, 2, 2, "uw")


@pytest.mark.minutes
@pytest.mark.parametrize(
    ("before", "after", "zero_before", "zero_after", "method"),
    [
        (1, 2, 2, 2, "uw"),
        (2, 1, 1, 1, "nash"),
        (1, 2, 1, 1, "uw"),
        (2, 1, 3, 3, "uw"),  # (NashMTL needs ZeRO-0/1/2)
        (1, 2, 3, 3, "uw"),
        (2, 1, 2, 2, "nash"),
        (2, 1, 1, 2, "uw"),  # and a ZeRO stage change with it
        (1, 2, 2, 1, "nash"),
    ],
)
def test_killed_run_resumes_at_another_world_size_and_stage_like_the_straight_run(
    tmp_path, builtin_data, before, after, zero_before, zero_after, method
):
    check_kill_and_reshard(tmp_path, builtin_data["train"], before, after, zero_before, zero_after, method)


@pytest.mark.minutes
def test_a_checkpoint_from_before_elastic_runs_resumes_at_its_own_world_size_only(tmp_path, builtin_data):
    from dtr_scale.checkpoint_format import (
        global_state_path,
        rank_state_path,
        read_state_file,
        write_state_file,
    )

    run_dir = tmp_path / "old"
    run_ranks(
        elastic_args(run_dir, builtin_data["train"], "train.max_steps=4", "train.checkpoint_every=4"), 1
    )
    tag_dir = run_dir / "checkpoints/step00000004"
    # What a dtr-scale from before elastic runs wrote: no layout, stream positions per (rank, loader worker).
    state = read_state_file(global_state_path(tag_dir))
    del state["layout"]
    write_state_file(global_state_path(tag_dir), state)
    ranked = read_state_file(rank_state_path(tag_dir, 0))
    ranked["stream"] = {"format": "dtr-scale-stream/1", "workers": [[0, 40]], "samples": 64, "batches": 8}
    write_state_file(rank_state_path(tag_dir, 0), ranked)
    longer = elastic_args(run_dir, builtin_data["train"], "train.max_steps=6", "train.checkpoint_every=6")
    with pytest.raises(AssertionError, match=r"before elastic runs and cannot be resharded to 2: resume it once "
                       r"with 1 processes \(e\.g\. `torchrun --nproc_per_node 1 -m dtr_scale train"):  # fmt: skip
        run_ranks(longer, world_size=2)
    out = run_ranks(longer, world_size=1)[0].stdout
    assert "the data stream starts over" in out and "resumed from" in out and "at step 4" in out
    assert (run_dir / "checkpoints/latest").read_text() == "step00000006"
