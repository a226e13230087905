"""Typed run configuration: YAML -> dataclasses, dotted overrides, validation, and the DeepSpeed JSON.

One source of truth: every knob of a run lives in `RunConfig`; the DeepSpeed JSON is derived from it
(`deepspeed_config`), and a user-supplied DeepSpeed JSON is checked against it. Unknown keys, wrong
types and impossible combinations are errors that name the key, raised before any work starts.
"""

from __future__ import annotations

import dataclasses
import json
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from dtr_scale.errors import UserError


class ConfigError(UserError, ValueError):
    """A configuration problem; the message names the key (and the file when there is one)."""


@dataclass
class ModelConfig:
    """model.*: the DiT (size, patch, optional overrides of the named size). Keys: docs/config.md."""

    name: str = "DiT-XL/2"  # a key of dtr_scale.models.dit.DiT_models
    # Optional overrides of the named size (None = the named model's value).
    hidden_size: int | None = None
    depth: int | None = None
    num_heads: int | None = None
    # None = taken from the data manifest's latent shape (C, H, W).
    input_size: int | None = None
    in_channels: int | None = None
    num_classes: int | None = None  # None = number of labels in the manifest
    class_dropout_prob: float = 0.1
    learn_sigma: bool = True
    mlp_ratio: float = 4.0
    grad_checkpointing: bool = False
    compile: bool = False


@dataclass
class RoutingConfig:
    """routing.*: DTR's timestep-dependent channel windows (Park et al. 2024, Eq. 4). Keys: docs/config.md."""

    enabled: bool = True
    alpha: float = 4.0
    beta: float = 0.8


@dataclass
class DiffusionConfig:
    """diffusion.*: noise schedule, T and the per-timestep loss weighting. Keys: docs/config.md."""

    noise_schedule: str = "linear"
    diffusion_steps: int = 1000
    # Per-timestep weight on the MSE term (diffusion/loss_weighting.py): none | min_snr | p2
    loss_weighting: str = "none"
    min_snr_gamma: float = 5.0  # Min-SNR-gamma (Hang et al. 2023): w_t = min(SNR, gamma) / SNR
    p2_k: float = 1.0  # P2 (Choi et al. 2022): w_t = 1 / (k + SNR)^gamma
    p2_gamma: float = 1.0


@dataclass
class MTLConfig:
    """mtl.*: ANT's timestep clusters, their sampling and the loss balancer (Go et al. 2023). Keys:
    docs/config.md."""

    method: str = "none"  # none | uw | nash | pcgrad
    num_clusters: int = 1
    objective: str = "timestep"  # timestep | snr | log_snr | affinity
    clusters_file: str | None = None  # JSON written by `dtr-scale cluster` (overrides objective)
    affinity_file: str | None = None  # .npy T x T matrix for objective=affinity
    # Timesteps: auto = stratify only equal-size clusters, else t ~ U{0..T-1}; or stratified | uniform
    sampling: str = "auto"
    update_every: int | None = None  # nash: 25, pcgrad: 1 when None
    uw_lr: float = 0.025


@dataclass
class DataConfig:
    """data.*: the latent shards and how they are streamed. Keys: docs/config.md."""

    shards: str | None = None  # manifest.json path
    num_workers: int = 2
    shuffle_buffer: int = 1000  # samples per loader worker's shuffle buffer
    interleave: int = 8  # shards each loader worker reads at once, round robin (class mixing)
    hflip: bool | None = None  # random horizontal flip; None = the manifest's `hflip` (digits: off)
    resampled: bool = True
    on_error: str = "warn"  # warn | raise
    vae: str | None = None  # local diffusers VAE dir for decoding sample grids (None: from manifest)


@dataclass
class TrainConfig:
    """train.*: batch layout, optimizer, precision, EMA, checkpoints and logging. Keys: docs/config.md."""

    max_steps: int = 400_000
    global_batch_size: int = 256
    # Samples per rank per forward. None: derived for the world size (resolve_batch_layout): global / world
    # when that is <= max_micro_batch_size, else its largest divisor that is, with gradient accumulation.
    micro_batch_size: int | None = None
    max_micro_batch_size: int = 32  # what fits in one device's memory (used when micro_batch_size is None)
    gradient_accumulation_steps: int | None = None  # None = derived from the world size
    seed: int = 0
    lr: float = 1e-4
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    weight_decay: float = 0.0
    warmup_steps: int = 0
    grad_clip: float = 0.0  # 0 = no clipping (reference DiT)
    precision: str = "auto"  # auto | bf16 | fp32
    ema_decay: float = 0.9999
    ema_warmup: bool = False
    checkpoint_every: int = 50_000
    keep_last: int = 2
    keep_every: int = 0  # also keep every M-th step's checkpoint (0 = none)
    log_every: int = 100
    max_nonfinite_steps: int = 10  # stop after this many non-finite losses in a row


@dataclass
class DeepSpeedConfig:
    """deepspeed.*: ZeRO stage and the DeepSpeed knobs this project sets. Keys: docs/config.md."""

    zero_stage: int = 2
    config_file: str | None = None  # a user's DeepSpeed JSON, checked against this config
    overlap_comm: bool = True
    # Elements (not bytes) per gradient reduce bucket; every rank holds a buffer of this size.
    reduce_bucket_size: int = 25_000_000
    # ZeRO-3 only (DeepSpeed's stage3_* keys), in parameters (elements): how many gathered parameters may
    # stay alive at once and how far ahead a gathered parameter is kept for reuse (DeepSpeed's 1e9 defaults
    # keep a model of under a billion parameters whole on every rank, which undoes ZeRO-3's saving), the
    # prefetch bucket, and the size under which a parameter is kept whole on every rank (biases, norms).
    stage3_max_live_parameters: int = 50_000_000
    stage3_max_reuse_distance: int = 50_000_000
    stage3_prefetch_bucket_size: int = 20_000_000
    stage3_param_persistence_threshold: int = 100_000


@dataclass
class MonitorConfig:
    """monitor.*: TensorBoard, progress bar, in-loop sample grids, MFU. Keys: docs/config.md."""

    tensorboard: bool = True
    progress: bool = True
    sample_every: int = 10_000  # 0 = never
    sample_classes: list[int] = field(default_factory=lambda: [207, 360, 387, 974, 88, 979, 417, 279])
    sample_steps: int = 50  # DDIM steps for the in-loop grid
    sample_cfg_scale: float = 4.0
    peak_tflops: float | None = None  # per device; None = looked up from the device name


@dataclass
class EvalConfig:
    """eval.*: in-loop KID/FID of EMA samples. Keys: docs/config.md."""

    every: int = 0  # 0 = off
    num_samples: int = 50
    steps: int = 25  # DDIM steps
    cfg_scale: float = 1.0
    reference: str | None = None  # image folder / npz / ADM stats; None = the manifest's held-out split
    reference_size: int = 0  # use the first N reference images (0 = all)
    inception_weights: str | None = None


@dataclass
class RunConfig:
    """The whole run config: one dataclass per YAML section (every key: docs/config.md)."""

    run_dir: str = "runs/default"
    model: ModelConfig = field(default_factory=ModelConfig)
    routing: RoutingConfig = field(default_factory=RoutingConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    mtl: MTLConfig = field(default_factory=MTLConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    monitor: MonitorConfig = field(default_factory=MonitorConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def to_dict(self) -> dict[str, Any]:
        """The config as plain nested dicts and lists (what dump_yaml writes)."""
        return dataclasses.asdict(self)


# ---------------------------------------------------------------------------------------------- loading


class _UniqueKeyLoader(yaml.SafeLoader):
    """yaml.SafeLoader that refuses duplicate keys (plain YAML silently keeps the last one)."""


def _unique_mapping(loader: _UniqueKeyLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    seen = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise ConfigError(f"duplicate key {key!r} (line {key_node.start_mark.line + 1})")
        seen.add(key)
    return loader.construct_mapping(node, deep=deep)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _unique_mapping)


def _check_type(value: Any, annotation: Any, key: str) -> Any:
    """Check (and mildly coerce: int -> float) a YAML value against a dataclass field annotation."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(annotation)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _check_type(value, option, key)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(errors[0] if errors else f"{key}: invalid value {value!r}")
    if origin is list:
        (inner,) = typing.get_args(annotation)
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return [_check_type(v, inner, f"{key}[{i}]") for i, v in enumerate(value)]
    if annotation is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true/false, got {value!r}")
        return value
    if annotation is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if annotation is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if annotation is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    raise ConfigError(f"{key}: unsupported field type {annotation!r}")


def _build(cls: type, data: dict[str, Any], prefix: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix or 'config'}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        where = f"{prefix}." if prefix else ""
        raise ConfigError(f"unknown config key {where}{unknown[0]} (known: {', '.join(sorted(names))})")
    kwargs = {}
    for name, value in data.items():
        key = f"{prefix}.{name}" if prefix else name
        annotation = hints[name]
        if dataclasses.is_dataclass(annotation):
            kwargs[name] = _build(annotation, value or {}, key)
        else:
            kwargs[name] = _check_type(value, annotation, key)
    return cls(**kwargs)


def apply_override(data: dict[str, Any], override: str) -> None:
    """Apply one `key.sub=value` override (value parsed as YAML) to a nested dict in place."""
    if "=" not in override:
        raise ConfigError(f"override {override!r}: expected key.sub=value")
    key, raw = override.split("=", 1)
    parts = key.strip().split(".")
    if not all(parts):
        raise ConfigError(f"override {override!r}: empty key component")
    node = data
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {override!r}: {part} is not a section")
    node[parts[-1]] = yaml.safe_load(raw) if raw.strip() else None


def load_config(path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> RunConfig:
    """Load a YAML config (safe loader), apply dotted overrides, validate; errors name the key and file."""
    data: dict[str, Any] = {}
    source = "defaults"
    if path is not None:
        path = Path(path)
        source = str(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        try:
            data = yaml.load(path.read_text(), Loader=_UniqueKeyLoader) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"config file {path} is not valid YAML: {err}") from err
        except ConfigError as err:
            raise ConfigError(f"config file {path}: {err}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"config file {path}: expected a mapping at the top level")
    for override in overrides:
        apply_override(data, override)
    try:
        cfg = _build(RunConfig, data, "")
        validate(cfg)
    except ConfigError as err:
        raise ConfigError(f"{_blame(err, overrides, source)}: {err}") from None
    return cfg


def _blame(err: ConfigError, overrides: list[str], source: str) -> str:
    """The command-line override whose key (or a dotted prefix of it) the error names, else the file. The
    "(known: ...)" list of an unknown-key error is not searched; a later override wins over an earlier one."""
    message = str(err).split("(known")[0]
    for override in reversed(overrides):
        parts = override.split("=", 1)[0].strip().split(".")
        prefixes = [".".join(parts[: n + 1]) for n in range(len(parts))]
        if any(re.search(rf"(?<![\w.]){re.escape(p)}(?![\w.])", message) for p in prefixes[::-1]):
            return f"override {override}"
    return source


def config_from_dict(data: dict[str, Any]) -> RunConfig:
    """A validated RunConfig from nested dicts (e.g. the YAML saved with a checkpoint); ConfigError names the
    key."""
    cfg = _build(RunConfig, data, "")
    validate(cfg)
    return cfg


def validate(cfg: RunConfig) -> None:
    """Checks that need no world size, data or device (those come in `check_runtime`)."""
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
    if cfg.diffusion.noise_schedule not in ("linear", "cosine"):
        raise ConfigError(
            f"diffusion.noise_schedule must be linear or cosine, got {cfg.diffusion.noise_schedule!r}"
        )
    if cfg.diffusion.diffusion_steps < 1:
        raise ConfigError(f"diffusion.diffusion_steps must be >= 1, got {cfg.diffusion.diffusion_steps}")
    _check_loss_weighting(cfg)
    m = cfg.mtl
    if m.method not in ("none", "uw", "nash", "pcgrad"):
        raise ConfigError(f"mtl.method must be one of none, uw, nash, pcgrad; got {m.method!r}")
    if m.objective not in ("timestep", "snr", "log_snr", "affinity"):
        raise ConfigError(f"mtl.objective must be timestep, snr, log_snr or affinity; got {m.objective!r}")
    if m.num_clusters < 1 or m.num_clusters > cfg.diffusion.diffusion_steps:
        raise ConfigError(
            f"mtl.num_clusters must be in [1, {cfg.diffusion.diffusion_steps}], got {m.num_clusters}"
        )
    if m.objective == "affinity" and not m.affinity_file and not m.clusters_file:
        raise ConfigError(
            "mtl.objective=affinity needs mtl.affinity_file (a T x T .npy) or mtl.clusters_file"
        )
    if m.update_every is not None and m.update_every < 1:
        raise ConfigError(f"mtl.update_every must be >= 1, got {m.update_every}")
    if m.method in ("nash", "pcgrad") and cfg.deepspeed.zero_stage == 3:
        raise ConfigError(
            f"mtl.method={m.method} needs whole per-cluster gradients of every parameter on each rank; "
            "under deepspeed.zero_stage=3 parameters are partitioned and only gathered inside the engine's "
            "own forward/backward, so the Gram matrix cannot be formed exactly. Use zero_stage 0, 1 or 2."
        )
    if m.method != "none" and m.num_clusters < 2:
        raise ConfigError(f"mtl.method={m.method} balances cluster losses: set mtl.num_clusters >= 2")
    d = cfg.data
    if d.on_error not in ("warn", "raise"):
        raise ConfigError(f"data.on_error must be warn or raise, got {d.on_error!r}")
    if d.num_workers < 0:
        raise ConfigError(f"data.num_workers must be >= 0, got {d.num_workers}")
    if d.interleave < 1:
        raise ConfigError(
            f"data.interleave must be >= 1 (shards read at once per worker), got {d.interleave}"
        )
    if d.shuffle_buffer < 0:
        raise ConfigError(f"data.shuffle_buffer must be >= 0, got {d.shuffle_buffer}")
    t = cfg.train
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
            f"train.micro_batch_size={t.micro_batch_size}"
        )
    if m.sampling not in ("auto", "stratified", "uniform"):
        raise ConfigError(f"mtl.sampling must be auto, stratified or uniform, got {m.sampling!r}")
    if t.micro_batch_size is not None and stratifies(cfg) and t.micro_batch_size % m.num_clusters:
        raise ConfigError(
            f"train.micro_batch_size={t.micro_batch_size} must be divisible by mtl.num_clusters="
            f"{m.num_clusters}: stratified sampling (mtl.sampling={m.sampling}) gives every cluster an "
            "equal share of every micro-batch"
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
    _check_ranges(cfg)
    if cfg.deepspeed.zero_stage not in (0, 1, 2, 3):
        raise ConfigError(f"deepspeed.zero_stage must be 0, 1, 2 or 3, got {cfg.deepspeed.zero_stage}")


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
    ("monitor.sample_every", 0, True, None),
    ("monitor.sample_steps", 1, True, None),
    ("monitor.sample_cfg_scale", 1.0, True, None),
    ("monitor.peak_tflops", 0.0, False, None),
    ("eval.every", 0, True, None),
    ("eval.num_samples", 2, True, None),
    ("eval.steps", 1, True, None),
    ("eval.cfg_scale", 1.0, True, None),
    ("eval.reference_size", 0, True, None),
)


def _check_loss_weighting(cfg: RunConfig) -> None:
    d = cfg.diffusion
    if d.loss_weighting not in ("none", "min_snr", "p2"):
        raise ConfigError(f"diffusion.loss_weighting must be none, min_snr or p2, got {d.loss_weighting!r}")
    if d.loss_weighting != "none" and cfg.mtl.method != "none":
        # The official DTR code offers constant, min_snr, p2 and uw as alternatives (one loss_weight_type);
        # a balancer re-weights the clusters' losses and would largely undo a per-timestep weighting.
        raise ConfigError(
            f"diffusion.loss_weighting={d.loss_weighting} cannot be combined with mtl.method={cfg.mtl.method}: "
            "both re-weight the timesteps (the DTR code offers them as alternatives); set one of them to none"
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
                f"{cfg.model.num_heads}"
            )


def stratifies(cfg: RunConfig) -> bool:
    """Whether the run splits every micro-batch evenly over its k > 1 clusters (mtl.sampling=stratified, or
    auto with objective=timestep's equal intervals); the trainer re-checks once the clusters are known."""
    m = cfg.mtl
    return m.num_clusters > 1 and (
        m.sampling == "stratified"
        or (m.sampling == "auto" and m.objective == "timestep" and not m.clusters_file)
    )


# ---------------------------------------------------------------------------------------------- runtime


def resolve_batch_layout(cfg: RunConfig, world_size: int) -> RunConfig:
    """A copy of `cfg` with train.micro_batch_size (and the accumulation) fixed for `world_size` ranks.

    Given micro_batch_size: checked as it is. Unset: per rank = global / world must be whole; the micro-
    batch is per rank when <= train.max_micro_batch_size, else the largest divisor of it that is (and that
    k divides, when stratifying), the rest made up by gradient accumulation. ConfigError when none exists.
    """
    t = cfg.train
    if t.micro_batch_size is None:
        if t.global_batch_size % world_size:
            raise ConfigError(
                f"train.global_batch_size={t.global_batch_size} cannot be split evenly over {world_size} ranks"
            )
        per_rank = t.global_batch_size // world_size
        k = cfg.mtl.num_clusters if stratifies(cfg) else 1
        fits = [
            d for d in range(1, min(per_rank, t.max_micro_batch_size) + 1) if per_rank % d == 0 and d % k == 0
        ]
        if not fits:
            raise ConfigError(
                f"train.global_batch_size={t.global_batch_size} over {world_size} ranks is {per_rank} per rank, "
                f"with no micro-batch <= train.max_micro_batch_size={t.max_micro_batch_size} that divides it"
                + (f" and that k={k} clusters divide (stratified sampling)" if k > 1 else "")
            )
        train = dataclasses.replace(t, micro_batch_size=max(fits), gradient_accumulation_steps=None)
        cfg = dataclasses.replace(cfg, train=train)
    gradient_accumulation(cfg, world_size)  # raises for an impossible layout
    return cfg


def gradient_accumulation(cfg: RunConfig, world_size: int) -> int:
    """micro_batch x accumulation x world must equal the global batch; returns the accumulation."""
    if cfg.train.micro_batch_size is None:
        cfg = resolve_batch_layout(cfg, world_size)
    t = cfg.train
    per_step = t.micro_batch_size * world_size
    if t.gradient_accumulation_steps is not None:
        if per_step * t.gradient_accumulation_steps != t.global_batch_size:
            raise ConfigError(
                f"train.micro_batch_size ({t.micro_batch_size}) x train.gradient_accumulation_steps "
                f"({t.gradient_accumulation_steps}) x world size ({world_size}) = "
                f"{per_step * t.gradient_accumulation_steps} != train.global_batch_size ({t.global_batch_size})"
            )
        return t.gradient_accumulation_steps
    if t.global_batch_size % per_step:
        raise ConfigError(
            f"train.global_batch_size ({t.global_batch_size}) is not divisible by train.micro_batch_size "
            f"({t.micro_batch_size}) x world size ({world_size})"
        )
    return t.global_batch_size // per_step


def resolve_precision(cfg: RunConfig, device_type: str, bf16_supported: bool) -> str:
    """train.precision for a device: auto = bf16 on a CUDA device that supports it, else fp32. bf16 is
    also allowed on CPU, through DeepSpeed's CPU accelerator (its bf16 optimizer and checkpoints: the
    CPU twin of the GPU path that the tests exercise). ConfigError when bf16 is asked of a device without it."""
    p = cfg.train.precision
    if p == "auto":
        return "bf16" if device_type == "cuda" and bf16_supported else "fp32"
    if p == "bf16" and not bf16_supported:
        raise ConfigError(
            f"train.precision=bf16 requested but the {device_type} device here has no bf16 training support"
        )
    return p


def deepspeed_config(cfg: RunConfig, world_size: int, precision: str, device_type: str) -> dict[str, Any]:
    """The DeepSpeed JSON derived from the run config (the optimizer is passed as a torch object)."""
    cfg = resolve_batch_layout(cfg, world_size)
    accumulation = gradient_accumulation(cfg, world_size)
    zero: dict[str, Any] = {"stage": cfg.deepspeed.zero_stage}
    if cfg.deepspeed.zero_stage > 0:
        zero.update(
            contiguous_gradients=True,
            overlap_comm=bool(cfg.deepspeed.overlap_comm and device_type == "cuda"),
            reduce_bucket_size=cfg.deepspeed.reduce_bucket_size,
        )
    if cfg.deepspeed.zero_stage == 3:
        ds = cfg.deepspeed
        zero.update(
            stage3_max_live_parameters=ds.stage3_max_live_parameters,
            stage3_max_reuse_distance=ds.stage3_max_reuse_distance,
            stage3_prefetch_bucket_size=ds.stage3_prefetch_bucket_size,
            stage3_param_persistence_threshold=ds.stage3_param_persistence_threshold,
        )
    return {
        "train_batch_size": cfg.train.global_batch_size,
        "train_micro_batch_size_per_gpu": cfg.train.micro_batch_size,
        "gradient_accumulation_steps": accumulation,
        "gradient_clipping": cfg.train.grad_clip,
        "zero_optimization": zero,
        "bf16": {"enabled": precision == "bf16"},
        "fp16": {"enabled": False},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }


def merge_user_deepspeed_config(path: str | Path, derived: dict[str, Any]) -> dict[str, Any]:
    """The derived DeepSpeed JSON updated by the user's file at `path`; ConfigError when one of the keys the
    YAML owns (batch layout, clipping, ZeRO stage and knobs, precision) disagrees, named with its YAML key.
    Every other DeepSpeed key of the file (e.g. communication or offload settings) is taken as written."""
    path = Path(path)
    try:
        user = json.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"deepspeed.config_file {path} does not exist") from None
    except json.JSONDecodeError as err:
        raise ConfigError(f"deepspeed.config_file {path} is not valid JSON: {err}") from None
    if not isinstance(user, dict):
        raise ConfigError(f"deepspeed.config_file {path}: expected a JSON object")
    for section in ("optimizer", "scheduler"):
        if section in user:
            raise ConfigError(
                f"{path}: '{section}' is set by dtr-scale from the YAML (train.lr, train.betas, "
                f"train.weight_decay, train.warmup_steps); remove it from the DeepSpeed JSON"
            )
    checks = {
        ("train_batch_size",): ("train.global_batch_size", derived["train_batch_size"]),
        ("train_micro_batch_size_per_gpu",): (
            "train.micro_batch_size",
            derived["train_micro_batch_size_per_gpu"],
        ),
        ("gradient_accumulation_steps",): (
            "train.gradient_accumulation_steps",
            derived["gradient_accumulation_steps"],
        ),
        ("gradient_clipping",): ("train.grad_clip", derived["gradient_clipping"]),
        ("zero_optimization", "stage"): ("deepspeed.zero_stage", derived["zero_optimization"]["stage"]),
        ("bf16", "enabled"): ("train.precision", derived["bf16"]["enabled"]),
        ("fp16", "enabled"): ("train.precision (fp16 is not supported; use bf16)", False),
    }
    # The ZeRO knobs that are YAML keys (deepspeed.*) must agree too: what config.yaml records is what ran.
    zero = derived["zero_optimization"]
    for name in (
        "reduce_bucket_size", "overlap_comm", "contiguous_gradients", "stage3_max_live_parameters",
        "stage3_max_reuse_distance", "stage3_prefetch_bucket_size", "stage3_param_persistence_threshold",
    ):  # fmt: skip
        yaml_key = f"deepspeed.{name}" if name != "contiguous_gradients" else "(always true at ZeRO >= 1)"
        checks[("zero_optimization", name)] = (
            yaml_key + ("" if name in zero else f" (not used at deepspeed.zero_stage={zero['stage']})"),
            zero.get(name),
        )
    for json_path, (yaml_key, expected) in checks.items():
        node: Any = user
        for part in json_path:
            node = node.get(part) if isinstance(node, dict) else None
        if node is not None and node != expected:  # (a key the derived JSON leaves out: expected None)
            raise ConfigError(
                f"{path}: {'.'.join(json_path)} = {node!r} disagrees with {yaml_key} (resolved: {expected!r})"
            )
    merged = json.loads(json.dumps(derived))
    for key, value in user.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = {**merged[key], **value}
        else:
            merged[key] = value
    return merged


def dump_yaml(cfg: RunConfig) -> str:
    """The config as YAML text (safe_dump, keys in declaration order): config.yaml and checkpoints store it."""
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)
