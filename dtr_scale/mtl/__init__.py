"""ANT (Go et al., NeurIPS 2023): timestep clusters as tasks, and the balancing of their losses.

- ``clustering``: interval clustering of the timesteps (dynamic programming) and the cluster file.
- ``sampling``: stratified timestep sampling over the clusters.
- ``cluster_losses``: per-cluster mean losses, and their reduction over micro-batches and ranks.
- ``balancers``: none / uw / nash / pcgrad, one interface (``build``).
- ``gram``: the exact Gram matrix of the global per-cluster gradients, partitioned across ranks.
- ``affinity``: task-affinity matrix of timestep groups from a trained model.
"""

from dtr_scale.mtl.balancers import Balancer, build, nash_weights, pcgrad_weights
from dtr_scale.mtl.cluster_losses import ClusterLossBuffer, per_cluster_mean
from dtr_scale.mtl.clustering import interval_clustering, load_clusters
from dtr_scale.mtl.gram import cosine_from_gram, global_cluster_gram
from dtr_scale.mtl.sampling import TimestepSampler

__all__ = [
    "Balancer",
    "ClusterLossBuffer",
    "TimestepSampler",
    "build",
    "cosine_from_gram",
    "global_cluster_gram",
    "interval_clustering",
    "load_clusters",
    "nash_weights",
    "pcgrad_weights",
    "per_cluster_mean",
]
