"""Config checks and defaults that follow from `diffusion.objective` (ddpm | flow).

DDPM-only keys (the beta schedule, the learned variance, Min-SNR / P2 weighting) mean nothing on the flow
path and are refused by name when set to anything but their defaults; the `flow.*` keys are refused with
ddpm in the same way, so a config never carries a setting that silently does nothing.
"""

from __future__ import annotations

import dataclasses

from dtr_scale.config.schema import ConfigError, DiffusionConfig, FlowConfig, RunConfig

OBJECTIVES = ("ddpm", "flow")
FLOW_TIME_SAMPLING = ("uniform", "logit_normal")
FLOW_SAMPLERS = ("euler", "heun", "sde")
# diffusion.* keys that only the DDPM path reads (diffusion_steps stays: on flow it is the grid of t that
# DTR's mask table and ANT's clusters are indexed by, docs/flow.md).
_DDPM_ONLY = ("noise_schedule", "loss_weighting", "min_snr_gamma", "p2_k", "p2_gamma")


def check_objective(cfg: RunConfig) -> None:
    """Raise ConfigError naming the key when a setting does not apply to `diffusion.objective`."""
    objective = cfg.diffusion.objective
    if objective not in OBJECTIVES:
        raise ConfigError(f"diffusion.objective must be ddpm or flow, got {objective!r}")
    if objective == "ddpm":
        for f in dataclasses.fields(FlowConfig):
            if getattr(cfg.flow, f.name) != f.default:
                raise ConfigError(
                    f"flow.{f.name}={getattr(cfg.flow, f.name)!r} applies to diffusion.objective=flow only "
                    "(this config trains ddpm)"
                )
        return
    if cfg.model.learn_sigma:
        raise ConfigError(
            "model.learn_sigma=true has no meaning with diffusion.objective=flow (a velocity model has no "
            "variance to learn); leave it unset or false"
        )
    defaults = DiffusionConfig()
    for name in _DDPM_ONLY:
        if getattr(cfg.diffusion, name) != getattr(defaults, name):
            raise ConfigError(
                f"diffusion.{name}={getattr(cfg.diffusion, name)!r} is a DDPM setting; "
                "diffusion.objective=flow does not use it (remove it)"
            )
    _check_flow(cfg.flow)


def _check_flow(f: FlowConfig) -> None:
    if f.time_sampling not in FLOW_TIME_SAMPLING:
        raise ConfigError(f"flow.time_sampling must be uniform or logit_normal, got {f.time_sampling!r}")
    if not f.logit_std > 0:
        raise ConfigError(f"flow.logit_std must be > 0, got {f.logit_std}")
    if f.sampler not in FLOW_SAMPLERS:
        raise ConfigError(f"flow.sampler must be euler, heun or sde, got {f.sampler!r}")
    if not 0.0 <= f.guidance_low <= f.guidance_high <= 1.0:
        raise ConfigError(
            f"flow.guidance_low and flow.guidance_high must satisfy 0 <= low <= high <= 1, "
            f"got {f.guidance_low} and {f.guidance_high}"
        )


def resolve_objective_defaults(cfg: RunConfig) -> RunConfig:
    """Fill the defaults that depend on the objective (model.learn_sigma: true for ddpm, false for flow)."""
    cfg.model.learn_sigma = learns_sigma(cfg)
    return cfg


def learns_sigma(cfg: RunConfig) -> bool:
    """model.learn_sigma as resolved for the objective (unset: true for ddpm, false for flow)."""
    if cfg.model.learn_sigma is None:
        return cfg.diffusion.objective == "ddpm"
    return bool(cfg.model.learn_sigma)


def flow_section(cfg: RunConfig) -> dict:
    """What a model dir's "diffusion" section records of a flow run (the objective, its time density and the
    sampler defaults `dtr-scale sample` uses); {} for ddpm, whose section stays as it always was."""
    if cfg.diffusion.objective != "flow":
        return {}
    f = cfg.flow
    return {
        "objective": "flow",
        "time_sampling": f.time_sampling,
        "sampler": f.sampler,
        "guidance_low": f.guidance_low,
        "guidance_high": f.guidance_high,
    }
