"""Save and resume everything a run needs (model, optimizer, EMA, data position, balancer, RNG, step); one
owner for all state.

The on-disk layout and the state-file format live in dtr_scale/checkpoint_format.py (which `convert`
reads too).

`latest` moves only after every rank has written and fsynced its files and the ranks agreed that none failed,
so a crash mid-save leaves the previous checkpoint as the resume point and never a half-written one; a write
error (full disk, I/O error) is one line per rank that met it (train/checkpoint_write.py).
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
import yaml

from dtr_scale import __version__
from dtr_scale.checkpoint_format import (
    CHECKPOINTS_DIR,
    LATEST_NAME,
    TAG_RE,
    check_deepspeed_files_safe,
    files_loaded_by_rank,
    global_state_path,
    partition_rank,
    rank_state_path,
    read_latest,
    read_state_file,
    tag_for_step,
    write_state_file,
)
from dtr_scale.distributed import barrier
from dtr_scale.errors import CheckpointError
from dtr_scale.fileio import atomic_write_text, fsync_path
from dtr_scale.train.checkpoint_write import (
    WriteFailures,
    failure_error,
    gather_messages,
    guard_engine_writes,
    latest_now,
)
from dtr_scale.train.runtime import load_rng_state, rng_state

# ------------------------------------------------------------------------------- the checkpointer


class Stateful(Protocol):
    """What the checkpointer saves and restores (torch.distributed.checkpoint's Stateful protocol)."""

    def state_dict(self) -> dict[str, Any]:
        """The object's resumable state: nested dicts/lists of tensors and plain values."""
        ...

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what `state_dict` returned."""
        ...


@dataclass
class TrainProgress:
    """Where training stands: optimizer steps taken, samples seen (global), steps skipped as non-finite."""

    step: int = 0
    samples_seen: int = 0
    skipped_steps: int = 0

    def state_dict(self) -> dict[str, int]:
        """The three counters."""
        return {"step": self.step, "samples_seen": self.samples_seen, "skipped_steps": self.skipped_steps}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the three counters."""
        self.step, self.samples_seen = int(state["step"]), int(state["samples_seen"])
        self.skipped_steps = int(state["skipped_steps"])


@dataclass
class RunRecord:
    """What the run is: its config (YAML text), ANT clusters, the identity of its data (train/resume.py's
    data_fingerprint) and the package version. Restoring it checks that the clusters the config gives now are
    those the checkpoint was trained with (CheckpointError)."""

    config_text: str
    clusters: list[tuple[int, int]] | None
    data: str | None = None

    def state_dict(self) -> dict[str, Any]:
        """Config text, clusters as lists, data fingerprint and the package version."""
        clusters = [list(c) for c in self.clusters] if self.clusters else []
        return {"config": self.config_text, "clusters": clusters, "data": self.data, "version": __version__}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Check the saved clusters equal this run's (CheckpointError otherwise)."""
        saved = [tuple(c) for c in state["clusters"]]
        if saved != [tuple(c) for c in (self.clusters or [])]:
            raise CheckpointError(
                f"the checkpoint was trained with clusters {saved}, the config now gives {self.clusters}"
            )

    def check_resumable(self, state: dict[str, Any], tag: str) -> None:
        """Before DeepSpeed loads `tag`: a ZeRO-3 checkpoint resumes only with the `deepspeed.sub_group_size`
        it was saved with (it sets the optimizer's flat groups, whose saved state DeepSpeed then refuses with
        a message that names no key). CheckpointError names the key, both values and the override."""
        saved, now = _zero3_sub_group_size(state.get("config", "")), _zero3_sub_group_size(self.config_text)
        if saved is not None and now is not None and saved != now:
            raise CheckpointError(
                f"checkpoint {tag} was saved with deepspeed.sub_group_size={saved} (ZeRO-3 partitions the "
                f"optimizer state by it); this run has {now}: resume with the override "
                f"deepspeed.sub_group_size={saved}"
            )


def _zero3_sub_group_size(config_text: str) -> int | None:
    """The config's `deepspeed.sub_group_size` under ZeRO-3, else None; a config saved before the key existed
    ran with DeepSpeed's default, 1e9."""
    section = (yaml.safe_load(config_text) or {}).get("deepspeed") or {}
    if section.get("zero_stage") != 3:
        return None
    return int(section.get("sub_group_size", 1_000_000_000))


class BalancerState:
    """The loss balancer's state that DeepSpeed does not hold: NashMTL / PCGrad's weights, Gram and solver
    state (nn.Module extra state), not its parameters (UW's s is saved, sharded, by DeepSpeed), plus the
    per-cluster weights at the time of saving, which `convert` records. state_dict() is collective under
    ZeRO-3 (reading UW's weights gathers s): every rank calls it."""

    def __init__(self, balancer: torch.nn.Module) -> None:
        self.balancer = balancer

    def state_dict(self) -> dict[str, Any]:
        """{'state': the balancer's non-parameter state, 'weights': its k weights as floats}."""
        params = dict(self.balancer.named_parameters())
        state = {k: v for k, v in self.balancer.state_dict().items() if k not in params}
        weights = [float(w) for w in self.balancer.weights().detach().double().cpu()]
        return {"state": state, "weights": weights}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the non-parameter state (DeepSpeed restores the parameters)."""
        if state["state"]:
            self.balancer.load_state_dict(state["state"], strict=False)


class RNGState:
    """Python, numpy and torch's global RNG states (runtime.rng_state). No training draw uses them (the
    per-sample draws are keyed by seed, step and slot: train/draws.py); they are kept so that anything else
    random (a user's hook, a library) continues as it would have."""

    def state_dict(self) -> dict[str, Any]:
        """The RNG states (runtime.rng_state)."""
        return rng_state()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore them (runtime.load_rng_state)."""
        load_rng_state(state)

    def reshard_states(self, states: list[dict[str, Any]], rank: int) -> dict[str, Any]:
        """At another world size: rank r continues old rank r mod old_world's generators."""
        return states[rank % len(states)]


class Checkpointer:
    """Owns `run_dir/checkpoints` and all resumable state: DeepSpeed's (model, optimizer, LR schedule)
    through the engine, and ours by pulling `state_dict()` from each registered object on save and
    pushing `load_state_dict()` on resume. `global_objects` are equal on every rank (rank 0 writes
    them); `rank_objects` are each rank's own (EMA shard, data position, RNG, buffers)."""

    def __init__(
        self,
        run_dir: str | Path,
        engine=None,
        global_objects: dict[str, Stateful] | None = None,
        rank_objects: dict[str, Stateful] | None = None,
        *,
        keep_last: int = 2,
        keep_every: int = 0,
        rank: int = 0,
        world_size: int = 1,
        sharding: dict[str, int] | None = None,
    ):
        self.dir = Path(run_dir) / CHECKPOINTS_DIR
        self.sharding = sharding or {}  # zero_stage, canonical_streams: what a resharding resume reads back
        self.engine = engine
        self.global_objects, self.rank_objects = global_objects or {}, rank_objects or {}
        self.keep_last, self.keep_every = keep_last, keep_every
        self.rank, self.world_size = rank, world_size
        self.failures = WriteFailures()  # the current save's first OSError on this rank (checkpoint_write.py)
        guard_engine_writes(engine, self.failures)

    def latest_tag(self) -> str | None:
        """The tag `latest` names, or None before the first checkpoint; CheckpointError if it names an
        incomplete one."""
        return read_latest(self.dir)

    def save(self, step: int) -> str:
        """Write the checkpoint of optimizer step `step` on every rank (collective); return its tag. A write that
        fails on any rank (full disk, I/O error) raises CheckpointWriteError on every rank after they agree:
        `latest` does not move and the tag's files are removed."""
        tag = tag_for_step(step)
        global_state = {name: obj.state_dict() for name, obj in self.global_objects.items()}
        rank_state = {name: obj.state_dict() for name, obj in self.rank_objects.items()}
        self.failures.reset()
        self.engine.save_checkpoint(str(self.dir), tag=tag, save_latest=False)  # its writes: self.failures
        self.failures.run(self.dir / tag, self._write_own_files, tag, rank_state, global_state)
        self._agree(tag)  # every rank has written and fsynced: only now may `latest` move
        if self.rank == 0:
            self.failures.run(self.dir / LATEST_NAME, self._move_latest, tag)
        self._agree(tag)
        if self.rank == 0:
            self._prune(step)
        barrier()
        return tag

    def _write_own_files(self, tag: str, rank_state: dict, global_state: dict) -> None:
        """This rank's dtr-scale state file (rank 0: the global one too), then an fsync of every file it wrote."""
        ours = self.dir / tag / "dtr_scale"
        ours.mkdir(parents=True, exist_ok=True)
        write_state_file(
            rank_state_path(self.dir / tag, self.rank), {"world_size": self.world_size, **rank_state}
        )
        if self.rank == 0:
            write_state_file(
                global_state_path(self.dir / tag),
                # (key "layout" on disk, as checkpoints have always written it)
                {"world_size": self.world_size, "layout": self.sharding, **global_state},
            )
        for path in files_written_by_rank(self.dir / tag, self.rank):
            fsync_path(path)  # DeepSpeed does not fsync its files

    def _move_latest(self, tag: str) -> None:
        # the new names themselves are durable before `latest` names them
        for directory in (self.dir / tag / "dtr_scale", self.dir / tag, self.dir):
            fsync_path(directory)
        atomic_write_text(self.dir / LATEST_NAME, tag, durable=True)

    def _agree(self, tag: str) -> None:
        """Collective: when some rank failed to write, every rank raises (checkpoint_write.failure_error) after
        rank 0 removed the tag, unless `latest` already names it (a failure after the rename itself)."""
        messages = gather_messages(self.failures.message())
        if all(m is None for m in messages):
            return
        latest, still_safe = latest_now(self.dir)
        if self.rank == 0 and latest != tag:
            shutil.rmtree(self.dir / tag, ignore_errors=True)  # nothing half-written is left behind
        barrier()
        raise failure_error(messages, self.rank, tag, still_safe)

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

    def load(self, tag: str, reshard: bool = False) -> None:
        """Restore DeepSpeed's state and every registered object's from checkpoint `tag` (collective).

        reshard: the checkpoint was written at another world size or ZeRO stage (train/reshard.py decided and
        built the engine with `checkpoint.load_universal`): the model and optimizer come from DeepSpeed's
        universal checkpoint of the tag (converted on rank 0 first), and each rank object's state from
        `obj.reshard_states([its state on every old rank], rank)`.
        """
        tag_dir = self.dir / tag
        if not tag_dir.is_dir():
            raise FileNotFoundError(f"checkpoint {tag_dir} does not exist")
        global_state = read_state_file(global_state_path(tag_dir))
        saved_world = int(global_state["world_size"])
        if saved_world != self.world_size and not reshard:
            raise CheckpointError(
                f"checkpoint {tag_dir} was written by {saved_world} ranks, this run has {self.world_size}"
            )
        run = self.global_objects.get("run")
        if isinstance(run, RunRecord) and "run" in global_state:
            run.check_resumable(global_state["run"], tag)
        load_dir, ds_tag = str(self.dir), tag
        if reshard:
            from dtr_scale.train.reshard import UNIVERSAL_DIR, universal_checkpoint

            check_deepspeed_files_safe(tag_dir)  # the conversion reads every rank's files
            if self.rank == 0:
                universal_checkpoint(tag_dir)
            barrier()
            load_dir, ds_tag = str(tag_dir), UNIVERSAL_DIR
        else:
            check_deepspeed_files_safe(tag_dir, self.rank)
        groups = [{k: v for k, v in g.items() if k != "params"} for g in self.engine.optimizer.param_groups]
        load_path, _ = self.engine.load_checkpoint(
            load_dir, tag=ds_tag, load_optimizer_states=True, load_lr_scheduler_states=True
        )
        if reshard:
            restore_group_settings(self.engine, groups)
        if load_path is None:
            raise CheckpointError(f"DeepSpeed could not load checkpoint {tag_dir}")
        ranks = range(saved_world) if reshard else [self.rank]
        rank_states = [read_state_file(rank_state_path(tag_dir, r)) for r in ranks]
        self._restore(tag, self.global_objects, [global_state], global_state_path(tag_dir), False)
        self._restore(tag, self.rank_objects, rank_states, rank_state_path(tag_dir, ranks[0]), reshard)

    def _restore(
        self, tag: str, objects: dict[str, Stateful], states: list[dict], path: Path, reshard: bool
    ) -> None:
        """Push each object its state: states[0][name], or (reshard) its reshard of every old rank's."""
        missing = sorted(set(objects) - set(states[0]))
        if missing:
            raise CheckpointError(f"{path} has no state for {missing}: written by another dtr-scale version?")
        for name, obj in objects.items():
            try:
                if not reshard:
                    obj.load_state_dict(states[0][name])
                else:
                    obj.load_state_dict(obj.reshard_states([st[name] for st in states], self.rank))
            except CheckpointError as err:
                raise CheckpointError(f"checkpoint {tag}: {err}") from None


def restore_group_settings(engine, groups: list[dict[str, Any]]) -> None:
    """Repair two effects of DeepSpeed 0.19.8's ZeRO-3 universal load on a torch optimizer with several param
    groups (the model's and UW's s): every group gets the first group's settings, and the groups' Adam states
    share one `step` tensor, which each group's update then increments (measured: UW's s trained its first
    resumed step at the model's LR, and later ones with the bias correction of twice the steps). Puts back
    each group's settings as built (betas, eps, weight decay, initial_lr) with the LR of the restored schedule,
    and gives every state its own step."""
    lrs = engine.lr_scheduler.get_last_lr() if engine.lr_scheduler is not None else None
    for i, (group, settings) in enumerate(zip(engine.optimizer.param_groups, groups, strict=True)):
        group.update({k: v for k, v in settings.items() if k != "lr"})
        if lrs is not None:
            group["lr"] = lrs[i]
    inner = getattr(engine.optimizer, "optimizer", engine.optimizer)
    for state in inner.state.values():
        if isinstance(state.get("step"), torch.Tensor):
            state["step"] = state["step"].clone()


def files_written_by_rank(tag_dir: Path, rank: int) -> list[Path]:
    """The files of a tag that `rank` wrote: its own partitions and state file, and on rank 0 the shared ones."""
    own = rank_state_path(tag_dir, rank)
    files = [p for p in files_loaded_by_rank(tag_dir, rank) if rank == 0 or partition_rank(p) == rank]
    if rank == 0:
        files += [global_state_path(tag_dir)]
    return files + [own]
