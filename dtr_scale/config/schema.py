"""The run config's schema: one dataclass per YAML section, defaults, and the YAML dump.

Every key's meaning, unit and default are documented once, in `dtr_scale.config_docs` (rendered to
docs/config.md); the comments here only say what a None default stands for.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import yaml

from dtr_scale.errors import UserError


class ConfigError(UserError, ValueError):
    """A configuration problem; the message names the key (and the file when there is one).

    `keys` names every key of a cross-key rule (e.g. ``("repa.depth", "model.depth")``): `load_config` then
    says where each of their values came from (config file, override or default) instead of blaming one."""

    def __init__(self, message: str, keys: tuple[str, ...] = ()) -> None:
        super().__init__(message)
        self.keys = tuple(keys)


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
    learn_sigma: bool | None = None  # None = the objective's: true for ddpm (DiT), false for flow
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
    """diffusion.*: the objective, noise schedule, T and the per-timestep loss weighting. Keys: docs/config.md."""

    objective: str = "ddpm"  # ddpm (DiT: epsilon) | flow (SiT / REPA: linear path, velocity)
    noise_schedule: str = "linear"
    diffusion_steps: int = 1000
    # Per-timestep weight on the MSE term (diffusion/loss_weighting.py): none | min_snr | p2
    loss_weighting: str = "none"
    min_snr_gamma: float = 5.0  # Min-SNR-gamma (Hang et al. 2023): w_t = min(SNR, gamma) / SNR
    p2_k: float = 1.0  # P2 (Choi et al. 2022): w_t = 1 / (k + SNR)^gamma
    p2_gamma: float = 1.0


@dataclass
class FlowConfig:
    """flow.*: flow matching (diffusion.objective=flow; SiT, Ma et al. 2024; REPA): time density and the
    sampler defaults. Keys: docs/config.md; conventions: docs/flow.md."""

    time_sampling: str = "uniform"  # uniform | logit_normal (SD3, Esser et al. 2024, Eq. 19)
    logit_mean: float = 0.0  # m of logit_normal: t = sigmoid(m + s * n), n ~ N(0, 1)
    logit_std: float = 1.0  # s of logit_normal
    sampler: str = "heun"  # euler | heun | sde: in-loop grids / KID and the model dir's default
    guidance_low: float = 0.0  # classifier-free guidance only for guidance_low <= t <= guidance_high
    guidance_high: float = 1.0


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
    shuffle_buffer: int = 1000  # samples per canonical stream's shuffle buffer
    interleave: int = 8  # shards each canonical stream reads at once, round robin (class mixing)
    canonical_streams: int | None = (
        None  # the sample order's streams (null: lcm(8, world) at the run's start)
    )
    hflip: bool | None = None  # random horizontal flip; None = the manifest's `hflip` (digits: off)
    resampled: bool = True
    on_error: str = "warn"  # warn | raise | ignore
    max_skipped_fraction: float = 0.01  # of the samples a rank saw between two checkpoints; then stop
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
    gradient_accumulation_steps: int | None = None  # None = derived from the world size; given = kept
    seed: int = 0
    lr: float = 1e-4
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    weight_decay: float = 0.0
    warmup_steps: int = 0
    lr_schedule: str = (
        "constant"  # constant | linear | cosine (after the warmup; transformers' get_scheduler)
    )
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
    # Elements (not bytes) per gradient reduce bucket; every rank holds a buffer of this size (and gloo, on
    # the CPU, about as much again while reducing it). 1e7 holds DiT-XL/2's largest weight (adaLN, 8.0M).
    reduce_bucket_size: int = 10_000_000
    # ZeRO-3 only (DeepSpeed's stage3_* keys), in parameters (elements): how many gathered parameters may
    # stay alive at once and how far ahead a gathered parameter is kept for reuse (DeepSpeed's 1e9 defaults
    # keep a model of under a billion parameters whole on every rank, which undoes ZeRO-3's saving), the
    # prefetch bucket, and the size under which a parameter is kept whole on every rank (biases, norms).
    stage3_max_live_parameters: int = 50_000_000
    stage3_max_reuse_distance: int = 50_000_000
    stage3_prefetch_bucket_size: int = 20_000_000
    stage3_param_persistence_threshold: int = 100_000
    # ZeRO-3 only: the optimizer step runs over this rank's partition in sub-groups of about this many
    # elements (DeepSpeed's sub_group_size, default 1e9 = one sub-group): a CPU AdamW allocates temporaries
    # of twice a sub-group's size, so 1e9 cost ~0.5 GiB per rank on a 130M model at world 2 (bench/RESULTS.md
    # 4c). GPU fused Adam has no such temporaries; more sub-groups cost a few kernel launches each step.
    # It shapes the ZeRO-3 optimizer checkpoint: a run resumes only with the value it was saved with.
    sub_group_size: int = 10_000_000


@dataclass
class MonitorConfig:
    """monitor.*: TensorBoard, progress bar, in-loop sample grids, MFU. Keys: docs/config.md."""

    tensorboard: bool = True
    progress: bool = True
    sample_every: int = 10_000  # 0 = never
    sample_classes: list[int] = field(default_factory=lambda: [207, 360, 387, 974, 88, 979, 417, 279])
    sample_steps: int = 50  # DDIM (flow: flow.sampler) steps for the in-loop grid
    sample_cfg_scale: float = 4.0
    peak_tflops: float | None = None  # per device; None = looked up from the device name


@dataclass
class EvalConfig:
    """eval.*: in-loop KID/FID of EMA samples. Keys: docs/config.md."""

    every: int = 0  # 0 = off
    num_samples: int = 50
    steps: int = 25  # DDIM (flow: flow.sampler) steps
    cfg_scale: float = 1.0
    reference: str | None = None  # image folder / npz / ADM stats; None = the manifest's held-out split
    reference_size: int = 0  # use the first N reference images (0 = all)
    inception_weights: str | None = None


@dataclass
class RepaConfig:
    """repa.*: representation alignment (REPA, Yu et al. 2025) with a frozen vision encoder. Keys: docs/config.md."""

    encoder: str | None = None  # local transformers directory (AutoModel); null = REPA off
    depth: int = 8  # align the tokens after this many DiT blocks (REPA: 8 for XL/2 and L/2)
    coeff: float = 0.5  # lambda: objective = diffusion objective + coeff * REPA loss
    projector_dim: int = 2048
    stop_step: int = 0  # alignment off from this optimizer step on (HASTE); 0 = never
    resolution: int | None = None  # encoder input side in pixels; null = encoder patch x DiT token grid


@dataclass
class RunConfig:
    """The whole run config: one dataclass per YAML section (every key: docs/config.md)."""

    run_dir: str = "runs/default"
    model: ModelConfig = field(default_factory=ModelConfig)
    routing: RoutingConfig = field(default_factory=RoutingConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    flow: FlowConfig = field(default_factory=FlowConfig)
    mtl: MTLConfig = field(default_factory=MTLConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    monitor: MonitorConfig = field(default_factory=MonitorConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    repa: RepaConfig = field(default_factory=RepaConfig)

    def to_dict(self) -> dict[str, Any]:
        """The config as plain nested dicts and lists (what dump_yaml writes)."""
        return dataclasses.asdict(self)


def dump_yaml(cfg: RunConfig) -> str:
    """The config as YAML text (safe_dump, keys in declaration order): config.yaml and checkpoints store it."""
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)
