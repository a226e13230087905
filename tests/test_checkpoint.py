"""Checkpoint bookkeeping without DeepSpeed: state files, retention, `latest`, world-size refusal."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from dtr_scale.checkpoint_format import read_state_file, tag_for_step, write_state_file
from dtr_scale.train.checkpoint import Checkpointer


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


def _fake_checkpoint(ckpt_dir, step: int, world_size: int = 2, layout: dict | None = None):
    ours = ckpt_dir / tag_for_step(step) / "dtr_scale"
    ours.mkdir(parents=True)
    state = {"world_size": world_size, "step": step, **({"layout": layout} if layout else {})}
    write_state_file(ours / "global.safetensors", state)


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


def test_a_checkpoint_from_before_elastic_runs_resumes_only_at_its_own_world_size(tmp_path):
    from dtr_scale.train.reshard import check_reshard, saved_sharding

    _fake_checkpoint(tmp_path / "checkpoints", 30, world_size=2)  # no layout: written before elastic runs
    saved = saved_sharding(tmp_path / "checkpoints" / "step00000030")
    assert not saved.elastic and check_reshard(saved, 2, 2, "CONFIG") is False  # as before
    with pytest.raises(
        RuntimeError,
        match=r"step00000030 was written by 2 ranks .* before elastic runs and cannot be resharded to 1: resume "
        r"it once with 2 processes \(e\.g\. `torchrun --nproc_per_node 2 -m dtr_scale train CONFIG`\)",
    ):
        check_reshard(saved, 1, 2, "CONFIG")
    ckpt = Checkpointer(tmp_path, rank=0, world_size=1)  # and the checkpointer never loads it unresharded
    with pytest.raises(RuntimeError, match=r"written by 2 ranks, this run has 1"):
        ckpt.load("step00000030")


def test_an_elastic_checkpoint_reshards_across_world_sizes_and_zero_1_to_3_but_not_zero_0(tmp_path):
    from dtr_scale.train.reshard import check_reshard, saved_sharding

    _fake_checkpoint(tmp_path, 10, world_size=2, layout={"zero_stage": 2, "canonical_streams": 8})
    _fake_checkpoint(tmp_path, 20, world_size=2, layout={"zero_stage": 0, "canonical_streams": 8})
    saved = saved_sharding(tmp_path / "step00000010")
    assert saved.elastic and (saved.world_size, saved.zero_stage, saved.canonical_streams) == (2, 2, 8)
    assert check_reshard(saved, 2, 2, "C") is False
    assert check_reshard(saved, 1, 2, "C") is True and check_reshard(saved, 4, 1, "C") is True
    assert check_reshard(saved, 2, 1, "C") is True  # a ZeRO stage change alone goes through the same path
    with pytest.raises(
        RuntimeError, match=r"written at ZeRO-2 and cannot be resumed at ZeRO-3: .* not between"
    ):
        check_reshard(saved, 4, 3, "C")
    with pytest.raises(RuntimeError, match=r"cannot be resumed at ZeRO-0 with 1 ranks: .* ZeRO-1/2/3 only"):
        check_reshard(saved, 1, 0, "C")
    with pytest.raises(RuntimeError, match=r"\(ZeRO-0, 2 ranks\) cannot be resumed at ZeRO-0 with 1 ranks"):
        check_reshard(saved_sharding(tmp_path / "step00000020"), 1, 0, "C")


DEEPSPEED_NAMES = [
    "mp_rank_00_model_states.pt",  # ZeRO 0-2: the whole model, read by every rank
    "bf16_zero_pp_rank_0_mp_rank_00_optim_states.pt",
    "bf16_zero_pp_rank_1_mp_rank_00_optim_states.pt",
    "zero_pp_rank_11_mp_rank_00_model_states.pt",  # ZeRO-3 style partition of rank 11
]


class _Malicious:
    def __reduce__(self):
        return (print, ("this would run on load",))


def test_each_rank_verifies_only_the_deepspeed_files_it_loads(tmp_path):
    from dtr_scale.checkpoint_format import check_deepspeed_files_safe, files_loaded_by_rank

    for name in DEEPSPEED_NAMES:
        torch.save({"x": torch.zeros(1)}, tmp_path / name)
    assert [p.name for p in files_loaded_by_rank(tmp_path, 1)] == [DEEPSPEED_NAMES[2], DEEPSPEED_NAMES[0]]
    assert [p.name for p in files_loaded_by_rank(tmp_path, 11)] == [DEEPSPEED_NAMES[0], DEEPSPEED_NAMES[3]]
    assert len(files_loaded_by_rank(tmp_path, None)) == 4
    torch.save({"x": _Malicious()}, tmp_path / DEEPSPEED_NAMES[2])  # rank 1's partition carries code
    check_deepspeed_files_safe(tmp_path, rank=0)  # rank 0 never opens it
    with pytest.raises(RuntimeError, match=r"refusing to load .*bf16_zero_pp_rank_1_mp_rank_00_optim"):
        check_deepspeed_files_safe(tmp_path, rank=1)


class _FakeEngine:
    """Writes DeepSpeed-like files for one rank, the way engine.save_checkpoint lays them out."""

    def __init__(self, rank: int):
        self.rank = rank

    def save_checkpoint(self, save_dir, tag, save_latest):
        tag_dir = Path(save_dir) / tag
        tag_dir.mkdir(parents=True, exist_ok=True)
        torch.save({}, tag_dir / f"zero_pp_rank_{self.rank}_mp_rank_00_optim_states.pt")
        if self.rank == 0:
            torch.save({}, tag_dir / "mp_rank_00_model_states.pt")


def test_every_written_file_and_directory_is_fsynced_before_latest_moves(tmp_path, monkeypatch):
    import os

    from dtr_scale import fileio
    from dtr_scale.train import checkpoint
    from dtr_scale.train.checkpoint import TrainProgress

    events: list[tuple[str, str]] = []
    real_fsync, real_replace = fileio.fsync_path, os.replace

    def fsync(p):
        events.append(("fsync", Path(p).name))
        real_fsync(p)

    monkeypatch.setattr(checkpoint, "fsync_path", fsync)
    monkeypatch.setattr(fileio, "fsync_path", fsync)
    monkeypatch.setattr(
        fileio.os,
        "replace",
        lambda a, b: (events.append(("replace", os.path.basename(b))), real_replace(a, b)),
    )

    class Stream:  # any object with state_dict / load_state_dict is checkpointed
        def state_dict(self):
            return {"position": 3}

    ckpt = Checkpointer(tmp_path, _FakeEngine(0), {"progress": TrainProgress(step=5)}, {"stream": Stream()})
    ckpt.save(5)
    moved = events.index(("replace", "latest"))
    synced_before = {name for kind, name in events[:moved] if kind == "fsync"}
    assert {"zero_pp_rank_0_mp_rank_00_optim_states.pt", "mp_rank_00_model_states.pt", "global.safetensors",
            "rank00000.safetensors", "dtr_scale", "step00000005", "checkpoints"} <= synced_before  # fmt: skip
    assert any(name.startswith(".latest.tmp") for name in synced_before)  # the new `latest` itself
    assert ("fsync", "checkpoints") in events[moved:]  # the rename of `latest` itself is made durable
    assert (tmp_path / "checkpoints" / "latest").read_text() == "step00000005"


def test_safe_loading_admits_one_thread_at_a_time() -> None:
    # torch's safe_globals is process-wide and its exit removes what it added: a second thread inside it at the
    # same time would lose its allow-list mid-load when the first leaves. The second must wait.
    import threading
    import time

    from dtr_scale.checkpoint_format import deepspeed_safe_loading

    inside, release, order = threading.Event(), threading.Event(), []

    def first() -> None:
        with deepspeed_safe_loading():
            inside.set()
            release.wait(5)
            order.append("first leaves")

    def second() -> None:
        inside.wait(5)
        with deepspeed_safe_loading():
            order.append("second enters")

    threads = [threading.Thread(target=first), threading.Thread(target=second)]
    for t in threads:
        t.start()
    inside.wait(5)
    time.sleep(0.3)  # ample time for the second thread to enter, were it not kept out
    assert order == []
    release.set()
    for t in threads:
        t.join(5)
    assert order == ["first leaves", "second enters"]
