"""Gaussian diffusion with ADM/DiT conventions: schedules, training losses, DDPM/DDIM samplers, respacing."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from .gaussian_diffusion import GaussianDiffusion, LossType, ModelMeanType, ModelVarType, mean_flat
from .loss_weighting import LOSS_WEIGHTINGS, mse_loss_weights
from .respace import SpacedDiffusion, space_timesteps
from .schedules import get_named_beta_schedule, snr

__all__ = [
    "LOSS_WEIGHTINGS",
    "GaussianDiffusion",
    "LossType",
    "ModelMeanType",
    "ModelVarType",
    "SpacedDiffusion",
    "create_diffusion",
    "get_named_beta_schedule",
    "mean_flat",
    "mse_loss_weights",
    "snr",
    "space_timesteps",
]


def create_diffusion(
    timestep_respacing: str | Sequence[int] | None = "",
    noise_schedule: str = "linear",
    use_kl: bool = False,
    sigma_small: bool = False,
    predict_xstart: bool = False,
    learn_sigma: bool = True,
    rescale_learned_sigmas: bool = False,
    diffusion_steps: int = 1000,
    loss_weighting: str = "none",
    min_snr_gamma: float = 5.0,
    p2_k: float = 1.0,
    p2_gamma: float = 1.0,
) -> SpacedDiffusion:
    """The diffusion DiT trains and samples with (same arguments as DiT's ``create_diffusion``).

    ``timestep_respacing`` "" or None keeps all ``diffusion_steps`` (training); "250" or "ddim50"
    respaces for sampling. Defaults: linear betas, eps prediction, learned-range variance, MSE + VB.
    ``loss_weighting`` none | min_snr | p2 weights the MSE term per timestep (loss_weighting.py); it only
    concerns training, so a respaced (sampling) diffusion refuses anything but "none".
    """
    betas = get_named_beta_schedule(noise_schedule, diffusion_steps)
    weights = None
    if loss_weighting != "none":
        kept = space_timesteps(diffusion_steps, timestep_respacing or [diffusion_steps])
        if len(kept) != diffusion_steps:
            raise ValueError("loss_weighting is a training setting; sample with loss_weighting='none'")
        weights = mse_loss_weights(
            np.cumprod(1.0 - betas), loss_weighting, min_snr_gamma=min_snr_gamma, p2_k=p2_k,
            p2_gamma=p2_gamma, predict_xstart=predict_xstart,
        )  # fmt: skip
    if use_kl:
        loss_type = LossType.RESCALED_KL
    elif rescale_learned_sigmas:
        loss_type = LossType.RESCALED_MSE
    else:
        loss_type = LossType.MSE
    if learn_sigma:
        var_type = ModelVarType.LEARNED_RANGE
    else:
        var_type = ModelVarType.FIXED_SMALL if sigma_small else ModelVarType.FIXED_LARGE
    if timestep_respacing is None or timestep_respacing == "":
        timestep_respacing = [diffusion_steps]
    return SpacedDiffusion(
        use_timesteps=space_timesteps(diffusion_steps, timestep_respacing),
        betas=betas,
        model_mean_type=ModelMeanType.START_X if predict_xstart else ModelMeanType.EPSILON,
        model_var_type=var_type,
        loss_type=loss_type,
        mse_loss_weights=weights,
    )
