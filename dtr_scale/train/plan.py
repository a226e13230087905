"""The run plan: everything about a run that follows from its config, the world size and the target device,
before any process group, model or data exists. The Trainer and `train --dry-run` both start from it, so the
dry run refuses what training would refuse (missing cluster files, a micro-batch that stratified sampling
cannot split) and plans the same layout."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from dtr_scale.config import (
    ConfigError,
    RunConfig,
    deepspeed_config,
    gradient_accumulation,
    merge_user_deepspeed_config,
    resolve_batch_layout,
    resolve_precision,
)
from dtr_scale.data.stream import StreamLayoutError, check_canonical_streams
from dtr_scale.train.build import build_diffusion, build_timestep_sampler, diffusion_snr, resolve_clusters
from dtr_scale.train.reshard import auto_canonical_streams


@dataclass
class RunPlan:
    """What `plan_run` resolved. cfg has train.micro_batch_size set for the world size; clusters are inclusive
    timestep intervals (None = one cluster); ds_config is the DeepSpeed JSON (the user's file merged in)."""

    cfg: RunConfig
    world_size: int
    precision: str
    accumulation: int
    ds_config: dict[str, Any]
    diffusion: Any
    clusters: list[tuple[int, int]] | None
    timestep_sampler: Any


def plan_run(
    cfg: RunConfig, world_size: int, device_type: str, bf16_supported: bool, user_ds_config: str | None = None
) -> RunPlan:
    """Resolve `cfg` for `world_size` ranks on `device_type` ("cuda" or "cpu"): the training diffusion, ANT's
    clusters and whether they stratify the micro-batch, then the batch layout (a micro-batch the clusters
    divide when stratifying), precision, accumulation and DeepSpeed JSON. Raises ConfigError naming the key."""
    from dtr_scale.mtl.sampling import resolve_sampling

    diffusion = build_diffusion(cfg)
    clusters = resolve_clusters(cfg, diffusion_snr(diffusion))
    uniform_t = cfg.diffusion.objective == "ddpm" or cfg.flow.time_sampling == "uniform"
    stratified = resolve_sampling(cfg.mtl.sampling, clusters, cfg.diffusion.diffusion_steps, uniform_t)
    cfg = resolve_batch_layout(cfg, world_size, stratify_over=len(clusters) if stratified else 1)
    if cfg.data.canonical_streams is None:  # a new run: the order's streams fit this world size
        data = dataclasses.replace(cfg.data, canonical_streams=auto_canonical_streams(world_size))
        cfg = dataclasses.replace(cfg, data=data)
    try:  # the family of world sizes that share one sample order
        check_canonical_streams(cfg.data.canonical_streams, world_size)
    except StreamLayoutError as err:
        raise ConfigError(str(err)) from None
    precision = resolve_precision(cfg, device_type, bf16_supported)
    ds_config = deepspeed_config(cfg, world_size, precision, device_type)
    ds_file = user_ds_config or cfg.deepspeed.config_file
    if ds_file:
        ds_config = merge_user_deepspeed_config(ds_file, ds_config)
    return RunPlan(
        cfg=cfg,
        world_size=world_size,
        precision=precision,
        accumulation=gradient_accumulation(cfg, world_size),
        ds_config=ds_config,
        diffusion=diffusion,
        clusters=clusters,
        timestep_sampler=build_timestep_sampler(cfg, clusters, stratified),
    )
