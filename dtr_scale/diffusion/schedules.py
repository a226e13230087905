"""Noise schedules of the forward process q(x_t | x_{t-1}) = N(sqrt(1 - beta_t) x_{t-1}, beta_t I).

Everything here is float64 numpy: the diffusion keeps its tables in float64 and rounds to float32
only when a coefficient is read for a batch, as the ADM/DiT reference does.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np

NOISE_SCHEDULES = ("linear", "cosine", "squaredcos_cap_v2")


def get_named_beta_schedule(name: str, num_diffusion_timesteps: int) -> np.ndarray:
    """Betas (float64, length ``num_diffusion_timesteps``) of a named schedule.

    "linear": Ho et al. 2020, beta from 1e-4 to 0.02 over 1000 steps; for other step counts both ends
    are scaled by 1000/T so the schedule keeps the same shape (ADM's extension).
    "cosine" (alias "squaredcos_cap_v2", DiT's name for it): Nichol & Dhariwal 2021, Eq. 17,
    abar(t) = cos((t/T + s) / (1 + s) * pi/2)^2 with s = 0.008, betas capped at 0.999.
    """
    if num_diffusion_timesteps < 1:
        raise ValueError(f"num_diffusion_timesteps must be >= 1, got {num_diffusion_timesteps}")
    if name == "linear":
        scale = 1000 / num_diffusion_timesteps
        return np.linspace(scale * 0.0001, scale * 0.02, num_diffusion_timesteps, dtype=np.float64)
    if name in ("cosine", "squaredcos_cap_v2"):
        return betas_for_alpha_bar(
            num_diffusion_timesteps, lambda t: math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2
        )
    raise ValueError(f"unknown noise schedule {name!r}; expected one of {', '.join(NOISE_SCHEDULES)}")


def betas_for_alpha_bar(
    num_diffusion_timesteps: int, alpha_bar: Callable[[float], float], max_beta: float = 0.999
) -> np.ndarray:
    """Discretise a continuous abar(s), s in [0, 1], into betas: beta_i = 1 - abar((i+1)/T) / abar(i/T).

    Capping at ``max_beta`` avoids the singularity of the cosine schedule at s = 1 (Nichol & Dhariwal).
    """
    steps = num_diffusion_timesteps
    betas = [min(1.0 - alpha_bar((i + 1) / steps) / alpha_bar(i / steps), max_beta) for i in range(steps)]
    return np.array(betas, dtype=np.float64)


def snr(alphas_cumprod: np.ndarray) -> np.ndarray:
    """Signal-to-noise ratio of x_t = sqrt(abar) x_0 + sqrt(1 - abar) eps: abar / (1 - abar), float64."""
    alphas_cumprod = np.asarray(alphas_cumprod, dtype=np.float64)
    return alphas_cumprod / (1.0 - alphas_cumprod)
