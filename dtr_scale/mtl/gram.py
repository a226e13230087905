"""The k x k Gram matrix G[i, j] = <g_i, g_j> of the global per-cluster gradients, without ever
holding a k x P matrix on one rank.

g_i is the gradient of cluster i's mean loss over the whole global batch (all ranks), i.e. the
rank-average of the local gradients (DESIGN §5). For each cluster in turn this rank computes its local
gradient with ``torch.autograd.grad`` (graph retained), flattens it into one reused P-vector, averages
it across ranks with an all-reduce, and keeps only its own contiguous 1/world slice. The partial Gram
of the slices (float64) is then all-reduced: sum over ranks of partial dot products = exact dot
products. Memory: k * P / world for the slices plus one P-vector.

Works with plain DDP-style data parallelism and DeepSpeed ZeRO 0/1/2, where every rank holds whole
parameters. ZeRO-3 partitions the parameters themselves, so autograd.grad w.r.t. them does not give
whole gradients; ``global_cluster_gram`` refuses such parameters with an explanation.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist

# float64 conversion of the slices happens in chunks of this many elements to bound extra memory
_CHUNK = 1 << 22


def _world(group: dist.ProcessGroup | None) -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(group), dist.get_world_size(group)
    return 0, 1


def _check_not_zero3(params: list[torch.Tensor]) -> None:
    if any(hasattr(p, "ds_id") and hasattr(p, "ds_tensor") for p in params):
        raise ValueError(
            "mtl.method nash/pcgrad compute per-cluster gradients with torch.autograd.grad, which needs whole "
            "parameters on every rank; DeepSpeed ZeRO-3 partitions them (each rank holds 1/world of each), so "
            "the gradients would be wrong. Use deepspeed.zero_stage 0, 1 or 2 with nash/pcgrad, or mtl.method "
            "uw/none with ZeRO-3."
        )


def global_cluster_gram(
    params: list[torch.Tensor],
    cluster_losses: torch.Tensor,
    group: dist.ProcessGroup | None = None,
    counts: torch.Tensor | None = None,
) -> torch.Tensor:
    """Exact Gram (k, k) float64 of the global per-cluster gradients of ``cluster_losses`` (k,).

    Call on every rank of ``group`` with this rank's differentiable per-cluster mean losses; the graph
    is retained so the caller can still back-propagate its training loss. Each cluster costs one
    backward pass through the whole micro-batch (see ``global_cluster_gram_from_fn`` for the cheaper
    per-cluster forward). Parameters that a cluster loss does not reach contribute zeros.

    ``counts`` (k,), optional: this rank's number of samples per cluster. Without it the ranks'
    gradients are averaged with equal weights, which is the gradient of the union's cluster mean when
    every rank has the same count per cluster (stratified sampling). With it, rank r's gradient is
    weighted by n_{r,i} / sum_r n_{r,i}, which is exact for any counts.
    """
    if cluster_losses.ndim != 1:
        raise ValueError(f"cluster_losses must have shape (k,), got {tuple(cluster_losses.shape)}")
    return _partitioned_gram(
        params,
        cluster_losses.shape[0],
        lambda i: cluster_losses[i],
        retain_graph=True,
        device=cluster_losses.device,
        group=group,
        counts=counts,
    )


def global_cluster_gram_from_fn(
    params: list[torch.Tensor],
    cluster_loss_fn: Callable[[int], torch.Tensor],
    k: int,
    group: dist.ProcessGroup | None = None,
    counts: torch.Tensor | None = None,
) -> torch.Tensor:
    """Like ``global_cluster_gram``, with cluster i's loss from ``cluster_loss_fn(i)``: a closure that
    runs the forward on cluster i's samples only and returns their mean loss.

    The k forwards and backwards then cost about one forward and backward of the whole micro-batch
    (instead of k backwards of it), and no graph is kept between clusters. Same result as
    ``global_cluster_gram`` for a model whose per-sample outputs do not depend on the rest of the
    batch, given the same randomness (DiT's label dropout draws anew in each forward).
    """
    device = next((p.device for p in params), torch.device("cpu"))
    return _partitioned_gram(params, k, cluster_loss_fn, False, device, group, counts)


def _partitioned_gram(
    params: list[torch.Tensor],
    k: int,
    loss_of: Callable[[int], torch.Tensor],
    retain_graph: bool,
    device: torch.device,
    group: dist.ProcessGroup | None,
    counts: torch.Tensor | None,
) -> torch.Tensor:
    params = [p for p in params if p.requires_grad]
    _check_not_zero3(params)
    rank, world = _world(group)
    distributed = world > 1
    total = sum(p.numel() for p in params)
    # this rank's contiguous slice [start, stop) of the flattened gradient
    per_rank = -(-total // world)
    start, stop = min(rank * per_rank, total), min((rank + 1) * per_rank, total)

    if counts is None:
        rank_weight = torch.full((k,), 1.0 / world, dtype=torch.float64, device=device)
    else:
        local = counts.to(device=device, dtype=torch.float64)
        global_counts = local.clone()
        if distributed:
            dist.all_reduce(global_counts, group=group)
        rank_weight = torch.where(
            global_counts > 0, local / global_counts.clamp(min=1.0), torch.zeros_like(local)
        )

    flat = torch.empty(total, dtype=torch.float32, device=device)
    slices = torch.empty(k, stop - start, dtype=torch.float32, device=device)
    for i in range(k):
        grads = torch.autograd.grad(loss_of(i), params, retain_graph=retain_graph, allow_unused=True)
        offset = 0
        for p, g in zip(params, grads):
            n = p.numel()
            if g is None:
                flat[offset : offset + n].zero_()
            else:
                flat[offset : offset + n].copy_(g.reshape(-1))
            offset += n
        flat.mul_(rank_weight[i].to(flat.dtype))
        if distributed:
            dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=group)
        slices[i].copy_(flat[start:stop])
    del flat

    gram = torch.zeros(k, k, dtype=torch.float64, device=device)
    for lo in range(0, stop - start, _CHUNK):
        chunk = slices[:, lo : lo + _CHUNK].to(torch.float64)
        gram += chunk @ chunk.T
    if distributed:
        dist.all_reduce(gram, op=dist.ReduceOp.SUM, group=group)
    return gram.cpu()


def cosine_from_gram(gram: torch.Tensor) -> torch.Tensor:
    """Cosine similarities G[i, j] / (|g_i| |g_j|); 0 where a gradient is zero."""
    norms = gram.diagonal().clamp(min=0).sqrt()
    denom = norms[:, None] * norms[None, :]
    return torch.where(
        denom > 0, gram / torch.where(denom > 0, denom, torch.ones_like(denom)), torch.zeros_like(gram)
    )
