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
import weakref
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from . import schedules

ModelFn = Callable[..., Tensor]


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


def mean_flat(tensor: Tensor) -> Tensor:
    """Mean over every dimension but the batch dimension: (B, ...) -> (B,)."""
    return tensor.mean(dim=tuple(range(1, tensor.ndim)))


def normal_kl(mean1: Tensor, logvar1: Tensor, mean2: Tensor, logvar2: Tensor) -> Tensor:
    """Elementwise KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)) in nats."""
    return 0.5 * (
        -1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2)
    )


def approx_standard_normal_cdf(x: Tensor) -> Tensor:
    """The tanh approximation of the standard normal CDF that the ADM reference uses."""
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))


def discretized_gaussian_log_likelihood(x: Tensor, means: Tensor, log_scales: Tensor) -> Tensor:
    """Elementwise log-likelihood (nats) of x under a Gaussian discretised into 256 bins on [-1, 1].

    DDPM's decoder L_0 (Ho et al., Eq. 13): the edge bins extend to +-infinity.
    """
    centered = x - means
    inv_std = torch.exp(-log_scales)
    cdf_plus = approx_standard_normal_cdf(inv_std * (centered + 1.0 / 255.0))
    cdf_min = approx_standard_normal_cdf(inv_std * (centered - 1.0 / 255.0))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))
    log_cdf_delta = torch.log((cdf_plus - cdf_min).clamp(min=1e-12))
    return torch.where(x < -0.999, log_cdf_plus, torch.where(x > 0.999, log_one_minus_cdf_min, log_cdf_delta))


# Schedule tables copied to an accelerator once, not once per lookup: id(table) -> (weakref, {device: tensor}).
_DEVICE_TABLES: dict[int, tuple[weakref.ref, dict[torch.device, Tensor]]] = {}


def table_on(table: np.ndarray, device: torch.device) -> Tensor:
    """``table`` (float64 numpy, never modified in place) as a float64 tensor on ``device``.

    On the CPU a zero-copy view; elsewhere copied once per (table, device) and cached for the table's
    lifetime, so a training step issues no host-to-device copy of schedule coefficients.
    """
    if device.type == "cpu":
        return torch.from_numpy(table)
    key = id(table)
    entry = _DEVICE_TABLES.get(key)
    if entry is None or entry[0]() is not table:
        entry = (weakref.ref(table, lambda _ref, key=key: _DEVICE_TABLES.pop(key, None)), {})
        _DEVICE_TABLES[key] = entry
    cached = entry[1].get(device)
    if cached is None:
        cached = entry[1][device] = torch.from_numpy(table).to(device)
    return cached


def _extract(table: np.ndarray, t: Tensor, shape: Sequence[int]) -> Tensor:
    """Read table[t] for a batch of timesteps as float32, broadcast to ``shape`` (B, ...).

    Indexing happens in float64 and the rounding to float32 after it, as in the reference.
    """
    values = table_on(table, t.device)[t].float()
    return values.reshape(-1, *([1] * (len(shape) - 1))).expand(*shape)


def _randn(shape: Sequence[int], device: torch.device, generator: torch.Generator | None) -> Tensor:
    return torch.randn(*shape, device=device, generator=generator)


def _last_sample(steps: Iterator[dict[str, Tensor]]) -> Tensor:
    """Run a progressive sampler to the end and return its final sample."""
    return deque(steps, maxlen=1)[0]["sample"]


def _resolve_device(
    model: ModelFn, noise: Tensor | None, device: torch.device | str | None, generator: torch.Generator | None
) -> torch.device:
    """The sampling device: explicit, else the noise's, the generator's, or the model's parameters'."""
    if device is not None:
        resolved = torch.device(device)
    elif noise is not None:
        resolved = noise.device
    elif generator is not None:
        resolved = generator.device
    else:
        owner = getattr(model, "__self__", model)  # a bound method such as model.forward_with_cfg
        first = next(owner.parameters(), None) if isinstance(owner, nn.Module) else None
        resolved = first.device if first is not None else torch.device("cpu")
    if generator is not None and generator.device.type != resolved.type:
        raise ValueError(
            f"the sampling generator is on {generator.device} but samples are drawn on {resolved}; "
            f"create it with torch.Generator(device={str(resolved)!r})"
        )
    return resolved


class GaussianDiffusion:
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
            _extract(self.sqrt_alphas_cumprod, t, x_start.shape) * x_start
            + _extract(self.sqrt_one_minus_alphas_cumprod, t, x_start.shape) * noise
        )

    def q_posterior_mean_variance(
        self, x_start: Tensor, x_t: Tensor, t: Tensor
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Mean, variance and clipped log variance of the posterior q(x_{t-1} | x_t, x_0)."""
        if x_start.shape != x_t.shape:
            raise ValueError(f"x_start has shape {tuple(x_start.shape)}, x_t {tuple(x_t.shape)}")
        mean = (
            _extract(self.posterior_mean_coef1, t, x_t.shape) * x_start
            + _extract(self.posterior_mean_coef2, t, x_t.shape) * x_t
        )
        variance = _extract(self.posterior_variance, t, x_t.shape)
        log_variance = _extract(self.posterior_log_variance_clipped, t, x_t.shape)
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
            min_log = _extract(self.posterior_log_variance_clipped, t, x.shape)
            max_log = _extract(self.log_betas, t, x.shape)
            frac = (var_values + 1) / 2
            log_variance = frac * max_log + (1 - frac) * min_log
            variance = torch.exp(log_variance)
        else:
            large = self.model_var_type == ModelVarType.FIXED_LARGE
            variance = _extract(self.fixed_large_variance if large else self.posterior_variance, t, x.shape)
            log_variance = _extract(
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
            _extract(self.sqrt_recip_alphas_cumprod, t, x_t.shape) * x_t
            - _extract(self.sqrt_recipm1_alphas_cumprod, t, x_t.shape) * eps
        )

    def _predict_eps_from_xstart(self, x_t: Tensor, t: Tensor, pred_xstart: Tensor) -> Tensor:
        return (_extract(self.sqrt_recip_alphas_cumprod, t, x_t.shape) * x_t - pred_xstart) / _extract(
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
            mse = _extract(self.mse_loss_weights, t, mse.shape) * mse

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

    # ----- sampling --------------------------------------------------------------------------------

    def p_sample(
        self,
        model: ModelFn,
        x: Tensor,
        t: Tensor,
        clip_denoised: bool = False,
        denoised_fn: Callable[[Tensor], Tensor] | None = None,
        model_kwargs: dict[str, Any] | None = None,
        generator: torch.Generator | None = None,
    ) -> dict[str, Tensor]:
        """One ancestral (DDPM) step x_t -> x_{t-1}; no noise is added at t = 0."""
        out = self.p_mean_variance(model, x, t, clip_denoised, denoised_fn, model_kwargs)
        noise = _randn(x.shape, x.device, generator)
        nonzero_mask = (t != 0).float().view(-1, *([1] * (x.ndim - 1)))
        sample = out["mean"] + nonzero_mask * torch.exp(0.5 * out["log_variance"]) * noise
        return {"sample": sample, "pred_xstart": out["pred_xstart"]}

    def ddim_sample(
        self,
        model: ModelFn,
        x: Tensor,
        t: Tensor,
        clip_denoised: bool = False,
        denoised_fn: Callable[[Tensor], Tensor] | None = None,
        model_kwargs: dict[str, Any] | None = None,
        eta: float = 0.0,
        generator: torch.Generator | None = None,
    ) -> dict[str, Tensor]:
        """One DDIM step x_t -> x_{t-1} (Song et al. 2021, Eq. 12; eta = 0 is deterministic)."""
        out = self.p_mean_variance(model, x, t, clip_denoised, denoised_fn, model_kwargs)
        # Re-derive eps from x_0 so that clipping or denoised_fn are reflected in it.
        eps = self._predict_eps_from_xstart(x.float(), t, out["pred_xstart"])
        alpha_bar = _extract(self.alphas_cumprod, t, x.shape)
        alpha_bar_prev = _extract(self.alphas_cumprod_prev, t, x.shape)
        # DDIM Eq. 16: sigma_t(eta).
        sigma = (
            eta
            * torch.sqrt((1 - alpha_bar_prev) / (1 - alpha_bar))
            * torch.sqrt(1 - alpha_bar / alpha_bar_prev)
        )
        # Drawn even for eta = 0 so that a seed consumes the same random stream as the reference.
        noise = _randn(x.shape, x.device, generator)
        mean_pred = (
            out["pred_xstart"] * torch.sqrt(alpha_bar_prev) + torch.sqrt(1 - alpha_bar_prev - sigma**2) * eps
        )
        nonzero_mask = (t != 0).float().view(-1, *([1] * (x.ndim - 1)))
        return {"sample": mean_pred + nonzero_mask * sigma * noise, "pred_xstart": out["pred_xstart"]}

    def _sample_loop_progressive(
        self,
        step: Callable[[Tensor, Tensor], dict[str, Tensor]],
        shape: Sequence[int],
        noise: Tensor | None,
        device: torch.device,
        progress: bool,
        generator: torch.Generator | None,
    ) -> Iterator[dict[str, Tensor]]:
        shape = tuple(shape)
        if noise is not None:
            if tuple(noise.shape) != shape:
                raise ValueError(f"noise has shape {tuple(noise.shape)}, expected the sample shape {shape}")
            img = noise.to(device)
        else:
            img = _randn(shape, device, generator)
        indices: Iterator[int] | range = range(self.num_timesteps - 1, -1, -1)
        if progress:
            from tqdm.auto import tqdm

            indices = tqdm(indices)
        for i in indices:
            t = torch.full((shape[0],), i, device=device, dtype=torch.long)
            with torch.no_grad():
                out = step(img, t)
            yield out
            img = out["sample"]

    def p_sample_loop_progressive(
        self,
        model: ModelFn,
        shape: Sequence[int],
        noise: Tensor | None = None,
        clip_denoised: bool = False,
        denoised_fn: Callable[[Tensor], Tensor] | None = None,
        model_kwargs: dict[str, Any] | None = None,
        device: torch.device | str | None = None,
        progress: bool = False,
        generator: torch.Generator | None = None,
    ) -> Iterator[dict[str, Tensor]]:
        """Yield p_sample's output at every step, from t = T-1 down to 0."""
        device = _resolve_device(model, noise, device, generator)

        def step(x: Tensor, t: Tensor) -> dict[str, Tensor]:
            return self.p_sample(model, x, t, clip_denoised, denoised_fn, model_kwargs, generator)

        yield from self._sample_loop_progressive(step, shape, noise, device, progress, generator)

    def p_sample_loop(
        self,
        model: ModelFn,
        shape: Sequence[int],
        noise: Tensor | None = None,
        clip_denoised: bool = False,
        denoised_fn: Callable[[Tensor], Tensor] | None = None,
        model_kwargs: dict[str, Any] | None = None,
        device: torch.device | str | None = None,
        progress: bool = False,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """Ancestral (DDPM) sampling; ``generator`` drives every noise draw, so a seed fixes the result."""
        return _last_sample(
            self.p_sample_loop_progressive(
                model, shape, noise, clip_denoised, denoised_fn, model_kwargs, device, progress, generator
            )
        )

    def ddim_sample_loop_progressive(
        self,
        model: ModelFn,
        shape: Sequence[int],
        noise: Tensor | None = None,
        clip_denoised: bool = False,
        denoised_fn: Callable[[Tensor], Tensor] | None = None,
        model_kwargs: dict[str, Any] | None = None,
        device: torch.device | str | None = None,
        progress: bool = False,
        eta: float = 0.0,
        generator: torch.Generator | None = None,
    ) -> Iterator[dict[str, Tensor]]:
        """Yield ddim_sample's output at every step, from t = T-1 down to 0."""
        device = _resolve_device(model, noise, device, generator)

        def step(x: Tensor, t: Tensor) -> dict[str, Tensor]:
            return self.ddim_sample(model, x, t, clip_denoised, denoised_fn, model_kwargs, eta, generator)

        yield from self._sample_loop_progressive(step, shape, noise, device, progress, generator)

    def ddim_sample_loop(
        self,
        model: ModelFn,
        shape: Sequence[int],
        noise: Tensor | None = None,
        clip_denoised: bool = False,
        denoised_fn: Callable[[Tensor], Tensor] | None = None,
        model_kwargs: dict[str, Any] | None = None,
        device: torch.device | str | None = None,
        progress: bool = False,
        eta: float = 0.0,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """DDIM sampling over this diffusion's steps (respace it for fewer, e.g. "ddim50")."""
        return _last_sample(
            self.ddim_sample_loop_progressive(
                model,
                shape,
                noise,
                clip_denoised,
                denoised_fn,
                model_kwargs,
                device,
                progress,
                eta,
                generator,
            )
        )
