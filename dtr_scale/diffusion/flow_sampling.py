"""Samplers of flow-matching models: Euler and Heun ODE (SiT) and Euler-Maruyama SDE (REPA's default), with
classifier-free guidance inside REPA's guidance interval (Kynkaanniemi et al. 2024).

They follow REPA's `samplers.py` (`euler_sampler`, `euler_maruyama_sampler`) step for step, in float64, in
this package's time convention (t = 1 noise, t = 0 data; diffusion/flow.py):

- euler / heun: t on linspace(1, 0, N + 1); x <- x + (t_next - t) v(x, t); Heun averages v(x, t) with
  v(x_next, t_next), except on the last step (which ends at t = 0, where the second evaluation is skipped).
- sde: t on linspace(1, 0.04, N) then 0; N - 1 Euler-Maruyama steps with diffusion coefficient w_t = 2t,
  drift v - w_t / 2 * score, score = (alpha_t / alpha_t' * v - x) / (sigma_t^2 - alpha_t / alpha_t' *
  sigma_t' * sigma_t) (REPA's `get_score_from_velocity`), x <- x + drift dt + sqrt(w_t) sqrt(|dt|) z;
  then one deterministic step from 0.04 to 0.
- CFG: v = v_uncond + s (v_cond - v_uncond) with the null label `num_classes`, only while the step's time t
  satisfies guidance_low <= t <= guidance_high (Heun's second evaluation follows its step's t); outside,
  the conditional model alone. (REPA guides the SDE's drift; the drift is affine in v with the same x for both
  halves, so guiding v first is the same.)

Every sample draws its Euler-Maruyama noise from its own generator (sampling.py), so sample i is the same image
at any world size or batch size.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

FLOW_SAMPLERS = ("euler", "heun", "sde")
SDE_LAST_TIME = 0.04  # REPA samplers.py: the SDE stops at t = 0.04 and takes one deterministic step to 0

Velocity = Callable[[Tensor, float, Tensor, bool], Tensor]


@dataclass(frozen=True)
class FlowSolver:
    """A flow sampler's settings: sampling steps and the guidance interval [guidance_low, guidance_high] of t
    (REPA's defaults 0 and 1: guidance at every step)."""

    steps: int
    guidance_low: float = 0.0
    guidance_high: float = 1.0


def flow_velocity_fn(
    model: nn.Module, cfg_scale: float, num_timesteps: int, device: torch.device
) -> Velocity:
    """velocity(x float64 (B, ...), t float, y long (B,), guided) -> float64 (B, ...): the model's velocity at
    time t (fed as t * (num_timesteps - 1), diffusion/flow.py), with CFG at `cfg_scale` when `guided` and
    cfg_scale != 1 (one doubled batch: conditional, then null labels `model.num_classes`)."""
    from dtr_scale.diffusion.flow import FlowMatching

    flow = FlowMatching(num_timesteps)
    dtype = next(model.parameters()).dtype
    null_label = model.num_classes
    autocast = (
        torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()
    )

    def velocity(x: Tensor, t: float, y: Tensor, guided: bool) -> Tensor:
        guided = guided and cfg_scale != 1.0
        inputs = torch.cat([x, x]) if guided else x
        labels = torch.cat([y, torch.full_like(y, null_label)]) if guided else y
        time = flow.model_time(torch.full((len(inputs),), float(t), dtype=torch.float64, device=x.device))
        with autocast:
            out = model(inputs.to(dtype), time.to(dtype), labels).to(torch.float64)
        if not guided:
            return out
        cond, uncond = out.chunk(2)
        return uncond + cfg_scale * (cond - uncond)

    return velocity


def _score(v: Tensor, x: Tensor, t: float) -> Tensor:
    """REPA's get_score_from_velocity for the linear path: alpha_t = 1 - t, sigma_t = t, alpha' = -1, sigma' = 1."""
    alpha, d_alpha, sigma, d_sigma = 1.0 - t, -1.0, t, 1.0
    reverse_alpha_ratio = alpha / d_alpha
    var = sigma**2 - reverse_alpha_ratio * d_sigma * sigma
    return (reverse_alpha_ratio * v - x) / var


@torch.no_grad()
def flow_sample(
    velocity: Velocity,
    sampler: str,
    x: Tensor,
    y: Tensor,
    steps: int,
    noise_fn: Callable[[], Tensor] | None = None,
    guidance_low: float = 0.0,
    guidance_high: float = 1.0,
) -> Tensor:
    """Data (t = 0) from noise x (t = 1), float64, by `sampler` (euler | heun | sde) in `steps` steps.

    x: (B, C, H, W) starting noise (any float dtype; integrated in float64); y: (B,) labels; noise_fn() ->
    (B, C, H, W) standard normal draws for each Euler-Maruyama step (sde only). The guidance interval applies
    to each step's t (see the module docstring)."""
    if sampler not in FLOW_SAMPLERS:
        raise ValueError(f"flow sampler must be one of {FLOW_SAMPLERS}, got {sampler!r}")
    if steps < 1 or (sampler == "sde" and steps < 2):
        raise ValueError(
            f"flow sampler {sampler}: steps must be >= {2 if sampler == 'sde' else 1}, got {steps}"
        )

    def in_interval(t: float) -> bool:
        return guidance_low <= t <= guidance_high

    x = x.to(torch.float64)
    if sampler == "sde":
        return _euler_maruyama(velocity, x, y, steps, noise_fn, in_interval)
    times = torch.linspace(1, 0, steps + 1, dtype=torch.float64).tolist()
    for i, (t_cur, t_next) in enumerate(zip(times[:-1], times[1:])):
        guided = in_interval(t_cur)
        d_cur = velocity(x, t_cur, y, guided)
        x_next = x + (t_next - t_cur) * d_cur
        if sampler == "heun" and i < steps - 1:
            d_prime = velocity(x_next, t_next, y, guided)
            x_next = x + (t_next - t_cur) * (0.5 * d_cur + 0.5 * d_prime)
        x = x_next
    return x


def _euler_maruyama(
    velocity: Velocity, x: Tensor, y: Tensor, steps: int, noise_fn, in_interval: Callable[[float], bool]
) -> Tensor:
    """REPA's euler_maruyama_sampler: N - 1 stochastic steps on linspace(1, 0.04, N), then 0.04 -> 0."""
    if noise_fn is None:
        raise ValueError("the sde sampler needs noise_fn (per-sample noise for every step)")
    times = torch.linspace(1.0, SDE_LAST_TIME, steps, dtype=torch.float64).tolist() + [0.0]

    def drift(x: Tensor, t: float) -> Tensor:
        v = velocity(x, t, y, in_interval(t))
        return v - 0.5 * (2.0 * t) * _score(v, x, t)  # diffusion coefficient w_t = 2t

    for t_cur, t_next in zip(times[:-2], times[1:-1]):
        dt = t_next - t_cur
        noise = noise_fn().to(x.device, torch.float64) * abs(dt) ** 0.5
        x = x + drift(x, t_cur) * dt + (2.0 * t_cur) ** 0.5 * noise
    t_cur, t_next = times[-2], times[-1]
    return x + (t_next - t_cur) * drift(x, t_cur)
