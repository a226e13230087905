"""Resuming with a config that differs from the checkpoint's: refuse what cannot change, apply what may.

Before anything is built or written, the resolved config of this launch is compared key by key with the one
saved in the checkpoint (`check_config`). Keys that define what is trained are refused, all in one line that
names each key and both values; keys that may change (config/changes.py lists them, docs/resume.md renders
the list) are applied and stated one line each. `data.shards` is judged by content: another path to the same
shards (names, sizes, sha256) may change, other shards may not. Once the checkpoint is loaded,
`reset_lr_schedule` makes a new LR reach the optimizer and the LR scheduler. `keep_config` writes the new
run_dir/config.yaml and keeps the checkpoint's beside it as config.stepNNNNNNNN.yaml.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dtr_scale.checkpoint_format import CHECKPOINTS_DIR, global_state_path, read_state_file, tag_for_step
from dtr_scale.config import ConfigError, RunConfig, dump_yaml
from dtr_scale.config.changes import CHANGEABLE, config_changes, may_change
from dtr_scale.config.loading import load_yaml
from dtr_scale.fileio import atomic_write_text


def data_fingerprint(manifest) -> str:
    """sha256 over the manifest's shards (name, sample count, sha256 of each), latent shape and scaling factor:
    the identity of the data a run trains on, whatever path it is read from."""
    identity = {
        "shards": [[s["name"], int(s["num_samples"]), s.get("sha256")] for s in manifest.shards],
        "latent_shape": list(manifest.latent_shape),
        "scaling_factor": manifest.scaling_factor,
    }
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()


@dataclass
class ResumeChanges:
    """The checkpoint a run resumes from and what changed: `applied` lines to print once it is loaded."""

    step: int
    saved_config_text: str
    applied: list[str] = field(default_factory=list)


def _show(value: Any) -> str:
    return json.dumps(value) if isinstance(value, str | list) or value is None else str(value)


def check_config(cfg: RunConfig, run_dir: Path, tag: str, manifest) -> ResumeChanges:
    """Compare `cfg` (resolved for this launch) with the config saved in checkpoint `tag`; ConfigError naming
    every key that may not change, with both values, in one line. Reads only the checkpoint's global state."""
    tag_dir = Path(run_dir) / CHECKPOINTS_DIR / tag
    state = read_state_file(global_state_path(tag_dir))
    run, step = state["run"], int(state["progress"]["step"])
    saved = load_yaml(run["config"])
    changes = config_changes(saved, cfg.to_dict(), RunConfig().to_dict())
    same_data = run.get("data") in (None, data_fingerprint(manifest))  # None: saved before fingerprints
    if not same_data and "data.shards" not in {key for key, _, _ in changes}:
        changes.append(("data.shards", saved.get("data", {}).get("shards"), cfg.data.shards))
    refused, applied, restore = [], [], []
    for key, old, new in changes:
        change = f"{_show(old)} -> {_show(new)}"
        if key == "data.canonical_streams" and old is None:
            continue  # a checkpoint from before elastic runs: its stream restarts (train/reshard.py warns)
        if key == "data.shards" and run.get("data") is not None and same_data:
            applied.append(f"data.shards: {change} (the same shards: names, sizes and sha256)")
        elif key == "data.shards" and old == new:
            refused.append(f"data.shards {_show(new)} (the same path now holds other shards)")
        elif key == "data.shards":
            refused.append(
                f"data.shards {change} (" + ("other shards)" if run.get("data") else "another path)")
            )
        elif may_change(key):
            how = CHANGEABLE.get(key) or CHANGEABLE[key.split(".", 1)[0] + ".*"]
            applied.append(f"{key}: {change} ({how})")
        else:
            refused.append(f"{key} {change}")
            restore.append(f"{key}={_show(old)}")
    if refused:
        back = f" (the overrides that resume: {' '.join(restore)})" if restore else ""
        raise ConfigError(
            f"{run_dir} resumes from {tag_dir} (step {step}), where these keys cannot change: "
            f"{'; '.join(refused)}. Set them back{back}, or train them in a new run_dir (what may change on "
            "resume: docs/resume.md)"
        )
    return ResumeChanges(step, run["config"], applied)


def keep_config(run_dir: Path, cfg: RunConfig, changes: ResumeChanges | None) -> None:
    """Write run_dir/config.yaml (what is trained from now on); when it differs from the checkpoint's, keep the
    checkpoint's as config.stepNNNNNNNN.yaml beside it (rank 0)."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    if changes is not None and changes.applied:
        kept = run_dir / f"config.{tag_for_step(changes.step)}.yaml"
        atomic_write_text(kept, changes.saved_config_text)
    atomic_write_text(run_dir / "config.yaml", dump_yaml(cfg))


def reset_lr_schedule(scheduler, base_lrs: list[float]) -> None:
    """After a checkpoint load: the LR schedule of this launch's config at the checkpoint's position.

    The checkpoint restores the scheduler's base_lrs and the optimizer's param groups (lr, initial_lr) with the
    values it was trained with, so a new train.lr would be ignored. Here base_lrs (those this launch's config
    built, one per param group) become the scheduler's and each group's initial_lr, and each group's lr is
    recomputed as base_lr x lr_lambda(last_epoch), exactly as LambdaLR computes it, with the schedule function
    built from this launch's config. Unchanged values give back the same LR bit for bit.
    """
    scheduler.base_lrs = list(base_lrs)
    groups = scheduler.optimizer.param_groups
    for group, base, schedule in zip(groups, base_lrs, scheduler.lr_lambdas, strict=True):
        group["initial_lr"] = base
        group["lr"] = base * schedule(scheduler.last_epoch)
    scheduler._last_lr = [group["lr"] for group in groups]
