"""Config checks that need no world size, data or device; each error names the key and the allowed values."""

from __future__ import annotations

import re

from dtr_scale.config.objective import check_objective
from dtr_scale.config.schema import ConfigError, RunConfig


def validate(cfg: RunConfig) -> None:
    """Checks that need no world size, data or device (those come at run time, in train/build.py and
    `resolve_batch_layout`). ConfigError names the first offending key, the allowed values and the value."""
    _check_model(cfg)
    check_objective(cfg)  # before the cross-key rules: a DDPM-only key under flow is named as such first
    _check_diffusion(cfg)
    _check_mtl(cfg)
    _check_data(cfg)
    _check_train(cfg)
    _check_ranges(cfg)
    if cfg.deepspeed.zero_stage not in (0, 1, 2, 3):
        raise ConfigError(f"deepspeed.zero_stage must be 0, 1, 2 or 3, got {cfg.deepspeed.zero_stage}")


def _check_model(cfg: RunConfig) -> None:
    # The names of models/dit.py's DiT_models table (checked there too); written out here so that the
    # config layer imports no model code.
    if not re.fullmatch(r"DiT-(S|B|L|XL)/(2|4|8)", cfg.model.name):
        raise ConfigError(
            f"model.name: unknown model {cfg.model.name!r} (one of DiT-S/2 ... DiT-XL/8: DiT-{{S,B,L,XL}}/{{2,4,8}})"
        )
    if not 0 <= cfg.model.class_dropout_prob < 1:
        raise ConfigError(f"model.class_dropout_prob must be in [0, 1), got {cfg.model.class_dropout_prob}")
    if cfg.routing.enabled:
        if not 0 < cfg.routing.beta <= 1:
            raise ConfigError(f"routing.beta (active fraction) must be in (0, 1], got {cfg.routing.beta}")
        if not cfg.routing.alpha > 0:
            raise ConfigError(f"routing.alpha must be > 0, got {cfg.routing.alpha}")


def _check_diffusion(cfg: RunConfig) -> None:
    if cfg.diffusion.noise_schedule not in ("linear", "cosine"):
        raise ConfigError(
            f"diffusion.noise_schedule must be linear or cosine, got {cfg.diffusion.noise_schedule!r}"
        )
    if cfg.diffusion.diffusion_steps < 1:
        raise ConfigError(f"diffusion.diffusion_steps must be >= 1, got {cfg.diffusion.diffusion_steps}")
    _check_loss_weighting(cfg)


def _check_mtl(cfg: RunConfig) -> None:
    m = cfg.mtl
    if m.method not in ("none", "uw", "nash", "pcgrad"):
        raise ConfigError(f"mtl.method must be one of none, uw, nash, pcgrad; got {m.method!r}")
    if m.objective not in ("timestep", "snr", "log_snr", "affinity"):
        raise ConfigError(f"mtl.objective must be timestep, snr, log_snr or affinity; got {m.objective!r}")
    if m.sampling not in ("auto", "stratified", "uniform"):
        raise ConfigError(f"mtl.sampling must be auto, stratified or uniform, got {m.sampling!r}")
    if m.num_clusters < 1 or m.num_clusters > cfg.diffusion.diffusion_steps:
        raise ConfigError(
            f"mtl.num_clusters must be in [1, {cfg.diffusion.diffusion_steps}] (diffusion.diffusion_steps), "
            f"got {m.num_clusters}",
            keys=("mtl.num_clusters", "diffusion.diffusion_steps"),
        )
    if m.objective == "affinity" and not m.affinity_file and not m.clusters_file:
        raise ConfigError(
            "mtl.objective=affinity needs mtl.affinity_file (a T x T .npy) or mtl.clusters_file",
            keys=("mtl.objective", "mtl.affinity_file", "mtl.clusters_file"),
        )
    if m.update_every is not None and m.update_every < 1:
        raise ConfigError(f"mtl.update_every must be >= 1, got {m.update_every}")
    if m.method in ("nash", "pcgrad") and cfg.deepspeed.zero_stage == 3:
        raise ConfigError(
            f"mtl.method={m.method} needs whole per-cluster gradients of every parameter on each rank; "
            "under deepspeed.zero_stage=3 parameters are partitioned and only gathered inside the engine's "
            "own forward/backward, so the Gram matrix cannot be formed exactly. Use zero_stage 0, 1 or 2.",
            keys=("mtl.method", "deepspeed.zero_stage"),
        )
    if m.method != "none" and m.num_clusters < 2:
        raise ConfigError(
            f"mtl.method={m.method} balances cluster losses: set mtl.num_clusters >= 2",
            keys=("mtl.method", "mtl.num_clusters"),
        )


def _check_data(cfg: RunConfig) -> None:
    d = cfg.data
    if d.on_error not in ("warn", "raise", "ignore"):
        raise ConfigError(f"data.on_error must be warn, raise or ignore, got {d.on_error!r}")
    if not 0.0 <= d.max_skipped_fraction <= 1.0:
        raise ConfigError(
            f"data.max_skipped_fraction must be in [0, 1] (1: never stop), got {d.max_skipped_fraction}"
        )
    if d.num_workers < 0:
        raise ConfigError(f"data.num_workers must be >= 0, got {d.num_workers}")
    if d.interleave < 1:
        raise ConfigError(
            f"data.interleave must be >= 1 (shards read at once per canonical stream), got {d.interleave}"
        )
    if d.shuffle_buffer < 0:
        raise ConfigError(f"data.shuffle_buffer must be >= 0, got {d.shuffle_buffer}")
    if d.canonical_streams is not None and d.canonical_streams < 1:
        raise ConfigError(f"data.canonical_streams must be >= 1, got {d.canonical_streams}")


def _check_train(cfg: RunConfig) -> None:
    t, k = cfg.train, cfg.mtl.num_clusters
    for key in ("max_steps", "global_batch_size", "max_micro_batch_size", "checkpoint_every", "log_every"):
        if getattr(t, key) < 1:
            raise ConfigError(f"train.{key} must be >= 1, got {getattr(t, key)}")
    if t.micro_batch_size is not None and t.micro_batch_size < 1:
        raise ConfigError(f"train.micro_batch_size must be >= 1 (or unset), got {t.micro_batch_size}")
    if t.gradient_accumulation_steps is not None and t.gradient_accumulation_steps < 1:
        raise ConfigError(
            f"train.gradient_accumulation_steps must be >= 1, got {t.gradient_accumulation_steps}"
        )
    if t.micro_batch_size is not None and t.global_batch_size % t.micro_batch_size:
        raise ConfigError(
            f"train.global_batch_size={t.global_batch_size} is not a multiple of "
            f"train.micro_batch_size={t.micro_batch_size}",
            keys=("train.global_batch_size", "train.micro_batch_size"),
        )
    if t.micro_batch_size is not None and stratifies(cfg) and t.micro_batch_size % k:
        raise ConfigError(
            f"train.micro_batch_size={t.micro_batch_size} must be divisible by mtl.num_clusters="
            f"{k}: stratified sampling (mtl.sampling={cfg.mtl.sampling}) gives every cluster an "
            "equal share of every micro-batch",
            keys=("train.micro_batch_size", "mtl.num_clusters", "mtl.sampling", "mtl.objective"),
        )
    if t.precision not in ("auto", "bf16", "fp32"):
        raise ConfigError(f"train.precision must be auto, bf16 or fp32, got {t.precision!r}")
    if not 0 <= t.ema_decay < 1:
        raise ConfigError(f"train.ema_decay must be in [0, 1), got {t.ema_decay}")
    if len(t.betas) != 2 or not all(0 <= b < 1 for b in t.betas):
        raise ConfigError(f"train.betas must be two numbers in [0, 1), got {t.betas}")
    if t.lr <= 0:
        raise ConfigError(f"train.lr must be > 0, got {t.lr}")
    if t.keep_last < 1:
        raise ConfigError(f"train.keep_last must be >= 1, got {t.keep_last}")
    if t.lr_schedule not in ("constant", "linear", "cosine"):
        raise ConfigError(f"train.lr_schedule must be constant, linear or cosine, got {t.lr_schedule!r}")
    r = cfg.repa
    if r.encoder is not None and cfg.model.depth is not None and r.depth > cfg.model.depth:
        raise ConfigError(
            f"repa.depth={r.depth} is deeper than the model (model.depth={cfg.model.depth})",
            keys=("repa.depth", "model.depth"),
        )


# Numeric keys and the range each must lie in: (key, lowest, lowest allowed?, highest or None).
_RANGES: tuple[tuple[str, float, bool, float | None], ...] = (
    ("train.eps", 0.0, False, None),
    ("train.weight_decay", 0.0, True, None),
    ("train.warmup_steps", 0, True, None),
    ("train.grad_clip", 0.0, True, None),
    ("train.keep_every", 0, True, None),
    ("train.max_nonfinite_steps", 1, True, None),
    ("mtl.uw_lr", 0.0, False, None),
    ("model.mlp_ratio", 0.0, False, None),
    ("model.hidden_size", 1, True, None),
    ("model.depth", 1, True, None),
    ("model.num_heads", 1, True, None),
    ("model.input_size", 1, True, None),
    ("model.in_channels", 1, True, None),
    ("model.num_classes", 1, True, None),
    ("deepspeed.reduce_bucket_size", 1, True, None),
    ("deepspeed.stage3_max_live_parameters", 1, True, None),
    ("deepspeed.stage3_max_reuse_distance", 0, True, None),
    ("deepspeed.stage3_prefetch_bucket_size", 0, True, None),
    ("deepspeed.stage3_param_persistence_threshold", 0, True, None),
    ("deepspeed.sub_group_size", 1, True, None),
    ("monitor.sample_every", 0, True, None),
    ("monitor.sample_steps", 1, True, None),
    ("monitor.sample_cfg_scale", 1.0, True, None),
    ("monitor.peak_tflops", 0.0, False, None),
    ("eval.every", 0, True, None),
    ("eval.num_samples", 2, True, None),
    ("eval.steps", 1, True, None),
    ("eval.cfg_scale", 1.0, True, None),
    ("eval.reference_size", 0, True, None),
    ("repa.depth", 1, True, None),
    ("repa.coeff", 0.0, True, None),
    ("repa.projector_dim", 1, True, None),
    ("repa.stop_step", 0, True, None),
    ("repa.resolution", 1, True, None),
)


def _check_loss_weighting(cfg: RunConfig) -> None:
    d = cfg.diffusion
    if d.loss_weighting not in ("none", "min_snr", "p2"):
        raise ConfigError(f"diffusion.loss_weighting must be none, min_snr or p2, got {d.loss_weighting!r}")
    if d.loss_weighting != "none" and cfg.mtl.method in (
        "uw",
        "nash",
        "pcgrad",
    ):  # an invalid method: _check_mtl
        # The official DTR code offers constant, min_snr, p2 and uw as alternatives (one loss_weight_type);
        # a balancer re-weights the clusters' losses and would largely undo a per-timestep weighting.
        raise ConfigError(
            f"diffusion.loss_weighting={d.loss_weighting} cannot be combined with mtl.method={cfg.mtl.method}: "
            "both re-weight the timesteps (the DTR code offers them as alternatives); set one of them to none",
            keys=("diffusion.loss_weighting", "mtl.method"),
        )
    if not d.min_snr_gamma > 0:
        raise ConfigError(f"diffusion.min_snr_gamma must be > 0, got {d.min_snr_gamma}")
    if d.p2_k < 0 or d.p2_gamma < 0:
        raise ConfigError(
            f"diffusion.p2_k and diffusion.p2_gamma must be >= 0, got {d.p2_k} and {d.p2_gamma}"
        )


def _check_ranges(cfg: RunConfig) -> None:
    """Reject out-of-range numbers by key (None = unset, where the key allows it)."""
    for key, low, inclusive, high in _RANGES:
        section, name = key.split(".")
        value = getattr(getattr(cfg, section), name)
        if value is None:
            continue
        too_low = value < low if inclusive else value <= low
        if too_low or (high is not None and value > high):
            bound = f">= {low}" if inclusive else f"> {low}"
            raise ConfigError(
                f"{key} must be {bound}{f' and <= {high}' if high is not None else ''}, got {value}"
            )
    if cfg.model.hidden_size is not None and cfg.model.num_heads is not None:
        if cfg.model.hidden_size % cfg.model.num_heads:
            raise ConfigError(
                f"model.hidden_size={cfg.model.hidden_size} must be divisible by model.num_heads="
                f"{cfg.model.num_heads}",
                keys=("model.hidden_size", "model.num_heads"),
            )


def stratifies(cfg: RunConfig) -> bool:
    """Whether the run splits every micro-batch evenly over its k > 1 clusters (mtl.sampling=stratified, or
    auto with objective=timestep's equal intervals under a uniform density of t); the trainer re-checks once
    the clusters are known."""
    m = cfg.mtl
    uniform_t = cfg.diffusion.objective == "ddpm" or cfg.flow.time_sampling == "uniform"
    return m.num_clusters > 1 and (
        m.sampling == "stratified"
        or (m.sampling == "auto" and m.objective == "timestep" and not m.clusters_file and uniform_t)
    )
