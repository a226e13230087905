"""Save and resume everything a run needs (DESIGN §6); one owner for all state.

Layout of `run_dir/checkpoints/`:

    latest                      tag of the newest COMPLETE checkpoint (moved last, atomically)
    step00001000/               DeepSpeed's files (model, optimizer, lr scheduler; per ZeRO rank)
    step00001000/dtr_scale/global.safetensors   state equal on every rank (step, samples seen,
                                                balancer, cluster-loss buffer, config, version)
    step00001000/dtr_scale/rank00003.safetensors  per-rank state (EMA shard, RNG states, data stream)

Per-rank and global state are plain `state_dict()`s split into tensors (stored as safetensors) and
everything else (stored as JSON in the safetensors metadata): nothing is ever unpickled from our
files. DeepSpeed's own files are pickles that DeepSpeed loads itself; before handing them over we
re-open each with `torch.load(weights_only=True)` and a small allow-list, so a file carrying
arbitrary code is refused rather than executed.

`latest` moves only after every rank has written and fsynced its files (barrier), so a crash
mid-save leaves the previous checkpoint as the resume point and never a half-written one.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from safetensors.torch import load_file, safe_open, save_file

from dtr_scale.errors import CheckpointError

TAG_RE = re.compile(r"^step(\d{8,})$")


def tag_for_step(step: int) -> str:
    return f"step{step:08d}"


# ------------------------------------------------------------------------------- state (de)serialisation


def split_state(state: Any, tensors: dict[str, torch.Tensor], prefix: str = "") -> Any:
    """Replace tensors in a nested state by references, collecting them in `tensors`."""
    if isinstance(state, torch.Tensor):
        key = prefix or "tensor"
        tensors[key] = state.detach().cpu().contiguous()
        return {"__tensor__": key}
    if isinstance(state, dict):
        return {
            "__dict__": [
                [k, split_state(v, tensors, f"{prefix}.{i}" if prefix else str(i))]
                for i, (k, v) in enumerate(state.items())
            ]
        }
    if isinstance(state, list | tuple):
        items = [split_state(v, tensors, f"{prefix}.{i}" if prefix else str(i)) for i, v in enumerate(state)]
        return {"__tuple__": items} if isinstance(state, tuple) else items
    if state is None or isinstance(state, bool | int | float | str):
        return state
    raise TypeError(f"cannot checkpoint a value of type {type(state).__name__} at {prefix or '<root>'}")


def join_state(node: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(node, dict):
        if "__tensor__" in node:
            return tensors[node["__tensor__"]]
        if "__tuple__" in node:
            return tuple(join_state(v, tensors) for v in node["__tuple__"])
        return {k: join_state(v, tensors) for k, v in node["__dict__"]}
    if isinstance(node, list):
        return [join_state(v, tensors) for v in node]
    return node


def write_state_file(path: Path, state: dict[str, Any]) -> None:
    """Write a nested state to one safetensors file, atomically (tmp + fsync + rename)."""
    tensors: dict[str, torch.Tensor] = {}
    skeleton = split_state(state, tensors)
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata={"state": json.dumps(skeleton)})
    with open(tmp, "rb") as fh:
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def read_state_file(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint state file {path} is missing (incomplete or foreign checkpoint)")
    with safe_open(str(path), framework="pt") as fh:
        metadata = fh.metadata() or {}
    if "state" not in metadata:
        raise ValueError(f"{path} is not a dtr-scale state file (no 'state' metadata)")
    return join_state(json.loads(metadata["state"]), load_file(str(path)))


# ------------------------------------------------------------------------------- safe pre-check


def _safe_globals() -> list:
    import argparse
    import collections

    allowed: list = [collections.OrderedDict, argparse.Namespace, torch.Size, set, frozenset]
    try:  # DeepSpeed records enums and version objects in its model-state files
        from deepspeed.runtime.zero.config import ZeroStageEnum

        allowed.append(ZeroStageEnum)
    except ImportError:
        pass
    try:  # the optimizer-state files record the (unused in fp32/bf16) loss scaler object
        from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler

        allowed += [LossScaler, DynamicLossScaler]
    except ImportError:
        pass
    try:
        from deepspeed.utils.tensor_fragment import fragment_address

        allowed.append(fragment_address)
    except ImportError:
        pass
    return allowed


_RANK_FILE_RE = re.compile(r"zero_pp_rank_(\d+)_")


def files_loaded_by_rank(tag_dir: Path, rank: int | None) -> list[Path]:
    """DeepSpeed's files in `tag_dir` that `rank` reads on resume: the shared model-states file(s) and its
    own `*zero_pp_rank_{rank}_*` partitions (DeepSpeed reads another rank's partition only for elastic
    checkpoints, which dtr-scale does not enable). rank None: every file (convert reads them all)."""
    files = sorted(tag_dir.glob("*.pt"))
    if rank is None:
        return files
    return [p for p in files if (m := _RANK_FILE_RE.search(p.name)) is None or int(m.group(1)) == rank]


def check_deepspeed_files_safe(tag_dir: Path, rank: int | None = None) -> None:
    """Refuse DeepSpeed checkpoint files that would need arbitrary unpickling to load (those `rank` loads)."""
    with torch.serialization.safe_globals(_safe_globals()):
        for path in files_loaded_by_rank(tag_dir, rank):
            try:
                torch.load(path, map_location="cpu", weights_only=True)
            except Exception as err:  # noqa: BLE001 - re-raised with the file name
                raise CheckpointError(
                    f"refusing to load {path}: it does not load with torch.load(weights_only=True) and the "
                    f"dtr-scale allow-list ({err.__class__.__name__}: {str(err).splitlines()[0]})"
                ) from err


# ------------------------------------------------------------------------------- the checkpointer


class Checkpointer:
    """Owns `run_dir/checkpoints`: save, retention, and resume of DeepSpeed + dtr-scale state."""

    def __init__(
        self, run_dir: str | Path, keep_last: int = 2, keep_every: int = 0, rank: int = 0, world_size: int = 1
    ):
        self.dir = Path(run_dir) / "checkpoints"
        self.keep_last, self.keep_every = keep_last, keep_every
        self.rank, self.world_size = rank, world_size

    def latest_tag(self) -> str | None:
        latest = self.dir / "latest"
        if not latest.is_file():
            return None
        tag = latest.read_text().strip()
        if not (self.dir / tag / "dtr_scale" / "global.safetensors").is_file():
            raise CheckpointError(
                f"{latest} names {tag!r}, but {self.dir / tag} is not a complete dtr-scale checkpoint"
            )
        return tag

    def save(self, engine, step: int, global_state: dict[str, Any], rank_state: dict[str, Any]) -> str:
        tag = tag_for_step(step)
        engine.save_checkpoint(str(self.dir), tag=tag, save_latest=False)
        ours = self.dir / tag / "dtr_scale"
        ours.mkdir(parents=True, exist_ok=True)
        write_state_file(
            ours / f"rank{self.rank:05d}.safetensors", {"world_size": self.world_size, **rank_state}
        )
        if self.rank == 0:
            write_state_file(ours / "global.safetensors", {"world_size": self.world_size, **global_state})
        for path in files_written_by_rank(self.dir / tag, self.rank):
            fsync_path(path)  # DeepSpeed does not fsync its files
        _barrier()  # every rank has written and fsynced: only now may `latest` move
        if self.rank == 0:
            for directory in (ours, self.dir / tag, self.dir):  # the new names themselves are durable
                fsync_path(directory)
            tmp = self.dir / "latest.tmp"
            tmp.write_text(tag)
            fsync_path(tmp)
            os.replace(tmp, self.dir / "latest")
            fsync_path(self.dir)
            self._prune(step)
        _barrier()
        return tag

    def _prune(self, current_step: int) -> None:
        steps = sorted(
            int(m.group(1)) for p in self.dir.iterdir() if (m := TAG_RE.match(p.name)) and p.is_dir()
        )
        keep = set(steps[-self.keep_last :]) | {current_step}
        if self.keep_every:
            keep |= {s for s in steps if s % self.keep_every == 0}
        for s in steps:
            if s not in keep:
                shutil.rmtree(self.dir / tag_for_step(s), ignore_errors=True)

    def load(self, engine, tag: str) -> tuple[dict[str, Any], dict[str, Any]]:
        """Restore DeepSpeed state into `engine`; return (global_state, this rank's state)."""
        tag_dir = self.dir / tag
        if not tag_dir.is_dir():
            raise FileNotFoundError(f"checkpoint {tag_dir} does not exist")
        global_state = read_state_file(tag_dir / "dtr_scale" / "global.safetensors")
        saved_world = int(global_state["world_size"])
        if saved_world != self.world_size:
            raise CheckpointError(
                f"checkpoint {tag_dir} was written by {saved_world} ranks, this run has {self.world_size}. "
                "Exact resume (EMA shards, data-stream positions, per-rank RNG) needs the same world size: "
                f"relaunch with {saved_world} processes, or start a new run from `dtr-scale convert` weights."
            )
        check_deepspeed_files_safe(tag_dir, self.rank)
        load_path, _ = engine.load_checkpoint(
            str(self.dir), tag=tag, load_optimizer_states=True, load_lr_scheduler_states=True
        )
        if load_path is None:
            raise CheckpointError(f"DeepSpeed could not load checkpoint {tag_dir}")
        rank_state = read_state_file(tag_dir / "dtr_scale" / f"rank{self.rank:05d}.safetensors")
        return global_state, rank_state


def files_written_by_rank(tag_dir: Path, rank: int) -> list[Path]:
    """The files of a tag that `rank` wrote: its own partitions and state file, and on rank 0 the shared ones."""
    own = f"rank{rank:05d}.safetensors"
    files = [
        p for p in tag_dir.glob("*.pt") if (m := _RANK_FILE_RE.search(p.name)) and int(m.group(1)) == rank
    ]
    if rank == 0:
        files += [p for p in tag_dir.glob("*.pt") if not _RANK_FILE_RE.search(p.name)]
        files += [tag_dir / "dtr_scale" / "global.safetensors"]
    return files + [tag_dir / "dtr_scale" / own]


def fsync_path(path: Path) -> None:
    """fsync a file or a directory (a directory's fsync makes the names it holds durable; POSIX)."""
    flags = os.O_RDONLY | (os.O_DIRECTORY if path.is_dir() else 0)
    fd = os.open(path, flags)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()
