"""Per-cluster losses l_k (ANT: the mean per-sample loss over the samples of timestep cluster k).

Two pieces:

- ``step_cluster_means``: the differentiable l_k of the optimizer step that a balancer combines into the
  training loss (``per_cluster_mean``: the same for one micro-batch on its own). A cluster with no sample
  gets 0 (never NaN), so it contributes nothing to the loss or its gradient.
- ``ClusterLossBuffer``: detached sums and counts accumulated over the micro-batches of one optimizer
  step or more, all-reduced across ranks in one collective when read, giving the global per-cluster
  means for logging (and a loss-vs-t profile).
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def _cluster_sums(per_sample_loss: torch.Tensor, cluster_idx: torch.Tensor, k: int) -> torch.Tensor:
    """Differentiable (k,) sums of ``per_sample_loss`` (B,) by ``cluster_idx`` (B,), in at least float32 so
    bf16 losses keep precision. ValueError for shapes that are not both (B,)."""
    if per_sample_loss.ndim != 1 or per_sample_loss.shape != cluster_idx.shape:
        raise ValueError(
            f"per_sample_loss and cluster_idx must both have shape (B,), got "
            f"{tuple(per_sample_loss.shape)} and {tuple(cluster_idx.shape)}"
        )
    dtype = torch.promote_types(per_sample_loss.dtype, torch.float32)
    return torch.zeros(k, dtype=dtype, device=per_sample_loss.device).index_add(
        0, cluster_idx, per_sample_loss.to(dtype)
    )


def per_cluster_mean(
    per_sample_loss: torch.Tensor, cluster_idx: torch.Tensor, k: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(means (k,), counts (k,) long) of ``per_sample_loss`` (B,) grouped by ``cluster_idx`` (B,): one
    micro-batch's l_k on its own (a cluster without samples: mean 0, count 0). Differentiable; ValueError for
    bad shapes or a cluster index >= k. The trainer uses ``step_cluster_means`` (l_k over the whole step)."""
    sums = _cluster_sums(per_sample_loss, cluster_idx, k)
    counts = torch.bincount(cluster_idx, minlength=k)
    if counts.numel() != k:
        raise ValueError(f"cluster_idx has values >= k={k} (max {int(cluster_idx.max())})")
    return sums / counts.clamp(min=1).to(sums.dtype), counts


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
    sums = _cluster_sums(per_sample_loss, cluster_idx, step_counts.shape[0])
    counts = step_counts.to(device=sums.device, dtype=sums.dtype)
    return sums * scale / counts.clamp(min=1)


class ClusterLossBuffer:
    """Per-cluster loss sums and counts (and a loss-vs-t profile) accumulated on the device between reads.

    ``add(per_sample_loss, cluster_idx, t)`` for every micro-batch (a fixed-size scatter: no host sync;
    non-finite losses are left out of sums and counts), then ``reduce()`` on every rank whenever the values
    are read (a collective when torch.distributed is initialised; the trainer reads at ``log_every``):
    the global per-cluster means and counts since the last read. ``take_profile()`` returns the loss per
    t bin accumulated by the reads since its last call. Logging only: the training loss uses
    ``step_cluster_means``.
    """

    def __init__(self, k: int, num_timesteps: int = 1000, profile_bins: int = 20) -> None:
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        if profile_bins < 1 or num_timesteps < profile_bins:
            raise ValueError(
                f"need 1 <= profile_bins <= num_timesteps, got {profile_bins} and {num_timesteps}"
            )
        self.k, self.num_timesteps, self.profile_bins = k, num_timesteps, profile_bins
        self.sums = torch.zeros(k, dtype=torch.float64)
        self.counts = torch.zeros(k, dtype=torch.float64)
        # per-t-bin sums/counts since the last reduce, and the reduced (all-rank) ones since take_profile
        self.bin_sums = torch.zeros(profile_bins, dtype=torch.float64)
        self.bin_counts = torch.zeros(profile_bins, dtype=torch.float64)
        self.profile_sums = torch.zeros(profile_bins, dtype=torch.float64)
        self.profile_counts = torch.zeros(profile_bins, dtype=torch.float64)

    def add(
        self, per_sample_loss: torch.Tensor, cluster_idx: torch.Tensor, t: torch.Tensor | None = None
    ) -> None:
        """Accumulate one micro-batch: losses (B,), cluster indices (B,) long, timesteps (B,) or None: long
        indices 0..T-1 (DDPM) or float flow times in [0, 1], binned on the same profile grid."""
        loss = per_sample_loss.detach().to(torch.float64)
        if self.sums.device != loss.device:
            # live on the loss's device so that NCCL can all-reduce without a host copy
            self.sums, self.counts = self.sums.to(loss.device), self.counts.to(loss.device)
            self.bin_sums, self.bin_counts = self.bin_sums.to(loss.device), self.bin_counts.to(loss.device)
        finite = torch.isfinite(loss)
        ones = finite.to(torch.float64)
        loss = torch.where(finite, loss, torch.zeros_like(loss))
        self.sums.index_add_(0, cluster_idx, loss)
        self.counts.index_add_(0, cluster_idx, ones)
        if t is not None:
            if t.is_floating_point():
                bins = (t.double() * self.profile_bins).floor().long().clamp_(0, self.profile_bins - 1)
            else:
                bins = torch.div(t * self.profile_bins, self.num_timesteps, rounding_mode="floor")
            self.bin_sums.index_add_(0, bins, loss)
            self.bin_counts.index_add_(0, bins, ones)

    def reduce(
        self, group: dist.ProcessGroup | None = None, reset: bool = True
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Global (means (k,) float64, counts (k,) float64, on the CPU) since the last reduce, all ranks;
        an absent cluster has mean 0 and count 0. A collective: call on every rank of ``group``. Clears
        the sums unless ``reset=False``; the profile bins move into the profile ``take_profile`` returns."""
        stacked = torch.cat([self.sums, self.counts, self.bin_sums, self.bin_counts])
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(stacked, op=dist.ReduceOp.SUM, group=group)
        stacked = stacked.cpu()
        k, b = self.k, self.profile_bins
        sums, counts = stacked[:k], stacked[k : 2 * k]
        self.profile_sums += stacked[2 * k : 2 * k + b]
        self.profile_counts += stacked[2 * k + b :]
        means = torch.where(counts > 0, sums / counts.clamp(min=1.0), torch.zeros_like(sums))
        if reset:
            self.reset()
        return means, counts

    def mark(self) -> list[torch.Tensor]:
        """Copies of the unread sums and counts, for `rollback` (device copies, no host sync)."""
        return [t.clone() for t in (self.sums, self.counts, self.bin_sums, self.bin_counts)]

    def rollback(self, mark: list[torch.Tensor]) -> None:
        """Forget what was added since `mark()`: the micro-batches of an optimizer step that was skipped."""
        self.sums, self.counts, self.bin_sums, self.bin_counts = mark

    def reset(self) -> None:
        """Clear the accumulated sums and counts (the reduced profile is kept)."""
        for tensor in (self.sums, self.counts, self.bin_sums, self.bin_counts):
            tensor.zero_()

    def take_profile(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean loss (bins,), samples (bins,)) per t bin over the reduces since the last call, then cleared.
        Bin j covers t in [j*T/bins, (j+1)*T/bins); an empty bin has mean 0 and count 0."""
        counts = self.profile_counts.clone()
        means = torch.where(counts > 0, self.profile_sums / counts.clamp(min=1.0), torch.zeros_like(counts))
        self.profile_sums.zero_()
        self.profile_counts.zero_()
        return means, counts

    def state_dict(self) -> dict[str, torch.Tensor | int]:
        """This rank's unread sums and counts and the reduced profile (CPU tensors)."""
        return {
            "k": self.k,
            "sums": self.sums.cpu().clone(),
            "counts": self.counts.cpu().clone(),
            "bin_sums": self.bin_sums.cpu().clone(),
            "bin_counts": self.bin_counts.cpu().clone(),
            "profile_sums": self.profile_sums.clone(),
            "profile_counts": self.profile_counts.clone(),
        }

    def reshard_states(self, states: list[dict], rank: int) -> dict:
        """This rank's state from every old rank's (another world size): the unread sums and counts are sums
        over ranks, so rank 0 takes their totals and the others start at zero; the reduced profile is the same
        on every rank and is kept."""
        additive = ("sums", "counts", "bin_sums", "bin_counts")
        merged = dict(states[0])
        for key in additive:
            total = sum(st[key] for st in states)
            merged[key] = total if rank == 0 else torch.zeros_like(total)
        return merged

    def load_state_dict(self, state: dict[str, torch.Tensor | int]) -> None:
        """Restore `state_dict()`; ValueError when it was saved with another number of clusters."""
        if int(state["k"]) != self.k:
            raise ValueError(
                f"ClusterLossBuffer state has k={state['k']} clusters but this run has k={self.k} (mtl.num_clusters)"
            )
        device = self.sums.device
        for name in ("sums", "counts", "bin_sums", "bin_counts"):
            if name in state and state[name].shape == getattr(self, name).shape:
                setattr(self, name, state[name].to(device=device, dtype=torch.float64).clone())
        if "profile_sums" in state and state["profile_sums"].shape == self.profile_sums.shape:
            self.profile_sums = state["profile_sums"].to(torch.float64).clone()
            self.profile_counts = state["profile_counts"].to(torch.float64).clone()
