"""Training times for flow matching (diffusion.objective=flow): the flow twin of mtl.sampling.TimestepSampler,
in train/ because it joins ANT's clusters (mtl) with the flow path's time densities (diffusion/flow.py)."""

from __future__ import annotations

import torch

from dtr_scale.mtl.clustering import Interval, validate_intervals
from dtr_scale.mtl.sampling import TimestepSampler


class FlowTimeSampler:
    """Draws (t, cluster_idx) for a flow-matching micro-batch: t float32 (B,) in [0, 1].

    Clusters are inclusive intervals of the T equal bins of t (bin i = [i/T, (i+1)/T); diffusion/flow.py).
    Not stratified: t from the training density (`flow.time_sampling`: uniform or logit-normal), cluster_idx
    the cluster its bin lies in. Stratified: slot g of the global batch belongs to cluster g mod k (as in
    TimestepSampler), t from the density restricted to the cluster's interval (inverse CDF), which with uniform
    density and equal clusters keeps t uniform, as TimestepSampler does for DDPM.
    """

    def __init__(
        self,
        num_bins: int,
        clusters: list[Interval] | None = None,
        stratified: bool = False,
        time_sampling: str = "uniform",
        logit_mean: float = 0.0,
        logit_std: float = 1.0,
    ) -> None:
        import numpy as np

        from dtr_scale.diffusion.flow import time_cdf

        self.num_timesteps = int(num_bins)
        self.stratified = bool(stratified and clusters)
        self.clusters = validate_intervals(
            clusters or [(0, num_bins - 1)], num_bins, source="FlowTimeSampler clusters"
        )
        self.num_clusters = len(self.clusters)
        self.density = (time_sampling, float(logit_mean), float(logit_std))
        edges = np.array([[left, right + 1] for left, right in self.clusters], dtype=np.float64) / num_bins
        self._cdf = torch.from_numpy(time_cdf(edges, *self.density))  # (k, 2): CDF at each cluster's ends
        right_bins = torch.tensor([right for _, right in self.clusters], dtype=torch.long)
        self._right_bins = right_bins

    check_batch_size = TimestepSampler.check_batch_size

    # (t float32, cluster_idx long), both (batch_size,): `from_uniform` of u ~ U[0, 1) drawn in float64 on the
    # generator's device for slots 0..batch_size-1, exactly as TimestepSampler.sample does it
    sample = TimestepSampler.sample

    def from_uniform(self, u: torch.Tensor, slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The times of samples whose uniform draws are u (float64 in [0, 1)) in global-batch slots `slots`:
        (t float32 in [0, 1], cluster_idx long), on u's device; the flow twin of TimestepSampler.from_uniform
        (train/draws.py keys u by seed, step and slot, so the times are the same at every world size).
        Inverse CDF of the training density, restricted to cluster g mod k when stratified."""
        from dtr_scale.diffusion.flow import time_quantile

        cdf = self._cdf.to(u.device)
        if self.stratified:
            cluster_idx = slots.to(u.device) % self.num_clusters
            low, high = cdf[cluster_idx, 0], cdf[cluster_idx, 1]
            t = time_quantile(low + u * (high - low), *self.density)
        else:
            t = time_quantile(u, *self.density)
            bins = (t * self.num_timesteps).floor().long().clamp_(0, self.num_timesteps - 1)
            cluster_idx = torch.searchsorted(self._right_bins.to(u.device), bins)
        return t.clamp(0.0, 1.0).float(), cluster_idx
