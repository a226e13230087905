"""ANT interval clustering, the cluster file and CLI, stratified timestep sampling, task affinity."""

from __future__ import annotations

import itertools
import json
import time

import numpy as np
import pytest
import torch

from dtr_scale.cli import main as cli_main
from dtr_scale.mtl.affinity import compute_affinity
from dtr_scale.mtl.clustering import (
    clustering_cost,
    interval_centre,
    interval_clustering,
    interval_cost,
    load_clusters,
)
from dtr_scale.mtl.sampling import TimestepSampler
from dtr_scale.train.cluster import schedule_snr


def brute_force(values: np.ndarray, k: int, objective: str) -> float:
    """Minimum cost over every way to cut 0..T-1 into k non-empty contiguous intervals."""
    T = values.shape[0]
    best = np.inf
    for cuts in itertools.combinations(range(1, T), k - 1):
        bounds = (0, *cuts, T)
        intervals = [(bounds[j], bounds[j + 1] - 1) for j in range(k)]
        best = min(best, clustering_cost(values, intervals, objective))
    return best


def assert_covering(intervals: list[tuple[int, int]], T: int, k: int) -> None:
    assert len(intervals) == k
    assert intervals[0][0] == 0 and intervals[-1][1] == T - 1
    for (_, right), (left, _) in zip(intervals, intervals[1:]):
        assert left == right + 1
    assert all(left <= right for left, right in intervals)


@pytest.mark.parametrize("objective", ["snr", "log_snr"])
@pytest.mark.parametrize("k", [1, 2, 3, 4])
def test_dp_matches_brute_force_on_1d_features(objective: str, k: int) -> None:
    rng = np.random.default_rng(k)
    for trial in range(5):
        # non-monotone positive values, so the optimum is not just "cut where the SNR falls"
        values = rng.lognormal(sigma=2.0, size=9 + trial % 2)
        intervals = interval_clustering(values, k, objective)
        assert_covering(intervals, values.shape[0], k)
        assert clustering_cost(values, intervals, objective) == pytest.approx(
            brute_force(values, k, objective), rel=1e-12, abs=1e-12
        )


@pytest.mark.parametrize("k", [1, 2, 3, 4])
def test_dp_matches_brute_force_on_affinity(k: int) -> None:
    rng = np.random.default_rng(10 + k)
    for _ in range(5):
        grads = rng.normal(size=(9, 5))
        affinity = (grads @ grads.T) / np.outer(np.linalg.norm(grads, axis=1), np.linalg.norm(grads, axis=1))
        intervals = interval_clustering(affinity, k, "affinity")
        assert_covering(intervals, 9, k)
        assert clustering_cost(affinity, intervals, "affinity") == pytest.approx(
            brute_force(affinity, k, "affinity"), rel=1e-12, abs=1e-12
        )


@pytest.mark.parametrize(("T", "k"), [(10, 3), (9, 4), (1000, 8), (1000, 3), (7, 7)])
def test_timestep_objective_is_the_official_uniform_split(T: int, k: int) -> None:
    intervals = interval_clustering(np.ones(T), k, "timestep")
    assert_covering(intervals, T, k)
    sizes = [right - left + 1 for left, right in intervals]
    assert max(sizes) - min(sizes) <= 1
    # ANT's initialize_cluster: [int(T / k * j), int(T / k * (j + 1))) for these T, k
    assert [left for left, _ in intervals] == [int(T / k * j) for j in range(k)]
    if T <= 10:
        assert clustering_cost(np.ones(T), intervals, "timestep") == brute_force(np.ones(T), k, "timestep")


def test_centre_rules_follow_the_official_code() -> None:
    # snr: round-half-even of (l + r + 1) / 2, clipped to r
    assert interval_centre(0, 2, "snr") == 2  # 1.5 -> 2
    assert interval_centre(1, 3, "snr") == 2  # 2.5 -> 2 (half to even)
    assert interval_centre(2, 4, "snr") == 4  # 3.5 -> 4
    assert interval_centre(3, 3, "snr") == 3  # 3.5 -> 4, clipped to r
    # affinity: floor((l + r + 1) / 2)
    assert interval_centre(1, 3, "affinity") == 2
    assert interval_centre(2, 4, "affinity") == 3
    values = np.array([4.0, 1.0, 2.0, 8.0])
    assert interval_cost(values, 0, 2, "snr") == pytest.approx(2.0 + 1.0 + 0.0)  # centre 2, v_c = 2
    A = np.arange(16.0).reshape(4, 4)
    assert interval_cost(A, 1, 3, "affinity") == pytest.approx(-(9.0 + 10.0 + 11.0))  # row 2, cols 1..3


@pytest.mark.parametrize("objective", ["snr", "log_snr"])
@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_real_schedule_gives_covering_intervals_within_a_second(objective: str, schedule: str) -> None:
    snr = schedule_snr(schedule, 1000)
    start = time.perf_counter()
    intervals = interval_clustering(snr, 8, objective)
    elapsed = time.perf_counter() - start
    assert_covering(intervals, 1000, 8)
    assert elapsed < 1.0


def test_linear_schedule_snr_matches_the_definition() -> None:
    betas = np.linspace(1e-4, 0.02, 1000, dtype=np.float64)
    abar = np.cumprod(1.0 - betas)
    np.testing.assert_allclose(schedule_snr("linear", 1000), abar / (1.0 - abar), rtol=1e-14)


def test_bad_k_and_bad_values_are_refused() -> None:
    with pytest.raises(ValueError, match="k must be in 1..5"):
        interval_clustering(np.ones(5), 6, "snr")
    with pytest.raises(ValueError, match="strictly positive"):
        interval_clustering(np.array([1.0, 0.0, 2.0]), 2, "log_snr")
    with pytest.raises(ValueError, match="square"):
        interval_clustering(np.ones(5), 2, "affinity")
    with pytest.raises(ValueError, match="unknown clustering objective"):
        interval_clustering(np.ones(5), 2, "kmeans")


def test_cli_writes_a_cluster_file_that_load_clusters_reads(tmp_path, capsys) -> None:
    out = tmp_path / "clusters.json"
    assert cli_main(["cluster", "--objective", "snr", "--k", "5", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "total cost" in printed and "%" in printed
    intervals = load_clusters(out, num_timesteps=1000)
    # the optimum an independent DP finds (test_cluster_sampling.py::_independent_snr_dp)
    assert intervals == [(0, 0), (1, 1), (2, 6), (7, 21), (22, 999)]
    # its cost by DESIGN §5's formula, in float64: sum_t |v_t - v_c|, c = min(round_half_even((l+r+1)/2), r)
    abar = np.cumprod(1.0 - np.linspace(1e-4, 0.02, 1000))
    v = abar / (1 - abar)
    expected_cost = sum(np.abs(v[a : b + 1] - v[min(round((a + b + 1) / 2), b)]).sum() for a, b in intervals)
    assert json.loads(out.read_text())["total_cost"] == pytest.approx(expected_cost, rel=1e-9)


def test_cli_clusters_flow_bins_of_t_as_a_brute_force_does(tmp_path, capsys) -> None:
    out = tmp_path / "flow.json"
    argv = ["cluster", "--diffusion", "flow", "--objective", "snr", "--k", "3", "--timesteps", "20"]
    assert cli_main([*argv, "--out", str(out)]) == 0
    assert "t in [0.000, " in capsys.readouterr().out
    # Independent: every split of 20 bins into 3 intervals, cost sum_t |v_t - v_c| (as above) on the flow
    # path's SNR ((1 - t) / t)^2 at the bin centres t = (i + 1/2) / 20, in float64.
    t = (np.arange(20) + 0.5) / 20
    v = ((1 - t) / t) ** 2

    def cost(a: int, b: int) -> float:
        return float(np.abs(v[a : b + 1] - v[min(round((a + b + 1) / 2), b)]).sum())

    splits = itertools.combinations(range(1, 20), 2)
    best = min(splits, key=lambda s: cost(0, s[0] - 1) + cost(s[0], s[1] - 1) + cost(s[1], 19))
    expected = [(0, best[0] - 1), (best[0], best[1] - 1), (best[1], 19)]
    assert load_clusters(out, 20, "flow") == expected
    record = json.loads(out.read_text())
    assert record["diffusion_objective"] == "flow" and record["schedule"] is None
    # A flow file in a DDPM run (or the reverse) is refused by name: the two SNRs differ.
    with pytest.raises(
        ValueError, match=r"flow\.json: written for diffusion.objective=flow, but the run trains ddpm"
    ):
        load_clusters(out, 20, "ddpm")
    # A DDPM SNR file from before `--diffusion` (no diffusion_objective, a schedule) is a DDPM file too.
    legacy = tmp_path / "legacy.json"
    legacy.write_text(json.dumps({"objective": "snr", "schedule": "linear", "intervals": [[0, 9], [10, 19]]}))
    with pytest.raises(ValueError, match=r"written for diffusion.objective=ddpm, but the run trains flow"):
        load_clusters(legacy, 20, "flow")
    # Equal intervals mean the same under either objective.
    equal = tmp_path / "equal.json"
    assert (
        cli_main(["cluster", "--objective", "timestep", "--k", "2", "--timesteps", "20", "--out", str(equal)])
        == 0
    )
    assert load_clusters(equal, 20, "flow") == [(0, 9), (10, 19)]
    assert cli_main([*argv, "--schedule", "cosine"]) == 2
    assert "--schedule cosine is a DDPM beta schedule: flow matching has none" in capsys.readouterr().err


def test_cli_clusters_a_group_affinity_matrix_in_timesteps(tmp_path) -> None:
    groups = np.eye(4) + 0.9 * np.kron(np.eye(2), np.ones((2, 2)))  # groups {0,1} and {2,3} agree
    np.save(tmp_path / "aff.npy", groups)
    out = tmp_path / "clusters.json"
    argv = ["cluster", "--objective", "affinity", "--k", "2", "--timesteps", "20"]
    assert cli_main([*argv, "--affinity", str(tmp_path / "aff.npy"), "--out", str(out)]) == 0
    assert load_clusters(out) == [(0, 9), (10, 19)]


def test_load_clusters_names_the_file_on_a_gap(tmp_path) -> None:
    path = tmp_path / "bad.json"
    path.write_text(json.dumps({"intervals": [[0, 4], [6, 9]]}))
    with pytest.raises(ValueError, match=r"bad\.json.*interval 1 is \[6, 9\]"):
        load_clusters(path)


def test_load_clusters_refuses_a_different_number_of_timesteps(tmp_path) -> None:
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"intervals": [[0, 4], [5, 9]]}))
    assert load_clusters(path) == [(0, 4), (5, 9)]
    with pytest.raises(ValueError, match=r"c\.json: intervals cover 0..9, expected 0..999"):
        load_clusters(path, num_timesteps=1000)


# ----------------------------------------------------------------------------- sampling


def test_stratified_sampler_gives_equal_shares_and_t_inside_each_cluster() -> None:
    clusters = [(0, 0), (1, 9), (10, 99)]
    sampler = TimestepSampler(100, clusters)
    t, cluster_idx = sampler.sample(12, generator=torch.Generator().manual_seed(0))
    assert t.dtype == torch.long and cluster_idx.dtype == torch.long
    assert torch.bincount(cluster_idx, minlength=3).tolist() == [4, 4, 4]
    assert cluster_idx.tolist() == [0, 1, 2] * 4  # slot g in cluster g mod k, at any world size
    for j, (left, right) in enumerate(clusters):
        chosen = t[cluster_idx == j]
        assert bool(((chosen >= left) & (chosen <= right)).all())
    assert torch.equal(sampler.cluster_of[t], cluster_idx)


def test_stratified_sampler_is_uniform_within_a_cluster() -> None:
    sampler = TimestepSampler(10, [(0, 1), (2, 9)])
    t, _ = sampler.sample(40000, generator=torch.Generator().manual_seed(1))
    counts = torch.bincount(t, minlength=10).double()
    # cluster 0: 2 timesteps share half the samples; cluster 1: 8 timesteps share the other half
    np.testing.assert_allclose(counts[:2] / 40000, [0.25, 0.25], atol=0.01)
    np.testing.assert_allclose(counts[2:] / 40000, [1 / 16] * 8, atol=0.01)


def test_sampler_refuses_a_batch_not_divisible_by_k() -> None:
    sampler = TimestepSampler(1000, [(0, 499), (500, 999)])
    with pytest.raises(ValueError, match="micro_batch_size=5.*k \\(mtl.num_clusters\\)=2"):
        sampler.sample(5)


def test_sampler_without_clusters_is_uniform_with_one_cluster() -> None:
    sampler = TimestepSampler(1000)
    t, cluster_idx = sampler.sample(7, generator=torch.Generator().manual_seed(0))
    assert sampler.num_clusters == 1 and torch.equal(cluster_idx, torch.zeros(7, dtype=torch.long))
    u = torch.rand(7, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    assert t.tolist() == [int(x * 1000) for x in u.tolist()]  # t = floor(u T), u ~ U[0, 1)


def test_sampler_refuses_clusters_with_a_gap() -> None:
    with pytest.raises(ValueError, match="interval 1 is \\[6, 9\\]"):
        TimestepSampler(10, [(0, 4), (6, 9)])


# ----------------------------------------------------------------------------- affinity


class _DirectionDiffusion:
    """Stand-in diffusion: the loss at timestep t is <model output, d_{t // 2}>. With a model that
    outputs its parameter theta, a group of two timesteps has the exact gradient d_group."""

    num_timesteps = 6

    def __init__(self, directions: torch.Tensor) -> None:
        self.directions = directions

    def training_losses(self, model, x_start, t, model_kwargs, noise):
        return {"loss": (model(x_start, t, model_kwargs["y"]) * self.directions[t // 2]).sum(dim=1)}


class _Theta(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.theta = torch.nn.Parameter(torch.zeros(4))

    def forward(self, x, t, y):
        return self.theta.expand(x.shape[0], 4)


def test_affinity_is_the_cosine_of_group_gradients() -> None:
    directions = torch.tensor([[1.0, 0.0, 0.0, 0.0], [1.0, 1.0, 0.0, 0.0], [0.0, 0.0, 0.0, -2.0]])
    batches = [(torch.randn(3, 4), torch.zeros(3, dtype=torch.long)) for _ in range(2)]
    affinity = compute_affinity(_Theta(), _DirectionDiffusion(directions), batches, group_size=2)
    unit = directions / directions.norm(dim=1, keepdim=True)
    np.testing.assert_allclose(affinity, (unit @ unit.T).numpy(), atol=1e-7)


def test_affinity_of_a_tiny_dit_is_the_cosine_of_its_mean_group_gradients() -> None:
    # The diffusion is wrapped only to record what compute_affinity asks it (t, noise); the expected matrix
    # is then rebuilt from those inputs by explicit per-group gradient vectors and cosines in float64.
    from dtr_scale.diffusion import create_diffusion
    from dtr_scale.models.dit import DiT

    torch.manual_seed(0)
    model = DiT(
        input_size=4, patch_size=2, in_channels=2, hidden_size=16, depth=1, num_heads=2, num_classes=3
    )
    for p in model.parameters():  # leave adaLN-Zero's zero init, so every group has a gradient
        torch.nn.init.normal_(p, std=0.05)
    model.eval()
    diffusion = create_diffusion("", noise_schedule="cosine", diffusion_steps=8)
    gen = torch.Generator().manual_seed(1)
    batches = [(torch.randn(4, 2, 4, 4, generator=gen), torch.tensor([0, 1, 2, 0])),
               (torch.randn(3, 2, 4, 4, generator=gen), torch.tensor([2, 2, 1]))]  # fmt: skip
    calls = []

    class Recording:
        num_timesteps = diffusion.num_timesteps

        def training_losses(self, model, x_start, t, model_kwargs, noise):
            calls.append((x_start, t.clone(), model_kwargs["y"], noise.clone()))
            return diffusion.training_losses(model, x_start, t, model_kwargs, noise)

    affinity = compute_affinity(model, Recording(), batches, group_size=2, seed=3)

    params = list(model.parameters())
    group_sum = np.zeros((4, sum(p.numel() for p in params)))
    noise_of_batch: dict[int, torch.Tensor] = {}
    seen = np.zeros((4, 2), dtype=int)
    for x, t, y, noise in calls:
        b = next(i for i, (xb, _) in enumerate(batches) if xb is x)
        assert torch.equal(y, batches[b][1])
        group = int(t[0]) // 2
        assert ((t >= 2 * group) & (t < 2 * group + 2)).all(), t  # every t inside its group of 2
        # common random numbers: one noise per batch, the same for every group
        assert torch.equal(noise_of_batch.setdefault(b, noise), noise)
        loss = diffusion.training_losses(model, x, t, {"y": y}, noise)["loss"].mean()
        grads = torch.autograd.grad(loss, params, allow_unused=True)
        group_sum[group] += np.concatenate(
            [
                (torch.zeros_like(p) if g is None else g).double().flatten().numpy()
                for p, g in zip(params, grads)
            ]
        )
        seen[group, b] += 1
    assert (seen == 1).all()  # each group's gradient over each batch exactly once
    unit = group_sum / np.linalg.norm(group_sum, axis=1, keepdims=True)  # the mean's direction = the sum's
    np.testing.assert_allclose(affinity, unit @ unit.T, rtol=0, atol=1e-6)
    assert np.abs(affinity - 1.0).max() > 0.01  # the groups' gradients really differ


def test_affinity_refuses_a_group_size_that_does_not_divide_t() -> None:
    batches = [(torch.randn(2, 4), torch.zeros(2, dtype=torch.long))]
    with pytest.raises(ValueError, match="group_size must divide the 6"):
        compute_affinity(_Theta(), _DirectionDiffusion(torch.eye(3, 4)), batches, group_size=4)


def test_snr_clusters_of_another_ddpm_schedule_are_refused(tmp_path, capsys) -> None:
    out = tmp_path / "linear.json"
    assert (
        cli_main(["cluster", "--objective", "snr", "--k", "3", "--timesteps", "20", "--out", str(out)]) == 0
    )
    # the schedule it was made for: the linear schedule's SNR DP optimum over 20 steps (written out by hand below)
    abar = np.cumprod(1.0 - np.linspace(1e-4 * 50, 0.02 * 50, 20))
    v = abar / (1 - abar)
    splits = itertools.combinations(range(1, 20), 2)

    def cost(a: int, b: int) -> float:
        return float(np.abs(v[a : b + 1] - v[min(round((a + b + 1) / 2), b)]).sum())

    best = min(splits, key=lambda s: cost(0, s[0] - 1) + cost(s[0], s[1] - 1) + cost(s[1], 19))
    assert load_clusters(out, 20, "ddpm", "linear") == [
        (0, best[0] - 1),
        (best[0], best[1] - 1),
        (best[1], 19),
    ]
    with pytest.raises(ValueError, match=r"SNR clusters of the linear schedule, but the run's "
                                         r"diffusion.noise_schedule is cosine"):  # fmt: skip
        load_clusters(out, 20, "ddpm", "cosine")
    equal = tmp_path / "equal.json"  # equal intervals do not depend on the schedule
    assert (
        cli_main(["cluster", "--objective", "timestep", "--k", "4", "--timesteps", "20", "--out", str(equal)])
        == 0
    )
    assert load_clusters(equal, 20, "ddpm", "cosine") == [(0, 4), (5, 9), (10, 14), (15, 19)]


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["--timesteps", "1"], "--timesteps must be >= 2"),
        (["--objective", "affinity", "--affinity", "{nan}"], "the matrix holds NaN or infinity"),
        (["--objective", "affinity", "--affinity", "{missing}"], "cannot read it as a .npy matrix"),
        (["--out", "{dir}"], "is a directory: expected the path of the JSON file"),
    ],
)
def test_cluster_cli_errors_name_the_flag_and_write_nothing(tmp_path, capsys, argv, expected) -> None:
    bad = np.eye(4)
    bad[0, 1] = np.nan
    np.save(tmp_path / "nan.npy", bad)
    paths = {"nan": tmp_path / "nan.npy", "missing": tmp_path / "missing.npy", "dir": tmp_path}
    argv = [a.format(**paths) for a in argv]
    assert cli_main(["cluster", "--k", "2", "--timesteps", "4", *argv]) == 2
    assert expected in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["nan.npy"]
