"""Loss balancers: turn the k per-cluster losses l_k into the one scalar that is trained.

One interface (``build(name, k, ...)``, names ``none``, ``uw``, ``nash``, ``pcgrad``; docs/ant-and-dtr.md). A
balancer is an ``nn.Module`` that lives inside the module DeepSpeed wraps, so UW's s is a model
parameter that DeepSpeed reduces and shards like every other one. Call the module itself,
``balancer(cluster_means, counts)`` (the same as ``combine``), inside the wrapped forward so that
ZeRO-3 gathers s for it.

- ``none``: the count-weighted mean of the cluster means, i.e. the plain sample mean of the loss.
- ``uw`` (Kendall et al. 2018, as used by ANT, NeurIPS 2023): learnable s in R^k, init 0,
  L = sum_k 0.5 * (exp(-s_k) * l_k / k + s_k) over the clusters present in the micro-batch; for fixed
  l_k its minimiser is s_k = log(l_k / k). s has its own optimizer group (lr 0.025, no weight decay).
- ``nash`` (Navon et al. 2022, Nash-MTL) and ``pcgrad`` (Yu et al. 2020): both update directions are
  sum_m w_m g_m for a weight vector w that depends only on the Gram matrix G of the global
  per-cluster gradients (``gram.global_cluster_gram_from_fn``, called by train/step.py's ``cluster_gram``). Every ``update_every`` steps the trainer
  computes G and calls ``update_from_gram(G)``; in between w is held. The training loss is
  (1/k) * sum_k w_k l_k: the 1/k follows the official ANT code (Nash: ``loss / len(losses)``;
  PCGrad: each l_k divided by the number of clusters), so that w = 1 (the initial value, and
  PCGrad's result when no gradients conflict) trains on the plain mean loss.

``weights()`` is always the coefficient of l_k in the training loss (uw: 0.5 exp(-s_k) / k;
nash/pcgrad: w_k / k; none: 1/k, exact when every cluster has the same count).
"""

from __future__ import annotations

import torch
from torch import nn

from dtr_scale.mtl.gram import cosine_from_gram
from dtr_scale.mtl.gram_weights import nash_weights, pcgrad_weights

BALANCERS = ("none", "uw", "nash", "pcgrad")
__all__ = [
    "BALANCERS", "Balancer", "GramBalancer", "NashMTL", "NoBalancer", "PCGrad", "UncertaintyWeighting", "build",
    "nash_weights", "pcgrad_weights",
]  # fmt: skip


class Balancer(nn.Module):
    """Common interface; see the module docstring. Subclasses implement ``combine`` and ``weights``."""

    name = "none"
    needs_gram = False
    update_every = 0

    def __init__(self, k: int) -> None:
        super().__init__()
        if k < 1:
            raise ValueError(f"number of clusters k must be >= 1, got {k}")
        self.k = k

    def forward(self, cluster_means: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """The scalar training loss from the cluster means (k,) and counts (k,) (see `combine`)."""
        return self.combine(cluster_means, counts)

    def combine(self, cluster_means: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """The scalar loss the balancer makes of cluster means (k,) and their counts (k,); differentiable."""
        raise NotImplementedError

    def weights(self) -> torch.Tensor:
        """Current per-cluster loss weights (k,) float64 (for logging and convert)."""
        raise NotImplementedError

    def should_update(self, step: int) -> bool:
        """Whether the trainer must compute G and call ``update_from_gram`` at optimizer step ``step``."""
        return self.needs_gram and step % self.update_every == 0

    def update_from_gram(self, G: torch.Tensor) -> None:
        """Update the weights from the (k, k) Gram of the per-cluster gradients (Nash/PCGrad only)."""
        raise RuntimeError(f"balancer {self.name!r} does not use per-cluster gradients (needs_gram is False)")

    def param_groups(self, base_lr: float) -> list[dict]:
        """Extra optimizer parameter groups (only uw has parameters)."""
        return []

    def log_scalars(self) -> dict[str, float]:
        """TensorBoard scalars: mtl/weight_j per cluster (and method-specific ones)."""
        return {f"mtl/weight_{j}": float(w) for j, w in enumerate(self.weights())}

    def _check(self, cluster_means: torch.Tensor, counts: torch.Tensor) -> None:
        if cluster_means.shape != (self.k,) or counts.shape != (self.k,):
            raise ValueError(
                f"balancer {self.name!r} expects cluster_means and counts of shape ({self.k},), got "
                f"{tuple(cluster_means.shape)} and {tuple(counts.shape)}"
            )


class NoBalancer(Balancer):
    """Plain mean loss: sum_k n_k l_k / sum_k n_k."""

    name = "none"

    def combine(self, cluster_means: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """The plain mean over all samples: sum_k n_k l_k / sum_k n_k."""
        self._check(cluster_means, counts)
        counts = counts.to(cluster_means)
        return (cluster_means * counts).sum() / counts.sum().clamp(min=1)

    def weights(self) -> torch.Tensor:
        """1/k each (every sample counts the same)."""
        return torch.full((self.k,), 1.0 / self.k, dtype=torch.float64)


class UncertaintyWeighting(Balancer):
    """ANT-UW: L = sum_k 0.5 * (exp(-s_k) * l_k / k + s_k) over present clusters (Kendall et al. 2018)."""

    name = "uw"

    def __init__(self, k: int, lr: float = 0.025) -> None:
        super().__init__(k)
        self.lr = lr
        self.s = nn.Parameter(torch.zeros(k))

    def combine(self, cluster_means: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """ANT-UW (Kendall et al. 2018, ANT Eq. 6): sum over present k of 0.5 (exp(-s_k) l_k / k + s_k)."""
        self._check(cluster_means, counts)
        s = self.s.to(cluster_means.dtype)
        terms = 0.5 * (torch.exp(-s) * cluster_means / self.k + s)
        # an absent cluster has l_k = 0 and would only push its s_k down: leave it out
        return torch.where(counts > 0, terms, torch.zeros_like(terms)).sum()

    def weights(self) -> torch.Tensor:
        """0.5 exp(-s_k) / k, the effective weight of l_k."""
        return 0.5 * torch.exp(-self._full_s()) / self.k

    def param_groups(self, base_lr: float) -> list[dict]:
        # s gets ANT's own learning rate whatever the model's base_lr is
        """s in its own group at ANT's learning rate (mtl.uw_lr), no weight decay."""
        return [{"params": [self.s], "lr": self.lr, "weight_decay": 0.0}]

    def log_scalars(self) -> dict[str, float]:
        """mtl/weight_j and the log-variances mtl/uw_s_j."""
        scalars = super().log_scalars()
        scalars.update({f"mtl/uw_s_{j}": float(v) for j, v in enumerate(self._full_s())})
        return scalars

    def _full_s(self) -> torch.Tensor:
        """s as a whole float64 CPU tensor, gathering it first if ZeRO-3 has partitioned it."""
        if hasattr(self.s, "ds_id"):
            import deepspeed

            with deepspeed.zero.GatheredParameters([self.s]):
                return self.s.detach().to(device="cpu", dtype=torch.float64).clone()
        return self.s.detach().to(device="cpu", dtype=torch.float64)


class GramBalancer(Balancer):
    """Shared state of nash/pcgrad: raw weights w (float64, init ones), the last G, update count.

    The state lives outside parameters and buffers (in ``get_extra_state``) so that DeepSpeed's bf16
    cast of the module never rounds it; it is still part of ``state_dict()`` and so of checkpoints.
    """

    needs_gram = True

    def __init__(self, k: int, update_every: int) -> None:
        super().__init__(k)
        if update_every < 1:
            raise ValueError(f"{self.name}: update_every must be >= 1, got {update_every}")
        self.update_every = update_every
        self._w = torch.ones(k, dtype=torch.float64)
        self._gram: torch.Tensor | None = None
        self.num_updates = 0
        self._cached: torch.Tensor | None = None

    def _solve(self, G: torch.Tensor, prev: torch.Tensor) -> torch.Tensor:
        """Weights for the (present clusters') Gram G; prev: their current weights."""
        raise NotImplementedError

    def update_from_gram(self, G: torch.Tensor) -> None:
        """Solve for new weights from G (k, k) on the clusters present (non-zero diagonal); absent clusters
        keep theirs."""
        G = torch.as_tensor(G, dtype=torch.float64).cpu()
        if G.shape != (self.k, self.k):
            raise ValueError(
                f"{self.name}: Gram matrix must have shape ({self.k}, {self.k}), got {tuple(G.shape)}"
            )
        # A cluster with no sample in the update (possible with uniform t sampling) has a zero gradient and
        # a zero row in G: solve for the present clusters only and keep the absent ones' weights as they were.
        present = torch.diagonal(G) > 0
        w = self._w.clone()
        if present.any():
            index = torch.nonzero(present).flatten()
            w[index] = self._solve(G[index][:, index], self._w[index]).to(torch.float64)
        self._w = w
        self._gram = G.clone()
        self.num_updates += 1
        self._cached = None

    def combine(self, cluster_means: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """sum_k (w_k / k) l_k with the last solved weights w (constant between updates)."""
        self._check(cluster_means, counts)
        if (
            self._cached is None
            or self._cached.device != cluster_means.device
            or self._cached.dtype != cluster_means.dtype
        ):
            self._cached = (self._w / self.k).to(device=cluster_means.device, dtype=cluster_means.dtype)
        return (self._cached * cluster_means).sum()

    def weights(self) -> torch.Tensor:
        """w / k, the weight each cluster loss gets."""
        return self._w / self.k

    def cosine_matrix(self) -> torch.Tensor | None:
        """Cosines of the per-cluster gradients at the last update (for a TensorBoard image)."""
        return None if self._gram is None else cosine_from_gram(self._gram)

    def log_scalars(self) -> dict[str, float]:
        """Weights, the raw w and the last Gram's gradient cosines."""
        scalars = super().log_scalars()
        scalars.update({f"mtl/{self.name}_w_{j}": float(v) for j, v in enumerate(self._w)})
        cos = self.cosine_matrix()
        if cos is not None:
            for i in range(self.k):
                for j in range(i + 1, self.k):
                    scalars[f"mtl/grad_cos_{i}_{j}"] = float(cos[i, j])
        return scalars

    def get_extra_state(self) -> dict:
        """Weights, last Gram and update count (saved by the checkpointer, not DeepSpeed)."""
        return {
            "w": self._w.clone(),
            "gram": None if self._gram is None else self._gram.clone(),
            "num_updates": self.num_updates,
        }

    def set_extra_state(self, state: dict) -> None:
        """Restore `get_extra_state`."""
        w = torch.as_tensor(state["w"], dtype=torch.float64)
        if w.shape != (self.k,):
            raise ValueError(f"{self.name} balancer state has {w.shape[0]} clusters, this run has k={self.k}")
        self._w = w.clone()
        self._gram = (
            None if state["gram"] is None else torch.as_tensor(state["gram"], dtype=torch.float64).clone()
        )
        self.num_updates = int(state["num_updates"])
        self._cached = None


class NashMTL(GramBalancer):
    """Nash-MTL weights (``nash_weights``), warm-started from the previous ones; update every 25 steps."""

    name = "nash"

    def __init__(self, k: int, update_every: int = 25) -> None:
        super().__init__(k, update_every)

    def _solve(self, G: torch.Tensor, prev: torch.Tensor) -> torch.Tensor:
        return nash_weights(G, prev=prev if self.num_updates > 0 else None)


class PCGrad(GramBalancer):
    """PCGrad weights (``pcgrad_weights``) with random projection orders; update every step.

    The orders come from a CPU generator seeded with ``seed`` -- the same on every rank, so every
    rank derives the same w from the same all-reduced G. Its state is checkpointed.
    """

    name = "pcgrad"

    def __init__(self, k: int, update_every: int = 1, seed: int = 0) -> None:
        super().__init__(k, update_every)
        self.generator = torch.Generator().manual_seed(seed)

    def _solve(self, G: torch.Tensor, prev: torch.Tensor) -> torch.Tensor:
        return pcgrad_weights(G, generator=self.generator)

    def get_extra_state(self) -> dict:
        """GramBalancer's state plus the projection-order generator's state."""
        state = super().get_extra_state()
        state["generator"] = self.generator.get_state()
        return state

    def set_extra_state(self, state: dict) -> None:
        """Restore `get_extra_state`."""
        super().set_extra_state(state)
        self.generator.set_state(state["generator"])


def build(name: str, k: int, **kwargs) -> Balancer:
    """Balancer ``name`` (config ``mtl.method``: none|uw|nash|pcgrad) for k clusters.

    kwargs: uw ``lr`` (0.025); nash ``update_every`` (25); pcgrad ``update_every`` (1), ``seed`` (0).
    """
    classes: dict[str, type[Balancer]] = {
        "none": NoBalancer,
        "uw": UncertaintyWeighting,
        "nash": NashMTL,
        "pcgrad": PCGrad,
    }
    if name not in classes:
        raise ValueError(f"mtl.method must be one of {', '.join(BALANCERS)}, got {name!r}")
    try:
        return classes[name](k, **kwargs)
    except TypeError as err:
        raise ValueError(f"mtl.method {name!r}: bad option ({err})") from None
