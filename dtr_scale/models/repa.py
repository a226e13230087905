"""REPA (Yu et al., ICLR 2025, "Representation Alignment for Generation"): the projector and the alignment loss.

The DiT's hidden tokens after block `depth` (B, N, hidden) go through a 3-layer SiLU MLP (the official
sihyun-yu/REPA models/sit.py `build_mlp`) to the encoder's width, and the loss is the negative cosine
similarity between each projected token and the frozen encoder's patch token of the clean image, averaged over
tokens and then over the batch (REPA loss.py `SILoss`: `mean_flat(-(z_j * z_tilde_j).sum(-1))` summed over
samples and divided by the batch size; the paper's Eq. 8 with sim = cosine). Plain PyTorch: the encoder itself
lives in train/repa.py.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from dtr_scale.models.dit import _gathered


def build_projector(hidden_size: int, projector_dim: int, z_dim: int) -> nn.Sequential:
    """Linear(hidden, p) -> SiLU -> Linear(p, p) -> SiLU -> Linear(p, z_dim) (REPA models/sit.py build_mlp),
    xavier-uniform weights and zero biases, as REPA's SiT initialises every Linear (`_basic_init`). Built
    under `deepspeed.zero.Init` it comes out partitioned, with the same values."""
    projector = nn.Sequential(
        nn.Linear(hidden_size, projector_dim),
        nn.SiLU(),
        nn.Linear(projector_dim, projector_dim),
        nn.SiLU(),
        nn.Linear(projector_dim, z_dim),
    )
    for layer in projector:
        if isinstance(layer, nn.Linear):
            # Under deepspeed.zero.Init (ZeRO-3) the layer is already partitioned: initialise it gathered, keep
            # rank 0's values (models/dit.py does the same for the DiT).
            with _gathered([layer.weight, layer.bias]):
                nn.init.xavier_uniform_(layer.weight)
                nn.init.zeros_(layer.bias)
    return projector


def repa_loss(projected: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
    """REPA's alignment loss: projected (B, N, D) DiT tokens, features (B, N, D) encoder patch tokens ->
    scalar mean over samples of the mean over tokens of -cos(projected, features) (REPA loss.py), computed in
    float32 whatever the inputs' dtype. Range [-1, 1]; -1 = perfectly aligned."""
    if projected.shape != features.shape:
        raise ValueError(
            f"REPA: projected DiT tokens {tuple(projected.shape)} and encoder features {tuple(features.shape)} "
            "must have the same shape (B, N, D)"
        )
    z_tilde = F.normalize(projected.float(), dim=-1)
    z = F.normalize(features.float(), dim=-1)
    return -(z * z_tilde).sum(dim=-1).mean(dim=-1).mean()


def match_token_grid(features: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """Encoder patch tokens (B, M, D) on a square grid -> (B, num_tokens, D) on the DiT's square token grid.

    REPA itself never resizes features: it chooses the encoder's input size so that the two grids agree
    (REPA train.py `preprocess_raw_image`: 224 px for DINOv2 at 256 px, 16 x 16 patches = SiT-XL/2's tokens),
    which is also what `repa.resolution: null` does here. When the grids differ anyway, the encoder grid is
    resized by bilinear interpolation with antialiasing (area-weighted when shrinking), as torchvision resizes
    images: each DiT token is aligned with the features of the image region it covers.
    """
    b, m, d = features.shape
    side, target = math.isqrt(m), math.isqrt(num_tokens)
    if side * side != m or target * target != num_tokens:
        raise ValueError(f"REPA: token counts must be square grids, got encoder {m} and DiT {num_tokens}")
    if m == num_tokens:
        return features
    grid = features.transpose(1, 2).reshape(b, d, side, side)
    grid = F.interpolate(
        grid.float(), size=(target, target), mode="bilinear", align_corners=False, antialias=True
    )
    return grid.reshape(b, d, num_tokens).transpose(1, 2).to(features.dtype)
