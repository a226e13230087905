"""The reverse-process samplers of `GaussianDiffusion`: one ancestral (DDPM) or DDIM step, and the loops that
run them from t = T-1 down to 0 (ADM's p_sample_loop / ddim_sample_loop, same signatures and random-stream use).

`SamplingLoops` is a mixin: it reads the host class's schedule tables (`alphas_cumprod`, `alphas_cumprod_prev`,
`num_timesteps`) and calls its `p_mean_variance` and `_predict_eps_from_xstart`.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from .tables import extract

ModelFn = Callable[..., Tensor]


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


class SamplingLoops:
    """DDPM and DDIM sampling for a diffusion class that provides the tables and `p_mean_variance`."""

    def p_sample(
        self,
        model: ModelFn,
        x: Tensor,
        t: Tensor,
        clip_denoised: bool = False,
        denoised_fn: Callable[[Tensor], Tensor] | None = None,
        model_kwargs: dict[str, Any] | None = None,
        generator: torch.Generator | None = None,
        noise: Tensor | None = None,
    ) -> dict[str, Tensor]:
        """One ancestral (DDPM) step x_t -> x_{t-1} (Ho et al. 2020, Alg. 2); no noise is added at t = 0.
        `noise` (x's shape) replaces the draw from `generator`, e.g. per-sample noise from per-sample generators."""
        out = self.p_mean_variance(model, x, t, clip_denoised, denoised_fn, model_kwargs)
        if noise is None:
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
        noise: Tensor | None = None,
    ) -> dict[str, Tensor]:
        """One DDIM step x_t -> x_{t-1} (Song et al. 2021, Eq. 12; eta = 0 is deterministic). `noise` (x's shape)
        replaces the draw from `generator`; at eta = 0 it is multiplied by 0, so zeros do."""
        out = self.p_mean_variance(model, x, t, clip_denoised, denoised_fn, model_kwargs)
        # Re-derive eps from x_0 so that clipping or denoised_fn are reflected in it.
        eps = self._predict_eps_from_xstart(x.float(), t, out["pred_xstart"])
        alpha_bar = extract(self.alphas_cumprod, t, x.shape)
        alpha_bar_prev = extract(self.alphas_cumprod_prev, t, x.shape)
        # DDIM Eq. 16: sigma_t(eta).
        sigma = (
            eta
            * torch.sqrt((1 - alpha_bar_prev) / (1 - alpha_bar))
            * torch.sqrt(1 - alpha_bar / alpha_bar_prev)
        )
        if noise is None:  # drawn even for eta = 0, so that a seed consumes the reference's random stream
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

    def p_sample_loop(self, *args: Any, **kwargs: Any) -> Tensor:
        """Ancestral (DDPM) sampling, the final sample (B, ...) of `p_sample_loop_progressive` (same arguments:
        model, shape, noise, clip_denoised, denoised_fn, model_kwargs, device, progress, generator).
        ``generator`` drives every noise draw, so a seed fixes the result."""
        return _last_sample(self.p_sample_loop_progressive(*args, **kwargs))

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

    def ddim_sample_loop(self, *args: Any, **kwargs: Any) -> Tensor:
        """DDIM sampling over this diffusion's steps (respace it for fewer, e.g. "ddim50"): the final sample of
        `ddim_sample_loop_progressive` (same arguments: model, shape, noise, clip_denoised, denoised_fn,
        model_kwargs, device, progress, eta, generator)."""
        return _last_sample(self.ddim_sample_loop_progressive(*args, **kwargs))
