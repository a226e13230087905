"""REPA in the trainer: the frozen vision encoder (a local `transformers` model) and the projector it aligns to.

The encoder runs on the fly in the training step: frozen, in eval mode, under no_grad, in the run's dtype
(bf16 where the run is bf16), outside DeepSpeed (not wrapped, not in the optimizer, not checkpointed: it is
read again from `repa.encoder` on resume). Its input is the clean image of each latent, decoded by the data
manifest's codec (exact for the built-in pixel codec; a VAE decode for AutoencoderKL latents, which costs a
decoder forward per sample). The projector (models/repa.py) is a submodule of the TrainModule, so DeepSpeed
shards, reduces and checkpoints it like the model; it is not in the EMA (sampling never uses it, as in the
official code, where only the EMA's DiT blocks are sampled) and `convert` drops it.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from dtr_scale.config import ConfigError, RunConfig

# timm's IMAGENET_DEFAULT_MEAN / STD, which REPA normalises with for DINOv2 (train.py preprocess_raw_image),
# used when the encoder directory has no preprocessor_config.json of its own.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class RepaEncoder:
    """images (B, C, H, W) in [-1, 1] -> patch tokens (B, M, D) of a frozen ViT-like `transformers` model.

    As REPA's `preprocess_raw_image` for DINOv2: to [0, 1], normalised by the encoder's mean/std, resized
    bicubically to `resolution`, then `last_hidden_state` without the CLS and register tokens (DINOv2's final
    LayerNorm'd patch tokens, `x_norm_patchtokens`). One-channel images are repeated to three.
    """

    def __init__(self, directory: str | Path, resolution: int | None, dit_grid: int, device, dtype):
        directory = Path(directory)
        if not (directory / "config.json").is_file():
            raise ConfigError(
                f"repa.encoder: {directory} is not a local transformers model directory (no config.json); "
                "nothing is downloaded: save the encoder with save_pretrained and give its path"
            )
        from dtr_scale.compat import ensure_torchvision_importable

        ensure_torchvision_importable()
        from transformers import AutoModel
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # no "Loading weights" bar in the training log

        try:
            model = AutoModel.from_pretrained(directory, local_files_only=True)
        except (OSError, ValueError) as err:
            raise ConfigError(
                f"repa.encoder: cannot load {directory} with transformers AutoModel: {err}"
            ) from None
        config = model.config
        if not hasattr(config, "patch_size") or not hasattr(config, "hidden_size"):
            raise ConfigError(
                f"repa.encoder: {directory} ({config.model_type}) is not a ViT-like model with patches"
            )
        self.model = model.to(device=device, dtype=dtype).eval().requires_grad_(False)
        self.prefix = 1 + int(getattr(config, "num_register_tokens", 0) or 0)  # CLS (+ registers)
        self.z_dim = int(config.hidden_size)
        self.resolution = int(resolution or config.patch_size * dit_grid)
        self.dtype = dtype
        mean, std = _normalisation(directory)
        self.mean = torch.tensor(mean, device=device).view(1, -1, 1, 1)
        self.std = torch.tensor(std, device=device).view(1, -1, 1, 1)
        self.identity = {"path": str(directory.resolve()), "model_type": config.model_type}

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        x = (images.float() + 1.0) / 2.0
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        x = (x - self.mean) / self.std
        x = F.interpolate(x, size=(self.resolution, self.resolution), mode="bicubic", align_corners=False)
        tokens = self.model(pixel_values=x.to(self.dtype)).last_hidden_state
        return tokens[:, self.prefix :]


def _normalisation(directory: Path) -> tuple[tuple[float, ...], tuple[float, ...]]:
    path = directory / "preprocessor_config.json"
    if path.is_file():
        config = json.loads(path.read_text())
        if "image_mean" in config and "image_std" in config:
            return tuple(config["image_mean"]), tuple(config["image_std"])
    return IMAGENET_MEAN, IMAGENET_STD


def build_repa(cfg: RunConfig, model: torch.nn.Module, manifest, device, dtype, zero3: bool, ds_config: dict):
    """(projector, features_fn) for `cfg.repa`, or (None, None) when REPA is off. features_fn(latents) ->
    encoder patch tokens of the decoded clean images; the projector maps the DiT's width to the encoder's."""
    r = cfg.repa
    if r.encoder is None:
        return None, None
    import deepspeed

    from dtr_scale.data.vae import build_decoder
    from dtr_scale.models.repa import build_projector

    depth = len(model.blocks)
    if not 1 <= r.depth <= depth:
        raise ConfigError(f"repa.depth={r.depth} must lie in 1..{depth} (the model's depth)")
    grid = model.x_embedder.num_patches**0.5
    encoder = RepaEncoder(r.encoder, r.resolution, int(round(grid)), device, dtype)
    hidden = model.t_embedder.mlp[2].out_features
    with deepspeed.zero.Init(config_dict_or_path=ds_config, enabled=zero3):
        projector = build_projector(hidden, r.projector_dim, encoder.z_dim)
    decode = build_decoder(manifest, device=device)

    def features(latents: torch.Tensor) -> torch.Tensor:
        return encoder(decode(latents))

    features.encoder = encoder  # type: ignore[attr-defined]
    return projector, features


def repa_active(cfg: RunConfig, step: int) -> bool:
    """Whether optimizer step `step` (0-based: the step being taken) aligns: REPA on, and before stop_step."""
    return cfg.repa.encoder is not None and (cfg.repa.stop_step == 0 or step < cfg.repa.stop_step)


FeaturesFn = Callable[[torch.Tensor], torch.Tensor]
