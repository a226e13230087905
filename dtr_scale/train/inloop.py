"""In-loop EMA sampling and evaluation: the sample grid in TensorBoard and periodic KID/FID.

Each function is given what it uses (the EMA, config sections, manifest, device, rank and world size, the
monitor), not the Trainer. Collective: the sharded EMA is gathered to every rank (`ema_sampler`), each rank
draws its share of the samples, and rank 0 assembles, logs and scores.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from dtr_scale.config import ConfigError, EvalConfig, MonitorConfig, RunConfig
from dtr_scale.config.objective import learns_sigma


@dataclass(frozen=True)
class EMASampler:
    """The EMA model as in-loop sampling uses it, on every rank: `model` (eval mode, on `device`), `decode`
    (latents -> images in [-1, 1]), `diffusion` (a model dir's "diffusion" section: objective, schedule, steps,
    learn_sigma), the `sampler` (ddim, or flow.sampler), the CFG interval `guidance` (low, high), the
    `latent_shape` (C, H, W), `num_classes`, and this process's `rank` of `world`."""

    model: nn.Module
    decode: Callable[[torch.Tensor], torch.Tensor]
    diffusion: dict[str, Any]
    sampler: str
    guidance: tuple[float, float]
    latent_shape: tuple[int, ...]
    num_classes: int
    device: torch.device
    rank: int
    world: int


def ema_sampler(ema, cfg: RunConfig, manifest, device: torch.device, rank: int, world: int) -> EMASampler:
    """The EMA weights of `ema` (train/ema.py ShardedEMA) in a model of `cfg` for `manifest`'s latents and
    labels, on every rank (collective: each rank samples a share), with the sampling settings of `cfg`.
    RuntimeError when the EMA's weights do not fit the model."""
    from dtr_scale.config.objective import flow_section
    from dtr_scale.data.vae import build_decoder
    from dtr_scale.models.build import build_model

    full = ema.gather(dst=None)
    shape, num_classes = tuple(manifest.latent_shape), len(manifest.labels)
    model = build_model(cfg, shape, num_classes).to(device)
    missing, unexpected = model.load_state_dict(full, strict=False)
    if unexpected or any(k != "pos_embed" for k in missing):
        raise RuntimeError(f"EMA weights do not match the model: missing {missing}, unexpected {unexpected}")
    # DDIM (eta 0), or flow.sampler for a flow model, through the one sampling path (diffusion/sampling.py, as
    # `dtr-scale sample`).
    d = cfg.diffusion
    section = {
        "noise_schedule": d.noise_schedule,
        "diffusion_steps": d.diffusion_steps,
        "learn_sigma": learns_sigma(cfg),
        **flow_section(cfg),
    }
    return EMASampler(
        model=model.eval(),
        decode=build_decoder(manifest, cfg.data.vae, device=device),
        diffusion=section,
        sampler=cfg.flow.sampler if d.objective == "flow" else "ddim",
        guidance=(cfg.flow.guidance_low, cfg.flow.guidance_high),
        latent_shape=shape,
        num_classes=num_classes,
        device=device,
        rank=rank,
        world=world,
    )


def sharded_images(
    ema: EMASampler, labels: list[int], steps: int, cfg_scale: float, seed: int, batch_size: int = 64
) -> torch.Tensor | None:
    """Decoded EMA samples (N, C, H, W) float in [-1, 1] for `labels` (N,), drawn by all ranks (rank r
    takes samples r, r + world, ...), returned in order on rank 0 (None elsewhere). Collective."""
    from dtr_scale.diffusion.sampling import denoise, sample_generators, sampling_parts

    diffusion, model_fn = sampling_parts(
        ema.model, ema.diffusion, ema.sampler, steps, cfg_scale, ema.device, *ema.guidance
    )
    # Sample i draws from its own generator, as `dtr-scale sample --seed seed --classes labels` does (label
    # draw first, then the noise), so it does not depend on which rank draws it.
    mine = list(range(ema.rank, len(labels), ema.world))
    pieces = []
    for start in range(0, len(mine), batch_size):
        chunk = mine[start : start + batch_size]
        generators, chunk_labels = sample_generators(seed, chunk, ema.model.num_classes, labels)
        y = torch.tensor(chunk_labels, device=ema.device)
        with torch.no_grad():
            z = denoise(diffusion, model_fn, ema.sampler, generators, y, ema.latent_shape, ema.device)
            pieces.append(ema.decode(z).float().cpu())
    ours = (mine, torch.cat(pieces) if pieces else None)
    if ema.world == 1:
        shares = [ours]
    else:
        shares = [None] * ema.world if ema.rank == 0 else None
        dist.gather_object(ours, shares, dst=0)
    if ema.rank != 0:
        return None
    images = [None] * len(labels)
    for indices, tensor in shares:
        for j, i in enumerate(indices):
            images[i] = tensor[j]
    return torch.stack(images)


def sample_grid(ema: EMASampler, m: MonitorConfig, seed: int, step: int, run_dir: Path, monitor) -> None:
    """EMA samples of the classes `m.sample_classes` (modulo the class count), drawn with `seed`, decoded and
    logged by `monitor` (train/monitor.py) as the image grid of `step`, also written to
    run_dir/samples/stepNNNNNNNN.png (rank 0). Collective."""
    from dtr_scale.train.monitor import image_grid

    labels = [c % ema.num_classes for c in m.sample_classes]
    images = sharded_images(ema, labels, m.sample_steps, m.sample_cfg_scale, seed)
    if images is None:
        return
    grid = image_grid(images)
    path = run_dir / "samples" / f"step{step:08d}.png"
    monitor.image("samples/ema", step, grid, png_path=path)
    monitor.message(f"sample grid: {path}")


def evaluate_in_loop(ema: EMASampler, e: EvalConfig, seed: int, step: int, manifest, monitor) -> None:
    """KID/FID of `e.num_samples` EMA samples (random classes and noise from `seed`, drawn by all ranks) against
    `e.reference` (default: the held-out split beside `manifest`'s), scored and logged as eval/* at `step` by
    `monitor` on rank 0. Collective."""
    from dtr_scale.data.images import to_uint8_nhwc
    from dtr_scale.metrics import compute_metrics

    gen = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, ema.num_classes, (e.num_samples,), generator=gen).tolist()
    images = sharded_images(ema, labels, e.steps, e.cfg_scale, seed)
    if images is None:
        return
    array = to_uint8_nhwc(images)  # the one quantiser (data/images.py), as the sampler; metrics make it RGB
    reference = e.reference or default_reference(manifest)
    if e.reference_size and isinstance(reference, np.ndarray):
        reference = reference[: e.reference_size]
    result = compute_metrics(
        array, reference, inception_weights=e.inception_weights, kid_subset_size=min(1000, e.num_samples)
    )
    scalars = {f"eval/{k}": float(v) for k, v in result["metrics"].items() if isinstance(v, int | float)}
    monitor.scalars(step, scalars)
    monitor.message(f"step {step} eval: " + ", ".join(f"{k}={v:.4g}" for k, v in scalars.items()))


def default_reference(manifest) -> np.ndarray:
    """The held-out split beside a built-in training split, as uint8 RGB images (NHWC)."""
    from dtr_scale.data.builtin import heldout_images

    heldout = Path(manifest.path).parent.parent / "heldout"
    if not heldout.is_dir():
        raise ConfigError(f"eval.reference is not set and {heldout} (built-in held-out split) does not exist")
    return heldout_images(heldout, rgb=True)
