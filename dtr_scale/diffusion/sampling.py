"""The one sampling path: classifier-free guidance around a model, and the reverse process with per-sample
noise. Used by `dtr-scale sample` (sample/sampler.py), the trainer's in-loop grids and evaluations
(train/inloop.py) and the demo alike. Sample i of a seed owns the generator `sample_generator(seed, i)`: its
first draw is its uniform label (`draw_label`, drawn even when the label is given), then its noise.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import nn

from dtr_scale.diffusion.flow_sampling import FLOW_SAMPLERS, FlowSolver, flow_sample, flow_velocity_fn


def sample_generator(seed: int, index: int) -> torch.Generator:
    """The CPU generator that owns sample `index`: seeded from SeedSequence([seed, index]), so distinct
    indices get independent, non-overlapping streams."""
    if seed < 0 or index < 0:
        raise ValueError(f"seed and sample index must be >= 0, got seed={seed}, index={index}")
    state = np.random.SeedSequence([seed, index]).generate_state(1, dtype=np.uint64)[0]
    return torch.Generator("cpu").manual_seed(int(state))


def draw_label(generator: torch.Generator, num_classes: int) -> int:
    """A uniform class index in 0..num_classes-1, the first draw from a sample's `generator`."""
    # Always drawn first, even with an explicit class list, so that x_T does not depend on `classes`.
    return int(torch.randint(num_classes, (1,), generator=generator))


def sample_generators(
    seed: int, indices: list[int], num_classes: int, classes: list[int] | None = None
) -> tuple[list[torch.Generator], list[int]]:
    """The generators of sample `indices` of `seed`, each past its first draw (its uniform label), and the
    labels: the uniform draws, or `classes` cycled by index (classes[i % len(classes)]). The label is drawn
    even when `classes` is given, so that a sample's noise does not depend on the class list."""
    generators = [sample_generator(seed, i) for i in indices]
    uniform = [draw_label(g, num_classes) for g in generators]
    labels = uniform if classes is None else [classes[i % len(classes)] for i in indices]
    return generators, labels


def guided_model_fn(model: nn.Module, cfg_scale: float, device: torch.device) -> Callable[..., torch.Tensor]:
    """model_fn(x, t, y) -> float32 output for the diffusion loops, with classifier-free guidance (Ho &
    Salimans 2022) when cfg_scale != 1: the conditional and null-label halves run as one doubled batch through
    the model's `forward_with_cfg` (the reference DiT's; `model.num_classes` is the null label)."""
    null_label = model.num_classes
    # bf16 autocast on CUDA only: CPU bf16 matmuls are slow and change results for no gain here.
    autocast = (
        torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()
    )

    def model_fn(x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        with autocast:
            if cfg_scale == 1.0:
                out = model(x, t, y)
            else:
                both = model.forward_with_cfg(
                    torch.cat([x, x]),
                    torch.cat([t, t]),
                    torch.cat([y, torch.full_like(y, null_label)]),
                    cfg_scale,
                )
                out = both[: len(x)]
        return out.float()

    return model_fn


@torch.no_grad()
def denoise(
    diffusion: Any,
    model_fn: Callable[..., torch.Tensor],
    sampler: str,
    generators: list[torch.Generator],
    labels: torch.Tensor,
    latent_shape: tuple[int, ...],
    device: torch.device,
) -> torch.Tensor:
    """Latents (B, *latent_shape) float32 from noise by the respaced `diffusion`'s reverse process: "ddim"
    (eta 0, Song et al. 2021 Eq. 12) or "ddpm" (ancestral); or, for a flow model, by the ODE/SDE `sampler`
    euler | heun | sde (diffusion/flow_sampling.py; `diffusion` a FlowSolver, `model_fn` its velocity). Sample
    b's starting noise, and its ancestral / SDE noise, come from `generators[b]`, so a sample is the same
    whatever batch or rank draws it. labels: (B,) long. Build the pair with `sampling_parts`."""

    def per_sample_noise() -> torch.Tensor:
        return torch.stack([torch.randn(latent_shape, generator=g) for g in generators]).to(device)

    x = per_sample_noise()
    if sampler in FLOW_SAMPLERS:  # `diffusion` is a FlowSolver and `model_fn` a flow velocity
        solver = diffusion
        z = flow_sample(
            model_fn, sampler, x, labels, solver.steps, per_sample_noise, solver.guidance_low,
            solver.guidance_high,
        )  # fmt: skip
        return z.float()
    kwargs = {"y": labels}
    for i in range(diffusion.num_timesteps - 1, -1, -1):
        t = torch.full((len(x),), i, device=device, dtype=torch.long)
        if sampler == "ddim":  # eta 0: the step's noise is multiplied by 0, so none is drawn
            step = diffusion.ddim_sample(
                model_fn, x, t, model_kwargs=kwargs, eta=0.0, noise=torch.zeros_like(x)
            )
        else:  # ancestral, each sample's noise from its own generator
            step = diffusion.p_sample(model_fn, x, t, model_kwargs=kwargs, noise=per_sample_noise())
        x = step["sample"]
    return x


def sampling_parts(
    model: nn.Module,
    diffusion_config: dict[str, Any],
    sampler: str,
    steps: int,
    cfg_scale: float,
    device: torch.device,
    guidance_low: float = 0.0,
    guidance_high: float = 1.0,
) -> tuple[Any, Callable[..., torch.Tensor]]:
    """(diffusion, model_fn) for `denoise`. diffusion_config: a model dir's "diffusion" section
    (`objective` ddpm when absent, `noise_schedule`, `diffusion_steps`, `learn_sigma`). DDPM: the diffusion
    respaced to `steps` (DDIM's respacing for ddim) and the guided eps model; flow: a FlowSolver and the
    guided velocity. ValueError when the sampler does not belong to the objective."""
    from dtr_scale.diffusion import create_diffusion

    objective = diffusion_config.get("objective", "ddpm")
    allowed = FLOW_SAMPLERS if objective == "flow" else ("ddpm", "ddim")
    if sampler not in allowed:
        raise ValueError(
            f"sampler {sampler!r} does not sample a {objective} model; use one of {', '.join(allowed)}"
        )
    if objective == "flow":
        velocity = flow_velocity_fn(model, cfg_scale, int(diffusion_config["diffusion_steps"]), device)
        return FlowSolver(steps, guidance_low, guidance_high), velocity
    diffusion = create_diffusion(
        timestep_respacing=f"ddim{steps}" if sampler == "ddim" else str(steps),
        noise_schedule=diffusion_config["noise_schedule"],
        learn_sigma=diffusion_config["learn_sigma"],
        diffusion_steps=diffusion_config["diffusion_steps"],
    )
    return diffusion, guided_model_fn(model, cfg_scale, device)
