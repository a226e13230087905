"""In-loop EMA sampling and evaluation: the sample grid in TensorBoard and periodic KID/FID.

Functions of a live `Trainer` (its config, manifest, EMA and monitor); collective where noted, since the
sharded EMA is gathered to rank 0 first.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from dtr_scale.config import ConfigError


def ema_model(trainer) -> nn.Module | None:
    """A copy of the model holding the gathered EMA weights on rank 0 (collective)."""
    from dtr_scale.models.build import build_model

    full = trainer.ema.gather(dst=0)
    if trainer.rank != 0:
        return None
    model = build_model(trainer.cfg, tuple(trainer.manifest.latent_shape), len(trainer.manifest.labels)).to(
        trainer.device
    )
    missing, unexpected = model.load_state_dict(full, strict=False)
    if unexpected or any(k != "pos_embed" for k in missing):
        raise RuntimeError(f"EMA weights do not match the model: missing {missing}, unexpected {unexpected}")
    return model.eval()


@torch.no_grad()
def sample_latents(trainer, model: nn.Module, labels: torch.Tensor, steps: int, cfg_scale: float, seed: int):
    from dtr_scale.diffusion import create_diffusion

    diffusion = create_diffusion(
        f"ddim{steps}",
        noise_schedule=trainer.cfg.diffusion.noise_schedule,
        learn_sigma=trainer.cfg.model.learn_sigma,
        diffusion_steps=trainer.cfg.diffusion.diffusion_steps,
    )
    generator = torch.Generator(device=trainer.device).manual_seed(seed)
    shape = (len(labels), *trainer.manifest.latent_shape)
    z = torch.randn(shape, generator=generator, device=trainer.device)
    if cfg_scale > 1.0:
        null = torch.full_like(labels, model.num_classes)
        z = torch.cat([z, z])
        kwargs = {"y": torch.cat([labels, null]), "cfg_scale": cfg_scale}
        out = diffusion.ddim_sample_loop(
            model.forward_with_cfg,
            z.shape,
            noise=z,
            model_kwargs=kwargs,
            device=trainer.device,
            generator=generator,
        )
        return out[: len(labels)]
    return diffusion.ddim_sample_loop(
        model, shape, noise=z, model_kwargs={"y": labels}, device=trainer.device, generator=generator
    )


def sample_grid(trainer) -> None:
    """EMA samples for fixed classes and noise, decoded and logged as an image grid (rank 0)."""
    from dtr_scale.data.shards import build_decoder
    from dtr_scale.train.monitor import image_grid

    model = ema_model(trainer)
    if model is None:
        return
    num_classes = len(trainer.manifest.labels)
    labels = torch.tensor(
        [c % num_classes for c in trainer.cfg.monitor.sample_classes], device=trainer.device
    )
    latents = sample_latents(
        trainer,
        model,
        labels,
        trainer.cfg.monitor.sample_steps,
        trainer.cfg.monitor.sample_cfg_scale,
        seed=trainer.cfg.train.seed,
    )
    decoder = build_decoder(trainer.manifest, trainer.cfg.data.vae, device=trainer.device)
    grid = image_grid(decoder(latents))
    path = trainer.run_dir / "samples" / f"step{trainer.step:08d}.png"
    trainer.monitor.image("samples/ema", trainer.step, grid, png_path=path)
    trainer.monitor.message(f"sample grid: {path}")


def evaluate_in_loop(trainer) -> None:
    """KID/FID of EMA samples against the held-out reference (rank 0), logged to TensorBoard."""
    from dtr_scale.sample.evaluate import compute_metrics
    from dtr_scale.sample.sampler import to_uint8_nhwc

    model = ema_model(trainer)
    if model is None:
        return
    from dtr_scale.data.shards import build_decoder

    e = trainer.cfg.eval
    num_classes = len(trainer.manifest.labels)
    gen = torch.Generator().manual_seed(trainer.cfg.train.seed + 1)
    labels = torch.randint(0, num_classes, (e.num_samples,), generator=gen).to(trainer.device)
    decoder = build_decoder(trainer.manifest, trainer.cfg.data.vae, device=trainer.device)
    images = []
    for start in range(0, e.num_samples, 64):
        z = sample_latents(
            trainer,
            model,
            labels[start : start + 64],
            e.steps,
            e.cfg_scale,
            seed=trainer.cfg.train.seed + start,
        )
        images.append(decoder(z).float().cpu())
    images = torch.cat(images)
    if images.shape[1] == 1:
        images = images.repeat(1, 3, 1, 1)
    array = to_uint8_nhwc(images)  # the sampler's quantisation, so in-loop and offline metrics agree
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
