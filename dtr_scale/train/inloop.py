"""In-loop EMA sampling and evaluation: the sample grid in TensorBoard and periodic KID/FID.

Functions of a live `Trainer` (its config, manifest, EMA and monitor), collective: the sharded EMA is
gathered to every rank, each rank draws its share of the samples, and rank 0 assembles, logs and scores.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from dtr_scale.config import ConfigError
from dtr_scale.config.objective import learns_sigma


def ema_model(trainer) -> nn.Module:
    """A copy of the model holding the EMA weights, on every rank (collective: each rank samples a share)."""
    from dtr_scale.models.build import build_model

    full = trainer.ema.gather(dst=None)
    model = build_model(trainer.cfg, tuple(trainer.manifest.latent_shape), len(trainer.manifest.labels)).to(
        trainer.device
    )
    missing, unexpected = model.load_state_dict(full, strict=False)
    if unexpected or any(k != "pos_embed" for k in missing):
        raise RuntimeError(f"EMA weights do not match the model: missing {missing}, unexpected {unexpected}")
    return model.eval()


def sharded_images(
    trainer, labels: list[int], steps: int, cfg_scale: float, seed: int, batch_size: int = 64
) -> torch.Tensor | None:
    """Decoded EMA samples (N, C, H, W) float in [-1, 1] for `labels` (N,), drawn by all ranks (rank r
    takes samples r, r + world, ...), returned in order on rank 0 (None elsewhere). Collective."""
    from dtr_scale.config.objective import flow_section
    from dtr_scale.data.vae import build_decoder
    from dtr_scale.diffusion.sampling import denoise, sample_generators, sampling_parts

    model = ema_model(trainer)
    decoder = build_decoder(trainer.manifest, trainer.cfg.data.vae, device=trainer.device)
    # DDIM (eta 0), or flow.sampler for a flow model, through the one sampling path (diffusion/sampling.py, as
    # `dtr-scale sample`); sample i draws from its own generator, as `dtr-scale sample --seed seed --classes
    # labels` does (label draw first, then the noise), so it does not depend on which rank draws it.
    cfg = trainer.cfg
    section = {
        "noise_schedule": cfg.diffusion.noise_schedule,
        "diffusion_steps": cfg.diffusion.diffusion_steps,
        "learn_sigma": learns_sigma(cfg),
        **flow_section(cfg),
    }
    sampler = cfg.flow.sampler if cfg.diffusion.objective == "flow" else "ddim"
    diffusion, model_fn = sampling_parts(
        model,
        section,
        sampler,
        steps,
        cfg_scale,
        trainer.device,
        cfg.flow.guidance_low,
        cfg.flow.guidance_high,
    )
    shape = tuple(trainer.manifest.latent_shape)
    mine = list(range(trainer.rank, len(labels), trainer.world))
    pieces = []
    for start in range(0, len(mine), batch_size):
        chunk = mine[start : start + batch_size]
        generators, chunk_labels = sample_generators(seed, chunk, model.num_classes, labels)
        y = torch.tensor(chunk_labels, device=trainer.device)
        with torch.no_grad():
            z = denoise(diffusion, model_fn, sampler, generators, y, shape, trainer.device)
            pieces.append(decoder(z).float().cpu())
    ours = (mine, torch.cat(pieces) if pieces else None)
    if trainer.world == 1:
        shares = [ours]
    else:
        shares = [None] * trainer.world if trainer.rank == 0 else None
        dist.gather_object(ours, shares, dst=0)
    if trainer.rank != 0:
        return None
    images = [None] * len(labels)
    for indices, tensor in shares:
        for k, i in enumerate(indices):
            images[i] = tensor[k]
    return torch.stack(images)


def sample_grid(trainer) -> None:
    """EMA samples for fixed classes and noise, decoded and logged as an image grid (rank 0). Collective."""
    from dtr_scale.train.monitor import image_grid

    num_classes = len(trainer.manifest.labels)
    m = trainer.cfg.monitor
    labels = [c % num_classes for c in m.sample_classes]
    images = sharded_images(trainer, labels, m.sample_steps, m.sample_cfg_scale, trainer.cfg.train.seed)
    if images is None:
        return
    grid = image_grid(images)
    path = trainer.run_dir / "samples" / f"step{trainer.step:08d}.png"
    trainer.monitor.image("samples/ema", trainer.step, grid, png_path=path)
    trainer.monitor.message(f"sample grid: {path}")


def evaluate_in_loop(trainer) -> None:
    """KID/FID of EMA samples (drawn by all ranks) against the held-out reference, scored and logged on
    rank 0. Collective."""
    from dtr_scale.data.images import to_uint8_nhwc
    from dtr_scale.metrics import compute_metrics

    e = trainer.cfg.eval
    num_classes = len(trainer.manifest.labels)
    gen = torch.Generator().manual_seed(trainer.cfg.train.seed + 1)
    labels = torch.randint(0, num_classes, (e.num_samples,), generator=gen).tolist()
    images = sharded_images(trainer, labels, e.steps, e.cfg_scale, trainer.cfg.train.seed + 1)
    if images is None:
        return
    array = to_uint8_nhwc(images)  # the one quantiser (data/images.py), as the sampler; metrics make it RGB
    reference = e.reference or default_reference(trainer.manifest)
    if e.reference_size and isinstance(reference, np.ndarray):
        reference = reference[: e.reference_size]
    result = compute_metrics(
        array, reference, inception_weights=e.inception_weights, kid_subset_size=min(1000, e.num_samples)
    )
    scalars = {f"eval/{k}": float(v) for k, v in result["metrics"].items() if isinstance(v, int | float)}
    trainer.monitor.scalars(trainer.step, scalars)
    trainer.monitor.message(
        f"step {trainer.step} eval: " + ", ".join(f"{k}={v:.4g}" for k, v in scalars.items())
    )


def default_reference(manifest) -> np.ndarray:
    """The held-out split beside a built-in training split, as uint8 RGB images (NHWC)."""
    from dtr_scale.data.builtin import heldout_images

    heldout = Path(manifest.path).parent.parent / "heldout"
    if not heldout.is_dir():
        raise ConfigError(f"eval.reference is not set and {heldout} (built-in held-out split) does not exist")
    return heldout_images(heldout, rgb=True)
