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

import contextlib

import torch

from dtr_scale.config import ConfigError, RunConfig
from dtr_scale.repa_encoder import RepaEncoder


def build_repa(cfg: RunConfig, model: torch.nn.Module, manifest, device, dtype, zero3: bool, ds_config: dict):
    """(projector, features_fn) for `cfg.repa`, or (None, None) when REPA is off.

    features_fn(latents, stored) -> the REPA targets (B, M, D) of a micro-batch: `stored`, the features
    precomputed into the shards (when the manifest has them: its encoder must be `repa.encoder`, else
    ConfigError naming the manifest), or the encoder's tokens of the decoded clean images (on the fly)."""
    r = cfg.repa
    if r.encoder is None:
        return None, None
    import deepspeed

    from dtr_scale.data.vae import build_decoder
    from dtr_scale.models.repa import build_projector

    if not 1 <= r.depth <= len(model.blocks):
        raise ConfigError(f"repa.depth={r.depth} must lie in 1..{len(model.blocks)} (the model's depth)")
    stored = manifest.extra.get("repa")
    grid = int(round(model.x_embedder.num_patches**0.5))
    if stored is not None:
        _check_stored_features(cfg, manifest, stored, grid)
        z_dim, encode = int(stored["dim"]), None
    else:
        encoder = RepaEncoder(r.encoder, r.resolution, grid, device=device, dtype=dtype)
        decode = build_decoder(manifest, device=device)
        z_dim, encode = encoder.z_dim, lambda latents: encoder(decode(latents))
    hidden = model.t_embedder.mlp[2].out_features
    # ZeRO-3: partitioned as it is built, like the model and the balancer.
    with deepspeed.zero.Init(config_dict_or_path=ds_config) if zero3 else contextlib.nullcontext():
        projector = build_projector(hidden, r.projector_dim, z_dim)

    def features(latents: torch.Tensor, stored_features: torch.Tensor | None = None) -> torch.Tensor:
        if encode is None:
            return stored_features.to(latents.device, non_blocking=True)
        return encode(latents)

    return projector, features


def _check_stored_features(cfg: RunConfig, manifest, stored: dict, grid: int | None = None) -> None:
    """The manifest's precomputed features must come from `repa.encoder` (config and weights hashes) at
    `repa.resolution`, or, when that is null, at the resolution the encoder would get on the fly (patch x the
    DiT's token grid `grid`), so that both ways train against the same targets; otherwise a ConfigError names
    the manifest and what differs."""
    from dtr_scale.repa_encoder import encoder_config, encoder_identity

    found = encoder_identity(cfg.repa.encoder)
    for key in ("config_sha256", "weights_sha256"):
        if found[key] != stored.get(key):
            raise ConfigError(
                f"{manifest.path}: its precomputed REPA features were made by encoder {stored.get('path')} "
                f"({key} {str(stored.get(key))[:12]}...), but repa.encoder={cfg.repa.encoder} has {found[key][:12]}...: "
                "re-run preprocess (or prepare-builtin) with --repa-encoder, or point repa.encoder at that encoder"
            )
    wanted = cfg.repa.resolution
    if wanted is None and grid is not None:
        wanted = int(encoder_config(cfg.repa.encoder)["patch_size"]) * grid
    if wanted is not None and wanted != stored.get("resolution"):
        raise ConfigError(
            f"repa.resolution={'null' if cfg.repa.resolution is None else cfg.repa.resolution} (encoder input {wanted} px), but {manifest.path} holds "
            f"features at {stored.get('resolution')} px; set repa.resolution={stored.get('resolution')} to "
            "train on them, or re-run preprocess with --repa-resolution"
        )


def repa_active(cfg: RunConfig, step: int) -> bool:
    """Whether optimizer step `step` (0-based: the step being taken) aligns: REPA on, and before stop_step."""
    return cfg.repa.encoder is not None and (cfg.repa.stop_step == 0 or step < cfg.repa.stop_step)
