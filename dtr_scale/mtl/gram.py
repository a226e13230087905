"""The k x k Gram matrix G[i, j] = <g_i, g_j> of the global per-cluster gradients, without ever
holding a k x P matrix on one rank.

g_i is the gradient of cluster i's mean loss over the whole global batch (all ranks), i.e. the
rank-average of the local gradients (ANT's per-cluster gradients; docs/ant-and-dtr.md). For each cluster in turn this rank computes its local
gradient with ``torch.autograd.grad``, writes it (scaled by the rank's weight) into one reused
P-vector, and a reduce-scatter leaves this rank the sum over ranks of its own contiguous 1/world slice.
The partial Gram of the slices (float64) is then all-reduced: sum over ranks of partial dot products =
exact dot products. Memory: k * P / world for the slices plus one P-vector (none at world 1, where the
gradients go straight into the slice rows); on CPU these buffers are kept for the next update.

Works with plain DDP-style data parallelism and DeepSpeed ZeRO 0/1/2, where every rank holds whole
parameters. ZeRO-3 partitions the parameters themselves, so autograd.grad w.r.t. them does not give
whole gradients; ``global_cluster_gram`` refuses such parameters with an explanation.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist

# columns of the float64 staging block of the partial Gram: k * 32768 * 8 bytes (2 MiB at k = 8) stays
# in cache; converting the whole k x P/world slice matrix at once cost ~2.9 s for DiT-S/2 on CPU, this ~0.45 s
_CHUNK = 1 << 15


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


class _Workspace:
    """Scratch buffers of one Gram computation, laid out once per (parameter shapes, k, world, rank).

    ``slices`` (k, P/world) holds this rank's share of the k global gradients; ``flat`` (P padded to a
    multiple of world) is the whole local gradient that the collective reduces; ``views`` are the
    per-parameter windows autograd's gradients are written into. At world 1 there is no ``flat``: a
    gradient is written straight into its row of ``slices``. ``chunk`` is the float64 staging block of
    the partial Gram (``_CHUNK`` columns), so that the k x P/world slices are never converted at once.
    """

    def __init__(self, shapes: tuple[torch.Size, ...], k: int, rank: int, world: int, device: torch.device):
        sizes = [s.numel() for s in shapes]
        total = sum(sizes)
        self.total = total
        self.per_rank = -(-total // world)
        self.start = min(rank * self.per_rank, total)
        self.stop = min((rank + 1) * self.per_rank, total)
        self.slices = torch.empty(k, self.stop - self.start, dtype=torch.float32, device=device)
        if world > 1:
            # zero padding past P: it takes part in the reduce-scatter and must add nothing
            self.flat = torch.zeros(self.per_rank * world, dtype=torch.float32, device=device)
            self.views = _split_views(self.flat, shapes)
            # receives the reduce-scatter when this rank's slice is shorter than per_rank (last rank)
            self.tail = (
                None
                if self.stop - self.start == self.per_rank
                else torch.empty_like(self.flat[: self.per_rank])
            )
        else:
            self.flat = self.tail = None
            self.rows = [_split_views(self.slices[i], shapes) for i in range(k)]
        self.chunk = torch.empty(
            k, min(_CHUNK, max(self.stop - self.start, 1)), dtype=torch.float64, device=device
        )


def _split_views(buffer: torch.Tensor, shapes: tuple[torch.Size, ...]) -> list[torch.Tensor]:
    views, offset = [], 0
    for shape in shapes:
        n = shape.numel()
        views.append(buffer[offset : offset + n].view(shape))
        offset += n
    return views


# One cached workspace, CPU only: there every fresh k * P/world buffer costs page faults on first touch
# (measured ~0.6 s per update for DiT-S/2, k = 8, about a third of a training step), whereas CUDA's
# caching allocator already recycles freed blocks, and holding the buffers between updates would take
# that memory away from activations for the `update_every - 1` steps in between.
_cached: tuple[tuple, _Workspace] | None = None


def _workspace(
    shapes: tuple[torch.Size, ...], k: int, rank: int, world: int, device: torch.device
) -> _Workspace:
    global _cached
    if device.type != "cpu":
        return _Workspace(shapes, k, rank, world, device)
    key = (shapes, k, rank, world, device)
    if _cached is None or _cached[0] != key:
        _cached = None  # free the old buffers before allocating the new ones
        _cached = (key, _Workspace(shapes, k, rank, world, device))
    return _cached[1]


def release_gram_workspace() -> None:
    """Free the cached CPU buffers (k * P / world + P floats) kept between Gram updates."""
    global _cached
    _cached = None


def _write_scaled(out: torch.Tensor, grad: torch.Tensor | None, scale: float, scale_t: torch.Tensor) -> None:
    """out = scale * grad in float32, bit-identical to copying grad into float32 and then scaling it."""
    if grad is None:
        out.zero_()
    elif scale == 1.0:
        out.copy_(grad)  # x * 1 == x exactly: skip a pass over the gradient
    elif grad.dtype == out.dtype:
        torch.mul(grad, scale_t, out=out)
    else:
        # a bf16/fp16 gradient times a 0-dim float32 tensor would be computed in bf16: upcast first
        out.copy_(grad)
        out.mul_(scale_t)


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

    if counts is None:
        rank_weight = torch.full((k,), 1.0 / world, dtype=torch.float64)
    else:
        local = counts.to(device=device, dtype=torch.float64)
        global_counts = local.clone()
        if distributed:
            dist.all_reduce(global_counts, group=group)
        rank_weight = torch.where(
            global_counts > 0, local / global_counts.clamp(min=1.0), torch.zeros_like(local)
        ).cpu()
    # the float32 factor each gradient is scaled by, as a 0-dim tensor and as a number to test for 1
    weight_t = rank_weight.to(torch.float32).to(device)
    weight = weight_t.cpu().tolist()

    work = _workspace(tuple(p.shape for p in params), k, rank, world, device)
    for i in range(k):
        grads = torch.autograd.grad(loss_of(i), params, retain_graph=retain_graph, allow_unused=True)
        views = work.views if distributed else work.rows[i]
        for view, g in zip(views, grads):
            _write_scaled(view, g, weight[i], weight_t[i])
        del grads
        if distributed:
            _reduce_to_slice(work, i, group)

    # partial Gram of this rank's slices in float64 (products of float32 values are exact in float64),
    # staged through a small reused block instead of converting k x P/world values at once
    gram = torch.zeros(k, k, dtype=torch.float64, device=device)
    width = work.chunk.shape[1]
    for lo in range(0, work.slices.shape[1], width):
        block = work.chunk[:, : min(width, work.slices.shape[1] - lo)]
        block.copy_(work.slices[:, lo : lo + block.shape[1]])
        gram.addmm_(block, block.T)
    if distributed:
        dist.all_reduce(gram, op=dist.ReduceOp.SUM, group=group)
    return gram.cpu()


def _reduce_to_slice(work: _Workspace, i: int, group: dist.ProcessGroup | None) -> None:
    """Sum the ranks' weighted gradients (``work.flat``) and keep this rank's slice in ``slices[i]``.

    A reduce-scatter moves half the data of an all-reduce and writes the slice in place (NCCL and, in
    torch 2.x, gloo have it); other backends all-reduce the whole vector and copy the slice.
    """
    if dist.get_backend(group) in ("nccl", "gloo"):
        row = work.slices[i]
        out = row if work.tail is None else work.tail
        dist.reduce_scatter_tensor(out, work.flat, op=dist.ReduceOp.SUM, group=group)
        if work.tail is not None:  # the last rank's slice is shorter than the padded share
            row.copy_(work.tail[: row.shape[0]])
        work.flat[work.total :].zero_()  # the collective may have used its input as scratch
    else:
        dist.all_reduce(work.flat, op=dist.ReduceOp.SUM, group=group)
        work.slices[i].copy_(work.flat[work.start : work.stop])


def cosine_from_gram(gram: torch.Tensor) -> torch.Tensor:
    """Cosine similarities G[i, j] / (|g_i| |g_j|); 0 where a gradient is zero."""
    norms = gram.diagonal().clamp(min=0).sqrt()
    denom = norms[:, None] * norms[None, :]
    return torch.where(
        denom > 0, gram / torch.where(denom > 0, denom, torch.ones_like(denom)), torch.zeros_like(gram)
    )
