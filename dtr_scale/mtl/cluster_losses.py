"""Per-cluster losses l_k (ANT: the mean per-sample loss over the samples of timestep cluster k).

Two pieces:

- ``per_cluster_mean``: the differentiable per-micro-batch means that a balancer combines into the
  training loss. A cluster with no sample in the micro-batch gets mean 0 and count 0 (never NaN), so
  it contributes nothing to the loss or its gradient.
- ``ClusterLossBuffer``: detached sums and counts accumulated over the micro-batches of one optimizer
  step, all-reduced across ranks in one collective, giving the global per-cluster means of the step
  (for logging and the balancers) and an EMA of them for smooth TensorBoard curves.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def per_cluster_mean(
    per_sample_loss: torch.Tensor, cluster_idx: torch.Tensor, k: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(means (k,), counts (k,) long) of ``per_sample_loss`` (B,) grouped by ``cluster_idx`` (B,).

    Differentiable in ``per_sample_loss``. Sums run in at least float32 so bf16 losses keep precision.
    """
    if per_sample_loss.ndim != 1 or per_sample_loss.shape != cluster_idx.shape:
        raise ValueError(
            f"per_sample_loss and cluster_idx must both have shape (B,), got "
            f"{tuple(per_sample_loss.shape)} and {tuple(cluster_idx.shape)}"
        )
    dtype = torch.promote_types(per_sample_loss.dtype, torch.float32)
    sums = torch.zeros(k, dtype=dtype, device=per_sample_loss.device).index_add(
        0, cluster_idx, per_sample_loss.to(dtype)
    )
    counts = torch.bincount(cluster_idx, minlength=k)
    if counts.numel() != k:
        raise ValueError(f"cluster_idx has values >= k={k} (max {int(cluster_idx.max())})")
    means = sums / counts.clamp(min=1).to(dtype)
    return means, counts


def step_cluster_means(
    per_sample_loss: torch.Tensor, cluster_idx: torch.Tensor, step_counts: torch.Tensor, scale: float
) -> torch.Tensor:
    """One micro-batch's share of the step's buffered cluster losses l_k, differentiable, (k,).

    The estimator (ANT's per-cluster loss over a whole optimizer step): l_k = S_k / N_k, the sum of the
    per-sample losses of cluster k over every micro-batch and rank of the step divided by their number N_k
    (`step_counts`, all-reduced before the step's first forward, since t is drawn up front). DeepSpeed
    averages the micro-batches' gradients (1 / gradient_accumulation) and the ranks' (1 / world), so a
    micro-batch contributes S_k^mb * scale / N_k with scale = accumulation * world: the average over all
    micro-batches and ranks is then exactly l_k, and any balancer linear in l_k (UW, Nash, PCGrad, none)
    gets the gradient of its loss on the buffered l_k. A cluster with N_k = 0 gets 0 (and the balancers
    skip it: UW's s_k gets no gradient). With stratified sampling every N_k = scale * B / k and this is the
    plain micro-batch mean.
    """
    if per_sample_loss.ndim != 1 or per_sample_loss.shape != cluster_idx.shape:
        raise ValueError(
            f"per_sample_loss and cluster_idx must both have shape (B,), got "
            f"{tuple(per_sample_loss.shape)} and {tuple(cluster_idx.shape)}"
        )
    k = step_counts.shape[0]
    dtype = torch.promote_types(per_sample_loss.dtype, torch.float32)
    sums = torch.zeros(k, dtype=dtype, device=per_sample_loss.device).index_add(
        0, cluster_idx, per_sample_loss.to(dtype)
    )
    counts = step_counts.to(device=sums.device, dtype=dtype)
    return sums * scale / counts.clamp(min=1)


class ClusterLossBuffer:
    """Per-cluster loss sums and counts over one optimizer step, reduced across ranks.

    Usage per optimizer step: ``add(loss.detach(), cluster_idx)`` for every micro-batch, then
    ``reduce()`` once on every rank (a collective when torch.distributed is initialised). ``reduce``
    returns the global per-cluster means and counts, updates the logging EMA and clears the sums.
    """

    def __init__(
        self, k: int, ema_decay: float = 0.99, num_timesteps: int = 1000, profile_bins: int = 20
    ) -> None:
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        if profile_bins < 1 or num_timesteps < profile_bins:
            raise ValueError(
                f"need 1 <= profile_bins <= num_timesteps, got {profile_bins} and {num_timesteps}"
            )
        # Per-timestep loss profile: sums/counts in `profile_bins` equal bins of t, accumulated (all ranks)
        # until `take_profile()`; what the monitor draws as loss vs t.
        self.num_timesteps, self.profile_bins = num_timesteps, profile_bins
        self.bin_sums = torch.zeros(profile_bins, dtype=torch.float64)
        self.bin_counts = torch.zeros(profile_bins, dtype=torch.float64)
        self.profile_sums = torch.zeros(profile_bins, dtype=torch.float64)
        self.profile_counts = torch.zeros(profile_bins, dtype=torch.float64)
        if not 0.0 <= ema_decay < 1.0:
            raise ValueError(f"ema_decay must be in [0, 1), got {ema_decay}")
        self.k = k
        self.ema_decay = ema_decay
        self.sums = torch.zeros(k, dtype=torch.float64)
        self.counts = torch.zeros(k, dtype=torch.float64)
        self.ema = torch.zeros(k, dtype=torch.float64)
        # a cluster's EMA starts at its first observed mean instead of being biased towards 0
        self.ema_started = torch.zeros(k, dtype=torch.bool)
        self.last_means = torch.zeros(k, dtype=torch.float64)
        self.last_counts = torch.zeros(k, dtype=torch.float64)

    def add(
        self, per_sample_loss: torch.Tensor, cluster_idx: torch.Tensor, t: torch.Tensor | None = None
    ) -> None:
        """Accumulate one micro-batch's detached per-sample losses (and, given t, the loss profile)."""
        loss = per_sample_loss.detach().to(torch.float64)
        if self.sums.device != loss.device:
            # live on the loss's device so that NCCL can all-reduce without a host copy
            self.sums, self.counts = self.sums.to(loss.device), self.counts.to(loss.device)
            self.bin_sums, self.bin_counts = self.bin_sums.to(loss.device), self.bin_counts.to(loss.device)
        ones = torch.ones_like(loss)
        self.sums.index_add_(0, cluster_idx, loss)
        self.counts.index_add_(0, cluster_idx, ones)  # a fixed-size scatter: no host sync
        if t is not None:
            bins = torch.div(t * self.profile_bins, self.num_timesteps, rounding_mode="floor")
            self.bin_sums.index_add_(0, bins, loss)
            self.bin_counts.index_add_(0, bins, ones)

    def reduce(
        self, group: dist.ProcessGroup | None = None, reset: bool = True
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Global (means (k,) float64, counts (k,) float64) over all ranks; absent clusters: 0 and 0.

        Call on every rank of ``group`` (it is a collective). Updates the EMA of the clusters that
        have samples; clears the accumulated sums unless ``reset=False``.
        """
        stacked = torch.cat([self.sums, self.counts, self.bin_sums, self.bin_counts])
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(stacked, op=dist.ReduceOp.SUM, group=group)
        stacked = stacked.cpu()
        k, b = self.k, self.profile_bins
        sums, counts = stacked[:k], stacked[k : 2 * k]
        self.profile_sums += stacked[2 * k : 2 * k + b]
        self.profile_counts += stacked[2 * k + b :]
        present = counts > 0
        means = torch.where(present, sums / counts.clamp(min=1.0), torch.zeros_like(sums))
        first = present & ~self.ema_started
        self.ema = torch.where(first, means, self.ema)
        update = present & self.ema_started
        self.ema = torch.where(update, self.ema_decay * self.ema + (1.0 - self.ema_decay) * means, self.ema)
        self.ema_started |= present
        self.last_means, self.last_counts = means, counts
        if reset:
            self.reset()
        return means, counts

    def reset(self) -> None:
        """Clear the accumulated sums and counts (the EMA and the reduced profile are kept)."""
        self.sums.zero_()
        self.counts.zero_()
        self.bin_sums.zero_()
        self.bin_counts.zero_()

    def take_profile(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean loss (bins,), samples (bins,)) per t bin since the last call (all ranks), then cleared.
        Bin j covers t in [j*T/bins, (j+1)*T/bins); an empty bin has mean 0 and count 0."""
        counts = self.profile_counts.clone()
        means = torch.where(counts > 0, self.profile_sums / counts.clamp(min=1.0), torch.zeros_like(counts))
        self.profile_sums.zero_()
        self.profile_counts.zero_()
        return means, counts

    def log_scalars(self, prefix: str = "cluster") -> dict[str, float]:
        """TensorBoard scalars of the last reduced step: loss, EMA loss and sample count per cluster."""
        scalars: dict[str, float] = {}
        for j in range(self.k):
            scalars[f"{prefix}/loss_{j}"] = float(self.last_means[j])
            scalars[f"{prefix}/loss_ema_{j}"] = float(self.ema[j])
            scalars[f"{prefix}/count_{j}"] = float(self.last_counts[j])
        return scalars

    def state_dict(self) -> dict[str, torch.Tensor | int | float]:
        return {
            "k": self.k,
            "ema_decay": self.ema_decay,
            "sums": self.sums.cpu().clone(),
            "counts": self.counts.cpu().clone(),
            "ema": self.ema.clone(),
            "ema_started": self.ema_started.clone(),
            "last_means": self.last_means.clone(),
            "last_counts": self.last_counts.clone(),
            "profile_sums": self.profile_sums.clone(),
            "profile_counts": self.profile_counts.clone(),
        }

    def load_state_dict(self, state: dict[str, torch.Tensor | int | float]) -> None:
        if int(state["k"]) != self.k:
            raise ValueError(
                f"ClusterLossBuffer state has k={state['k']} clusters but this run has k={self.k} (mtl.num_clusters)"
            )
        self.ema_decay = float(state["ema_decay"])
        device = self.sums.device
        self.sums = state["sums"].to(device=device, dtype=torch.float64).clone()
        self.counts = state["counts"].to(device=device, dtype=torch.float64).clone()
        self.ema = state["ema"].to(torch.float64).clone()
        self.ema_started = state["ema_started"].to(torch.bool).clone()
        self.last_means = state["last_means"].to(torch.float64).clone()
        self.last_counts = state["last_counts"].to(torch.float64).clone()
        if "profile_sums" in state and state["profile_sums"].shape == self.profile_sums.shape:
            self.profile_sums = state["profile_sums"].to(torch.float64).clone()
            self.profile_counts = state["profile_counts"].to(torch.float64).clone()
