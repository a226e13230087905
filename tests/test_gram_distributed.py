"""The Gram matrix of global per-cluster gradients, on one process and on two (gloo, 127.0.0.1)."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from dtr_scale.distributed import free_port
from dtr_scale.mtl import gram as gram_module
from dtr_scale.mtl.cluster_losses import ClusterLossBuffer, per_cluster_mean
from dtr_scale.mtl.gram import (
    cosine_from_gram,
    global_cluster_gram,
    global_cluster_gram_from_fn,
    release_gram_workspace,
)

K = 3
# the union batch: 12 samples; rank r of 2 takes samples r::2
UNION_IDX_EQUAL = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2])  # each rank: 2 per cluster
UNION_IDX_UNEQUAL = torch.tensor([0, 0, 0, 1, 0, 1, 1, 1, 2, 1, 2, 1])  # rank 1 has no cluster 2


def tiny_model() -> torch.nn.Module:
    torch.manual_seed(0)
    # 5*6 + 6 + 6 + 1 = 43 parameters: odd, so the two ranks' slices differ in length
    return torch.nn.Sequential(torch.nn.Linear(5, 6), torch.nn.Tanh(), torch.nn.Linear(6, 1))


def union_batch() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    return torch.randn(12, 5, generator=gen), torch.randn(12, generator=gen)


def per_sample_loss(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return (model(x).squeeze(1) - y) ** 2


def reference_gram(cluster_idx: torch.Tensor, model: torch.nn.Module | None = None) -> torch.Tensor:
    """Gram of the per-cluster gradients of the union batch, from explicit gradient vectors."""
    model = tiny_model() if model is None else model
    x, y = union_batch()
    means, _ = per_cluster_mean(per_sample_loss(model, x, y), cluster_idx, K)
    rows = []
    for i in range(K):
        grads = torch.autograd.grad(means[i], list(model.parameters()), retain_graph=True)
        rows.append(torch.cat([g.reshape(-1) for g in grads]).double())
    grads = torch.stack(rows)
    return grads @ grads.T


def _worker(rank: int, world: int, port: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        model = tiny_model()
        x, y = union_batch()
        x, y = x[rank::world], y[rank::world]
        out = {}
        for name, union_idx, pass_counts in (
            ("equal", UNION_IDX_EQUAL, False),
            ("unequal", UNION_IDX_UNEQUAL, True),
        ):
            idx = union_idx[rank::world]
            loss = per_sample_loss(model, x, y)
            means, counts = per_cluster_mean(loss, idx, K)
            out[name] = global_cluster_gram(
                list(model.parameters()), means, counts=counts if pass_counts else None
            )
            # the graph was retained: the training loss can still be back-propagated
            loss.mean().backward()
            buffer = ClusterLossBuffer(K)
            buffer.add(loss.detach(), idx)
            out[f"{name}_buffer"] = buffer.reduce()
            out[f"{name}_from_fn"] = global_cluster_gram_from_fn(
                list(model.parameters()),
                lambda i, idx=idx: per_sample_loss(model, x[idx == i], y[idx == i]).mean(),
                K,
                counts=counts if pass_counts else None,
            )
        # backends without reduce-scatter: all-reduce of the whole gradient, then the slice is copied
        real_get_backend = gram_module.dist.get_backend
        gram_module.dist.get_backend = lambda group=None: "no-reduce-scatter"
        try:
            idx = UNION_IDX_UNEQUAL[rank::world]
            means, counts = per_cluster_mean(per_sample_loss(model, x, y), idx, K)
            out["unequal_all_reduce"] = global_cluster_gram(list(model.parameters()), means, counts=counts)
        finally:
            gram_module.dist.get_backend = real_get_backend
        torch.save(out, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def world2_results(tmp_path_factory) -> dict:
    out_dir = tmp_path_factory.mktemp("gram_world2")
    mp.spawn(_worker, args=(2, free_port(), str(out_dir)), nprocs=2, join=True)
    return {rank: torch.load(out_dir / f"rank{rank}.pt", weights_only=True) for rank in (0, 1)}


def test_single_process_gram_equals_explicit_gradients() -> None:
    model = tiny_model()
    x, y = union_batch()
    means, _ = per_cluster_mean(per_sample_loss(model, x, y), UNION_IDX_UNEQUAL, K)
    G = global_cluster_gram(list(model.parameters()), means)
    assert G.dtype == torch.float64 and G.shape == (K, K)
    torch.testing.assert_close(G, reference_gram(UNION_IDX_UNEQUAL), rtol=1e-6, atol=1e-9)


@pytest.mark.multiprocess
def test_two_process_gram_equals_single_process_gram_of_the_union(world2_results: dict) -> None:
    expected = reference_gram(UNION_IDX_EQUAL)
    for rank in (0, 1):
        torch.testing.assert_close(world2_results[rank]["equal"], expected, rtol=1e-6, atol=1e-9)


@pytest.mark.multiprocess
def test_two_process_gram_with_unequal_counts_weights_ranks_by_count(world2_results: dict) -> None:
    expected = reference_gram(UNION_IDX_UNEQUAL)
    for rank in (0, 1):
        torch.testing.assert_close(world2_results[rank]["unequal"], expected, rtol=1e-6, atol=1e-9)


@pytest.mark.multiprocess
def test_two_process_gram_from_per_cluster_forwards_equals_the_union_gram(world2_results: dict) -> None:
    for name, union_idx in (("equal", UNION_IDX_EQUAL), ("unequal", UNION_IDX_UNEQUAL)):
        expected = reference_gram(union_idx)
        for rank in (0, 1):
            torch.testing.assert_close(
                world2_results[rank][f"{name}_from_fn"], expected, rtol=1e-6, atol=1e-9
            )


@pytest.mark.multiprocess
def test_two_process_gram_without_reduce_scatter_equals_the_union_gram(world2_results: dict) -> None:
    expected = reference_gram(UNION_IDX_UNEQUAL)
    for rank in (0, 1):
        torch.testing.assert_close(world2_results[rank]["unequal_all_reduce"], expected, rtol=1e-6, atol=1e-9)


def test_repeated_gram_reuses_its_buffers_and_follows_a_change_of_model() -> None:
    model = tiny_model()
    x, y = union_batch()

    def gram_of(module: torch.nn.Module, inputs: torch.Tensor) -> torch.Tensor:
        means, _ = per_cluster_mean(per_sample_loss(module, inputs, y), UNION_IDX_UNEQUAL, K)
        return global_cluster_gram(list(module.parameters()), means)

    first = gram_of(model, x)
    # a model with other shapes in between must not read the first model's cached layout
    torch.manual_seed(3)
    other = torch.nn.Sequential(torch.nn.Linear(5, 2), torch.nn.Tanh(), torch.nn.Linear(2, 1))
    other_gram = gram_of(other, x)
    again = gram_of(model, x)
    assert torch.equal(first, again)
    torch.testing.assert_close(other_gram, reference_gram(UNION_IDX_UNEQUAL, other), rtol=1e-6, atol=1e-9)
    release_gram_workspace()
    torch.testing.assert_close(gram_of(model, x), first, rtol=0, atol=0)


def test_scaled_bf16_gradient_is_upcast_before_scaling() -> None:
    grad = torch.tensor([1.0 + 2**-7, 3.0, -0.3], dtype=torch.bfloat16)
    out = torch.empty(3)
    gram_module._write_scaled(out, grad, 1 / 3, torch.tensor(1 / 3))
    # computed in float32, not bf16: equal to upcasting first, and not to the bf16 product
    torch.testing.assert_close(out, grad.float() * torch.tensor(1 / 3), rtol=0, atol=0)
    assert not torch.equal(out, (grad * torch.tensor(1 / 3)).float())


def test_single_process_gram_from_per_cluster_forwards_equals_the_retained_graph_gram() -> None:
    model = tiny_model()
    x, y = union_batch()
    G = global_cluster_gram_from_fn(
        list(model.parameters()),
        lambda i: per_sample_loss(model, x[UNION_IDX_UNEQUAL == i], y[UNION_IDX_UNEQUAL == i]).mean(),
        K,
    )
    torch.testing.assert_close(G, reference_gram(UNION_IDX_UNEQUAL), rtol=1e-6, atol=1e-9)


@pytest.mark.multiprocess
def test_two_process_buffer_reduces_to_the_union_means(world2_results: dict) -> None:
    model = tiny_model()
    x, y = union_batch()
    with torch.no_grad():
        loss = per_sample_loss(model, x, y).double()
    # the union's cluster means, by masks (cluster 2: samples 8 and 10, both on rank 0)
    means = torch.stack([loss[UNION_IDX_UNEQUAL == j].mean() for j in range(K)])
    counts = torch.tensor([4.0, 6.0, 2.0], dtype=torch.float64)  # counted by hand from UNION_IDX_UNEQUAL
    for rank in (0, 1):
        got_means, got_counts = world2_results[rank]["unequal_buffer"]
        torch.testing.assert_close(got_means, means, rtol=1e-6, atol=1e-9)
        torch.testing.assert_close(got_counts, counts)


def test_cosine_from_gram_is_zero_for_a_zero_gradient() -> None:
    grads = torch.tensor([[3.0, 0.0], [0.0, 0.0], [1.0, 1.0]], dtype=torch.float64)
    cos = cosine_from_gram(grads @ grads.T)
    torch.testing.assert_close(cos[0, 2], torch.tensor(2**-0.5, dtype=torch.float64))
    assert cos[1].abs().sum().item() == 0.0 and cos[0, 0].item() == pytest.approx(1.0)


def test_gram_refuses_zero3_partitioned_parameters() -> None:
    weight = torch.nn.Parameter(torch.ones(3))
    weight.ds_id, weight.ds_tensor = 0, torch.ones(1)  # what DeepSpeed ZeRO-3 attaches
    with pytest.raises(ValueError, match="ZeRO-3 partitions"):
        global_cluster_gram([weight], (weight * 2).sum().reshape(1))
