"""The Trainer: the loop that ties build (train/build.py), step (train/step.py), checkpoint, EMA and monitor.

Works as a single process, under `torchrun`, the `deepspeed` launcher (`--module dtr_scale`) and SLURM (`srun`:
SLURM_* mapped to the torch variables); the CLI is train/cli.py. Ranks are the GLOBAL rank / world size. A Trainer
on an existing `run_dir` resumes from `checkpoints/latest` (or the tag given) after checking its config against
the checkpoint's (train/resume.py, docs/resume.md), resharding a checkpoint of another world size or ZeRO stage
(train/reshard.py). Each step (train/step.py): timesteps, noise and label drops drawn per slot of the global
batch (train/draws.py), per micro-batch (x, y) from the stream, per-sample loss -> ANT cluster losses ->
balancer -> backward / step; then the fp32 EMA, logs and checkpoints (train/cadence.py, also skipped steps).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch

from dtr_scale.checkpoint_format import CHECKPOINTS_DIR, read_latest
from dtr_scale.config import ConfigError, RunConfig, dump_yaml
from dtr_scale.errors import NonFiniteLossError
from dtr_scale.models.build import build_model
from dtr_scale.train.build import build_balancer, build_optimizer, build_stream
from dtr_scale.train.cadence import checkpoint_if_due, latest_text, log_step
from dtr_scale.train.data_health import skipped_scalars
from dtr_scale.train.plan import plan_run
from dtr_scale.train.repa import build_repa, repa_active
from dtr_scale.train.resume import (
    ResumeChanges,
    check_config,
    data_fingerprint,
    keep_config,
    reset_lr_schedule,
)
from dtr_scale.train.runtime import init_distributed, pin_mmap_threshold, seed_everything
from dtr_scale.train.step import LogSums, StepLayout, TrainModule, accumulate_and_step, cluster_gram

# ------------------------------------------------------------------------------- the trainer


class Trainer:
    """Builds everything from a RunConfig (model, diffusion, ANT clusters, balancer, DeepSpeed engine, EMA,
    stream, checkpointer, monitor), resumes from `latest` when there is one, and trains with `fit()`. Every
    rank constructs one."""

    def __init__(self, cfg: RunConfig, user_ds_config: str | None = None, resume_tag: str | None = None):
        if not cfg.data.shards:
            raise ConfigError(
                "data.shards: set it to a manifest.json (e.g. from `dtr-scale prepare-builtin`)"
            )
        self._setup_runtime(cfg, user_ds_config, resume_tag)
        # A resumed run's config is checked against the checkpoint's before anything is built or written.
        tag = self.saved.tag_dir.name if self.saved is not None else None
        changes = check_config(self.cfg, self.run_dir, tag, self.manifest) if tag is not None else None
        self._build_modules()
        self._build_engine()
        self._build_state()
        if changes is not None:
            self._resume(tag, changes)
        if self.rank == 0:  # only now: a checkpoint that does not load leaves config.yaml as it was
            keep_config(self.run_dir, self.cfg, changes)
        self._build_monitor()  # last: it trims metrics.jsonl to the step this run starts from

    def _setup_runtime(self, cfg: RunConfig, user_ds_config: str | None, resume_tag: str | None) -> None:
        """Process group, device, the checkpoint to resume (and whether it must be resharded: train/reshard.py),
        the run plan for this world size (train/plan.py: batch layout, precision, DeepSpeed JSON, diffusion,
        clusters, timestep sampler) and the data manifest."""
        from deepspeed.accelerator import get_accelerator

        from dtr_scale.data.shards import load_manifest
        from dtr_scale.train.reshard import check_reshard, saved_sharding

        info = init_distributed()
        self.rank, self.world, self.device = info.rank, info.world_size, info.device
        checkpoints = Path(cfg.run_dir) / CHECKPOINTS_DIR
        tag = resume_tag or read_latest(checkpoints)
        self.saved = saved_sharding(checkpoints / tag) if tag is not None else None
        if self.saved is not None and cfg.data.canonical_streams is None and self.saved.elastic:
            # the sample order is the run's: a resumed run keeps its checkpoint's canonical streams
            data = dataclasses.replace(cfg.data, canonical_streams=self.saved.canonical_streams)
            cfg = dataclasses.replace(cfg, data=data)
        bf16 = bool(get_accelerator().is_bf16_supported())
        plan = plan_run(cfg, self.world, self.device.type, bf16, user_ds_config)
        hint = f"CONFIG run_dir={cfg.run_dir}"
        stage = plan.cfg.deepspeed.zero_stage
        self.reshard = self.saved is not None and check_reshard(self.saved, self.world, stage, hint)
        if self.reshard:  # DeepSpeed reads the tag's universal checkpoint (Checkpointer.load converts it)
            plan.ds_config["checkpoint"] = {**plan.ds_config.get("checkpoint", {}), "load_universal": True}
        # The micro-batch for this world size (train.micro_batch_size may be unset): one config, 1..N GPUs.
        self.cfg, self.precision, self.accumulation = plan.cfg, plan.precision, plan.accumulation
        self.ds_config, self.diffusion, self.clusters = plan.ds_config, plan.diffusion, plan.clusters
        self.timestep_sampler = plan.timestep_sampler
        self.num_clusters = 1 if self.clusters is None else len(self.clusters)
        self.manifest = load_manifest(self.cfg.data.shards)
        self.run_dir = Path(self.cfg.run_dir)
        if self.cfg.deepspeed.zero_stage == 3 and self.device.type == "cpu":
            pin_mmap_threshold()  # gathered parameters go back to the OS when freed (runtime.py)

    def _build_modules(self) -> None:
        """Model and balancer (partitioned as they are built under ZeRO-3), and the TrainModule around them."""
        import deepspeed

        cfg = self.cfg
        zero3 = cfg.deepspeed.zero_stage == 3
        seed_everything(cfg.train.seed)  # the same initial weights on every rank
        # ZeRO-3: every submodule is partitioned as soon as it is built (in the training dtype DeepSpeed
        # takes from the config), so no rank ever holds the whole model; DiT's init runs on gathered modules.
        with deepspeed.zero.Init(config_dict_or_path=self.ds_config, enabled=zero3):
            model = build_model(cfg, tuple(self.manifest.latent_shape), len(self.manifest.labels))
        self.flops_per_sample = model.flops_per_sample()
        # Under ZeRO-3 the balancer's parameters (UW's s) are partitioned like the model's, in its dtype.
        with deepspeed.zero.Init(config_dict_or_path=self.ds_config, enabled=zero3):
            balancer = build_balancer(cfg, self.num_clusters)
        # REPA (train/repa.py): the frozen encoder stays outside DeepSpeed; the projector trains inside.
        dtype = torch.bfloat16 if self.precision == "bf16" else torch.float32
        projector, self.repa_features = build_repa(
            cfg, model, self.manifest, self.device, dtype, zero3, self.ds_config
        )
        self.module = TrainModule(
            model, balancer, self.diffusion, float(self.accumulation * self.world),
            repa_projector=projector, repa_depth=cfg.repa.depth, repa_coeff=cfg.repa.coeff,
        )  # fmt: skip

    def _build_engine(self) -> None:
        """Per-rank seeds of the global generators (seed * world + rank) and the DeepSpeed engine."""
        import deepspeed

        cfg = self.cfg
        seed_everything(cfg.train.seed * self.world + self.rank)
        optimizer, scheduler = build_optimizer(
            cfg, self.module.model, self.module.balancer, self.device, self.module.repa_projector
        )
        self.engine, _, _, self.scheduler = deepspeed.initialize(
            model=self.module,
            optimizer=optimizer,
            lr_scheduler=scheduler,
            config=self.ds_config,
            dist_init_required=False,
        )
        if cfg.model.compile:
            self.engine.compile()

    def _build_state(self) -> None:
        """EMA, data stream, logging buffers, the step layout, and the checkpointer that owns their state."""
        from dtr_scale.mtl.cluster_losses import ClusterLossBuffer
        from dtr_scale.train.checkpoint import BalancerState, Checkpointer, RNGState, RunRecord, TrainProgress
        from dtr_scale.train.ema import ShardedEMA

        cfg, t = self.cfg, self.cfg.train
        self.ema = ShardedEMA(self.engine.module.model, t.ema_decay, t.ema_warmup, self.rank, self.world)
        self.stream = build_stream(cfg, self.manifest, self.rank, self.world, self.device, self.accumulation)
        self.cluster_buffer = ClusterLossBuffer(self.num_clusters, cfg.diffusion.diffusion_steps)
        self.log_sums = LogSums(self.device, cfg.repa.coeff if cfg.repa.encoder is not None else None)
        self.layout = StepLayout(
            micro_batch_size=t.micro_batch_size,
            accumulation=self.accumulation,
            world=self.world,
            num_clusters=self.num_clusters,
            device=self.device,
            drop_grads_on_nonfinite=cfg.deepspeed.zero_stage == 0 and self.precision == "fp32",
            rank=self.rank,
            seed=t.seed,
            latent_shape=tuple(self.manifest.latent_shape),
            label_dropout=cfg.model.class_dropout_prob,
        )
        self.progress = TrainProgress()
        self.nonfinite_in_row = 0
        self.checkpoint_due = False  # a checkpoint postponed by a non-finite step (cadence.py)
        global_objects = {
            "progress": self.progress,
            "run": RunRecord(dump_yaml(cfg), self.clusters, data_fingerprint(self.manifest)),
            "balancer": BalancerState(self.engine.module.balancer),
        }
        rank_objects = {
            "ema": self.ema,
            "stream": self.stream,
            "rng": RNGState(),
            "cluster_buffer": self.cluster_buffer,
            "log_sums": self.log_sums,
        }
        self.checkpointer = Checkpointer(
            self.run_dir, self.engine, global_objects, rank_objects, keep_last=t.keep_last,
            keep_every=t.keep_every, rank=self.rank, world_size=self.world,
            sharding={"zero_stage": cfg.deepspeed.zero_stage, "canonical_streams": cfg.data.canonical_streams},
        )  # fmt: skip

    def _build_monitor(self) -> None:
        """Progress bar, TensorBoard and metrics.jsonl (rank 0; train/monitor.py), from the current step."""
        from dtr_scale.train.monitor import Monitor, peak_flops_per_device

        cfg = self.cfg
        self.monitor = Monitor(
            self.run_dir, self.rank, self.world, cfg.train.max_steps, self.flops_per_sample,
            peak_flops_per_device(self.device, cfg.monitor.peak_tflops), tensorboard=cfg.monitor.tensorboard,
            progress=cfg.monitor.progress, start_step=self.step, config_text=dump_yaml(cfg),
            num_clusters=self.num_clusters,
        )  # fmt: skip

    # -- state -------------------------------------------------------------------------------------

    # The progress counters, read and set through the checkpointed TrainProgress.
    step = property(lambda self: self.progress.step, lambda self, v: setattr(self.progress, "step", v))
    samples_seen = property(
        lambda self: self.progress.samples_seen, lambda self, v: setattr(self.progress, "samples_seen", v)
    )
    skipped_steps = property(
        lambda self: self.progress.skipped_steps, lambda self, v: setattr(self.progress, "skipped_steps", v)
    )

    def save(self) -> str:
        """Checkpoint the current step (collective); returns its tag."""
        tag = self.checkpointer.save(self.step)
        if self.rank == 0:
            self.monitor.message(f"saved checkpoint {self.checkpointer.dir / tag}")
        return tag

    def _resume(self, tag: str, changes: ResumeChanges) -> None:
        """Load checkpoint `tag` (resharded when it was written at another world size or ZeRO stage), then apply
        this launch's LR schedule (a changed train.lr reaches the optimizer and the scheduler: train/resume.py)
        and state each changed key in one line."""
        if self.reshard and self.rank == 0:
            from dtr_scale.train.reshard import reshard_line

            print(reshard_line(self.saved, self.world, self.cfg.deepspeed.zero_stage), flush=True)
        base_lrs = list(self.scheduler.base_lrs)  # what this launch's config asks for, before the load
        self.checkpointer.load(tag, reshard=self.reshard)
        reset_lr_schedule(self.scheduler, base_lrs)
        if self.rank == 0:
            print(f"resumed from {self.checkpointer.dir / tag} at step {self.step}", flush=True)
            for line in changes.applied:
                print(f"resume: changed {line}", flush=True)

    # -- training ----------------------------------------------------------------------------------

    def _gram_update(self, x, t, y, noise, cluster_idx, drop) -> None:
        """NashMTL / PCGrad: the balancer's update from the exact Gram (step.cluster_gram), and its
        gradient cosines as a TensorBoard image."""
        from dtr_scale.train.monitor import cosine_image

        gram = cluster_gram(self.engine.module, x, t, y, noise, cluster_idx, self.num_clusters, drop)
        self.engine.module.balancer.update_from_gram(gram)
        if self.rank == 0:
            self.monitor.image("balancer/gradient_cosines", self.step + 1, cosine_image(gram))

    def train_step(self, batches) -> bool:
        """One optimizer step (train/step.py); False when it was skipped for a non-finite loss (its losses are
        then left out of the logged means: they were not trained on)."""
        balancer = self.engine.module.balancer
        gram = self._gram_update if balancer.should_update(self.step) else None
        marks = self.log_sums.mark(), self.cluster_buffer.mark()
        try:
            features = self.repa_features if repa_active(self.cfg, self.step) else None
            applied = accumulate_and_step(self.engine, batches, self.timestep_sampler, self.step, self.layout,
                                          self.cluster_buffer, self.log_sums, gram, features)  # fmt: skip
        except NonFiniteLossError as err:
            raise NonFiniteLossError(
                f"step {self.step + 1}: {err}; last complete checkpoint: {latest_text(self.checkpointer)}"
            ) from None
        if applied:
            self.ema.update()
        else:
            self.log_sums.rollback(marks[0])
            self.cluster_buffer.rollback(marks[1])
        return applied

    def read_scalars(self) -> dict[str, float]:
        """What is logged at `log_every`: losses since the last read, LR, grad norm, per-cluster losses,
        weights and counts. Collective (every rank calls it): the one place logging reads the device."""
        means, counts = self.cluster_buffer.reduce()
        scalars = {"skipped_steps": float(self.skipped_steps)}
        if counts.sum() > 0:  # no sample since the last read (every step skipped): the loss is absent, not 0
            scalars["loss/mean"] = float((means * counts).sum() / counts.sum())
        scalars.update(self.log_sums.read())
        scalars["lr"] = float(self.scheduler.get_last_lr()[0])
        scalars.update(skipped_scalars(self.stream.skipped, self.device))
        if not self.cfg.data.resampled:  # epoch mode: which pass over the data this step came from
            scalars["data/epoch"] = float(self.stream.epoch)
        grad_norm = self.engine.get_global_grad_norm()
        if grad_norm is not None:
            scalars["grad_norm"] = float(grad_norm)
        if self.num_clusters > 1:  # under ZeRO-3 reading UW's s is a collective gather
            balancer = self.engine.module.balancer
            weights = balancer.weights().detach().float().cpu()
            for i in range(self.num_clusters):
                if counts[i] > 0:  # a cluster without samples since the last read has no loss to log
                    scalars[f"cluster/loss_{i}"] = float(means[i])
                scalars[f"cluster/weight_{i}"] = float(weights[i])
                scalars[f"cluster/count_{i}"] = float(counts[i])  # samples since the last read, all ranks
            scalars.update(balancer.log_scalars())
        return scalars

    def fit(self) -> dict[str, Any]:
        """Train to train.max_steps: steps, logging, checkpoints, in-loop grids and evals; returns the last
        logged scalars."""
        cfg, t = self.cfg, self.cfg.train
        self.engine.train()
        batches = self.stream.batches()  # epoch mode rolls over into the next, reshuffled epoch
        last_scalars: dict[str, float] = {}
        try:
            while self.step < t.max_steps:
                applied = self.train_step(batches)
                self.step += 1
                self.samples_seen += t.global_batch_size
                last_scalars = log_step(self, applied) or last_scalars
                checkpoint_if_due(self)
                if cfg.monitor.sample_every and self.step % cfg.monitor.sample_every == 0:
                    self.sample_grid()
                    self.log_loss_profile()
                if cfg.eval.every and self.step % cfg.eval.every == 0:
                    self.evaluate_in_loop()
        finally:  # also when a run stops on an error: the progress bar ends, TensorBoard is flushed
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

    def _ema_sampler(self):
        """The EMA model and sampling settings for in-loop grids and evals (collective; train/inloop.py)."""
        from dtr_scale.train.inloop import ema_sampler

        return ema_sampler(self.ema, self.cfg, self.manifest, self.device, self.rank, self.world)

    def sample_grid(self) -> None:
        """The in-loop EMA sample grid (collective; train/inloop.py)."""
        from dtr_scale.train.inloop import sample_grid

        seed = self.cfg.train.seed
        sample_grid(self._ema_sampler(), self.cfg.monitor, seed, self.step, self.run_dir, self.monitor)

    def evaluate_in_loop(self) -> None:
        """The in-loop KID/FID (collective; train/inloop.py)."""
        from dtr_scale.train.inloop import evaluate_in_loop

        seed = self.cfg.train.seed + 1
        evaluate_in_loop(self._ema_sampler(), self.cfg.eval, seed, self.step, self.manifest, self.monitor)
