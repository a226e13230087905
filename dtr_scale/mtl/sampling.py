"""Training timesteps: uniform, or stratified over ANT's timestep clusters (`mtl.sampling`).

`resolve_sampling` decides: `auto` stratifies only equal-size clusters (where it keeps t uniform, as the
official ANT code does with its intervals), `uniform` never, `stratified` always (warning once, with the
resulting marginal, when the clusters are unequal).

Stratified sampling (ANT, NeurIPS 2023, Sec. 4.2: every cluster is a task present in every batch)
gives each of the k clusters an equal share of every batch, with t uniform inside its cluster: slot g of
the global batch belongs to cluster g mod k, so the step's shares (global_batch_size / k each) are the same at
every world size. A rank's micro-batch holds slots r, r + world, ... (train/step.py), an equal share of each
cluster when world and k are coprime; the buffered cluster losses are global sums either way.

What this does to the marginal of t
-----------------------------------
With clusters of sizes n_1..n_k (sum T), each cluster receives 1/k of the samples whatever its width,
so a timestep t in cluster j is drawn with probability

    p(t) = 1 / (k * n_j)        instead of the uniform 1 / T.

Narrow clusters are over-sampled and wide ones under-sampled by the factor T / (k * n_j). For the
uniform clusters of the ``"timestep"`` objective with k dividing T (k = 8, T = 1000: sizes 125) the
marginal is exactly uniform, so the plain sample mean of the loss is DiT's usual objective; when
sizes differ by one (k = 3: 334/333/333) the bias is below 0.3%. For SNR-based clusters the bias is
large (the linear schedule's SNR clusters at k = 8 include single-timestep clusters near t = 0, each
receiving 1/8 of the batch): the effective training objective becomes sum_j (1/k) E_{t ~ U(cluster
j)}[L_t], i.e. every cluster counts equally, which is ANT's intent, and any loss balancer then
re-weights these cluster means. To train on the uniform-t objective with such clusters instead,
weight cluster j's mean loss by k * n_j / T.
"""

from __future__ import annotations

import torch

from dtr_scale.mtl.clustering import Interval, validate_intervals

SAMPLING_CHOICES = ("auto", "stratified", "uniform")


def equal_sizes(clusters: list[Interval]) -> bool:
    """True for ANT's uniform intervals (sizes differ by at most one), where stratified == uniform t."""
    sizes = [right - left + 1 for left, right in clusters]
    return max(sizes) - min(sizes) <= 1


def resolve_sampling(
    mode: str, clusters: list[Interval] | None, num_timesteps: int, uniform_density: bool = True
) -> bool:
    """`mtl.sampling` -> stratify or not. auto: stratify only equal-size clusters under a uniform density of t
    (ANT's official code only stratifies its uniform intervals; there stratifying keeps t's density);
    otherwise t is drawn from its density (DDPM: U{0..T-1}; flow: flow.time_sampling) and each cluster takes
    the samples that fall in it. stratified with unequal clusters is allowed, with one warning that states the
    marginal of t (with a non-uniform density of flow times, stratifying always changes the marginal)."""
    import warnings

    if mode not in SAMPLING_CHOICES:
        raise ValueError(f"mtl.sampling must be one of {', '.join(SAMPLING_CHOICES)}, got {mode!r}")
    if clusters is None or len(clusters) < 2 or mode == "uniform":
        return False
    if mode == "auto":
        return uniform_density and equal_sizes(clusters)
    if not equal_sizes(clusters):
        k = len(clusters)
        shares = ", ".join(
            f"[{left}, {right}]: {100 / k:.1f}% of samples for {100 * (right - left + 1) / num_timesteps:.1f}% of t"
            for left, right in clusters
        )
        warnings.warn(
            f"mtl.sampling=stratified with unequal clusters: each cluster gets 1/{k} of every micro-batch, so "
            f"p(t) = 1 / ({k} * n_j) instead of 1/{num_timesteps} ({shares}); mtl.sampling=auto keeps t uniform",
            UserWarning,
            stacklevel=2,
        )
    return True


class TimestepSampler:
    """Draws (t, cluster_idx) for a micro-batch.

    ``clusters=None``: t ~ U{0..T-1}, one cluster (k = 1, cluster_idx all 0). With clusters, stratified
    (the default; ``stratified=True``): slot g in cluster g mod k (batch_size / k each for consecutive slots),
    t uniform within the cluster (see the module docstring for the marginal of t); ``stratified=False``: t ~ U{0..T-1} and cluster_idx
    the cluster each t falls in (some clusters may get no sample in a micro-batch).
    """

    def __init__(
        self, num_timesteps: int, clusters: list[Interval] | None = None, stratified: bool | None = None
    ) -> None:
        if num_timesteps < 1:
            raise ValueError(f"num_timesteps must be >= 1, got {num_timesteps}")
        self.num_timesteps = num_timesteps
        self.stratified = (clusters is not None) if stratified is None else bool(stratified and clusters)
        if clusters is None:
            clusters = [(0, num_timesteps - 1)]
        self.clusters = validate_intervals(clusters, num_timesteps, source="TimestepSampler clusters")
        self.num_clusters = len(self.clusters)
        self._starts = torch.tensor([left for left, _ in self.clusters], dtype=torch.long)
        self._sizes = torch.tensor([right - left + 1 for left, right in self.clusters], dtype=torch.long)
        # t -> index of its cluster
        self.cluster_of = torch.repeat_interleave(torch.arange(self.num_clusters), self._sizes)
        self._tables: dict[torch.device, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}

    def _tables_on(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(cluster_of, starts, sizes) on ``device``, copied there once (no copy per micro-batch)."""
        device = torch.device(device)
        if device not in self._tables:
            self._tables[device] = (
                self.cluster_of.to(device),
                self._starts.to(device),
                self._sizes.to(device),
            )
        return self._tables[device]

    def check_batch_size(self, micro_batch_size: int) -> None:
        """Raise a clear error (at config time, ideally) if a micro-batch cannot be split evenly."""
        if self.stratified and micro_batch_size % self.num_clusters != 0:
            raise ValueError(
                f"stratified timestep sampling needs train.micro_batch_size divisible by the number of "
                f"clusters: micro_batch_size={micro_batch_size}, k (mtl.num_clusters)={self.num_clusters}"
            )

    def sample(
        self, batch_size: int, generator: torch.Generator | None = None, device: torch.device | str = "cpu"
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(t, cluster_idx), both LongTensor (batch_size,) on ``device``: `from_uniform` of u ~ U[0, 1) float64
        drawn on the generator's device (CPU when no generator is given), for slots 0..batch_size-1, so a seeded
        CPU generator gives the same timesteps whatever ``device`` is."""
        self.check_batch_size(batch_size)
        draw_device = generator.device if generator is not None else torch.device("cpu")
        u = torch.rand(batch_size, generator=generator, device=draw_device, dtype=torch.float64)
        t, cluster_idx = self.from_uniform(u, torch.arange(batch_size, device=draw_device))
        return t.to(device), cluster_idx.to(device)

    def from_uniform(self, u: torch.Tensor, slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The timesteps of samples whose uniform draws are u (float64 in [0, 1)) and whose slots in the global
        batch are `slots` (long): (t, cluster_idx), LongTensor, on u's device. The one place a uniform becomes a
        timestep, so a training step's timesteps are a pure function of its per-slot draws (train/draws.py).

        Uniform: t = floor(u * T). Stratified: slot g belongs to cluster g mod k (so every k consecutive slots of
        the global batch hold one sample of each cluster, whatever the world size) and t = start_j +
        floor(u * n_j), uniform inside the cluster (exact for any n_j <= T in float64).
        """
        cluster_of, starts, sizes = self._tables_on(u.device)
        if not self.stratified:
            t = torch.minimum(
                (u * self.num_timesteps).long(), torch.tensor(self.num_timesteps - 1, device=u.device)
            )
            return t, cluster_of[t]
        cluster_idx = slots.to(u.device) % self.num_clusters
        size = sizes[cluster_idx]
        t = starts[cluster_idx] + torch.minimum((u * size).long(), size - 1)
        return t, cluster_idx
