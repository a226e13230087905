"""Gaussian diffusion: forward process, training loss and samplers (ADM / DiT conventions).

Papers: DDPM (Ho et al. 2020), improved DDPM (Nichol & Dhariwal 2021: learned-range variance and the
hybrid loss), DDIM (Song et al. 2021). Conventions follow the ADM/DiT code, so that numbers agree with
it: schedule tables live in float64 numpy and are rounded to float32 when read for a batch; losses are
per sample; the variational term is in bits per dimension.

A model is any callable ``model(x, t, **model_kwargs) -> Tensor`` returning 2*C channels (eps and the
variance interpolation v in [-1, 1]) with learned variance, or C channels otherwise. Classifier-free
guidance is the caller's business: pass ``model.forward_with_cfg`` as the model.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from . import schedules
from .loops import ModelFn, SamplingLoops
from .losses import discretized_gaussian_log_likelihood, mean_flat, normal_kl
from .tables import extract, table_on


class ModelMeanType(enum.Enum):
    """What the model's first C output channels predict."""

    START_X = enum.auto()
    EPSILON = enum.auto()


class ModelVarType(enum.Enum):
    """Where the reverse-process variance comes from.

    LEARNED_RANGE (Nichol & Dhariwal, Eq. 15): the model outputs v in [-1, 1] and
    log sigma^2 = frac * log beta_t + (1 - frac) * log beta~_t with frac = (v + 1) / 2.
    """

    LEARNED = enum.auto()
    FIXED_SMALL = enum.auto()
    FIXED_LARGE = enum.auto()
    LEARNED_RANGE = enum.auto()


class LossType(enum.Enum):
    """The training loss (ADM): MSE (+ VB for a learned variance), rescaled MSE, or KL."""

    MSE = enum.auto()  # eps MSE, plus the VB term when the variance is learned (hybrid loss)
    RESCALED_MSE = enum.auto()  # as MSE, with the VB term scaled by num_timesteps / 1000
    KL = enum.auto()  # the variational bound alone
    RESCALED_KL = enum.auto()  # the variational bound times num_timesteps (estimates the full VLB)

    def is_vb(self) -> bool:
        """Whether the loss is the variational bound itself (KL or rescaled KL)."""
        return self in (LossType.KL, LossType.RESCALED_KL)


class GaussianDiffusion(SamplingLoops):
    """Training losses and samplers for a discrete-time Gaussian diffusion with ``len(betas)`` steps."""

    def __init__(
        self,
        betas: np.ndarray | Sequence[float],
        model_mean_type: ModelMeanType = ModelMeanType.EPSILON,
        model_var_type: ModelVarType = ModelVarType.LEARNED_RANGE,
        loss_type: LossType = LossType.MSE,
        mse_loss_weights: np.ndarray | Sequence[float] | None = None,
    ) -> None:
        self.model_mean_type = model_mean_type
        self.model_var_type = model_var_type
        self.loss_type = loss_type
        # w_t on the MSE term (loss_weighting.py: Min-SNR, P2); None = 1. Rounded to float32 once, like the
        # reference code's tables.
        self.mse_loss_weights = (
            None
            if mse_loss_weights is None
            else np.asarray(mse_loss_weights, dtype=np.float32).astype(np.float64)
        )

        betas = np.array(betas, dtype=np.float64)
        if betas.ndim != 1 or betas.shape[0] < 2:
            raise ValueError(f"betas must be a 1-D array of at least 2 values, got shape {betas.shape}")
        if not ((betas > 0).all() and (betas <= 1).all()):
            raise ValueError(f"betas must lie in (0, 1], got min {betas.min()} and max {betas.max()}")
        self.betas = betas
        self.num_timesteps = int(betas.shape[0])
        if self.mse_loss_weights is not None and self.mse_loss_weights.shape != (self.num_timesteps,):
            raise ValueError(
                f"mse_loss_weights must have one weight per timestep ({self.num_timesteps}), "
                f"got shape {self.mse_loss_weights.shape}"
            )

        alphas = 1.0 - betas
        self.alphas_cumprod = np.cumprod(alphas)
        self.alphas_cumprod_prev = np.append(1.0, self.alphas_cumprod[:-1])
        self.alphas_cumprod_next = np.append(self.alphas_cumprod[1:], 0.0)

        # q(x_t | x_0) = N(sqrt(abar_t) x_0, (1 - abar_t) I)   (DDPM Eq. 4)
        self.sqrt_alphas_cumprod = np.sqrt(self.alphas_cumprod)
        self.sqrt_one_minus_alphas_cumprod = np.sqrt(1.0 - self.alphas_cumprod)
        self.log_one_minus_alphas_cumprod = np.log(1.0 - self.alphas_cumprod)
        self.sqrt_recip_alphas_cumprod = np.sqrt(1.0 / self.alphas_cumprod)
        self.sqrt_recipm1_alphas_cumprod = np.sqrt(1.0 / self.alphas_cumprod - 1.0)

        # q(x_{t-1} | x_t, x_0) = N(coef1 x_0 + coef2 x_t, beta~_t I)   (DDPM Eqs. 6-7)
        self.posterior_variance = betas * (1.0 - self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        # beta~_0 = 0, so its log is replaced by log beta~_1 (the reference's clipping).
        self.posterior_log_variance_clipped = np.log(
            np.append(self.posterior_variance[1], self.posterior_variance[1:])
        )
        self.posterior_mean_coef1 = betas * np.sqrt(self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        self.posterior_mean_coef2 = (
            (1.0 - self.alphas_cumprod_prev) * np.sqrt(alphas) / (1.0 - self.alphas_cumprod)
        )
        self.log_betas = np.log(betas)
        # FIXED_LARGE uses beta_t, except at t = 0 where beta~_1 gives a better decoder likelihood.
        self.fixed_large_variance = np.append(self.posterior_variance[1], betas[1:])
        self.fixed_large_log_variance = np.log(self.fixed_large_variance)
        self.snr_table = schedules.snr(self.alphas_cumprod)  # abar_t / (1 - abar_t), float64 (T,)

    # ----- forward process -------------------------------------------------------------------------

    def snr(self, t: Tensor) -> Tensor:
        """Per-sample SNR abar_t / (1 - abar_t) for timesteps t (B,), float64 on t's device."""
        return table_on(self.snr_table, t.device)[t]

    def q_sample(self, x_start: Tensor, t: Tensor, noise: Tensor | None = None) -> Tensor:
        """Draw x_t ~ q(x_t | x_0) = sqrt(abar_t) x_0 + sqrt(1 - abar_t) noise."""
        if noise is None:
            noise = torch.randn_like(x_start)
        if noise.shape != x_start.shape:
            raise ValueError(f"noise has shape {tuple(noise.shape)}, x_start {tuple(x_start.shape)}")
        return (
            extract(self.sqrt_alphas_cumprod, t, x_start.shape) * x_start
            + extract(self.sqrt_one_minus_alphas_cumprod, t, x_start.shape) * noise
        )

    def q_posterior_mean_variance(
        self, x_start: Tensor, x_t: Tensor, t: Tensor
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Mean, variance and clipped log variance of the posterior q(x_{t-1} | x_t, x_0)."""
        if x_start.shape != x_t.shape:
            raise ValueError(f"x_start has shape {tuple(x_start.shape)}, x_t {tuple(x_t.shape)}")
        mean = (
            extract(self.posterior_mean_coef1, t, x_t.shape) * x_start
            + extract(self.posterior_mean_coef2, t, x_t.shape) * x_t
        )
        variance = extract(self.posterior_variance, t, x_t.shape)
        log_variance = extract(self.posterior_log_variance_clipped, t, x_t.shape)
        return mean, variance, log_variance

    # ----- reverse process -------------------------------------------------------------------------

    def _call_model(
        self, model: ModelFn, x: Tensor, t: Tensor, model_kwargs: dict[str, Any] | None
    ) -> Tensor:
        """Run the model on (x, t); SpacedDiffusion overrides this to pass the original timesteps."""
        return model(x, t, **(model_kwargs or {}))

    @property
    def _learns_variance(self) -> bool:
        return self.model_var_type in (ModelVarType.LEARNED, ModelVarType.LEARNED_RANGE)

    def _split_output(self, model_output: Tensor, x: Tensor) -> tuple[Tensor, Tensor | None]:
        """Cast the model output to float32 and split it into (mean part, variance values or None)."""
        batch, channels = x.shape[:2]
        out_channels = 2 * channels if self._learns_variance else channels
        expected = (batch, out_channels, *x.shape[2:])
        if tuple(model_output.shape) != expected:
            raise ValueError(
                f"model output has shape {tuple(model_output.shape)}, expected {expected} "
                f"({self.model_var_type.name} variance needs {out_channels} channels for {channels} input channels)"
            )
        model_output = model_output.float()
        if not self._learns_variance:
            return model_output, None
        mean_part, var_values = torch.split(model_output, channels, dim=1)
        return mean_part, var_values

    def _p_mean_variance_from_output(
        self,
        model_output: Tensor,
        x: Tensor,
        t: Tensor,
        clip_denoised: bool = False,
        denoised_fn: Callable[[Tensor], Tensor] | None = None,
    ) -> dict[str, Tensor]:
        if t.shape != (x.shape[0],):
            raise ValueError(f"t must have shape ({x.shape[0]},), got {tuple(t.shape)}")
        x = x.float()
        mean_part, var_values = self._split_output(model_output, x)
        if self.model_var_type == ModelVarType.LEARNED:
            log_variance = var_values
            variance = torch.exp(log_variance)
        elif self.model_var_type == ModelVarType.LEARNED_RANGE:
            min_log = extract(self.posterior_log_variance_clipped, t, x.shape)
            max_log = extract(self.log_betas, t, x.shape)
            frac = (var_values + 1) / 2
            log_variance = frac * max_log + (1 - frac) * min_log
            variance = torch.exp(log_variance)
        else:
            large = self.model_var_type == ModelVarType.FIXED_LARGE
            variance = extract(self.fixed_large_variance if large else self.posterior_variance, t, x.shape)
            log_variance = extract(
                self.fixed_large_log_variance if large else self.posterior_log_variance_clipped, t, x.shape
            )

        if self.model_mean_type == ModelMeanType.START_X:
            pred_xstart = mean_part
        else:
            pred_xstart = self._predict_xstart_from_eps(x, t, mean_part)
        if denoised_fn is not None:
            pred_xstart = denoised_fn(pred_xstart)
        if clip_denoised:
            pred_xstart = pred_xstart.clamp(-1, 1)
        mean, _, _ = self.q_posterior_mean_variance(pred_xstart, x, t)
        return {"mean": mean, "variance": variance, "log_variance": log_variance, "pred_xstart": pred_xstart}

    def p_mean_variance(
        self,
        model: ModelFn,
        x: Tensor,
        t: Tensor,
        clip_denoised: bool = False,
        denoised_fn: Callable[[Tensor], Tensor] | None = None,
        model_kwargs: dict[str, Any] | None = None,
    ) -> dict[str, Tensor]:
        """p(x_{t-1} | x_t): dict of "mean", "variance", "log_variance", "pred_xstart" (float32)."""
        model_output = self._call_model(model, x, t, model_kwargs)
        return self._p_mean_variance_from_output(model_output, x, t, clip_denoised, denoised_fn)

    def _predict_xstart_from_eps(self, x_t: Tensor, t: Tensor, eps: Tensor) -> Tensor:
        # Inverse of q_sample: x_0 = x_t / sqrt(abar) - sqrt(1/abar - 1) eps.
        return (
            extract(self.sqrt_recip_alphas_cumprod, t, x_t.shape) * x_t
            - extract(self.sqrt_recipm1_alphas_cumprod, t, x_t.shape) * eps
        )

    def _predict_eps_from_xstart(self, x_t: Tensor, t: Tensor, pred_xstart: Tensor) -> Tensor:
        return (extract(self.sqrt_recip_alphas_cumprod, t, x_t.shape) * x_t - pred_xstart) / extract(
            self.sqrt_recipm1_alphas_cumprod, t, x_t.shape
        )

    # ----- training --------------------------------------------------------------------------------

    def _vb_terms_bpd(
        self, model_output: Tensor, x_start: Tensor, x_t: Tensor, t: Tensor, clip_denoised: bool = False
    ) -> dict[str, Tensor]:
        """One term of the variational bound in bits per dim (improved DDPM, Eq. 4-5), shape (B,).

        L_{t-1} = KL(q(x_{t-1} | x_t, x_0) || p(x_{t-1} | x_t)) for t > 0 and the discretised decoder
        NLL -log p(x_0 | x_1) at t = 0.
        """
        true_mean, _, true_log_variance = self.q_posterior_mean_variance(x_start, x_t, t)
        out = self._p_mean_variance_from_output(model_output, x_t, t, clip_denoised)
        kl = mean_flat(normal_kl(true_mean, true_log_variance, out["mean"], out["log_variance"])) / math.log(
            2.0
        )
        decoder_nll = -mean_flat(
            discretized_gaussian_log_likelihood(
                x_start, means=out["mean"], log_scales=0.5 * out["log_variance"]
            )
        ) / math.log(2.0)
        return {"output": torch.where(t == 0, decoder_nll, kl), "pred_xstart": out["pred_xstart"]}

    def training_losses(
        self,
        model: ModelFn,
        x_start: Tensor,
        t: Tensor,
        model_kwargs: dict[str, Any] | None = None,
        noise: Tensor | None = None,
    ) -> dict[str, Tensor]:
        """Per-sample losses {"loss", "mse", "vb"}, each of shape (B,) and float32.

        MSE loss types: loss = mse + vb, where mse is the eps (or x_0) regression error and vb the
        variational term computed with the mean output detached, so the VB only trains the variance
        (improved DDPM's L_hybrid; vb is 0 for a fixed variance). KL loss types: loss = vb and mse is a
        detached diagnostic. x_t reaches the model in x_start's dtype; all loss arithmetic is float32
        even when the model returns bfloat16.
        """
        x_start32 = x_start.float()
        noise = torch.randn_like(x_start32) if noise is None else noise.float()
        x_t = self.q_sample(x_start32, t, noise=noise)
        model_output = self._call_model(model, x_t.to(x_start.dtype), t, model_kwargs)
        mean_part, var_values = self._split_output(model_output, x_start32)
        target = noise if self.model_mean_type == ModelMeanType.EPSILON else x_start32
        mse = mean_flat((target - mean_part) ** 2)
        if self.mse_loss_weights is not None:  # Min-SNR / P2, on the MSE term only (official DTR code)
            mse = extract(self.mse_loss_weights, t, mse.shape) * mse

        if self.loss_type.is_vb():
            vb = self._vb_terms_bpd(model_output, x_start32, x_t, t)["output"]
            if self.loss_type == LossType.RESCALED_KL:
                vb = vb * self.num_timesteps
            return {"loss": vb, "mse": mse.detach(), "vb": vb}

        if var_values is None:
            vb = torch.zeros_like(mse)
        else:
            frozen_output = torch.cat([mean_part.detach(), var_values], dim=1)
            vb = self._vb_terms_bpd(frozen_output, x_start32, x_t, t)["output"]
            if self.loss_type == LossType.RESCALED_MSE:
                # The reference's scaling, so the VB term does not swamp the MSE for long schedules.
                vb = vb * (self.num_timesteps / 1000.0)
        return {"loss": mse + vb, "mse": mse, "vb": vb}
