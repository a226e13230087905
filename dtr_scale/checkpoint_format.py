"""The on-disk format of a dtr-scale checkpoint, shared by the trainer (train/checkpoint.py) and `convert`.

Layout of `run_dir/checkpoints/`:

    latest                      tag of the newest COMPLETE checkpoint (moved last, atomically)
    step00001000/               DeepSpeed's files (model, optimizer, lr scheduler; per ZeRO rank)
    step00001000/dtr_scale/global.safetensors     state equal on every rank (step, samples seen, clusters,
                                                  balancer state and weights, config, version)
    step00001000/dtr_scale/rank00003.safetensors  per-rank state (EMA shard, RNG, data stream, log sums)

Our state files are nested `state_dict()`s split into tensors (stored as safetensors) and everything else
(JSON in the safetensors metadata): nothing is ever unpickled from them. DeepSpeed's own files are pickles
that DeepSpeed loads itself; before handing them over each is re-opened with `torch.load(weights_only=True)`
and a small allow-list, so a file carrying arbitrary code is refused rather than executed.
"""

from __future__ import annotations

import json
import math
import os
import re
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, safe_open, save_file

from dtr_scale.errors import CheckpointError
from dtr_scale.fileio import atomic_path

TAG_RE = re.compile(r"^step(\d{8,})$")
CHECKPOINTS_DIR = "checkpoints"  # under run_dir: the DeepSpeed tags and `latest`
LATEST_NAME = "latest"


def tag_for_step(step: int) -> str:
    """The tag (directory name) of the checkpoint of optimizer step `step`, e.g. step00001000."""
    return f"step{step:08d}"


def global_state_path(tag_dir: Path) -> Path:
    """The file of state equal on every rank (step, config, clusters, balancer) in a tag directory."""
    return Path(tag_dir) / "dtr_scale" / "global.safetensors"


def rank_state_path(tag_dir: Path, rank: int) -> Path:
    """The file of `rank`'s own state (EMA shard, RNG, data position, logging sums) in a tag directory."""
    return Path(tag_dir) / "dtr_scale" / f"rank{rank:05d}.safetensors"


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
    """Inverse of `split_state`: the nested state with its tensor references filled in."""
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
    """Write a nested state to one safetensors file, atomically (tmp + fsync + rename); OSError (with its errno)
    when the file system refuses the write."""
    tensors: dict[str, torch.Tensor] = {}
    skeleton = split_state(state, tensors)
    with atomic_path(path, durable=True) as tmp:
        try:
            save_file(tensors, str(tmp), metadata={"state": json.dumps(skeleton)})
        except SafetensorError as err:  # its I/O errors (a full disk) are not OSErrors: give the errno back
            code = re.search(r"\(os error (\d+)\)", str(err))
            if code is None:
                raise
            raise OSError(int(code[1]), os.strerror(int(code[1])), str(path)) from err


def read_state_file(path: Path) -> dict[str, Any]:
    """The nested state `write_state_file` wrote; FileNotFoundError / ValueError name the file."""
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint state file {path} is missing (incomplete or foreign checkpoint)")
    with safe_open(str(path), framework="pt") as fh:
        metadata = fh.metadata() or {}
    if "state" not in metadata:
        raise ValueError(f"{path} is not a dtr-scale state file (no 'state' metadata)")
    return join_state(json.loads(metadata["state"]), load_file(str(path)))


# ------------------------------------------------------------------------------- safe pre-check


def deepspeed_safe_globals() -> list:
    """The classes DeepSpeed's checkpoint pickles name, allowed for `torch.load(weights_only=True)`."""
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


def partition_rank(path: Path) -> int | None:
    """The rank whose partition a DeepSpeed file `*zero_pp_rank_{r}_*` holds; None for a shared file."""
    match = _RANK_FILE_RE.search(path.name)
    return None if match is None else int(match.group(1))


def files_loaded_by_rank(tag_dir: Path, rank: int | None) -> list[Path]:
    """DeepSpeed's files in `tag_dir` that `rank` reads on resume: the shared model-states file(s) and its
    own `*zero_pp_rank_{rank}_*` partitions (DeepSpeed reads another rank's partition only for elastic
    checkpoints, which dtr-scale does not enable). rank None: every file (convert reads them all)."""
    files = sorted(tag_dir.glob("*.pt"))
    if rank is None:
        return files
    return [p for p in files if partition_rank(p) in (None, rank)]


def complete_tags(checkpoints_dir: Path) -> list[str]:
    """The tags under a run's `checkpoints/` whose dtr-scale global state was written (sorted)."""
    return sorted(
        p.parent.parent.name for p in checkpoints_dir.glob(f"*/{global_state_path(Path()).as_posix()}")
    )


def read_latest(checkpoints_dir: Path) -> str | None:
    """The tag `checkpoints/latest` names, or None before the first checkpoint; CheckpointError if it names
    an incomplete one (`latest` only moves after every rank wrote, so that means files were removed)."""
    latest = checkpoints_dir / LATEST_NAME
    if not latest.is_file():
        return None
    tag = latest.read_text().strip()
    if not global_state_path(checkpoints_dir / tag).is_file():
        raise CheckpointError(
            f"{latest} names {tag!r}, but {checkpoints_dir / tag} is not a complete dtr-scale checkpoint"
        )
    return tag


# torch.serialization.safe_globals edits one process-wide list and its exit removes what it added, so two
# threads inside it at once (parallel conversions) drop each other's allow-list mid-load.
_SAFE_GLOBALS_LOCK = threading.RLock()


@contextmanager
def deepspeed_safe_loading():
    """`torch.load(weights_only=True)` of DeepSpeed files allowed (deepspeed_safe_globals), one thread at a time."""
    with _SAFE_GLOBALS_LOCK, torch.serialization.safe_globals(deepspeed_safe_globals()):
        yield


def check_deepspeed_files_safe(tag_dir: Path, rank: int | None = None) -> None:
    """Refuse DeepSpeed checkpoint files that would need arbitrary unpickling to load (those `rank` loads)."""
    with deepspeed_safe_loading():
        for path in files_loaded_by_rank(tag_dir, rank):
            try:
                torch.load(path, map_location="cpu", weights_only=True)
            except Exception as err:  # noqa: BLE001 - re-raised with the file name
                raise CheckpointError(
                    f"refusing to load {path}: it does not load with torch.load(weights_only=True) and the "
                    f"dtr-scale allow-list ({err.__class__.__name__}: {str(err).splitlines()[0]})"
                ) from err


def assemble_ema_shards(states: list[dict], shapes: dict[str, tuple[int, ...]]) -> dict[str, torch.Tensor]:
    """Full fp32 tensors (shapes[name]) from every rank's saved EMA state {"segments": [(name, start, length)],
    "shard": (n,) float32}, the layout train/ema.py saves; ValueError when the shards do not cover a parameter."""
    full = {name: torch.zeros(math.prod(shape), dtype=torch.float32) for name, shape in shapes.items()}
    covered = dict.fromkeys(shapes, 0)
    for state in states:
        offset = 0
        for name, start, length in state["segments"]:
            if name not in full:
                raise ValueError(f"EMA shard names parameter {name!r}, which the model does not have")
            full[name][start : start + length] = state["shard"][offset : offset + length]
            covered[name] += length
            offset += length
    missing = [name for name, n in covered.items() if n != full[name].numel()]
    if missing:
        raise ValueError(f"EMA shards do not cover parameter(s) {missing[:3]}: a rank file is missing")
    return {name: full[name].view(shapes[name]) for name in shapes}
