"""Config -> the trainer's parts: ANT clusters, diffusion, loss balancer, optimizer and LR schedule.

Each builder takes the run config (and what it needs of the data) and raises ConfigError naming the key
when the config cannot be built. The model itself is built by `dtr_scale.models.build.build_model`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from dtr_scale.config import ConfigError, RunConfig
from dtr_scale.config.objective import learns_sigma


def resolve_clusters(cfg: RunConfig, snr_values: np.ndarray) -> list[tuple[int, int]] | None:
    """ANT's timestep clusters as inclusive intervals [(left, right), ...] covering 0..T-1, or None for one.

    From `mtl.clusters_file` when given, else interval clustering (ANT, Go et al. 2023, Sec. 4.1: dynamic
    programming over contiguous intervals) of the per-task SNR (snr_values: float64 (T,); DDPM: abar_t /
    (1 - abar_t) per timestep, flow: ((1 - t) / t)^2 per bin of t, `diffusion_snr`) or of the task-affinity
    matrix in `mtl.affinity_file` (mtl.objective=affinity).
    """
    from dtr_scale.mtl.clustering import interval_clustering, load_clusters

    m, steps = cfg.mtl, cfg.diffusion.diffusion_steps
    if m.clusters_file:
        try:
            ddpm_schedule = cfg.diffusion.noise_schedule if cfg.diffusion.objective == "ddpm" else None
            clusters = load_clusters(m.clusters_file, steps, cfg.diffusion.objective, ddpm_schedule)
        except (OSError, ValueError) as err:
            raise ConfigError(f"mtl.clusters_file: {err}") from None
        if len(clusters) != m.num_clusters:
            raise ConfigError(
                f"mtl.clusters_file {m.clusters_file} has {len(clusters)} clusters, mtl.num_clusters is {m.num_clusters}"
            )
        return clusters
    if m.num_clusters == 1:
        return None
    if m.objective == "affinity":
        path = Path(m.affinity_file)
        if not path.is_file():
            raise ConfigError(f"mtl.affinity_file {path} does not exist")
        values = np.load(path, allow_pickle=False)
        if values.shape != (steps, steps):
            raise ConfigError(
                f"mtl.affinity_file {path}: expected a {steps}x{steps} matrix, got {values.shape}"
            )
    else:
        values = snr_values
    return interval_clustering(values, m.num_clusters, m.objective)


def build_diffusion(cfg: RunConfig):
    """The training objective of `cfg.diffusion`: GaussianDiffusion (ddpm; all T steps, ADM's
    create_diffusion) or FlowMatching (flow; diffusion/flow.py)."""
    from dtr_scale.diffusion import create_diffusion
    from dtr_scale.diffusion.flow import FlowMatching

    d = cfg.diffusion
    if d.objective == "flow":
        return FlowMatching(d.diffusion_steps)
    return create_diffusion(
        "",
        noise_schedule=d.noise_schedule,
        learn_sigma=learns_sigma(cfg),
        diffusion_steps=d.diffusion_steps,
        loss_weighting=d.loss_weighting,
        min_snr_gamma=d.min_snr_gamma,
        p2_k=d.p2_k,
        p2_gamma=d.p2_gamma,
    )


def diffusion_snr(diffusion) -> np.ndarray:
    """The SNR of each of the objective's T tasks, float64 (T,): DDPM's abar / (1 - abar) per timestep, or
    the flow path's ((1 - t) / t)^2 at the centre of each bin of t."""
    from dtr_scale.diffusion.schedules import snr

    if getattr(diffusion, "objective", "ddpm") == "flow":
        return diffusion.snr_grid()
    return snr(np.asarray(diffusion.alphas_cumprod, dtype=np.float64))


def build_balancer(cfg: RunConfig, num_clusters: int) -> nn.Module:
    """The `mtl.method` balancer (none | uw | nash | pcgrad) over `num_clusters` cluster losses."""
    from dtr_scale.mtl import balancers

    m = cfg.mtl
    options: dict[str, Any] = {}
    if m.method == "uw":
        options["lr"] = m.uw_lr
    if m.method in ("nash", "pcgrad"):
        if m.update_every is not None:
            options["update_every"] = m.update_every
        if m.method == "pcgrad":
            options["seed"] = cfg.train.seed
    return balancers.build(m.method, num_clusters, **options)


def build_optimizer(
    cfg: RunConfig,
    model: nn.Module,
    balancer: nn.Module,
    device: torch.device,
    projector: nn.Module | None = None,
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW over the model and REPA's projector (train.lr, betas, eps, weight_decay, as REPA trains its
    projector with the model) plus the balancer's own parameter groups (UW's s at mtl.uw_lr, no decay), and
    the LR schedule of `lr_scheduler`. A torch optimizer handed to DeepSpeed, so no DeepSpeed op is JIT-built."""
    t = cfg.train
    trained = list(model.parameters()) + (list(projector.parameters()) if projector is not None else [])
    groups = [{"params": [p for p in trained if p.requires_grad], "weight_decay": t.weight_decay}]
    groups += balancer.param_groups(t.lr)
    optimizer = torch.optim.AdamW(
        groups,
        lr=t.lr,
        betas=tuple(t.betas),
        eps=t.eps,
        weight_decay=t.weight_decay,
        fused=device.type == "cuda",
    )
    return optimizer, lr_scheduler(cfg, optimizer)


def lr_scheduler(cfg: RunConfig, optimizer: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LambdaLR:
    """`train.lr_schedule` by transformers' `get_scheduler`: a linear warmup over train.warmup_steps (factor
    step / warmup, 0 at the first step), then constant (DiT: a constant 1e-4), linear or cosine (half a period)
    decay to 0 at train.max_steps. A LambdaLR whose state DeepSpeed checkpoints, so resume is exact."""
    from transformers import get_scheduler

    t = cfg.train
    name = {"constant": "constant_with_warmup", "linear": "linear", "cosine": "cosine"}[t.lr_schedule]
    return get_scheduler(name, optimizer, num_warmup_steps=t.warmup_steps, num_training_steps=t.max_steps)


def build_timestep_sampler(cfg: RunConfig, clusters: list[tuple[int, int]] | None, stratified: bool):
    """ANT's timestep sampler over `clusters`, stratified or not (`mtl.sampling.resolve_sampling`, decided in
    train/plan.py); ConfigError when a stratified micro-batch cannot be split evenly over the clusters."""
    from dtr_scale.mtl.sampling import TimestepSampler
    from dtr_scale.train.flow_times import FlowTimeSampler

    if cfg.diffusion.objective == "flow":
        f = cfg.flow
        sampler = FlowTimeSampler(
            cfg.diffusion.diffusion_steps, clusters, stratified, f.time_sampling, f.logit_mean, f.logit_std
        )
    else:
        sampler = TimestepSampler(cfg.diffusion.diffusion_steps, clusters, stratified=stratified)
    try:
        sampler.check_batch_size(cfg.train.micro_batch_size)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    return sampler


def build_stream(
    cfg: RunConfig, manifest, rank: int, world: int, device: torch.device, accumulation: int = 1
):
    """This rank's LatentStream of micro-batches (data.*; the global order of data.canonical_streams; epoch mode
    takes whole optimizer steps of full micro-batches only, the same number on every rank)."""
    from dtr_scale.data.stream import LatentStream

    d = cfg.data
    return LatentStream(
        manifest,
        cfg.train.micro_batch_size,
        seed=cfg.train.seed,
        rank=rank,
        world_size=world,
        num_workers=d.num_workers,
        shuffle_buffer=d.shuffle_buffer,
        interleave=d.interleave,
        hflip=d.hflip,
        resampled=d.resampled,
        drop_last=True,
        on_error=d.on_error,
        pin_memory=device.type == "cuda",
        with_repa=cfg.repa.encoder is not None and "repa" in manifest.extra,  # precomputed REPA features
        canonical_streams=d.canonical_streams,
        accumulation=accumulation,
    )
