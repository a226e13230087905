"""REPA's frozen vision encoder: a local `transformers` model (DINOv2, DINOv2 with registers, any ViT-like model
whose patch tokens form a grid) that turns clean images into patch tokens, and its identity (config and weights
hashes) for the data manifest. Shared by the trainer (on the fly, train/repa.py) and `preprocess --repa-encoder`
(precomputed, data/encode.py). Nothing is ever downloaded: `from_pretrained(dir, local_files_only=True)`.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
import torch.nn.functional as F

from dtr_scale.config import ConfigError
from dtr_scale.fileio import sha256_file

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

    def __init__(
        self,
        directory: str | Path,
        resolution: int | None = None,
        dit_grid: int | None = None,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
    ):
        """resolution: the encoder's input side in pixels; None = its patch size x `dit_grid` (the DiT's token
        grid side), REPA's rule (224 = 14 x 16 for DINOv2 and DiT-XL/2 at 256 px). ConfigError names
        `repa.encoder` for a directory that is missing, not local, or not a ViT-like model."""
        directory = Path(directory)
        config = encoder_config(directory)
        if resolution is None and dit_grid is None:
            raise ValueError("RepaEncoder needs a resolution or the DiT's token grid")
        if resolution is not None:
            check_resolution(
                resolution, int(config["patch_size"]), f"repa.resolution={resolution}", directory
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
        self.model = model.to(device=device, dtype=dtype).eval().requires_grad_(False)
        self.prefix = 1 + int(config.get("num_register_tokens", 0) or 0)  # CLS (+ registers)
        self.model_type, self.directory = config.get("model_type"), directory
        self.z_dim = int(config["hidden_size"])
        self.resolution = int(resolution or int(config["patch_size"]) * int(dit_grid))
        self.num_tokens = (self.resolution // int(config["patch_size"])) ** 2
        self.dtype = dtype
        mean, std = _normalisation(directory)
        self.mean = torch.tensor(mean, device=device).view(1, -1, 1, 1)
        self.std = torch.tensor(std, device=device).view(1, -1, 1, 1)

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        x = (images.float() + 1.0) / 2.0
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        x = (x - self.mean) / self.std
        x = F.interpolate(x, size=(self.resolution, self.resolution), mode="bicubic", align_corners=False)
        tokens = self.model(pixel_values=x.to(self.dtype)).last_hidden_state
        # The patch grid is the last num_tokens tokens (DINOv2: after CLS and registers; no-CLS models: all).
        extra = tokens.shape[1] - self.num_tokens
        if not 0 <= extra <= self.prefix:
            raise ConfigError(
                f"repa.encoder: {self.directory} ({self.model_type}) gave {tokens.shape[1]} tokens for a "
                f"{self.resolution} px input, expected {self.num_tokens} patch tokens (+ up to {self.prefix} "
                "CLS/register tokens): not a model whose output is its full patch grid (e.g. ViT-MAE masks patches)"
            )
        return tokens[:, extra:]


def _normalisation(directory: Path) -> tuple[tuple[float, ...], tuple[float, ...]]:
    path = directory / "preprocessor_config.json"
    if path.is_file():
        try:
            config = json.loads(path.read_text())
        except (ValueError, UnicodeDecodeError) as err:
            raise ConfigError(f"repa.encoder: {path} is not valid JSON ({err})") from None
        if isinstance(config, dict) and "image_mean" in config and "image_std" in config:
            return tuple(config["image_mean"]), tuple(config["image_std"])
    return IMAGENET_MEAN, IMAGENET_STD


def check_resolution(resolution: int, patch: int, label: str, directory: str | Path) -> None:
    """An encoder input of `resolution` px must be a positive multiple of its `patch` (else tokens are cut off);
    ConfigError "LABEL: expected ..." naming the encoder `directory` otherwise."""
    if resolution < patch or resolution % patch:
        raise ConfigError(
            f"{label}: expected a positive multiple of the patch size {patch} of the encoder {directory}"
        )


def encoder_config(directory: str | Path) -> dict:
    """The encoder directory's config.json; ConfigError naming `repa.encoder` and the path when it is missing."""
    directory = Path(directory)
    path = directory / "config.json"
    if not path.is_file():
        raise ConfigError(
            f"repa.encoder: {directory} is not a local transformers model directory (no config.json); "
            "nothing is downloaded: save the encoder with save_pretrained and give its path"
        )
    try:
        config = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as err:
        raise ConfigError(f"repa.encoder: {path} is not valid JSON ({err})") from None
    if not isinstance(config, dict) or "patch_size" not in config or "hidden_size" not in config:
        raise ConfigError(f"repa.encoder: {path} has no patch_size / hidden_size: not a ViT-like encoder")
    return config


def encoder_identity(directory: str | Path) -> dict:
    """{"path", "model_type", "config_sha256", "weights_sha256"}: what a manifest records of the encoder its
    features came from (config keys starting with '_' and the transformers version are not hashed)."""
    directory = Path(directory)
    config = encoder_config(directory)
    public = {
        k: v for k, v in sorted(config.items()) if not k.startswith("_") and k != "transformers_version"
    }
    weights = hashlib.sha256()
    for path in sorted(directory.glob("*.safetensors")) + sorted(directory.glob("*.bin")):
        weights.update(f"{path.name}:{sha256_file(path)}\n".encode())
    return {
        "path": str(directory.resolve()),
        "model_type": config.get("model_type"),
        "config_sha256": hashlib.sha256(json.dumps(public, sort_keys=True, default=str).encode()).hexdigest(),
        "weights_sha256": weights.hexdigest(),
    }
