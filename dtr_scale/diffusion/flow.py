"""Flow matching with the linear interpolant and velocity prediction (SiT, Ma et al. 2024; REPA's `loss.py`).

Convention (REPA's and SiT's `transport` with its time reversed once, here): t in [0, 1], t = 0 is data and
t = 1 pure noise,

    x_t = alpha_t x + sigma_t eps,   alpha_t = 1 - t,   sigma_t = t,
    target v = d(alpha_t)/dt x + d(sigma_t)/dt eps = eps - x,
    loss = mean over the non-batch dimensions of (v_theta(x_t, t) - v)^2     (one value per sample).

The network is the same DiT as for DDPM; it sees the time as `t * (T - 1)` with T = `diffusion.diffusion_steps`
(1000), i.e. on the scale of DDPM's timestep indices, so the DiT's sinusoidal embedding spans the same
frequencies and DTR's mask table is indexed by `round(t * (T - 1))`: row u = t of the routing formula
(docs/design-choices.md, "DTR over continuous time"). ANT's clusters are intervals of T equal bins of t,
bin i = [i / T, (i + 1) / T) (docs/flow.md).

Training times: uniform, or logit-normal (SD3, Esser et al. 2024, Sec. 3.1: t = sigmoid(m + s n), n ~ N(0, 1);
REPA's "lognormal" with P_mean = m, P_std = s is the same law). Both are drawn by inverting the CDF of a
uniform draw, so one code path also draws t restricted to a cluster's interval (stratified sampling).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from torch import Tensor

from .losses import mean_flat

TIME_SAMPLINGS = ("uniform", "logit_normal")


class FlowMatching:
    """The linear-interpolant flow objective over `num_timesteps` bins of t (DTR rows, ANT clusters).

    `training_losses` has GaussianDiffusion's interface, so the trainer, ANT's cluster losses and the
    balancers use either objective unchanged; t is float (B,) in [0, 1] instead of a long index.
    """

    objective = "flow"

    def __init__(self, num_timesteps: int = 1000) -> None:
        if num_timesteps < 2:
            raise ValueError(f"diffusion.diffusion_steps must be >= 2 for flow matching, got {num_timesteps}")
        self.num_timesteps = int(num_timesteps)

    def model_time(self, t: Tensor) -> Tensor:
        """The network's time input: t * (T - 1), DDPM's index scale (float, same dtype as t)."""
        return t * (self.num_timesteps - 1)

    @staticmethod
    def interpolant(t: Tensor) -> tuple[Tensor, Tensor, float, float]:
        """(alpha_t, sigma_t, d alpha_t / dt, d sigma_t / dt) of the linear path (REPA loss.py, "linear")."""
        return 1 - t, t, -1.0, 1.0

    def training_losses(
        self,
        model,
        x_start: Tensor,
        t: Tensor,
        model_kwargs: dict[str, Any] | None = None,
        noise: Tensor | None = None,
    ) -> dict[str, Tensor]:
        """Per-sample velocity MSE. x_start, noise: (B, C, H, W); t: (B,) float in [0, 1]; model(x_t, time,
        **model_kwargs) -> (B, C, H, W). Returns {"loss": (B,), "mse": (B,)} (the same tensor: no VB term)."""
        if not t.is_floating_point():
            raise TypeError(f"flow matching takes t in [0, 1] as a float tensor, got dtype {t.dtype}")
        noise = torch.randn_like(x_start) if noise is None else noise
        shape = (-1,) + (1,) * (x_start.ndim - 1)
        alpha, sigma, d_alpha, d_sigma = self.interpolant(t.to(x_start.dtype).view(shape))
        x_t = alpha * x_start + sigma * noise
        target = d_alpha * x_start + d_sigma * noise  # = noise - x_start
        output = model(x_t, self.model_time(t.to(x_start.dtype)), **(model_kwargs or {}))
        mse = mean_flat((output - target) ** 2)
        return {"loss": mse, "mse": mse}

    def time_bins(self, t: Tensor) -> Tensor:
        """Bin index floor(t * T), clipped to 0..T-1 (t = 1 falls in the last bin): long, t's shape."""
        return (t.double() * self.num_timesteps).floor().long().clamp_(0, self.num_timesteps - 1)

    def snr_grid(self) -> np.ndarray:
        """The path's SNR (alpha_t / sigma_t)^2 = ((1 - t) / t)^2 at the bin centres (i + 1/2) / T: float64 (T,),
        the values ANT's snr / log_snr interval clustering runs on."""
        t = (np.arange(self.num_timesteps, dtype=np.float64) + 0.5) / self.num_timesteps
        return ((1.0 - t) / t) ** 2


def time_cdf(
    t: np.ndarray, time_sampling: str, logit_mean: float = 0.0, logit_std: float = 1.0
) -> np.ndarray:
    """The CDF of the training density of t at `t` (float64 array in [0, 1]): uniform t, or logit-normal
    Phi((logit(t) - m) / s)."""
    t = np.asarray(t, dtype=np.float64)
    if time_sampling == "uniform":
        return t.copy()
    if time_sampling != "logit_normal":
        raise ValueError(f"flow.time_sampling must be one of {TIME_SAMPLINGS}, got {time_sampling!r}")
    with np.errstate(divide="ignore"):
        z = (np.log(t) - np.log1p(-t) - logit_mean) / logit_std  # +-inf at t = 1 / 0
    return np.array([0.5 * math.erfc(-v / math.sqrt(2.0)) for v in z.ravel()]).reshape(t.shape)


def time_quantile(p: Tensor, time_sampling: str, logit_mean: float = 0.0, logit_std: float = 1.0) -> Tensor:
    """The inverse of `time_cdf`: t with CDF(t) = p, for p float64 in [0, 1] (any shape, any device);
    logit-normal: t = sigmoid(m + s Phi^-1(p)) (SD3, Esser et al. 2024, Eq. 19)."""
    if time_sampling == "uniform":
        return p.clone()
    if time_sampling != "logit_normal":
        raise ValueError(f"flow.time_sampling must be one of {TIME_SAMPLINGS}, got {time_sampling!r}")
    return torch.sigmoid(logit_mean + logit_std * torch.special.ndtri(p))
