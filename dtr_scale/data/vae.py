"""The latent codec: images <-> the latents the DiT is trained on.

Two codecs, named by a manifest's `vae` field:
- the built-in pixel codec (`vae.name` = "builtin-pixel-unshuffle", data/builtin.py): `pixel_unshuffle(f)` of
  the image in [-1, 1] as the latent, decoded exactly by `pixel_shuffle(f)`;
- a diffusers AutoencoderKL loaded from a local directory (never downloaded), as in the DiT and DTR papers'
  ImageNet setting (sd-vae-ft-ema), encoded by preprocess and decoded here.
Latents are stored unscaled; the model sees them multiplied by the manifest's `scaling_factor` (0.18215 for
SD's VAE), which the decoder divides out. Used by preprocess, the built-in dataset, the sampler, the in-loop
grids and evaluation alike.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

BUILTIN_VAE_NAME = "builtin-pixel-unshuffle"


def pixel_encode(images: torch.Tensor, factor: int) -> torch.Tensor:
    """The built-in codec: images (B, C, H, W) in [-1, 1] -> latents (B, C*f*f, H/f, W/f), exactly invertible."""
    return torch.nn.functional.pixel_unshuffle(images, factor)


def pixel_decode(latents: torch.Tensor, factor: int) -> torch.Tensor:
    """Inverse of `pixel_encode`: latents (B, C*f*f, h, w) -> images (B, C, h*f, w*f)."""
    return torch.nn.functional.pixel_shuffle(latents, factor)


def build_decoder(
    data: Any, vae_dir: str | os.PathLike | None = None, device: str | torch.device = "cpu"
) -> Callable[[torch.Tensor], torch.Tensor]:
    """decode(latents) -> images (B, 3 or 1, H, W) float32 in [-1, 1], for latents *as the model sees them*
    (already multiplied by the scaling factor).

    `data`: a Manifest (data/shards.py) or a model directory's `data` section (a mapping with "vae" and
    "scaling_factor"). The built-in codec decodes with `pixel_decode`; otherwise the AutoencoderKL is
    loaded from `vae_dir`, or the directory recorded in `vae.path`. Errors name the manifest / field.
    """
    if isinstance(data, Mapping):
        vae, scaling_factor, where = dict(data["vae"]), float(data["scaling_factor"]), "model config data.vae"
    else:
        vae, scaling_factor, where = dict(data.vae), float(data.scaling_factor), f"{data.path}: field 'vae'"
    if vae.get("name") == BUILTIN_VAE_NAME:
        factor = int(vae.get("downscale_factor", 2))

        def decode_builtin(latents: torch.Tensor) -> torch.Tensor:
            return pixel_decode(latents.float() / scaling_factor, factor).clamp(-1.0, 1.0)

        return decode_builtin
    source = vae_dir if vae_dir is not None else vae.get("path")
    if source is None:
        raise ValueError(f"{where} records no 'path'; pass the VAE directory explicitly")
    model = load_vae(source, context=f"decoding latents of {where}").to(device).eval()

    @torch.no_grad()
    def decode_vae(latents: torch.Tensor) -> torch.Tensor:
        z = latents.to(device=device, dtype=model.dtype) / scaling_factor
        return model.decode(z).sample.float().clamp(-1.0, 1.0)

    return decode_vae


def load_vae(directory: str | os.PathLike, context: str = ""):
    """A diffusers AutoencoderKL from a local directory (local_files_only); FileNotFoundError / ValueError
    naming the directory when it is missing, has no config.json, or holds another model class."""
    directory = Path(directory)
    where = f" ({context})" if context else ""
    config_path = directory / "config.json"
    if not directory.is_dir():
        raise FileNotFoundError(
            f"VAE directory {directory} does not exist{where}; expected a diffusers AutoencoderKL directory "
            "(config.json + diffusion_pytorch_model.safetensors), e.g. saved with save_pretrained"
        )
    if not config_path.is_file():
        raise FileNotFoundError(f"{directory} is not a diffusers VAE directory{where}: it has no config.json")
    try:
        class_name = json.loads(config_path.read_text()).get("_class_name")
    except json.JSONDecodeError as err:
        raise ValueError(f"{config_path}: not valid JSON{where}") from err
    if class_name != "AutoencoderKL":
        raise ValueError(f"{config_path}: _class_name is {class_name!r}, expected 'AutoencoderKL'{where}")
    from dtr_scale.compat import ensure_torchvision_importable

    ensure_torchvision_importable()
    from diffusers import AutoencoderKL

    try:
        return AutoencoderKL.from_pretrained(directory, local_files_only=True)
    except (OSError, ValueError, RuntimeError) as err:
        raise ValueError(f"{directory}: cannot load a diffusers AutoencoderKL{where}: {err}") from err


def vae_identity(
    directory: str | os.PathLike, config: dict[str, Any], name: str | None = None
) -> dict[str, Any]:
    """The manifest's `vae` field: name, local path and a sha256 of the config (keys starting '_' dropped)."""
    public = {k: v for k, v in sorted(config.items()) if not k.startswith("_")}
    digest = hashlib.sha256(json.dumps(public, sort_keys=True, default=str).encode()).hexdigest()
    return {
        "name": name or Path(directory).name,
        "path": str(Path(directory).resolve()),
        "class": "AutoencoderKL",
        "config_sha256": digest,
    }
