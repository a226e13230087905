"""Resuming a run at another world size or ZeRO stage ("resharding"): what the checkpoint says about its sharding,
the refusals, and DeepSpeed's Universal Checkpointing for the model and optimizer.

The model, optimizer and LR schedule go through DeepSpeed's own conversion (`deepspeed.checkpoint.
ds_to_universal`, run here in-process on rank 0, written once into `<tag>/universal/` beside the original
files) and the engine's `checkpoint.load_universal`. dtr-scale's own per-rank state (EMA shards, stream
positions, RNG, logging sums) is resharded by each object's `reshard_states(states of every old rank, rank)`
(train/checkpoint.py); the global state (step, balancer, skip counts via the stream) needs nothing.
docs/multi-node.md says what is elastic and what is not.
"""

from __future__ import annotations

import math
import shutil
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

from dtr_scale.checkpoint_format import global_state_path, read_state_file
from dtr_scale.errors import CheckpointError

UNIVERSAL_DIR = "universal"  # inside a tag directory: DeepSpeed's universal checkpoint of that tag
AUTO_STREAMS = 8  # data.canonical_streams when unset: lcm(8, world size) at the run's start


@dataclass
class SavedSharding:
    """How a checkpoint was written: world size, ZeRO stage (None before elastic runs), canonical streams
    (None before elastic runs)."""

    tag_dir: Path
    world_size: int
    zero_stage: int | None
    canonical_streams: int | None

    @property
    def elastic(self) -> bool:
        """Whether it was written by a dtr-scale that can reshard it."""
        return self.canonical_streams is not None


def saved_sharding(tag_dir: Path) -> SavedSharding:
    """The sharding (world size, ZeRO stage, canonical streams) recorded in a tag's global state file (key "layout")."""
    state = read_state_file(global_state_path(tag_dir))
    layout = state.get("layout", {})
    return SavedSharding(
        Path(tag_dir), int(state["world_size"]), layout.get("zero_stage"), layout.get("canonical_streams")
    )


def auto_canonical_streams(world_size: int) -> int:
    """data.canonical_streams for a new run that leaves it unset: the least multiple of 8 and the world size,
    so a run started at 1..8 ranks can move between 1, 2, 4 and 8, and a larger start keeps its divisors."""
    return math.lcm(AUTO_STREAMS, world_size)


def check_reshard(saved: SavedSharding, world_size: int, zero_stage: int, config_hint: str) -> bool:
    """Whether resuming `saved` at (world_size, zero_stage) needs resharding; CheckpointError (one line) when
    it cannot be: a checkpoint from before elastic runs, ZeRO stage 0 on either side, or a move between ZeRO-1/2
    and ZeRO-3 (DeepSpeed 0.19.8's universal load looks for the new stage's model-state files, which a
    checkpoint of the other kind does not have)."""
    if saved.world_size == world_size and saved.zero_stage in (None, zero_stage):
        return False
    if not saved.elastic:
        raise CheckpointError(
            f"checkpoint {saved.tag_dir} was written by {saved.world_size} ranks with a dtr-scale from before "
            f"elastic runs and cannot be resharded to {world_size}: resume it once with {saved.world_size} "
            f"processes (e.g. `torchrun --nproc_per_node {saved.world_size} -m dtr_scale train {config_hint}`); "
            "its next checkpoint can then be resumed at another world size"
        )
    if 0 in (saved.zero_stage, zero_stage):
        raise CheckpointError(
            f"checkpoint {saved.tag_dir} (ZeRO-{saved.zero_stage}, {saved.world_size} ranks) cannot be resumed "
            f"at ZeRO-{zero_stage} with {world_size} ranks: DeepSpeed's Universal Checkpointing reshards ZeRO-1/2/3 "
            f"only; resume with deepspeed.zero_stage={saved.zero_stage} and {saved.world_size} ranks"
        )
    if (saved.zero_stage == 3) != (zero_stage == 3):
        raise CheckpointError(
            f"checkpoint {saved.tag_dir} was written at ZeRO-{saved.zero_stage} and cannot be resumed at "
            f"ZeRO-{zero_stage}: DeepSpeed's universal load moves between ZeRO-1 and 2, not between those and "
            f"ZeRO-3; resume with deepspeed.zero_stage={saved.zero_stage} (at any world size that divides "
            "data.canonical_streams)"
        )
    return True


def reshard_line(saved: SavedSharding, world_size: int, zero_stage: int) -> str:
    """The one line a resharding resume prints, e.g. "resharding step 400 from world 16 to world 8"."""
    tag = saved.tag_dir.name
    step = int(tag.removeprefix("step")) if tag.startswith("step") and tag[4:].isdigit() else tag
    line = f"resharding step {step} from world {saved.world_size} to world {world_size}"
    if saved.zero_stage != zero_stage:
        line += f" (ZeRO-{saved.zero_stage} -> ZeRO-{zero_stage})"
    return line


def universal_checkpoint(tag_dir: Path) -> Path:
    """`tag_dir`/universal: DeepSpeed's universal checkpoint of the tag, converted here when it is not there yet
    (rank 0 only; the caller holds the other ranks at a barrier). Written to a temporary name and renamed, so
    an interrupted conversion is redone, never used.

    The conversion copies each module entry as a tensor, and NashMTL's / PCGrad's solver state is a module
    entry that is not one (nn.Module extra state, restored by dtr-scale from its own state file): it converts
    a staged copy of the tag whose model-state files hold the tensors only, and puts the original model-state
    files beside the result, which is what the engine loads the module from.
    """
    from deepspeed.checkpoint import ds_to_universal

    tag_dir = Path(tag_dir)
    out = tag_dir / UNIVERSAL_DIR
    if out.is_dir():
        return out
    partial, staged = tag_dir / f"{UNIVERSAL_DIR}.partial", tag_dir / f"{UNIVERSAL_DIR}.input"
    for path in (partial, staged):
        shutil.rmtree(path, ignore_errors=True)
    staged.mkdir()
    model_files = sorted(tag_dir.glob("*model_states.pt"))
    for path in tag_dir.glob("*.pt"):
        if path in model_files:
            _save_tensor_module_entries(path, staged / path.name)
        else:
            (staged / path.name).symlink_to(path.resolve())
    args = SimpleNamespace(
        input_folder=str(staged),
        output_folder=str(partial),
        num_extract_workers=1,  # in-process: no worker pool inside a training rank
        num_merge_workers=1,
        keep_temp_folder=False,
        strict=True,
        inject_missing_state=True,  # ZeRO-1/2 checkpoints lack the universal info DeepSpeed adds here
    )
    ds_to_universal.main(args)
    for path in model_files:
        shutil.copy2(path, partial / path.name)
    shutil.rmtree(staged)
    (tag_dir / "latest_universal").unlink(missing_ok=True)  # written by the conversion; not ours
    partial.rename(out)
    return out


def _save_tensor_module_entries(source: Path, target: Path) -> None:
    """A copy of a DeepSpeed model-state file whose "module" holds its tensor entries only (read safely)."""
    import torch

    from dtr_scale.checkpoint_format import deepspeed_safe_loading

    with deepspeed_safe_loading():
        state = torch.load(source, map_location="cpu", weights_only=True)
    if isinstance(state.get("module"), dict):
        state["module"] = {k: v for k, v in state["module"].items() if isinstance(v, torch.Tensor)}
    torch.save(state, target)
