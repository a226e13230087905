"""Loss balancers (none, uw, nash, pcgrad), their weights from G, and per-cluster loss reduction."""

from __future__ import annotations

import io
import itertools

import numpy as np
import pytest
import torch

from dtr_scale.mtl.balancers import build, nash_weights, pcgrad_weights
from dtr_scale.mtl.cluster_losses import ClusterLossBuffer, per_cluster_mean


def direct_pcgrad(grads: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """PCGrad as Yu et al. (2020) Algorithm 1 writes it, on explicit gradient vectors."""
    projected = grads.clone()
    for i in range(grads.shape[0]):
        for j in order[i].tolist():
            if j == i:
                continue
            dot = projected[i] @ grads[j]
            if dot < 0:
                projected[i] = projected[i] - dot / (grads[j] @ grads[j]) * grads[j]
    return projected.sum(dim=0)


def conflicting_gradients(k: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    base = torch.randn(30, dtype=torch.float64, generator=gen)
    # a shared component plus large task-specific ones: plenty of negative dot products
    return 0.3 * base + torch.randn(k, 30, dtype=torch.float64, generator=gen)


def saved_and_loaded(state: dict) -> dict:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


# ----------------------------------------------------------------------------- pcgrad


@pytest.mark.parametrize("k", [2, 3, 5, 8])
def test_pcgrad_weights_reproduce_direct_pcgrad_for_a_given_order(k: int) -> None:
    projected = 0
    for seed in range(6):
        grads = conflicting_gradients(k, seed)
        gen = torch.Generator().manual_seed(100 + seed)
        order = torch.stack([torch.randperm(k, generator=gen) for _ in range(k)])
        w = pcgrad_weights(grads @ grads.T, order=order)
        assert w.dtype == torch.float64 and w.shape == (k,)
        projected += not torch.allclose(w, torch.ones(k, dtype=torch.float64))
        torch.testing.assert_close(w @ grads, direct_pcgrad(grads, order), rtol=1e-10, atol=1e-12)
    assert projected >= 2  # the cases really exercise projections


def test_pcgrad_random_orders_come_from_the_generator() -> None:
    k = 4
    grads = conflicting_gradients(k, 7)
    w = pcgrad_weights(grads @ grads.T, generator=torch.Generator().manual_seed(5))
    gen = torch.Generator().manual_seed(5)
    order = torch.stack([torch.randperm(k, generator=gen) for _ in range(k)])
    torch.testing.assert_close(w @ grads, direct_pcgrad(grads, order), rtol=1e-10, atol=1e-12)


def test_pcgrad_without_conflict_is_the_plain_sum() -> None:
    grads = torch.tensor([[1.0, 0.0], [1.0, 1.0], [0.0, 2.0]], dtype=torch.float64)
    torch.testing.assert_close(pcgrad_weights(grads @ grads.T), torch.ones(3, dtype=torch.float64))


def test_pcgrad_refuses_an_order_that_is_not_a_permutation() -> None:
    G = torch.eye(3, dtype=torch.float64)
    with pytest.raises(ValueError, match="permutations of 0..2"):
        pcgrad_weights(G, order=torch.tensor([[0, 1, 1], [0, 1, 2], [2, 1, 0]]))


# ----------------------------------------------------------------------------- nash


@pytest.mark.parametrize("k", [2, 3, 5, 8])
def test_nash_weights_solve_the_bargaining_equation(k: int) -> None:
    for seed in range(4):
        grads = conflicting_gradients(k, seed) * 10.0**seed  # the scale of G must not matter
        G = grads @ grads.T
        w = nash_weights(G)
        assert w.dtype == torch.float64 and bool((w > 0).all())
        G_hat = G / torch.linalg.matrix_norm(G)
        torch.testing.assert_close(G_hat @ w, 1.0 / w, rtol=1e-8, atol=0.0)


def test_nash_weights_of_identical_gradients_are_ones() -> None:
    g = torch.randn(1, 10, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    G = g.repeat(4, 1) @ g.repeat(4, 1).T
    torch.testing.assert_close(nash_weights(G), torch.ones(4, dtype=torch.float64))


def test_nash_weights_warm_start_reaches_the_same_solution() -> None:
    grads = conflicting_gradients(5, 3)
    G = grads @ grads.T
    cold = nash_weights(G)
    warm = nash_weights(G, prev=cold * 1.7)
    torch.testing.assert_close(warm, cold, rtol=1e-8, atol=0.0)


def test_nash_weights_handle_a_near_singular_gram() -> None:
    grads = conflicting_gradients(3, 1)
    grads[1] = grads[0] + 1e-9 * grads[2]  # two almost identical clusters: G is rank-deficient to 1e-18
    G = grads @ grads.T
    w = nash_weights(G)
    G_hat = G / torch.linalg.matrix_norm(G)
    assert bool((w > 0).all())
    torch.testing.assert_close(G_hat @ w, 1.0 / w, rtol=1e-6, atol=0.0)


def test_nash_weights_give_a_zero_gradient_cluster_the_mean_weight() -> None:
    grads = conflicting_gradients(4, 2)
    grads[2] = 0.0
    w = nash_weights(grads @ grads.T)
    active = [0, 1, 3]
    assert w[2].item() == pytest.approx(w[active].mean().item())
    G_hat = (grads @ grads.T)[active][:, active] / torch.linalg.matrix_norm(grads @ grads.T)
    torch.testing.assert_close(G_hat @ w[active], 1.0 / w[active], rtol=1e-8, atol=0.0)


def test_nash_weights_fall_back_to_prev_without_a_solution() -> None:
    g = torch.randn(10, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    grads = torch.stack([g, -g])  # exactly opposite: no w > 0 solves G w = 1/w
    prev = torch.tensor([0.7, 1.3], dtype=torch.float64)
    torch.testing.assert_close(nash_weights(grads @ grads.T, prev=prev), prev)


# ----------------------------------------------------------------------------- balancers


def test_none_balancer_is_the_plain_sample_mean() -> None:
    loss = torch.tensor([1.0, 2.0, 3.0, 4.0, 10.0])
    cluster_idx = torch.tensor([0, 0, 1, 2, 2])
    means, counts = per_cluster_mean(loss, cluster_idx, 4)
    combined = build("none", 4)(means, counts)
    assert combined.item() == pytest.approx(loss.mean().item())


def test_uw_loss_is_the_design_formula_over_present_clusters() -> None:
    uw = build("uw", 3)
    with torch.no_grad():
        uw.s.copy_(torch.tensor([0.5, -1.0, 2.0]))
    means = torch.tensor([2.0, 3.0, 0.0])
    counts = torch.tensor([4, 4, 0])
    expected = sum(0.5 * (np.exp(-s) * loss / 3 + s) for s, loss in [(0.5, 2.0), (-1.0, 3.0)])
    assert uw(means, counts).item() == pytest.approx(expected, rel=1e-6)
    uw(means, counts).backward()
    assert uw.s.grad[2].item() == 0.0  # the absent cluster's s is left alone


def test_uw_s_moves_toward_log_of_loss_over_k() -> None:
    k = 4
    uw = build("uw", k)
    losses = torch.tensor([0.2, 1.0, 3.0, 8.0])
    counts = torch.full((k,), 2)
    target = torch.log(losses / k)
    optimizer = torch.optim.SGD(uw.parameters(), lr=0.5)
    distance = [(uw.s.detach() - target).abs()]
    for _ in range(200):
        optimizer.zero_grad()
        uw(losses, counts).backward()
        optimizer.step()
        distance.append((uw.s.detach() - target).abs())
    assert bool((distance[1] < distance[0]).all())
    torch.testing.assert_close(uw.s.detach(), target, atol=1e-4, rtol=0.0)
    torch.testing.assert_close(uw.weights(), 0.5 * torch.exp(-uw.s.detach().double()) / k)


def test_uw_has_its_own_param_group_and_the_others_none() -> None:
    uw = build("uw", 3)
    (group,) = uw.param_groups(base_lr=1e-4)
    assert group["params"] == [uw.s] and group["lr"] == 0.025 and group["weight_decay"] == 0.0
    for name in ("none", "nash", "pcgrad"):
        assert build(name, 3).param_groups(1e-4) == []
        assert list(build(name, 3).parameters()) == []


@pytest.mark.parametrize("name", ["nash", "pcgrad"])
def test_gram_balancers_start_as_the_mean_and_train_on_weighted_losses(name: str) -> None:
    k = 3
    balancer = build(name, k)
    means = torch.tensor([1.0, 2.0, 6.0], requires_grad=True)
    counts = torch.full((k,), 2)
    assert balancer(means, counts).item() == pytest.approx(3.0)  # w = 1: (1/k) sum l_k
    grads = conflicting_gradients(k, 0)
    G = grads @ grads.T
    balancer.update_from_gram(G)
    w = balancer.weights()  # w_m / k with w the solver's update direction weights
    assert balancer(means, counts).item() == pytest.approx((w * means.detach().double()).sum().item())
    if name == "nash":  # k w solves the bargaining equation of Navon et al.
        G_hat = G / torch.linalg.matrix_norm(G)
        torch.testing.assert_close(G_hat @ (k * w), 1.0 / (k * w), rtol=1e-8, atol=0.0)
    else:  # k w reproduces Algorithm 1 for one of the 6^3 possible projection orders (brute force)
        rows = [torch.tensor(p) for p in itertools.permutations(range(k))]
        candidates = [direct_pcgrad(grads, torch.stack(o)) for o in itertools.product(rows, repeat=k)]
        assert any(torch.allclose((k * w) @ grads, c, rtol=1e-10, atol=1e-12) for c in candidates)
        assert not torch.allclose(k * w, torch.ones(k, dtype=torch.float64))  # a projection happened
    scalars = balancer.log_scalars()
    assert {"mtl/weight_0", f"mtl/{name}_w_2", "mtl/grad_cos_0_1"} <= set(scalars)


def test_update_schedule_defaults() -> None:
    nash, pcgrad, uw = build("nash", 2), build("pcgrad", 2), build("uw", 2)
    assert nash.needs_gram and nash.update_every == 25 and pcgrad.update_every == 1 and not uw.needs_gram
    assert [s for s in range(60) if nash.should_update(s)] == [0, 25, 50]
    assert not any(uw.should_update(s) for s in range(10))
    with pytest.raises(RuntimeError, match="does not use per-cluster gradients"):
        uw.update_from_gram(torch.eye(2))


def test_pcgrad_state_round_trip_continues_the_same_orders() -> None:
    k = 4
    grams = [(g @ g.T) for g in (conflicting_gradients(k, s) for s in range(3))]
    original = build("pcgrad", k, seed=3)
    original.update_from_gram(grams[0])
    state = saved_and_loaded(original.state_dict())
    resumed = build("pcgrad", k, seed=99)
    resumed.load_state_dict(state)
    torch.testing.assert_close(resumed.weights(), original.weights(), rtol=0, atol=0)
    for G in grams[1:]:
        original.update_from_gram(G)
        resumed.update_from_gram(G)
        torch.testing.assert_close(resumed.weights(), original.weights(), rtol=0, atol=0)


def test_nash_state_round_trip_keeps_weights_and_gram() -> None:
    k = 3
    grads = conflicting_gradients(k, 4)
    original = build("nash", k, update_every=5)
    original.update_from_gram(grads @ grads.T)
    resumed = build("nash", k, update_every=5)
    resumed.load_state_dict(saved_and_loaded(original.state_dict()))
    torch.testing.assert_close(resumed.weights(), original.weights(), rtol=0, atol=0)
    torch.testing.assert_close(resumed.cosine_matrix(), original.cosine_matrix(), rtol=0, atol=0)
    assert resumed.num_updates == 1


def test_gram_balancer_state_survives_a_bf16_cast_of_the_module() -> None:
    nash = build("nash", 3)
    grads = conflicting_gradients(3, 5)
    nash.update_from_gram(grads @ grads.T)
    before = nash.weights()
    nash.to(torch.bfloat16)  # what DeepSpeed does to the wrapped module under bf16
    torch.testing.assert_close(nash.weights(), before, rtol=0, atol=0)


def test_build_errors_name_the_config_key() -> None:
    with pytest.raises(ValueError, match="mtl.method must be one of none, uw, nash, pcgrad"):
        build("gradnorm", 3)
    with pytest.raises(ValueError, match="mtl.method 'uw': bad option"):
        build("uw", 3, update_every=4)


# ----------------------------------------------------------------------------- per-cluster losses


def test_per_cluster_mean_of_an_absent_cluster_is_zero_and_never_nan() -> None:
    loss = torch.tensor([1.0, 3.0, 5.0], requires_grad=True)
    means, counts = per_cluster_mean(loss, torch.tensor([0, 0, 2]), 3)
    torch.testing.assert_close(means, torch.tensor([2.0, 0.0, 5.0]))
    assert counts.tolist() == [2, 0, 1]
    means.sum().backward()
    torch.testing.assert_close(loss.grad, torch.tensor([0.5, 0.5, 1.0]))


def test_per_cluster_mean_sums_bf16_losses_in_float32() -> None:
    loss = torch.full((300,), 1.0 + 2**-7, dtype=torch.bfloat16)
    means, _ = per_cluster_mean(loss, torch.zeros(300, dtype=torch.long), 1)
    assert means.dtype == torch.float32 and means.item() == pytest.approx(1.0 + 2**-7)


def test_buffer_accumulates_micro_batches_into_global_means() -> None:
    buffer = ClusterLossBuffer(3)
    buffer.add(torch.tensor([1.0, 2.0, 3.0]), torch.tensor([0, 0, 1]))
    buffer.add(torch.tensor([4.0, 5.0]), torch.tensor([0, 1]))
    means, counts = buffer.reduce()
    torch.testing.assert_close(means, torch.tensor([7.0 / 3, 4.0, 0.0], dtype=torch.float64))
    torch.testing.assert_close(counts, torch.tensor([3.0, 2.0, 0.0], dtype=torch.float64))
    buffer.add(torch.tensor([1.0, 6.0]), torch.tensor([0, 2]))
    means, counts = buffer.reduce()  # only what came since the last read
    torch.testing.assert_close(means, torch.tensor([1.0, 0.0, 6.0], dtype=torch.float64))
    torch.testing.assert_close(counts, torch.tensor([1.0, 0.0, 1.0], dtype=torch.float64))


def test_buffer_leaves_non_finite_losses_out() -> None:
    buffer = ClusterLossBuffer(2, num_timesteps=4, profile_bins=2)
    loss = torch.tensor([1.0, float("nan"), 3.0, float("inf")])
    buffer.add(loss, torch.tensor([0, 0, 1, 1]), torch.tensor([0, 1, 2, 3]))
    means, counts = buffer.reduce()
    torch.testing.assert_close(means, torch.tensor([1.0, 3.0], dtype=torch.float64))
    torch.testing.assert_close(counts, torch.tensor([1.0, 1.0], dtype=torch.float64))
    profile, samples = buffer.take_profile()
    torch.testing.assert_close(profile, torch.tensor([1.0, 3.0], dtype=torch.float64))
    torch.testing.assert_close(samples, torch.tensor([1.0, 1.0], dtype=torch.float64))


def test_buffer_state_round_trip() -> None:
    buffer = ClusterLossBuffer(2)
    buffer.add(torch.tensor([1.0, 2.0]), torch.tensor([0, 1]))
    buffer.reduce()
    buffer.add(torch.tensor([3.0]), torch.tensor([1]))  # unread sums are saved too
    restored = ClusterLossBuffer(2)
    restored.load_state_dict(saved_and_loaded(buffer.state_dict()))
    for ours, theirs in zip(restored.reduce(), buffer.reduce()):
        torch.testing.assert_close(ours, theirs, rtol=0, atol=0)
    for ours, theirs in zip(restored.take_profile(), buffer.take_profile()):
        torch.testing.assert_close(ours, theirs, rtol=0, atol=0)


def test_buffer_refuses_state_with_another_k() -> None:
    with pytest.raises(ValueError, match="k=3 clusters but this run has k=2"):
        ClusterLossBuffer(2).load_state_dict(ClusterLossBuffer(3).state_dict())


@pytest.mark.parametrize("name", ["nash", "pcgrad"])
def test_a_cluster_absent_from_the_gram_update_keeps_its_weight(name):
    # Cluster 1 had no sample in the update (uniform t sampling): zero gradient, zero row and column of G.
    # The present clusters are solved on their own 2x2 Gram; cluster 1's weight stays as it was.
    g = torch.tensor([[1.0, 0.2, 0.0], [0.0, 0.0, 0.0], [-0.5, 1.0, 0.3]], dtype=torch.float64)
    G = g @ g.T
    balancer = build(name, 3, update_every=1)
    before = balancer.weights() * 3  # the solver's w (weights() = w / k)
    balancer.update_from_gram(G)
    after = balancer.weights() * 3
    assert after[1] == before[1] == 1.0
    sub = G[[0, 2]][:, [0, 2]]
    if name == "nash":  # the sub-solution satisfies (G_sub / |G_sub|_F) w = 1 / w
        w = after[[0, 2]]
        torch.testing.assert_close((sub / torch.linalg.norm(sub)) @ w, 1.0 / w, rtol=1e-6, atol=1e-8)
    else:
        # Worked by hand: <g0, g2> = -0.5 + 0.2 = -0.3 < 0, |g0|^2 = 1.04, |g2|^2 = 1.34. With two present
        # tasks the order does not matter; each is projected once against the other's original gradient:
        #   g~0 = g0 + (0.3 / 1.34) g2,  g~2 = g2 + (0.3 / 1.04) g0
        #   g~0 + g~2 = (1 + 0.3 / 1.04) g0 + (1 + 0.3 / 1.34) g2
        expected = torch.tensor([1 + 0.3 / 1.04, 1 + 0.3 / 1.34], dtype=torch.float64)
        torch.testing.assert_close(after[[0, 2]], expected, rtol=1e-12, atol=0)
