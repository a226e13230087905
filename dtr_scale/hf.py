"""diffusers classes for what diffusers lacks: DTR-routed DiTs and the built-in pixel codec.

`dtr-scale convert RUN --out DIR --format diffusers` writes a folder that `diffusers.DiTPipeline` loads
(sample/diffusers_export.py). Unrouted DiTs with an AutoencoderKL use diffusers' own classes and need no
dtr_scale. A routed model's `transformer/` names `DTRDiTTransformer2DModel` from this module, and a run on the
built-in pixel codec names `PixelShuffleVAE`; diffusers resolves such a name only from a module the caller has
already imported, so:

    import dtr_scale.hf                      # registers the classes below for diffusers
    from diffusers import DiTPipeline
    pipe = DiTPipeline.from_pretrained(DIR)

Both are plain `ModelMixin` + `ConfigMixin` models: `save_pretrained` / `from_pretrained` store their config
as JSON and their weights as safetensors. The DTR mask table is rebuilt from the saved routing settings, never
stored.
"""

from __future__ import annotations

import torch

from dtr_scale.compat import ensure_torchvision_importable
from dtr_scale.data.vae import pixel_decode, pixel_encode
from dtr_scale.models.dit import DiT

ensure_torchvision_importable()  # diffusers imports torchvision (see compat.py)

from diffusers import ConfigMixin, ModelMixin  # noqa: E402  (after the shim above)
from diffusers.configuration_utils import register_to_config  # noqa: E402
from diffusers.models.autoencoders.vae import DecoderOutput  # noqa: E402
from diffusers.models.modeling_outputs import Transformer2DModelOutput  # noqa: E402

__all__ = ["ConfigMixin", "DTRDiTTransformer2DModel", "ModelMixin", "PixelShuffleVAE", "PIPELINE_NULL_LABEL"]

# diffusers' DiTPipeline passes class 1000 as the null (unconditional) label, whatever the model's class count
# (pipelines/dit/pipeline_dit.py: `class_null = torch.tensor([1000] * batch_size)`).
PIPELINE_NULL_LABEL = 1000


class DTRDiTTransformer2DModel(ModelMixin, ConfigMixin):
    """dtr-scale's DiT (reference DiT layers + DTR routing) with the call signature DiTPipeline uses.

    Config: the DiT's constructor arguments under diffusers' names where diffusers has one (`sample_size` =
    latent side, `num_layers`, `num_attention_heads`, `num_embeds_ada_norm` = number of classes) and the DTR
    routing (`routing_alpha`, `routing_beta`, `routing_num_tasks`; beta 1 or None = no routing). The state
    dict keys are the reference DiT's, prefixed `dit.`.

    Labels: 0..num_classes-1 are classes; num_classes and DiTPipeline's null label 1000 both mean "no class"
    (classifier-free guidance); any other label is a ValueError naming it.
    """

    _supports_gradient_checkpointing = False

    @register_to_config
    def __init__(
        self,
        sample_size: int = 32,
        patch_size: int = 2,
        in_channels: int = 4,
        out_channels: int = 8,
        hidden_size: int = 1152,
        num_layers: int = 28,
        num_attention_heads: int = 16,
        mlp_ratio: float = 4.0,
        num_embeds_ada_norm: int = 1000,
        class_dropout_prob: float = 0.1,
        routing_alpha: float | None = None,
        routing_beta: float | None = None,
        routing_num_tasks: int | None = None,
    ):
        super().__init__()
        if out_channels not in (in_channels, 2 * in_channels):
            raise ValueError(
                f"out_channels must be in_channels ({in_channels}) or twice it (learned sigma), got {out_channels}"
            )
        routing = None
        if routing_beta is not None and routing_beta < 1.0:
            routing = {"alpha": routing_alpha, "beta": routing_beta, "num_tasks": routing_num_tasks}
        self.dit = DiT(
            input_size=sample_size,
            patch_size=patch_size,
            in_channels=in_channels,
            hidden_size=hidden_size,
            depth=num_layers,
            num_heads=num_attention_heads,
            mlp_ratio=mlp_ratio,
            class_dropout_prob=class_dropout_prob,
            num_classes=num_embeds_ada_norm,
            learn_sigma=out_channels == 2 * in_channels,
            routing=routing,
        )

    def _labels(self, class_labels: torch.Tensor) -> torch.Tensor:
        """Class labels with DiTPipeline's null label 1000 mapped to this model's null class."""
        num_classes = self.dit.num_classes
        labels = class_labels.long().reshape(-1)
        null = labels == PIPELINE_NULL_LABEL
        bad = ~null & ((labels < 0) | (labels > num_classes))
        if bool(bad.any()):
            raise ValueError(
                f"class label {int(labels[bad][0])} is out of range: this model has classes 0..{num_classes - 1}, "
                f"null label {num_classes} (DiTPipeline's null label {PIPELINE_NULL_LABEL} maps to it)"
            )
        return torch.where(null, torch.full_like(labels, num_classes), labels)

    def forward(
        self,
        hidden_states: torch.Tensor,
        timestep: torch.Tensor,
        class_labels: torch.Tensor,
        return_dict: bool = True,
    ) -> Transformer2DModelOutput | tuple[torch.Tensor]:
        """hidden_states (B, C, H, W) latents, timestep (B,) original timestep indices 0..T-1 (the DTR table
        is indexed with them), class_labels (B,) -> `.sample` (B, out_channels, H, W)."""
        timestep = torch.as_tensor(timestep, device=hidden_states.device).reshape(-1)
        if timestep.numel() == 1:
            timestep = timestep.expand(hidden_states.shape[0])
        out = self.dit(hidden_states, timestep, self._labels(class_labels))
        return Transformer2DModelOutput(sample=out) if return_dict else (out,)


class PixelShuffleVAE(ModelMixin, ConfigMixin):
    """The built-in pixel codec (data/vae.py) as a diffusers VAE: latents are `pixel_unshuffle(f)` of the image
    in [-1, 1], decoded exactly by `pixel_shuffle(f)`. No weights. `scaling_factor` is the manifest's (the
    pipeline divides latents by it before `decode`)."""

    @register_to_config
    def __init__(self, downscale_factor: int = 2, image_channels: int = 1, scaling_factor: float = 1.0):
        super().__init__()
        if downscale_factor < 1 or image_channels < 1:
            raise ValueError(
                f"downscale_factor and image_channels must be >= 1, got {downscale_factor}, {image_channels}"
            )
        # The codec has no weights, but diffusers' from_pretrained needs a weights file and ModelMixin a tensor
        # for .dtype / .device: the factor, stored as a scalar.
        self.register_buffer("shuffle_factor", torch.tensor(float(downscale_factor)))

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """(B, image_channels, H, W) in [-1, 1] -> unscaled latents (B, image_channels*f*f, H/f, W/f)."""
        return pixel_encode(images, self.config.downscale_factor)

    def decode(self, z: torch.Tensor, return_dict: bool = True) -> DecoderOutput | tuple[torch.Tensor]:
        """Unscaled latents (B, image_channels*f*f, h, w) -> `.sample` images (B, image_channels, h*f, w*f) in
        [-1, 1] (clamped, as dtr-scale's own decoder)."""
        images = pixel_decode(z, self.config.downscale_factor).clamp(-1.0, 1.0)
        return DecoderOutput(sample=images) if return_dict else (images,)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """= decode(z).sample."""
        return self.decode(z).sample
