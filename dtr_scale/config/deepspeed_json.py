"""Runtime resolution of a config for a world size and device: the batch layout (micro-batch x accumulation x
world = global batch), the precision, and the DeepSpeed JSON derived from the config (or a user's JSON checked
against it)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from dtr_scale.config.schema import ConfigError, RunConfig
from dtr_scale.config.validation import stratifies


def resolve_batch_layout(cfg: RunConfig, world_size: int, stratify_over: int | None = None) -> RunConfig:
    """A copy of `cfg` with train.micro_batch_size (and the accumulation) fixed for `world_size` ranks.

    Given micro_batch_size: checked as it is. Unset: per rank = global / world must be whole; the micro-
    batch is per rank when <= train.max_micro_batch_size, else the largest divisor of it that is (and that
    k divides, when stratifying), the rest made up by gradient accumulation. ConfigError when none exists.
    stratify_over: the k every micro-batch is split over, from the resolved clusters (train/plan.py); None =
    judged from the config alone (`stratifies`), which cannot see the sizes in an `mtl.clusters_file`.
    """
    t = cfg.train
    if t.micro_batch_size is None:
        if t.global_batch_size % world_size:
            raise ConfigError(
                f"train.global_batch_size={t.global_batch_size} cannot be split evenly over {world_size} ranks",
                keys=("train.global_batch_size",),
            )
        per_rank = t.global_batch_size // world_size
        num_clusters = stratify_over or (cfg.mtl.num_clusters if stratifies(cfg) else 1)
        # A given accumulation is the user's: the micro-batch follows from it.
        if t.gradient_accumulation_steps is not None:
            return _micro_batch_for_accumulation(cfg, world_size, per_rank, num_clusters)
        fits = [
            d
            for d in range(1, min(per_rank, t.max_micro_batch_size) + 1)
            if per_rank % d == 0 and d % num_clusters == 0
        ]
        if not fits:
            raise ConfigError(
                f"train.global_batch_size={t.global_batch_size} over {world_size} ranks is {per_rank} per rank, "
                f"with no micro-batch <= train.max_micro_batch_size={t.max_micro_batch_size} that divides it"
                + (
                    f" and that its {num_clusters} clusters divide (stratified sampling; mtl.sampling=uniform lifts it)"
                    if num_clusters > 1
                    else ""
                ),
                keys=("train.global_batch_size", "train.max_micro_batch_size")
                + (("mtl.num_clusters", "mtl.sampling") if num_clusters > 1 else ()),
            )
        train = dataclasses.replace(t, micro_batch_size=max(fits), gradient_accumulation_steps=None)
        cfg = dataclasses.replace(cfg, train=train)
    gradient_accumulation(cfg, world_size)  # raises for an impossible layout
    return cfg


def _micro_batch_for_accumulation(
    cfg: RunConfig, world_size: int, per_rank: int, num_clusters: int
) -> RunConfig:
    """micro_batch_size = per rank / train.gradient_accumulation_steps, which must be whole, at most
    train.max_micro_batch_size (what one device holds) and split over the stratified clusters; ConfigError naming
    the keys otherwise."""
    t = cfg.train
    accumulation = t.gradient_accumulation_steps
    micro, rest = divmod(per_rank, accumulation)
    keys = ("train.global_batch_size", "train.gradient_accumulation_steps")
    head = (
        f"train.global_batch_size={t.global_batch_size} over {world_size} ranks in "
        f"train.gradient_accumulation_steps={accumulation} micro-batches"
    )
    if rest or micro < 1:
        raise ConfigError(f"{head} does not split evenly ({per_rank} per rank)", keys=keys)
    if micro > t.max_micro_batch_size:
        raise ConfigError(
            f"{head} gives micro-batches of {micro}, above train.max_micro_batch_size={t.max_micro_batch_size}",
            keys=(*keys, "train.max_micro_batch_size"),
        )
    if micro % num_clusters:
        raise ConfigError(
            f"{head} gives micro-batches of {micro}, which its {num_clusters} clusters do not divide (stratified "
            "sampling; mtl.sampling=uniform lifts it)",
            keys=(*keys, "mtl.num_clusters", "mtl.sampling"),
        )
    return dataclasses.replace(cfg, train=dataclasses.replace(t, micro_batch_size=micro))


def gradient_accumulation(cfg: RunConfig, world_size: int) -> int:
    """micro_batch x accumulation x world must equal the global batch; returns the accumulation."""
    if cfg.train.micro_batch_size is None:
        cfg = resolve_batch_layout(cfg, world_size)
    t = cfg.train
    per_step = t.micro_batch_size * world_size
    if t.gradient_accumulation_steps is not None:
        if per_step * t.gradient_accumulation_steps != t.global_batch_size:
            raise ConfigError(
                f"train.micro_batch_size ({t.micro_batch_size}) x train.gradient_accumulation_steps "
                f"({t.gradient_accumulation_steps}) x world size ({world_size}) = "
                f"{per_step * t.gradient_accumulation_steps} != train.global_batch_size ({t.global_batch_size})",
                keys=(
                    "train.micro_batch_size",
                    "train.gradient_accumulation_steps",
                    "train.global_batch_size",
                ),
            )
        return t.gradient_accumulation_steps
    if t.global_batch_size % per_step:
        raise ConfigError(
            f"train.global_batch_size ({t.global_batch_size}) is not divisible by train.micro_batch_size "
            f"({t.micro_batch_size}) x world size ({world_size})",
            keys=("train.global_batch_size", "train.micro_batch_size"),
        )
    return t.global_batch_size // per_step


def resolve_precision(cfg: RunConfig, device_type: str, bf16_supported: bool) -> str:
    """train.precision for a device: auto = bf16 on a CUDA device that supports it, else fp32. bf16 is
    also allowed on CPU, through DeepSpeed's CPU accelerator (its bf16 optimizer and checkpoints: the
    CPU twin of the GPU path that the tests exercise). ConfigError when bf16 is asked of a device without it."""
    p = cfg.train.precision
    if p == "auto":
        return "bf16" if device_type == "cuda" and bf16_supported else "fp32"
    if p == "bf16" and not bf16_supported:
        raise ConfigError(
            f"train.precision=bf16 requested but the {device_type} device here has no bf16 training support"
        )
    return p


def deepspeed_config(cfg: RunConfig, world_size: int, precision: str, device_type: str) -> dict[str, Any]:
    """The DeepSpeed JSON derived from the run config (the optimizer is passed as a torch object)."""
    cfg = resolve_batch_layout(cfg, world_size)
    accumulation = gradient_accumulation(cfg, world_size)
    zero: dict[str, Any] = {"stage": cfg.deepspeed.zero_stage}
    if cfg.deepspeed.zero_stage > 0:
        zero.update(
            contiguous_gradients=True,
            overlap_comm=bool(cfg.deepspeed.overlap_comm and device_type == "cuda"),
            reduce_bucket_size=cfg.deepspeed.reduce_bucket_size,
        )
    if cfg.deepspeed.zero_stage == 3:
        ds = cfg.deepspeed
        zero.update(
            stage3_max_live_parameters=ds.stage3_max_live_parameters,
            stage3_max_reuse_distance=ds.stage3_max_reuse_distance,
            stage3_prefetch_bucket_size=ds.stage3_prefetch_bucket_size,
            stage3_param_persistence_threshold=ds.stage3_param_persistence_threshold,
            sub_group_size=ds.sub_group_size,
        )
    return {
        "train_batch_size": cfg.train.global_batch_size,
        "train_micro_batch_size_per_gpu": cfg.train.micro_batch_size,
        "gradient_accumulation_steps": accumulation,
        "gradient_clipping": cfg.train.grad_clip,
        "zero_optimization": zero,
        "bf16": {"enabled": precision == "bf16"},
        "fp16": {"enabled": False},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }


def merge_user_deepspeed_config(path: str | Path, derived: dict[str, Any]) -> dict[str, Any]:
    """The derived DeepSpeed JSON updated by the user's file at `path`; ConfigError when one of the keys the
    YAML owns (batch layout, clipping, ZeRO stage and knobs, precision) disagrees, named with its YAML key.
    Every other DeepSpeed key of the file (e.g. communication or offload settings) is taken as written."""
    path = Path(path)
    try:
        user = json.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"deepspeed.config_file {path} does not exist") from None
    except json.JSONDecodeError as err:
        raise ConfigError(f"deepspeed.config_file {path} is not valid JSON: {err}") from None
    if not isinstance(user, dict):
        raise ConfigError(f"deepspeed.config_file {path}: expected a JSON object")
    for section in ("optimizer", "scheduler"):
        if section in user:
            raise ConfigError(
                f"{path}: '{section}' is set by dtr-scale from the YAML (train.lr, train.betas, "
                f"train.weight_decay, train.warmup_steps); remove it from the DeepSpeed JSON"
            )
    checks = _yaml_owned_keys(derived)
    for json_path, (yaml_key, expected) in checks.items():
        node: Any = user
        for part in json_path:
            node = node.get(part) if isinstance(node, dict) else None
        if node is not None and node != expected:  # (a key the derived JSON leaves out: expected None)
            raise ConfigError(
                f"{path}: {'.'.join(json_path)} = {node!r} disagrees with {yaml_key} (resolved: {expected!r})"
            )
    merged = json.loads(json.dumps(derived))
    for key, value in user.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = {**merged[key], **value}
        else:
            merged[key] = value
    return merged


def _yaml_owned_keys(derived: dict[str, Any]) -> dict[tuple[str, ...], tuple[str, Any]]:
    """The DeepSpeed JSON paths that the YAML owns, each with its YAML key and the derived value."""
    checks = {
        ("train_batch_size",): ("train.global_batch_size", derived["train_batch_size"]),
        ("train_micro_batch_size_per_gpu",): (
            "train.micro_batch_size",
            derived["train_micro_batch_size_per_gpu"],
        ),
        ("gradient_accumulation_steps",): (
            "train.gradient_accumulation_steps",
            derived["gradient_accumulation_steps"],
        ),
        ("gradient_clipping",): ("train.grad_clip", derived["gradient_clipping"]),
        ("zero_optimization", "stage"): ("deepspeed.zero_stage", derived["zero_optimization"]["stage"]),
        ("bf16", "enabled"): ("train.precision", derived["bf16"]["enabled"]),
        ("fp16", "enabled"): ("train.precision (fp16 is not supported; use bf16)", False),
    }
    # The ZeRO knobs that are YAML keys (deepspeed.*) must agree too: what config.yaml records is what ran.
    zero = derived["zero_optimization"]
    for name in (
        "reduce_bucket_size", "overlap_comm", "contiguous_gradients", "stage3_max_live_parameters",
        "stage3_max_reuse_distance", "stage3_prefetch_bucket_size", "stage3_param_persistence_threshold",
        "sub_group_size",
    ):  # fmt: skip
        yaml_key = f"deepspeed.{name}" if name != "contiguous_gradients" else "(always true at ZeRO >= 1)"
        checks[("zero_optimization", name)] = (
            yaml_key + ("" if name in zero else f" (not used at deepspeed.zero_stage={zero['stage']})"),
            zero.get(name),
        )
    return checks
