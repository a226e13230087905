"""Checkpoint bookkeeping without DeepSpeed: state files, retention, `latest`, world-size refusal."""

from __future__ import annotations

import pytest
import torch

from dtr_scale.train.checkpoint import Checkpointer, read_state_file, tag_for_step, write_state_file


def test_state_file_round_trips_nested_state_without_pickle(tmp_path):
    state = {
        "step": 7, "name": "x", "none": None, "ratio": 0.25, "flag": True,
        "rng": (3, [1, 2, 3], None), "ema": {"shard": torch.arange(5.0), "segments": [["a.weight", 0, 5]]},
        "bytes": torch.tensor([1, 2, 255], dtype=torch.uint8),
    }  # fmt: skip
    path = tmp_path / "s.safetensors"
    write_state_file(path, state)
    back = read_state_file(path)
    assert back["rng"] == (3, [1, 2, 3], None) and isinstance(back["rng"], tuple)
    assert torch.equal(back["ema"]["shard"], state["ema"]["shard"]) and back["ema"]["segments"] == [
        ["a.weight", 0, 5]
    ]
    assert torch.equal(back["bytes"], state["bytes"]) and back["bytes"].dtype == torch.uint8
    assert {k: back[k] for k in ("step", "name", "none", "ratio", "flag")} == {
        "step": 7, "name": "x", "none": None, "ratio": 0.25, "flag": True}  # fmt: skip
    assert not list(tmp_path.glob("*.tmp"))


def test_unsupported_values_are_refused_by_name(tmp_path):
    with pytest.raises(TypeError, match=r"cannot checkpoint a value of type object at 0\.1"):
        write_state_file(tmp_path / "s.safetensors", {"a": [1, object()]})


def _fake_checkpoint(ckpt_dir, step: int, world_size: int = 2):
    ours = ckpt_dir / tag_for_step(step) / "dtr_scale"
    ours.mkdir(parents=True)
    write_state_file(ours / "global.safetensors", {"world_size": world_size, "step": step})


def test_retention_keeps_the_last_k_and_every_mth(tmp_path):
    ckpt = Checkpointer(tmp_path, keep_last=2, keep_every=100)
    for step in (50, 100, 150, 200, 250, 300):
        _fake_checkpoint(ckpt.dir, step)
    ckpt._prune(300)
    kept = sorted(p.name for p in ckpt.dir.iterdir())
    assert kept == ["step00000100", "step00000200", "step00000250", "step00000300"]


def test_latest_must_name_a_complete_checkpoint(tmp_path):
    ckpt = Checkpointer(tmp_path)
    assert ckpt.latest_tag() is None
    ckpt.dir.mkdir(parents=True)
    (ckpt.dir / "latest").write_text("step00000010")
    (ckpt.dir / "step00000010").mkdir()  # a half-written tag: DeepSpeed files only, no dtr_scale state
    with pytest.raises(RuntimeError, match="is not a complete dtr-scale checkpoint"):
        ckpt.latest_tag()
    _fake_checkpoint(ckpt.dir, 20)
    (ckpt.dir / "latest").write_text("step00000020\n")
    assert ckpt.latest_tag() == "step00000020"


def test_resume_at_another_world_size_is_refused_with_how_to(tmp_path):
    _fake_checkpoint(tmp_path / "checkpoints", 30, world_size=2)
    ckpt = Checkpointer(tmp_path, rank=0, world_size=1)
    with pytest.raises(RuntimeError, match=r"written by 2 ranks, this run has 1.*relaunch with 2 processes"):
        ckpt.load(engine=None, tag="step00000030")
