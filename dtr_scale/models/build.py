"""Build the DiT a run config describes (shared by the trainer, `convert` and the in-loop sampler).

Source: the model table of facebookresearch/DiT (models.py `DiT_models`), with DTR's routing (Park et al.
2024) added when `routing.enabled`; see models/dit.py and models/routing.py.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from dtr_scale.config import ConfigError, RunConfig
from dtr_scale.config.objective import learns_sigma


def model_kwargs(cfg: RunConfig, latent_shape: tuple[int, int, int], num_labels: int) -> dict[str, Any]:
    """DiT keyword arguments from `cfg.model` / `cfg.routing`, checked against the data.

    latent_shape: (C, H, W) of the training latents (the manifest's `latent_shape`); num_labels: the
    manifest's label count. Raises ConfigError, naming the key, when the model cannot take the data
    (non-square latents, in_channels/input_size/num_classes disagreeing, H not divisible by the patch).
    """
    from dtr_scale.models.dit import DiT_models

    m = cfg.model
    if m.name not in DiT_models:
        raise ConfigError(f"model.name: unknown model {m.name!r} (one of {', '.join(DiT_models)})")
    channels, height, width = latent_shape
    if height != width:
        raise ConfigError(f"data.shards: latents must be square, got latent_shape {list(latent_shape)}")
    if m.in_channels is not None and m.in_channels != channels:
        raise ConfigError(
            f"model.in_channels={m.in_channels} but the data manifest's latent_shape is {list(latent_shape)}"
        )
    if m.input_size is not None and m.input_size != height:
        raise ConfigError(
            f"model.input_size={m.input_size} but the data manifest's latent_shape is {list(latent_shape)}"
        )
    num_classes = m.num_classes if m.num_classes is not None else num_labels
    if num_classes < num_labels:
        raise ConfigError(
            f"model.num_classes={num_classes} is smaller than the manifest's {num_labels} labels"
        )
    patch = int(m.name.split("/")[1])
    if height % patch:
        raise ConfigError(
            f"model.name={m.name}: latent size {height} is not divisible by the patch size {patch}"
        )
    kwargs: dict[str, Any] = dict(
        input_size=height,
        in_channels=channels,
        num_classes=num_classes,
        class_dropout_prob=m.class_dropout_prob,
        learn_sigma=learns_sigma(cfg),
        mlp_ratio=m.mlp_ratio,
        grad_checkpointing=m.grad_checkpointing,
    )
    for key in ("hidden_size", "depth", "num_heads"):
        if getattr(m, key) is not None:
            kwargs[key] = getattr(m, key)
    if cfg.routing.enabled:
        kwargs["routing"] = {
            "alpha": cfg.routing.alpha,
            "beta": cfg.routing.beta,
            "num_tasks": cfg.diffusion.diffusion_steps,
        }
    return kwargs


def build_model(cfg: RunConfig, latent_shape: tuple[int, int, int], num_labels: int) -> nn.Module:
    """The DiT of `cfg` for latents of `latent_shape` (C, H, W) and `num_labels` classes, fp32 weights
    initialised as the reference DiT does (on the current default device: use `torch.device("meta")` for
    shapes only). Raises ConfigError as `model_kwargs` does."""
    from dtr_scale.models.dit import DiT_models

    return DiT_models[cfg.model.name](**model_kwargs(cfg, latent_shape, num_labels))
