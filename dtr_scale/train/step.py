"""One optimizer step: what DeepSpeed wraps (`TrainModule`) and the step over its micro-batches
(`accumulate_and_step`; `Trainer.train_step` in train/engine.py calls it).

Per step: the step's per-sample draws (timestep, label dropout, noise: train/draws.py, keyed by seed, step and
slot in the global batch, so the step computes the same at every world size) are made up front (ANT's
buffered cluster losses need the global per-cluster counts N_k before the first forward: one small
all-reduce), then for each of `accumulation` micro-batches
forward -> `engine.backward` -> `engine.step` (DeepSpeed applies the optimizer at the last one). No host
sync per micro-batch: the losses to log and a non-finite flag are summed on the device, and the flag is
read once per step (one all-reduce and one `.item()`). Source: the training loop of facebookresearch/DiT
(train.py), with ANT's per-cluster losses (Go et al. 2023, Eq. 5) and DeepSpeed's gradient accumulation.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from dtr_scale.errors import NonFiniteLossError
from dtr_scale.mtl.cluster_losses import ClusterLossBuffer, step_cluster_means
from dtr_scale.mtl.sampling import TimestepSampler
from dtr_scale.train.draws import draw_slots, micro_batch_slots


class TrainModule(nn.Module):
    """What DeepSpeed wraps: the DiT, the diffusion loss and the loss balancer.

    The balancer sits inside so that its parameters (UW's s) are reduced, sharded and checkpointed by
    DeepSpeed like the model's, and so that ZeRO-3 gathers them inside this forward. `scale` is
    gradient_accumulation x world size (see mtl.cluster_losses.step_cluster_means).
    """

    def __init__(
        self,
        model: nn.Module,
        balancer: nn.Module,
        diffusion,
        scale: float,
        repa_projector: nn.Module | None = None,
        repa_depth: int = 0,
        repa_coeff: float = 0.0,
    ):
        super().__init__()
        self.model = model
        self.balancer = balancer
        self.diffusion = diffusion
        self.scale = scale
        self.repa_projector = repa_projector
        self.repa_depth = repa_depth
        self.repa_coeff = repa_coeff

    def forward(
        self, x, t, y, noise, cluster_idx, step_counts, repa_features=None, drop=None
    ) -> dict[str, torch.Tensor]:
        """x, noise: (B, C, H, W) latents and their noise; t, y, cluster_idx: (B,) long; step_counts:
        (num_clusters,) float, the step's global per-cluster sample counts; repa_features: (B, M, D) encoder
        patch tokens of the clean images, or None (no alignment this step); drop: (B,) long, 1 = train this
        sample on the null label (None: the model's own label dropout). Returns {"loss": the objective to
        back-propagate, "per_sample": (B,) detached diffusion losses, "mse": (B,) detached eps-MSE, "repa":
        detached REPA loss (0 without)}."""
        aligns = repa_features is not None and self.repa_projector is not None
        terms, hidden = self.per_sample_losses(x, t, y, noise, drop, self.repa_depth if aligns else None)
        per_sample = terms["loss"]
        # l_k: this micro-batch's share of the step's buffered cluster losses (sums over the step / N_k;
        # ANT Eq. 5).
        cluster_losses = step_cluster_means(per_sample, cluster_idx, step_counts, self.scale)
        # The objective: loss = sum_k w_k l_k + lambda * L_REPA. The balancer's weighted sum of the cluster
        # losses (mtl/balancers.py; UW's is sum_k 0.5 (exp(-s_k) l_k / K + s_k), K = num_clusters, ANT Eq. 6),
        # plus lambda = repa.coeff times REPA's loss (models/repa.py, REPA Eq. 8), added once per micro-batch, not per
        # cluster, on the steps that align, as REPA's train.py adds `proj_coeff * proj_loss` to the denoising loss.
        loss = self.balancer(cluster_losses, step_counts)
        repa = torch.zeros((), device=loss.device)
        if aligns:
            repa = self.repa_alignment(hidden, repa_features)
            loss = loss + self.repa_coeff * repa
        return {
            "loss": loss,
            "per_sample": per_sample.detach(),
            "mse": terms["mse"].detach(),
            "repa": repa.detach(),
        }

    def per_sample_losses(
        self, x, t, y, noise, drop=None, hidden_at: int | None = None
    ) -> tuple[dict[str, torch.Tensor], torch.Tensor | None]:
        """The objective's per-sample losses {"loss", "mse", ...} (B,) float32: `diffusion.training_losses` of
        the objective train/build.py `build_diffusion` chose (ddpm: eps MSE + VB, DiT/ADM; flow: velocity MSE,
        SiT), the one place the training forward and the Gram's per-cluster passes compute them. With
        `hidden_at` = d, also the DiT's tokens after block d (REPA's input), else None."""
        kwargs = {"y": y} if drop is None else {"y": y, "force_drop_ids": drop}
        if hidden_at is None:
            return self.diffusion.training_losses(self.model_fn, x, t, model_kwargs=kwargs, noise=noise), None
        kept: list[torch.Tensor] = []

        def model_fn(x_t: torch.Tensor, timesteps: torch.Tensor, **kw) -> torch.Tensor:
            out, hidden = self.model_fn(x_t, timesteps, return_hidden_at=hidden_at, **kw)
            kept.append(hidden)
            return out

        terms = self.diffusion.training_losses(model_fn, x, t, model_kwargs=kwargs, noise=noise)
        return terms, kept[0]

    def repa_alignment(self, hidden: torch.Tensor, repa_features: torch.Tensor) -> torch.Tensor:
        """REPA's loss (models/repa.py): the projected tokens `hidden` (B, N, hidden) against the encoder's
        features (B, M, D), brought to the DiT's token grid; a scalar in [-1, 1]."""
        from dtr_scale.models.repa import match_token_grid, repa_loss

        return repa_loss(self.repa_projector(hidden), match_token_grid(repa_features, hidden.shape[1]))

    def model_fn(self, x_t: torch.Tensor, timesteps: torch.Tensor, **kwargs):
        """The network in its parameters' dtype (bf16 under DeepSpeed's bf16), the diffusion maths in fp32:
        the one precision mechanism of the loss and of the Gram path. With return_hidden_at, (output in fp32,
        the tokens in the network's dtype)."""
        dtype = next(self.model.parameters()).dtype
        out = self.model(x_t.to(dtype), timesteps, **kwargs)
        if isinstance(out, tuple):
            return out[0].float(), out[1]
        return out.float()


@dataclass
class StepLayout:
    """The fixed shape of every step: micro-batch size, accumulation, world, this rank, clusters, how a step
    with a non-finite loss is dropped (`drop_grads_on_nonfinite`: ZeRO-0 fp32, where DeepSpeed's optimizer is
    a plain torch one that does not skip non-finite gradients by itself), and what the per-sample draws need:
    the seed, the latent shape (C, H, W) and the label dropout probability."""

    micro_batch_size: int
    accumulation: int
    world: int
    num_clusters: int
    device: torch.device
    drop_grads_on_nonfinite: bool
    rank: int = 0
    seed: int = 0
    latent_shape: tuple[int, ...] = ()
    label_dropout: float = 0.0


class LogSums:
    """Device-side sums of the logged losses over the steps since the last `read()` (no host sync until then)."""

    def __init__(self, device: torch.device, repa_coeff: float | None = None) -> None:
        # objective, mse, micro-batches, REPA loss, micro-batches that aligned
        self.values = torch.zeros(5, dtype=torch.float64, device=device)
        self.repa_coeff = repa_coeff

    def add(
        self, loss: torch.Tensor, mse: torch.Tensor, finite: torch.Tensor, repa: torch.Tensor | None = None
    ) -> None:
        """loss: the micro-batch's scalar objective; mse: (B,) per-sample eps-MSE; finite: bool scalar;
        repa: its REPA loss, when it aligned."""
        one = torch.ones((), device=loss.device, dtype=torch.float64)
        aligned = repa if repa is not None else torch.zeros_like(one)
        update = torch.stack(
            [loss.detach().double(), mse.double().mean(), one, aligned.double(), one * (repa is not None)]
        )
        self.values += torch.where(finite, update, torch.zeros_like(update))

    def mark(self) -> torch.Tensor:
        """A copy of the unread sums, for `rollback` (a device copy, no host sync)."""
        return self.values.clone()

    def rollback(self, mark: torch.Tensor) -> None:
        """Forget what was added since `mark()`: the micro-batches of an optimizer step that was skipped."""
        self.values = mark

    def read(self) -> dict[str, float]:
        """{"loss/objective", "loss/mse_rank0"} (+ "loss/repa", "loss/diffusion" = objective - coeff x REPA and
        "loss/repa_share" = |coeff x REPA| / (|coeff x REPA| + |diffusion|) with REPA): means per finite
        micro-batch since the last read; clears. Empty when no micro-batch was added (every step since the last
        read was skipped): a loss that was not measured is absent, never 0."""
        objective, mse, n, repa, aligned = self.values.tolist()
        self.values.zero_()
        if n == 0:
            return {}
        scalars = {"loss/objective": objective / n, "loss/mse_rank0": mse / n}
        if self.repa_coeff is not None and aligned:  # not after repa.stop_step
            # The REPA loss lies in [-1, 1] and the objective includes coeff x it: the share compares the sizes
            # of the two terms, each a mean over all micro-batches of the window.
            term = self.repa_coeff * repa / n
            diffusion = objective / n - term
            scalars["loss/repa"] = repa / aligned
            scalars["loss/diffusion"] = diffusion
            scalars["loss/repa_share"] = abs(term) / max(abs(term) + abs(diffusion), 1e-12)
        return scalars

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The unread sums (CPU)."""
        return {"values": self.values.cpu().clone()}

    def reshard_states(self, states: list[dict], rank: int) -> dict:
        """At another world size: rank 0 keeps old rank 0's sums (what it logs), the others start at zero."""
        return states[0] if rank == 0 else {"values": torch.zeros_like(states[0]["values"])}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Restore them on this device (a checkpoint from before REPA holds the first three sums)."""
        values = state["values"].to(self.values.device, torch.float64)
        self.values = torch.cat([values, self.values.new_zeros(5 - len(values))]).clone()


def draw_step(sampler: TimestepSampler, layout: StepLayout, step: int) -> tuple[list[tuple], torch.Tensor]:
    """Optimizer step `step`'s (t, cluster_idx, noise, drop) per micro-batch of this rank, on the device
    (train/draws.py), and the global per-cluster counts N_k (num_clusters,) float32 (all-reduced over ranks:
    a collective, no host sync)."""
    drawn = []
    for micro in range(layout.accumulation):
        slots = micro_batch_slots(layout.rank, layout.world, micro, layout.micro_batch_size)
        draws = draw_slots(layout.seed, step, slots, layout.latent_shape, layout.label_dropout)
        t, cluster_idx = sampler.from_uniform(draws.u, torch.tensor(slots))
        # A copy from pinned memory does not wait for the device's queue (one from pageable memory would).
        pin = layout.device.type == "cuda"
        values = (t, cluster_idx, draws.noise, draws.drop)
        drawn.append(
            tuple((v.pin_memory() if pin else v).to(layout.device, non_blocking=True) for v in values)
        )
    step_counts = torch.zeros(layout.num_clusters, dtype=torch.float32, device=layout.device)
    for _, cluster_idx, _, _ in drawn:
        step_counts.index_add_(0, cluster_idx, torch.ones_like(cluster_idx, dtype=step_counts.dtype))
    if layout.world > 1:
        dist.all_reduce(step_counts)
    return drawn, step_counts


def _any_rank(flag: torch.Tensor, world: int) -> bool:
    """Whether `flag` (a device scalar) is non-zero on any rank: the step's one host sync."""
    if world > 1:
        flag = flag.clone()
        dist.all_reduce(flag)
    return bool(flag.item() > 0)


def accumulate_and_step(
    engine,
    batches: Iterator[tuple[torch.Tensor, torch.Tensor]],
    sampler: TimestepSampler,
    step: int,
    layout: StepLayout,
    cluster_buffer: ClusterLossBuffer,
    log_sums: LogSums,
    gram_update: Callable[..., None] | None = None,
    repa_features: Callable[..., torch.Tensor] | None = None,
) -> bool:
    """Optimizer step `step` (0-based) over `layout.accumulation` micro-batches; returns whether it was applied.

    A non-finite loss in any micro-batch on any rank drops the whole step (returns False): DeepSpeed's
    ZeRO-1/2/3 and bf16 optimizers skip a step whose gradient norm is not finite and clear the gradients;
    at ZeRO-0 fp32 the gradients are set to None first, which torch's AdamW skips. `gram_update(x, t, y,
    noise, cluster_idx, drop)`, given, runs on the first micro-batch (NashMTL / PCGrad balancer updates);
    `repa_features(x, *stored)`, given, makes each micro-batch's REPA targets (the step aligns).
    Raises NonFiniteLossError if DeepSpeed applied a step whose loss was not finite.
    """
    drawn, step_counts = draw_step(sampler, layout, step)
    nonfinite = torch.zeros((), device=layout.device)
    bad = False
    for micro, (t, cluster_idx, noise, drop) in enumerate(drawn):
        x, y, *stored = next(batches)  # + the REPA features, when the shards hold them
        x = x.to(layout.device, non_blocking=True)
        y = y.to(layout.device, non_blocking=True)
        if gram_update is not None and micro == 0:
            gram_update(x, t, y, noise, cluster_idx, drop)
        features = repa_features(x, *stored) if repa_features is not None else None
        out = engine(x, t, y, noise, cluster_idx, step_counts, features, drop)
        loss = out["loss"]
        finite = torch.isfinite(loss.detach())
        nonfinite += (~finite).float()
        cluster_buffer.add(out["per_sample"], cluster_idx, t)
        log_sums.add(loss, out["mse"], finite, out["repa"] if features is not None else None)
        engine.backward(loss)
        if micro == layout.accumulation - 1:
            bad = _any_rank(nonfinite, layout.world)
            if bad and layout.drop_grads_on_nonfinite:
                for p in engine.module.parameters():
                    p.grad = None
        engine.step()
    if bad and engine.was_step_applied() and not layout.drop_grads_on_nonfinite:
        raise NonFiniteLossError(
            "a non-finite loss reached an optimizer step that DeepSpeed applied (its gradient norm was finite); "
            "the weights may be damaged"
        )
    return not bad


def cluster_gram(
    module: TrainModule,
    x: torch.Tensor,
    t: torch.Tensor,
    y: torch.Tensor,
    noise: torch.Tensor,
    cluster_idx: torch.Tensor,
    num_clusters: int,
    drop: torch.Tensor | None = None,
) -> torch.Tensor:
    """NashMTL / PCGrad: the exact (num_clusters, num_clusters) float64 Gram of the global per-cluster gradients
    on a micro-batch.

    Cluster i's gradient comes from a forward/backward on cluster i's samples only (about the cost of one
    forward/backward of the micro-batch in all), reduced across ranks inside `global_cluster_gram_from_fn`;
    only the Gram is all-reduced in full (never a num_clusters x P gather). A cluster with no sample on this
    rank contributes a zero gradient.
    """
    from dtr_scale.mtl.gram import global_cluster_gram_from_fn

    params = [p for p in module.model.parameters() if p.requires_grad]

    def cluster_loss(i: int) -> torch.Tensor:
        sel = cluster_idx == i
        if not bool(sel.any()):  # no sample of cluster i here: a zero gradient (its weight is kept)
            return sum(p.sum() for p in params) * 0.0
        terms, _ = module.per_sample_losses(
            x[sel], t[sel], y[sel], noise[sel], None if drop is None else drop[sel]
        )
        return terms["loss"].mean()

    counts = torch.bincount(cluster_idx, minlength=num_clusters)
    return global_cluster_gram_from_fn(params, cluster_loss, num_clusters, counts=counts)
