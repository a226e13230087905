"""`dtr-scale train`: DeepSpeed ZeRO training of a routed DiT with ANT loss balancing.

    dtr-scale train --config configs/dit-xl2-dtr-ant.yaml [key.sub=value ...] [--dry-run]

Works as a plain single process, under `torchrun`, under the `deepspeed` launcher (hostfile,
`--module dtr_scale`), and under SLURM (`srun`: SLURM_* variables are mapped to the torch ones).
Ranks are always the GLOBAL rank / world size of torch.distributed. Re-running the same command on
an existing `run_dir` resumes from `checkpoints/latest` (or `--resume TAG`).

One optimizer step = `gradient_accumulation_steps` micro-batches, each:
    (x, y) from the stream; (t, cluster) from the ANT timestep sampler; noise from a seeded generator;
    per-sample diffusion loss -> per-cluster means -> balancer -> one scalar -> engine.backward
then engine.step, the sharded EMA update, logging and periodic checkpoints.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from dtr_scale import __version__
from dtr_scale.config import (
    ConfigError,
    RunConfig,
    deepspeed_config,
    dump_yaml,
    gradient_accumulation,
    load_config,
    merge_user_deepspeed_config,
    resolve_batch_layout,
    resolve_precision,
)
from dtr_scale.errors import CheckpointError
from dtr_scale.train.runtime import init_distributed, load_rng_state, rng_state, seed_everything

accepts_overrides = True
FAULT_ENV = "DTR_SCALE_FAULT_AT_STEP"  # testing aid: rank 0 SIGKILLs itself after this step

# ------------------------------------------------------------------------------- model construction


def model_kwargs(cfg: RunConfig, latent_shape: tuple[int, int, int], num_labels: int) -> dict[str, Any]:
    """DiT keyword arguments from the config, checked against the data's latent shape."""
    channels, height, width = latent_shape
    if height != width:
        raise ConfigError(f"data.shards: latents must be square, got latent_shape {list(latent_shape)}")
    m = cfg.model
    if m.in_channels is not None and m.in_channels != channels:
        raise ConfigError(
            f"model.in_channels={m.in_channels} but the data manifest's latent_shape is {list(latent_shape)}"
        )
    if m.input_size is not None and m.input_size != height:
        raise ConfigError(
            f"model.input_size={m.input_size} but the data manifest's latent_shape is {list(latent_shape)}"
        )
    num_classes = m.num_classes if m.num_classes is not None else num_labels
    if num_classes < num_labels:
        raise ConfigError(
            f"model.num_classes={num_classes} is smaller than the manifest's {num_labels} labels"
        )
    kwargs: dict[str, Any] = dict(
        input_size=height,
        in_channels=channels,
        num_classes=num_classes,
        class_dropout_prob=m.class_dropout_prob,
        learn_sigma=m.learn_sigma,
        mlp_ratio=m.mlp_ratio,
        grad_checkpointing=m.grad_checkpointing,
    )
    patch = int(m.name.split("/")[1])
    if height % patch:
        raise ConfigError(
            f"model.name={m.name}: latent size {height} is not divisible by the patch size {patch}"
        )
    for key in ("hidden_size", "depth", "num_heads"):
        if getattr(m, key) is not None:
            kwargs[key] = getattr(m, key)
    if cfg.routing.enabled:
        kwargs["routing"] = {
            "alpha": cfg.routing.alpha,
            "beta": cfg.routing.beta,
            "num_tasks": cfg.diffusion.diffusion_steps,
        }
    return kwargs


def build_model(cfg: RunConfig, latent_shape, num_labels: int) -> nn.Module:
    from dtr_scale.models.dit import DiT_models

    return DiT_models[cfg.model.name](**model_kwargs(cfg, latent_shape, num_labels))


def resolve_clusters(cfg: RunConfig, alphas_cumprod: np.ndarray) -> list[tuple[int, int]] | None:
    """ANT clusters from the config: a clusters file, or interval clustering on the schedule/affinity."""
    from dtr_scale.mtl.clustering import interval_clustering, load_clusters

    m, steps = cfg.mtl, cfg.diffusion.diffusion_steps
    if m.clusters_file:
        clusters = load_clusters(m.clusters_file, steps)
        if len(clusters) != m.num_clusters:
            raise ConfigError(
                f"mtl.clusters_file {m.clusters_file} has {len(clusters)} clusters, mtl.num_clusters is {m.num_clusters}"
            )
        return clusters
    if m.num_clusters == 1:
        return None
    if m.objective == "affinity":
        path = Path(m.affinity_file)
        if not path.is_file():
            raise ConfigError(f"mtl.affinity_file {path} does not exist")
        values = np.load(path, allow_pickle=False)
        if values.shape != (steps, steps):
            raise ConfigError(
                f"mtl.affinity_file {path}: expected a {steps}x{steps} matrix, got {values.shape}"
            )
    else:
        values = alphas_cumprod / (1.0 - alphas_cumprod)  # per-timestep SNR (ANT)
    return interval_clustering(values, m.num_clusters, m.objective)


class TrainModule(nn.Module):
    """What DeepSpeed wraps: the DiT, the diffusion loss and the loss balancer.

    The balancer sits inside so that its parameters (UW's s) are reduced, sharded and checkpointed by
    DeepSpeed like the model's, and so that ZeRO-3 gathers them inside this forward.
    """

    def __init__(self, model: nn.Module, balancer: nn.Module, diffusion, num_clusters: int, scale: float):
        super().__init__()
        self.model = model
        self.balancer = balancer
        self.diffusion = diffusion
        self.num_clusters = num_clusters
        self.scale = scale  # gradient_accumulation * world: see mtl.cluster_losses.step_cluster_means

    def forward(self, x, t, y, noise, cluster_idx, step_counts) -> dict[str, torch.Tensor]:
        from dtr_scale.mtl.cluster_losses import step_cluster_means

        dtype = next(self.model.parameters()).dtype

        def model_fn(x_t, timesteps, **kwargs):  # diffusion maths in fp32, the network in its dtype
            return self.model(x_t.to(dtype), timesteps, **kwargs).float()

        terms = self.diffusion.training_losses(model_fn, x, t, model_kwargs={"y": y}, noise=noise)
        per_sample = terms["loss"]
        # This micro-batch's share of the step's buffered cluster losses l_k (sums over the step / N_k).
        means = step_cluster_means(per_sample, cluster_idx, step_counts, self.scale)
        loss = self.balancer(means, step_counts)
        return {"loss": loss, "per_sample": per_sample.detach(), "mse": terms["mse"].detach()}


# ------------------------------------------------------------------------------- the trainer


class Trainer:
    def __init__(self, cfg: RunConfig, user_ds_config: str | None = None, resume_tag: str | None = None):
        import deepspeed
        from deepspeed.accelerator import get_accelerator

        from dtr_scale.data.shards import load_manifest
        from dtr_scale.data.stream import LatentStream
        from dtr_scale.diffusion import create_diffusion
        from dtr_scale.mtl import balancers
        from dtr_scale.mtl.cluster_losses import ClusterLossBuffer
        from dtr_scale.mtl.sampling import TimestepSampler, resolve_sampling
        from dtr_scale.train.checkpoint import Checkpointer
        from dtr_scale.train.ema import ShardedEMA

        self.cfg = cfg
        if not cfg.data.shards:
            raise ConfigError(
                "data.shards: set it to a manifest.json (e.g. from `dtr-scale prepare-builtin`)"
            )
        self.dist = info = init_distributed()
        self.rank, self.world = info.rank, info.world_size
        # The micro-batch for this world size (train.micro_batch_size may be unset): one config, 1..N GPUs.
        self.cfg = cfg = resolve_batch_layout(cfg, self.world)
        self.device = info.device
        accelerator = get_accelerator()
        self.precision = resolve_precision(cfg, info.device.type, accelerator.is_bf16_supported())
        self.accumulation = gradient_accumulation(cfg, self.world)
        self.manifest = load_manifest(cfg.data.shards)
        self.run_dir = Path(cfg.run_dir)

        # Same initial weights on every rank (seed shared), then per-rank seeds seed*world + rank.
        seed_everything(cfg.train.seed)
        model = build_model(cfg, tuple(self.manifest.latent_shape), len(self.manifest.labels))
        self.flops_per_sample = model.flops_per_sample()
        d = cfg.diffusion
        self.diffusion = create_diffusion(
            "",
            noise_schedule=d.noise_schedule,
            learn_sigma=cfg.model.learn_sigma,
            diffusion_steps=d.diffusion_steps,
            loss_weighting=d.loss_weighting,
            min_snr_gamma=d.min_snr_gamma,
            p2_k=d.p2_k,
            p2_gamma=d.p2_gamma,
        )
        self.clusters = resolve_clusters(cfg, np.asarray(self.diffusion.alphas_cumprod, dtype=np.float64))
        k = 1 if self.clusters is None else len(self.clusters)
        # mtl.sampling: stratify only ANT's equal-size intervals unless told otherwise (mtl/sampling.py)
        stratified = resolve_sampling(cfg.mtl.sampling, self.clusters, d.diffusion_steps)
        self.sampler = TimestepSampler(d.diffusion_steps, self.clusters, stratified=stratified)
        try:
            self.sampler.check_batch_size(cfg.train.micro_batch_size)
        except ValueError as err:
            raise ConfigError(str(err)) from None
        self.k = k
        options: dict[str, Any] = {}
        if cfg.mtl.method == "uw":
            options["lr"] = cfg.mtl.uw_lr
        if cfg.mtl.method in ("nash", "pcgrad"):
            if cfg.mtl.update_every is not None:
                options["update_every"] = cfg.mtl.update_every
            if cfg.mtl.method == "pcgrad":
                options["seed"] = cfg.train.seed
        balancer = balancers.build(cfg.mtl.method, k, **options)
        self.module = TrainModule(model, balancer, self.diffusion, k, float(self.accumulation * self.world))

        seed_everything(cfg.train.seed * self.world + self.rank)
        self.generator = torch.Generator(device=self.device).manual_seed(
            cfg.train.seed * self.world + self.rank
        )

        t = cfg.train
        groups = [
            {"params": [p for p in model.parameters() if p.requires_grad], "weight_decay": t.weight_decay}
        ]
        groups += balancer.param_groups(t.lr)
        optimizer = torch.optim.AdamW(
            groups,
            lr=t.lr,
            betas=tuple(t.betas),
            eps=t.eps,
            weight_decay=t.weight_decay,
            fused=self.device.type == "cuda",
        )
        warmup = t.warmup_steps
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda s: min(1.0, (s + 1) / warmup) if warmup else 1.0
        )
        self.ds_config = deepspeed_config(cfg, self.world, self.precision, self.device.type)
        ds_file = user_ds_config or cfg.deepspeed.config_file
        if ds_file:
            self.ds_config = merge_user_deepspeed_config(ds_file, self.ds_config)
        self.engine, _, _, self.scheduler = deepspeed.initialize(
            model=self.module,
            optimizer=optimizer,
            lr_scheduler=scheduler,
            config=self.ds_config,
            dist_init_required=False,
        )
        if cfg.model.compile:
            self.engine.compile()
        self.ema = ShardedEMA(self.engine.module.model, t.ema_decay, t.ema_warmup, self.rank, self.world)
        self.stream = LatentStream(
            self.manifest,
            t.micro_batch_size,
            seed=t.seed,
            rank=self.rank,
            world_size=self.world,
            num_workers=cfg.data.num_workers,
            shuffle_buffer=cfg.data.shuffle_buffer,
            interleave=cfg.data.interleave,
            hflip=cfg.data.hflip,
            resampled=cfg.data.resampled,
            drop_last=True,  # epoch mode: full micro-batches only, the same number on every rank
            on_error=cfg.data.on_error,
            pin_memory=self.device.type == "cuda",
        )
        self.cluster_buffer = ClusterLossBuffer(k, num_timesteps=cfg.diffusion.diffusion_steps)
        self.checkpointer = Checkpointer(self.run_dir, t.keep_last, t.keep_every, self.rank, self.world)
        self.step = 0
        self.samples_seen = 0
        self.nonfinite_in_row = 0
        self.skipped_steps = 0

        if self.rank == 0:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / "config.yaml").write_text(dump_yaml(cfg))
        tag = resume_tag or self.checkpointer.latest_tag()
        if tag is not None:
            self._resume(tag)

    # -- state -------------------------------------------------------------------------------------

    def _global_state(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "samples_seen": self.samples_seen,
            "skipped_steps": self.skipped_steps,
            "balancer": self.engine.module.balancer.state_dict() if self.cfg.deepspeed.zero_stage < 3 else {},
            "cluster_buffer": self.cluster_buffer.state_dict(),
            "clusters": [list(c) for c in self.clusters] if self.clusters else [],
            "config": dump_yaml(self.cfg),
            "version": __version__,
        }

    def _rank_state(self) -> dict[str, Any]:
        return {
            "ema": self.ema.state_dict(),
            "rng": rng_state(self.generator),
            "stream": self.stream.state_dict(),
            "rank": self.rank,
        }

    def save(self) -> str:
        tag = self.checkpointer.save(self.engine, self.step, self._global_state(), self._rank_state())
        if self.rank == 0:
            self.monitor_message(f"saved checkpoint {self.checkpointer.dir / tag}")
        return tag

    def _resume(self, tag: str) -> None:
        global_state, rank_state = self.checkpointer.load(self.engine, tag)
        self.step = int(global_state["step"])
        self.samples_seen = int(global_state["samples_seen"])
        self.skipped_steps = int(global_state["skipped_steps"])
        saved_clusters = [tuple(c) for c in global_state["clusters"]]
        if saved_clusters != [tuple(c) for c in (self.clusters or [])]:
            raise CheckpointError(
                f"checkpoint {tag} was trained with clusters {saved_clusters}, the config now gives {self.clusters}"
            )
        if global_state["balancer"]:
            self.engine.module.balancer.load_state_dict(global_state["balancer"])
        self.cluster_buffer.load_state_dict(global_state["cluster_buffer"])
        self.ema.load_state_dict(rank_state["ema"])
        self.stream.load_state_dict(rank_state["stream"])
        load_rng_state(rank_state["rng"], self.generator)
        self.resumed_from = tag
        if self.rank == 0:
            print(f"resumed from {self.checkpointer.dir / tag} at step {self.step}", flush=True)

    def monitor_message(self, text: str) -> None:
        if getattr(self, "monitor", None) is not None:
            self.monitor.message(text)
        elif self.rank == 0:
            print(text, flush=True)

    # -- training ----------------------------------------------------------------------------------

    def _all_finite(self, loss: torch.Tensor) -> bool:
        bad = torch.tensor([0.0 if torch.isfinite(loss.detach()).all() else 1.0], device=self.device)
        if self.world > 1:
            dist.all_reduce(bad)
        return bad.item() == 0

    def update_balancer_from_gram(self, x, t, y, noise, cluster_idx) -> None:
        """NashMTL / PCGrad: exact Gram of the global per-cluster gradients on this micro-batch.

        Cluster i's gradient comes from a forward/backward on cluster i's samples only (about the cost
        of one forward/backward of the micro-batch in all), reduced across ranks inside
        `global_cluster_gram_from_fn`; only the k x k Gram is all-reduced in full (DESIGN §5).
        """
        from dtr_scale.mtl.gram import global_cluster_gram_from_fn

        module = self.engine.module
        params = [p for p in module.model.parameters() if p.requires_grad]
        dtype = params[0].dtype

        def model_fn(x_t, timesteps, **kwargs):
            return module.model(x_t.to(dtype), timesteps, **kwargs).float()

        def cluster_loss(i: int) -> torch.Tensor:
            sel = cluster_idx == i
            if not bool(sel.any()):  # no sample of cluster i here: a zero gradient (its weight is kept)
                return sum(p.sum() for p in params) * 0.0
            terms = module.diffusion.training_losses(
                model_fn, x[sel], t[sel], model_kwargs={"y": y[sel]}, noise=noise[sel]
            )
            return terms["loss"].mean()

        counts = torch.bincount(cluster_idx, minlength=self.k)
        gram = global_cluster_gram_from_fn(params, cluster_loss, self.k, counts=counts)
        module.balancer.update_from_gram(gram)
        if self.rank == 0 and getattr(self, "monitor", None) is not None:
            from dtr_scale.mtl.gram import cosine_from_gram

            cos = cosine_from_gram(gram).float().clamp(-1, 1)
            image = ((cos + 1) * 127.5).round().to(torch.uint8).cpu()
            image = (
                image.repeat_interleave(16, 0).repeat_interleave(16, 1).unsqueeze(-1).repeat(1, 1, 3).numpy()
            )
            self.monitor.image("balancer/gradient_cosines", self.step + 1, image)

    def train_step(self, batches) -> dict[str, float] | None:
        """One optimizer step over `accumulation` micro-batches; None when skipped (non-finite loss)."""
        balancer = self.engine.module.balancer
        update_gram = getattr(balancer, "needs_gram", False) and self.step % balancer.update_every == 0
        # Logging sums stay on the device and are read once per step (no host sync per micro-batch).
        objective = torch.zeros((), device=self.device)
        mse_sum = torch.zeros((), device=self.device)
        # The step's timesteps are drawn up front, so the global per-cluster counts N_k of the whole step
        # are known (one small all-reduce) before the first forward: the buffered estimator needs them.
        drawn = [
            self.sampler.sample(self.cfg.train.micro_batch_size, self.generator, self.device)
            for _ in range(self.accumulation)
        ]
        step_counts = torch.zeros(self.k, dtype=torch.float32, device=self.device)
        for _, cluster_idx in drawn:
            step_counts.index_add_(0, cluster_idx, torch.ones_like(cluster_idx, dtype=step_counts.dtype))
        if self.world > 1:
            dist.all_reduce(step_counts)
        for micro, (t, cluster_idx) in enumerate(drawn):
            x, y = next(batches)
            x = x.to(self.device, non_blocking=True)
            y = y.to(self.device, non_blocking=True)
            noise = torch.randn(x.shape, generator=self.generator, device=self.device)
            if update_gram and micro == 0:
                self.update_balancer_from_gram(x, t, y, noise, cluster_idx)
            out = self.engine(x, t, y, noise, cluster_idx, step_counts)
            loss = out["loss"]
            if not self._all_finite(loss):
                if micro == 0:  # nothing accumulated yet: skip the whole optimizer step cleanly
                    return None
                if self.cfg.deepspeed.zero_stage == 3:
                    raise FloatingPointError(
                        f"non-finite loss in micro-batch {micro} of step {self.step + 1} under ZeRO-3, where a "
                        "partial step cannot be undone; resume from the last checkpoint"
                    )
                # Mid-accumulation: contribute exact zeros for this micro-batch, keep the others.
                loss = sum(
                    (p.sum() * 0.0 for p in self.engine.module.parameters() if p.requires_grad),
                    torch.zeros((), device=self.device),
                )
                self.monitor_message(f"step {self.step + 1}: non-finite loss in micro-batch {micro}, dropped")
            else:
                self.cluster_buffer.add(out["per_sample"], cluster_idx, t)
                objective += loss.detach().float() / self.accumulation
                mse_sum += out["mse"].mean().float() / self.accumulation
            self.engine.backward(loss)
            self.engine.step()
        self.ema.update()
        means, counts = self.cluster_buffer.reduce()
        total = counts.sum().clamp_min(1)
        scalars = {
            "loss/mean": float((means * counts).sum() / total),
            "loss/objective": float(objective),
            "loss/mse_rank0": float(mse_sum),
            "lr": float(self.scheduler.get_last_lr()[0]),
        }
        if not self.cfg.data.resampled:  # epoch mode: which pass over the data this step came from
            scalars["data/epoch"] = float(self.stream.epoch)
        grad_norm = self.engine.get_global_grad_norm()
        if grad_norm is not None:
            scalars["grad_norm"] = float(grad_norm)
        if self.k > 1:  # every rank calls these: under ZeRO-3 reading UW's s is a collective gather
            weights = balancer.weights().detach().float().cpu()
            for i in range(self.k):
                scalars[f"cluster/loss_{i}"] = float(means[i])
                scalars[f"cluster/weight_{i}"] = float(weights[i])
                scalars[f"cluster/count_{i}"] = float(counts[i])  # samples in the step, all ranks
            scalars.update(balancer.log_scalars())
        return scalars

    def fit(self) -> dict[str, Any]:
        from dtr_scale.train.monitor import Monitor, memory_stats, peak_flops_per_device

        cfg, t = self.cfg, self.cfg.train
        self.monitor = Monitor(
            self.run_dir,
            self.rank,
            self.world,
            t.max_steps,
            self.flops_per_sample,
            peak_flops_per_device(self.device, cfg.monitor.peak_tflops),
            tensorboard=cfg.monitor.tensorboard,
            progress=cfg.monitor.progress,
            start_step=self.step,
            config_text=dump_yaml(cfg),
            num_clusters=self.k,
        )
        self.engine.train()
        batches = self.stream.batches()  # epoch mode rolls over into the next, reshuffled epoch
        fault_step = int(os.environ.get(FAULT_ENV, "0"))
        last_scalars: dict[str, float] = {}
        while self.step < t.max_steps:
            scalars = self.train_step(batches)
            self.step += 1
            self.samples_seen += t.global_batch_size
            if scalars is None:
                self.skipped_steps += 1
                self.nonfinite_in_row += 1
                self.monitor.message(
                    f"step {self.step}: non-finite loss on some rank, optimizer step skipped "
                    f"({self.nonfinite_in_row} in a row, {self.skipped_steps} in total)"
                )
                self.monitor.scalars(self.step, {"skipped_steps": self.skipped_steps})
                if self.nonfinite_in_row >= t.max_nonfinite_steps:
                    raise FloatingPointError(
                        f"stopping: {self.nonfinite_in_row} non-finite losses in a row (train.max_nonfinite_steps="
                        f"{t.max_nonfinite_steps}); last complete checkpoint: {self.checkpointer.dir}/latest"
                    )
            else:
                self.nonfinite_in_row = 0
                if self.step % t.log_every == 0 or self.step == t.max_steps or self.step == 1:
                    scalars.update(memory_stats(self.device))
                    last_scalars = self.monitor.step(self.step, scalars, t.global_batch_size)
            if self.step % t.checkpoint_every == 0 or self.step == t.max_steps:
                self.save()
            if cfg.monitor.sample_every and self.step % cfg.monitor.sample_every == 0:
                self.sample_grid()
                self.log_loss_profile()
            if cfg.eval.every and self.step % cfg.eval.every == 0:
                self.evaluate_in_loop()
            if fault_step and self.step == fault_step and self.rank == 0:
                import signal

                os.kill(os.getpid(), signal.SIGKILL)
        self.monitor.close()
        return last_scalars

    def log_loss_profile(self) -> None:
        """Loss vs t since the last call (all ranks' samples) as a TensorBoard image and PNG (rank 0)."""
        from dtr_scale.train.monitor import loss_profile_image

        means, counts = self.cluster_buffer.take_profile()  # every rank: the profile is replicated
        if self.rank == 0 and counts.sum() > 0:
            image = loss_profile_image(means, counts, self.cfg.diffusion.diffusion_steps)
            path = self.run_dir / "samples" / f"loss_profile_{self.step:08d}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            self.monitor.image("loss/profile_vs_t", self.step, image, png_path=path)

    def sample_grid(self) -> None:
        from dtr_scale.train.inloop import sample_grid

        sample_grid(self)

    def evaluate_in_loop(self) -> None:
        from dtr_scale.train.inloop import evaluate_in_loop

        evaluate_in_loop(self)


# ------------------------------------------------------------------------------- dry run and CLI


def dry_run(
    cfg: RunConfig,
    world_size: int,
    user_ds_config: str | None,
    device_type: str | None = None,
    gpus_per_node: int | None = None,
) -> str:
    """Resolved config, batch layout, DeepSpeed JSON and DeepSpeed's memory estimate, without any work.

    device_type: the target ("cuda" or "cpu"; None = this machine's), so a CPU login node can plan a GPU
    run: precision and the DeepSpeed JSON are resolved as they would be there (cuda: bf16 available).
    A data manifest that is not reachable from here is replaced by the DiT defaults (4x32x32, 1000 classes).
    """
    import contextlib
    import io
    import json

    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs_all_cold
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs_all_cold

    from dtr_scale.data.shards import load_manifest

    here = "cuda" if torch.cuda.is_available() else "cpu"
    device_type = device_type or here
    bf16 = torch.cuda.is_bf16_supported() if device_type == here == "cuda" else device_type == "cuda"
    cfg = resolve_batch_layout(cfg, world_size)
    precision = resolve_precision(cfg, device_type, bf16)
    accumulation = gradient_accumulation(cfg, world_size)
    ds = deepspeed_config(cfg, world_size, precision, device_type)
    if user_ds_config or cfg.deepspeed.config_file:
        ds = merge_user_deepspeed_config(user_ds_config or cfg.deepspeed.config_file, ds)
    note = ""
    if cfg.data.shards and Path(cfg.data.shards).exists():
        manifest = load_manifest(cfg.data.shards)
        latent_shape, labels = tuple(manifest.latent_shape), len(manifest.labels)
    else:
        latent_shape = (cfg.model.in_channels or 4, cfg.model.input_size or 32, cfg.model.input_size or 32)
        labels = cfg.model.num_classes or 1000
        note = (
            f" (data.shards {cfg.data.shards} not reachable here: assumed)"
            if cfg.data.shards
            else " (assumed)"
        )
    with torch.device("meta"):
        model = build_model(cfg, latent_shape, labels)
    total = sum(p.numel() for p in model.parameters())
    largest = max(p.numel() for p in model.parameters())
    local = (
        gpus_per_node
        or int(os.environ.get("LOCAL_WORLD_SIZE", "0"))
        or (8 if device_type == "cuda" and here == "cpu" else max(1, torch.cuda.device_count()))
    )
    gpus = min(world_size, local)
    nodes = max(1, world_size // gpus)
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        if cfg.deepspeed.zero_stage == 3:
            estimate_zero3_model_states_mem_needs_all_cold(
                total, largest, num_gpus_per_node=gpus, num_nodes=nodes
            )
        else:
            estimate_zero2_model_states_mem_needs_all_cold(total, num_gpus_per_node=gpus, num_nodes=nodes)
    return "\n".join(
        [
            "# resolved config",
            dump_yaml(cfg),
            f"# layout: micro-batch {cfg.train.micro_batch_size} x gradient accumulation {accumulation} x "
            f"world size {world_size} ({nodes} node(s) x {gpus} {device_type} device(s)) = global batch "
            f"{cfg.train.global_batch_size}; precision {precision}",
            f"# DeepSpeed JSON (world size {world_size}, precision {precision})",
            json.dumps(ds, indent=2),
            f"# model: {cfg.model.name}, {total / 1e6:.1f}M parameters, latent {list(latent_shape)}{note}",
            "# DeepSpeed memory estimate (model states; ZeRO-3 estimator at stage 3, else ZeRO-2's)",
            buffer.getvalue().strip(),
        ]
    )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="YAML run config (configs/*.yaml)")
    parser.add_argument("overrides", nargs="*", help="key.sub=value overrides, e.g. train.max_steps=1000")
    parser.add_argument(
        "--deepspeed-config", default=None, help="your DeepSpeed JSON, checked against the YAML"
    )
    parser.add_argument("--resume", default=None, help="checkpoint tag to resume from (default: latest)")
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="print resolved config, DeepSpeed JSON and memory estimate, then exit",
    )
    parser.add_argument(
        "--world-size", type=int, default=None, help="world size for --dry-run (default: WORLD_SIZE or 1)"
    )
    parser.add_argument(
        "--device",
        choices=("cuda", "cpu"),
        default=None,
        help="target device for --dry-run (default: this machine's): plan a GPU run from a login node",
    )
    parser.add_argument("--gpus-per-node", type=int, default=None, help="for --dry-run's memory estimate")


def run(args: argparse.Namespace) -> int:
    # Config, data and checkpoint errors reach the CLI, which prints them as one line on rank 0 (errors.py).
    cfg = load_config(args.config, args.overrides or [])
    if args.dry_run:
        world = args.world_size or int(os.environ.get("WORLD_SIZE", "1"))
        print(dry_run(cfg, world, args.deepspeed_config, args.device, args.gpus_per_node))
        return 0
    trainer = Trainer(cfg, user_ds_config=args.deepspeed_config, resume_tag=args.resume)
    trainer.fit()
    if cfg.deepspeed.zero_stage < 3:  # whole parameters on every rank: they must agree exactly
        with torch.no_grad():
            checksum = sum(p.double().sum().item() for p in trainer.engine.module.model.parameters())
        print(f"rank {trainer.rank}: parameter checksum {checksum!r}", flush=True)
    if trainer.rank == 0:
        print(
            f"done: step {trainer.step}; run dir {trainer.run_dir} (checkpoints/, tensorboard/, samples/)",
            flush=True,
        )
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    return 0
