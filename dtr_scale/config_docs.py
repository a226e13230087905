"""Every run-config key in one place: its unit and meaning (the type and default come from config/schema.py).

`reference_markdown()` renders the table of docs/config.md (`python -m dtr_scale.config_docs > docs/config.md`);
a test checks that every dataclass field of config/schema.py has an entry here, that docs/config.md is current,
and that the README's key table agrees with the defaults.
"""

from __future__ import annotations

import dataclasses
import typing

from dtr_scale import config

# key -> (unit, meaning). Unit "-" for names, switches and enumerations.
KEY_DOCS: dict[str, tuple[str, str]] = {
    "run_dir": ("path", "run directory: config.yaml, checkpoints/, tensorboard/, samples/, metrics.jsonl"),
    "model.name": ("-", "DiT size and patch, DiT-{S,B,L,XL}/{2,4,8} (DiT paper Table 1)"),
    "model.hidden_size": ("channels", "override of the named size's width (null: the named model's)"),
    "model.depth": ("blocks", "override of the named size's number of DiT blocks"),
    "model.num_heads": ("heads", "override of the named size's attention heads (must divide hidden_size)"),
    "model.input_size": ("latent pixels", "latent height = width; null: from the manifest's latent_shape"),
    "model.in_channels": ("channels", "latent channels; null: from the manifest's latent_shape"),
    "model.num_classes": ("classes", "label classes (the null class is added); null: the manifest's labels"),
    "model.class_dropout_prob": ("probability", "label dropout for classifier-free guidance (DiT: 0.1)"),
    "model.learn_sigma": (
        "-",
        "predict the variance too (DiT: true; loss = MSE + VB, improved DDPM); null: true for ddpm, false for flow (refused with flow)",
    ),
    "model.mlp_ratio": ("x hidden", "MLP width / hidden width"),
    "model.grad_checkpointing": ("-", "recompute each block in backward (activation memory for compute)"),
    "model.compile": ("-", "torch.compile the engine (engine.compile())"),
    "routing.enabled": ("-", "DTR: timestep-dependent channel windows in every block (Park et al. 2024)"),
    "routing.alpha": ("-", "DTR alpha: how fast the window moves with t (Eq. 4); 4 in the paper"),
    "routing.beta": ("fraction", "DTR beta: share of channels active per task (Eq. 4); 0.8 in the paper"),
    "diffusion.objective": (
        "-",
        "ddpm (DiT: epsilon prediction over T timesteps) or flow (SiT/REPA: linear interpolant, velocity prediction, t in [0, 1]; docs/flow.md)",
    ),
    "diffusion.noise_schedule": ("-", "beta schedule: linear (DiT) or cosine (ddpm only)"),
    "diffusion.diffusion_steps": (
        "timesteps",
        "T, the number of training timesteps (denoising tasks); flow: the T equal bins of t that DTR's mask rows and ANT's clusters index",
    ),
    "diffusion.loss_weighting": ("-", "per-timestep MSE weight: none, min_snr (Min-SNR-gamma) or p2"),
    "diffusion.min_snr_gamma": ("SNR", "gamma of Min-SNR: w_t = min(SNR_t, gamma) / SNR_t"),
    "diffusion.p2_k": ("SNR", "k of P2 weighting: w_t = 1 / (k + SNR_t)^gamma"),
    "diffusion.p2_gamma": ("-", "gamma of P2 weighting"),
    "flow.time_sampling": (
        "-",
        "flow: density of the training times, uniform or logit_normal (SD3: t = sigmoid(m + s n), n ~ N(0, 1))",
    ),
    "flow.logit_mean": ("logit", "flow: m of logit_normal (SD3: 0)"),
    "flow.logit_std": ("logit", "flow: s of logit_normal (SD3: 1)"),
    "flow.sampler": (
        "-",
        "flow: euler, heun (ODE) or sde (Euler-Maruyama) for in-loop grids / KID; the model dir's default for `dtr-scale sample`",
    ),
    "flow.guidance_low": (
        "t",
        "flow: classifier-free guidance only for t >= this (REPA's guidance interval)",
    ),
    "flow.guidance_high": ("t", "flow: classifier-free guidance only for t <= this (t = 1 is noise)"),
    "mtl.method": ("-", "ANT loss balancer over the timestep clusters: none, uw, nash or pcgrad"),
    "mtl.num_clusters": ("clusters", "k, the number of contiguous timestep clusters (1 = no clustering)"),
    "mtl.objective": ("-", "interval clustering cost: timestep (equal intervals), snr, log_snr or affinity"),
    "mtl.clusters_file": ("path", "clusters JSON from `dtr-scale cluster` (overrides objective)"),
    "mtl.affinity_file": (
        "path",
        "T x T task-affinity .npy (objective affinity); for the groups x groups matrix of `dtr-scale affinity`, cluster it with `dtr-scale cluster --out` and set mtl.clusters_file",
    ),
    "mtl.sampling": ("-", "timesteps: auto (stratify equal-size clusters only), stratified or uniform"),
    "mtl.update_every": ("steps", "Nash/PCGrad weight update interval; null: nash 25, pcgrad 1"),
    "mtl.uw_lr": ("1/step", "learning rate of UW's log-variances s_k (ANT: 0.025)"),
    "data.shards": ("path", "manifest.json of the latent shards (dtr-scale preprocess / prepare-builtin)"),
    "data.num_workers": ("processes", "DataLoader workers per rank (0: in the training process)"),
    "data.shuffle_buffer": ("samples", "shuffle buffer of each canonical stream"),
    "data.interleave": ("shards", "shards each canonical stream reads at once, round robin (class mixing)"),
    "data.canonical_streams": (
        "streams",
        "C: the global sample order is defined over C streams, so every world size dividing C trains on the same samples per step and a run resumes at any of them (docs/multi-node.md); a rank reads C / world of them; null: lcm(8, world size) at the run's start, then the checkpoint's",
    ),
    "data.hflip": ("-", "random horizontal flips; null: the manifest's hflip (digits: off)"),
    "data.resampled": ("-", "true: endless shuffled stream; false: epochs of equal full batches per rank"),
    "data.on_error": (
        "-",
        "an unusable sample or shard: warn (counted, one line per shard and kind, skipped), raise, or ignore (counted only)",
    ),
    "data.max_skipped_fraction": (
        "fraction",
        "stop before the next checkpoint when a rank skipped more than this share of the samples it saw since the last one (1: never)",
    ),
    "data.vae": ("path", "local diffusers VAE dir for decoding grids; null: the manifest's"),
    "train.max_steps": ("optimizer steps", "length of the run"),
    "train.global_batch_size": ("samples", "samples per optimizer step over all ranks"),
    "train.micro_batch_size": ("samples", "per rank per forward; null: derived for the world size"),
    "train.max_micro_batch_size": ("samples", "largest micro-batch a device holds (when micro is null)"),
    "train.gradient_accumulation_steps": (
        "micro-batches",
        "per optimizer step; null: derived; given: kept at every world size, the micro-batch follows (<= max)",
    ),
    "train.seed": ("-", "seed of weights, data order, timesteps and noise"),
    "train.lr": ("1/step", "AdamW learning rate after warmup (DiT: 1e-4, constant)"),
    "train.betas": ("-", "AdamW betas"),
    "train.eps": ("-", "AdamW epsilon"),
    "train.weight_decay": ("-", "AdamW decoupled weight decay (DiT: 0)"),
    "train.warmup_steps": (
        "optimizer steps",
        "linear LR warmup: factor step / warmup_steps, 0 at the first step",
    ),
    "train.lr_schedule": (
        "-",
        "after the warmup: constant, linear or cosine decay to 0 at max_steps (transformers' get_scheduler)",
    ),
    "train.grad_clip": ("L2 norm", "gradient clipping threshold (0: none, as the reference DiT)"),
    "train.precision": ("-", "auto (bf16 on a bf16 GPU, else fp32), bf16 or fp32"),
    "train.ema_decay": ("-", "EMA decay per optimizer step (DiT: 0.9999)"),
    "train.ema_warmup": ("-", "EMA decay min(decay, (1 + n) / (10 + n)) over the first steps"),
    "train.checkpoint_every": ("optimizer steps", "checkpoint interval (and at the last step)"),
    "train.keep_last": ("checkpoints", "newest checkpoints kept"),
    "train.keep_every": ("optimizer steps", "also keep every checkpoint at a multiple of this (0: none)"),
    "train.log_every": ("optimizer steps", "scalars to TensorBoard and metrics.jsonl"),
    "train.max_nonfinite_steps": (
        "optimizer steps",
        "stop after this many skipped non-finite steps in a row",
    ),
    "deepspeed.zero_stage": ("-", "ZeRO stage 0, 1, 2 or 3"),
    "deepspeed.config_file": ("path", "your DeepSpeed JSON, merged after checking it agrees with the YAML"),
    "deepspeed.overlap_comm": ("-", "overlap gradient reduction with backward (CUDA only)"),
    "deepspeed.reduce_bucket_size": ("elements", "gradient reduce bucket; every rank holds one"),
    "deepspeed.stage3_max_live_parameters": ("elements", "ZeRO-3: gathered parameters alive at once"),
    "deepspeed.stage3_max_reuse_distance": ("elements", "ZeRO-3: keep a gathered parameter this far ahead"),
    "deepspeed.stage3_prefetch_bucket_size": ("elements", "ZeRO-3: parameters prefetched ahead of use"),
    "deepspeed.stage3_param_persistence_threshold": ("elements", "ZeRO-3: smaller parameters stay whole"),
    "deepspeed.sub_group_size": (
        "elements",
        "ZeRO-3: optimizer step in sub-groups of this size; keep it to resume",
    ),
    "monitor.tensorboard": ("-", "write TensorBoard events under run_dir/tensorboard"),
    "monitor.progress": ("-", "tqdm progress bar on rank 0"),
    "monitor.sample_every": ("optimizer steps", "EMA sample grid and loss-vs-t profile (0: never)"),
    "monitor.sample_classes": ("class indices", "classes of the in-loop grid (taken modulo the classes)"),
    "monitor.sample_steps": ("steps", "sampling steps of the in-loop grid (DDIM; flow: flow.sampler)"),
    "monitor.sample_cfg_scale": ("-", "classifier-free guidance scale of the grid (1: none)"),
    "monitor.peak_tflops": ("TFLOP/s", "per-device peak for MFU; null: looked up from the device name"),
    "eval.every": ("optimizer steps", "in-loop KID/FID of EMA samples (0: off)"),
    "eval.num_samples": ("images", "samples per in-loop evaluation, drawn by all ranks"),
    "eval.steps": ("steps", "sampling steps of the in-loop evaluation (DDIM; flow: flow.sampler)"),
    "eval.cfg_scale": ("-", "guidance scale of the in-loop evaluation"),
    "eval.reference": ("path", "reference images / ADM stats; null: the built-in held-out split"),
    "eval.reference_size": ("images", "use the first N images of the built-in held-out reference (0: all)"),
    "eval.inception_weights": ("path", "torch-fidelity Inception state dict; null: the bundled FID network"),
    "repa.encoder": ("path", "REPA: local transformers vision encoder (DINOv2...), frozen; null: REPA off"),
    "repa.depth": ("blocks", "REPA: align the DiT tokens after this many blocks (REPA: 8 for XL/2, L/2)"),
    "repa.coeff": ("-", "REPA: lambda, the alignment loss's weight in the objective (REPA: 0.5)"),
    "repa.projector_dim": ("channels", "REPA: hidden width of the 3-layer SiLU projector (REPA: 2048)"),
    "repa.stop_step": ("optimizer steps", "REPA: alignment off from this step on (HASTE); 0: never"),
    "repa.resolution": ("pixels", "REPA: encoder input side; null: encoder patch x the DiT's token grid"),
}


def config_fields() -> dict[str, tuple[str, object]]:
    """Every key of RunConfig as "section.key" -> (type as written, default)."""
    out: dict[str, tuple[str, object]] = {}

    def walk(cls, prefix: str) -> None:
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            key = f"{prefix}{f.name}"
            kind = hints[f.name]
            if dataclasses.is_dataclass(kind):
                walk(kind, key + ".")
                continue
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            out[key] = (str(f.type), default)

    walk(config.RunConfig, "")
    return out


def format_default(value: object) -> str:
    """A default as YAML would spell it."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    return str(value)


PUBLIC_KEYS = (
    "run_dir", "train.max_steps", "train.checkpoint_every", "train.global_batch_size", "train.micro_batch_size",
    "train.seed", "train.precision", "deepspeed.zero_stage", "routing.enabled", "routing.alpha", "routing.beta",
    "mtl.method", "mtl.num_clusters", "mtl.objective", "mtl.sampling", "diffusion.loss_weighting",
    "data.shards", "data.hflip", "train.lr_schedule", "repa.encoder", "repa.depth", "repa.coeff",
    "diffusion.objective", "flow.time_sampling",
)  # fmt: skip


def key_row(key: str) -> str:
    """The README's row of a key: | `key` | `default` | unit | meaning |."""
    unit, meaning = KEY_DOCS[key]
    return f"| `{key}` | `{format_default(config_fields()[key][1])}` | {unit} | {meaning} |"


def reference_markdown() -> str:
    """The markdown table of every key: key, type, default, unit, meaning."""
    lines = [
        "# Run config keys",
        "",
        "Generated from dtr_scale/config/schema.py and dtr_scale/config_docs.py "
        "(`python -m dtr_scale.config_docs > docs/config.md`); a test keeps it current.",
        "",
        "Numbers are read as YAML 1.2 reads them, in config files and `key=value` overrides alike: `1e-4`, "
        "`3e5`, `1E-4`, `-1e-4` and `.5e-3` are floats (YAML 1.1, PyYAML's default, reads them as strings). A key "
        "of type `int` takes an integral number in any spelling (`train.max_steps=3e5` is 300000) and refuses "
        "a fractional one (`2.5`). Which keys may change when a run resumes: docs/resume.md.",
        "",
        "| key | type | default | unit | meaning |",
        "|---|---|---|---|---|",
    ]
    for key, (kind, default) in config_fields().items():
        unit, meaning = KEY_DOCS[key]
        kind = kind.replace("|", "\\|")  # a pipe inside a table cell
        lines.append(f"| `{key}` | `{kind}` | `{format_default(default)}` | {unit} | {meaning} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(reference_markdown(), end="")
