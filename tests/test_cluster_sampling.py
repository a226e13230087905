"""ANT at scale: timestep sampling that keeps the distribution, and the buffered per-cluster losses."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dtr_scale.diffusion import create_diffusion
from dtr_scale.mtl.balancers import build
from dtr_scale.mtl.cluster_losses import step_cluster_means
from dtr_scale.mtl.clustering import interval_clustering
from dtr_scale.mtl.sampling import TimestepSampler, resolve_sampling


def _snr_clusters(k: int = 5) -> list[tuple[int, int]]:
    abar = create_diffusion("").alphas_cumprod
    return interval_clustering(abar / (1 - abar), k, "snr")


def _independent_snr_dp(v: np.ndarray, k: int) -> list[tuple[int, int]]:
    """DESIGN §5's optimum written out separately: all O(T^2) interval costs at once, then the k-interval DP.

    v is strictly decreasing (SNR), so with centre c = min(round_half_even((l + r + 1) / 2), r) the cost
    sum_{t=l..r} |v_t - v_c| = sum_{t<c} (v_t - v_c) + sum_{t>c} (v_c - v_t), by prefix sums P.
    """
    T = len(v)
    assert np.all(np.diff(v) < 0)
    P = np.concatenate([[0.0], np.cumsum(v)])
    left, right = np.arange(T)[:, None], np.arange(T)[None, :]
    c = np.clip(np.minimum(np.round((left + right + 1) / 2), right), 0, T - 1).astype(
        int
    )  # np.round: half-even
    cost = (P[c] - P[left]) - (c - left) * v[c] + (right - c) * v[c] - (P[right + 1] - P[c + 1])
    cost = np.where(left <= right, cost, np.inf)
    best, choices = cost[0], []  # best[r]: cheapest cover of 0..r by the intervals placed so far
    for _ in range(1, k):
        total = np.concatenate([[np.inf], best[:-1]])[:, None] + cost  # [l, r]: cover 0..l-1, then [l, r]
        choices.append(total.argmin(axis=0))
        best = total.min(axis=0)
    intervals, end = [], T - 1
    for choice in reversed(choices):
        intervals.append((int(choice[end]), end))
        end = int(choice[end]) - 1
    return [(0, end), *reversed(intervals)]


def test_snr_clusters_are_the_unequal_ones_the_issue_measured():
    # The float64 linear schedule and an independent DP give the same five clusters as mtl.clustering.
    abar = np.cumprod(1.0 - np.linspace(1e-4, 0.02, 1000))
    expected = [(0, 0), (1, 1), (2, 6), (7, 21), (22, 999)]
    assert _independent_snr_dp(abar / (1 - abar), 5) == expected
    assert _snr_clusters() == expected


def test_auto_stratifies_only_equal_size_clusters_and_warns_for_forced_unequal_strata():
    uniform_split = interval_clustering(np.zeros(1000), 8, "timestep")
    assert resolve_sampling("auto", uniform_split, 1000) is True
    assert resolve_sampling("auto", _snr_clusters(), 1000) is False
    assert resolve_sampling("uniform", uniform_split, 1000) is False
    assert resolve_sampling("auto", None, 1000) is False
    with pytest.warns(
        UserWarning, match=r"p\(t\) = 1 / \(5 \* n_j\).*\[0, 0\]: 20\.0% of samples for 0\.1% of t"
    ):
        assert resolve_sampling("stratified", _snr_clusters(), 1000) is True
    with pytest.raises(ValueError, match="mtl.sampling must be one of"):
        resolve_sampling("balanced", uniform_split, 1000)


def test_uniform_sampling_over_snr_clusters_gives_each_cluster_its_share_of_timesteps():
    clusters = _snr_clusters()
    sampler = TimestepSampler(1000, clusters, stratified=False)
    n = 200_000
    t, cluster_idx = sampler.sample(n, torch.Generator().manual_seed(0))
    counts = torch.bincount(cluster_idx, minlength=5).double()
    expected = torch.tensor([(right - left + 1) / 1000 for left, right in clusters], dtype=torch.float64) * n
    sigma = (expected * (1 - expected / n)).sqrt()
    assert ((counts - expected).abs() <= 5 * sigma).all(), (counts, expected)
    # each sample's cluster is the one its t falls in
    starts = torch.tensor([left for left, _ in clusters])
    assert torch.equal(torch.searchsorted(starts, t, right=True) - 1, cluster_idx)
    sampler.check_batch_size(7)  # no divisibility rule without strata


def _per_sample_losses(theta: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
    return (features @ theta) ** 2  # (B,), differentiable in theta


@pytest.mark.parametrize("method", ["uw", "none", "nash"])
@pytest.mark.parametrize("world", [1, 2])
def test_buffered_cluster_losses_give_the_gradient_of_the_balanced_step_means(method, world):
    # A step = `world` ranks x 3 micro-batches of 6 samples with uniformly drawn clusters (cluster 3 absent
    # everywhere). DeepSpeed's reduction -- mean over micro-batches, then over ranks -- of the micro-batch
    # losses must equal, in value and gradient, the balancer applied directly to the step's cluster means
    # l_k = (sum of the cluster's losses over the whole step) / (its count): computed here on the union.
    k, accumulation, batch = 4, 3, 6
    gen = torch.Generator().manual_seed(world)
    features = torch.randn(world, accumulation, batch, 5, generator=gen, dtype=torch.float64)
    cluster_idx = torch.randint(0, 3, (world, accumulation, batch), generator=gen)
    balancer = build(method, k).double()
    if method == "uw":
        with torch.no_grad():
            balancer.s.copy_(torch.tensor([0.3, -0.2, 0.5, 0.1]))
    if method == "nash":
        balancer._w = torch.tensor([1.5, 0.5, 2.0, 1.0], dtype=torch.float64)
    theta = torch.randn(5, generator=gen, dtype=torch.float64, requires_grad=True)
    step_counts = torch.bincount(cluster_idx.flatten(), minlength=k).double()
    assert step_counts[3] == 0

    params = [theta] + list(balancer.parameters())
    reduced = torch.zeros((), dtype=torch.float64)
    grads = [torch.zeros_like(p) for p in params]
    for r in range(world):
        for m in range(accumulation):
            losses = _per_sample_losses(theta, features[r, m])
            means = step_cluster_means(losses, cluster_idx[r, m], step_counts, scale=accumulation * world)
            loss = balancer(means, step_counts) / (accumulation * world)
            reduced = reduced + loss.detach()
            for g, p in zip(grads, torch.autograd.grad(loss, params)):
                g += p

    flat = _per_sample_losses(theta, features.reshape(-1, 5))
    idx = cluster_idx.flatten()
    direct_means = torch.stack(
        [flat[idx == j].mean() if (idx == j).any() else flat.sum() * 0 for j in range(k)]
    )
    direct = balancer(direct_means, step_counts)
    direct_grads = torch.autograd.grad(direct, params)
    torch.testing.assert_close(reduced, direct.detach(), rtol=1e-12, atol=1e-12)
    for g, d in zip(grads, direct_grads):
        torch.testing.assert_close(g, d, rtol=1e-10, atol=1e-12)
    if method == "uw":
        assert grads[1][3] == 0  # the absent cluster's s gets no gradient


def test_loss_profile_bins_losses_by_timestep_and_counts_clusters_without_a_host_sync():
    from dtr_scale.mtl.cluster_losses import ClusterLossBuffer

    buffer = ClusterLossBuffer(2, num_timesteps=1000, profile_bins=20)  # bins of 50 timesteps
    t = torch.tensor([0, 49, 50, 999, 999])
    buffer.add(torch.tensor([1.0, 3.0, 5.0, 0.5, 1.5]), torch.tensor([0, 0, 0, 1, 1]), t)
    means, counts = buffer.reduce()
    assert counts.tolist() == [3.0, 2.0] and means.tolist() == [3.0, 1.0]
    buffer.add(torch.tensor([7.0]), torch.tensor([0]), torch.tensor([10]))
    buffer.reduce()
    profile, samples = buffer.take_profile()  # both steps, then cleared
    assert samples[0] == 3 and profile[0] == pytest.approx((1 + 3 + 7) / 3)
    assert samples[1] == 1 and profile[1] == 5.0
    assert samples[19] == 2 and profile[19] == 1.0
    assert samples[2:19].sum() == 0 and profile[2:19].sum() == 0
    assert buffer.take_profile()[1].sum() == 0


def test_monitor_writes_the_cluster_layout_and_a_loss_profile_image(tmp_path):
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader
    from tensorboard.plugins.custom_scalar import layout_pb2

    from dtr_scale.train.monitor import Monitor, loss_profile_image

    monitor = Monitor(tmp_path, 0, 1, 10, 1.0, None, progress=False, num_clusters=3)
    image = loss_profile_image(torch.tensor([1e-3, 0.0, 2.0]), torch.tensor([4.0, 0.0, 1.0]), 1000)
    assert image.shape == (220, 420, 3) and image.dtype == np.uint8
    monitor.image("loss/profile_vs_t", 5, image)
    monitor.close()
    layout, images = None, []
    for path in (tmp_path / "tensorboard").iterdir():
        for event in EventFileLoader(str(path)).Load():
            for value in event.summary.value:
                if value.tag == "custom_scalars__config__":
                    layout = layout_pb2.Layout.FromString(value.tensor.string_val[0])
                images.append(value.tag)
    charts = {
        chart.title: list(chart.multiline.tag) for category in layout.category for chart in category.chart
    }
    assert charts["cluster losses"] == ["cluster/loss_0", "cluster/loss_1", "cluster/loss_2"]
    assert charts["cluster weights"] == ["cluster/weight_0", "cluster/weight_1", "cluster/weight_2"]
    assert "loss/profile_vs_t" in images


def test_resume_drops_a_torn_metrics_line_and_the_steps_after_the_checkpoint(tmp_path):
    """A kill mid-write leaves a half line at the end of metrics.jsonl; resuming at step 2 keeps steps 1-2 (and
    a record without a step, which counts as step 0), drops step 3 (logged after the checkpoint), the torn line,
    a non-object line, a non-integer step and undecodable bytes, each with a warning naming file and line. A
    raw U+2028 inside a string is not a line break."""
    import json

    from dtr_scale.train.monitor import Monitor

    path = tmp_path / "metrics.jsonl"
    lines = [
        '{"step": 1, "loss": 0.5, "note": "a\u2028b"}',  # 1
        "[1, 2]",  # 2: not an object
        '{"loss": 0.45}',  # 3: no step -> 0, kept
        '{"step": "2"}',  # 4: not an integer step
        '{"step": 2, "loss": 0.4}',  # 5
        '{"step": 3, "loss": 0.3}',  # 6: after the checkpoint
    ]
    path.write_bytes(
        "\n".join(lines).encode() + b"\n\xff\xfe\n" + b'{"step": 4, "lo'
    )  # 7: bad bytes, 8: torn
    with pytest.warns(UserWarning) as caught:
        Monitor(tmp_path, 0, 1, 10, 1.0, None, tensorboard=False, progress=False, start_step=2)
    dropped = sorted(int(str(w.message).split(":")[1]) for w in caught if "metrics.jsonl" in str(w.message))
    assert dropped == [2, 4, 7, 8]
    kept = path.read_text(encoding="utf-8").split("\n")
    assert [json.loads(line).get("step", 0) for line in kept if line] == [1, 0, 2]
    assert json.loads(kept[0])["note"] == "a\u2028b"
