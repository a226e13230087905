"""Flow matching in the product: config rules, DTR over continuous t, ANT's clusters and time sampling over
t in [0, 1], and sample identity whatever the batch. (Parity with the official code: test_flow_parity.py.)"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from dtr_scale.config import ConfigError, load_config
from dtr_scale.diffusion.flow import FlowMatching, time_cdf
from dtr_scale.models.dit import DiT
from dtr_scale.models.routing import DTRConfig, dtr_mask_table
from dtr_scale.mtl.cluster_losses import ClusterLossBuffer
from dtr_scale.mtl.sampling import resolve_sampling
from dtr_scale.train.build import diffusion_snr, resolve_clusters
from dtr_scale.train.flow_times import FlowTimeSampler

FLOW = ["diffusion.objective=flow"]


# ------------------------------------------------------------------------------------------------ config


def test_learn_sigma_follows_the_objective_and_flow_keys_load() -> None:
    assert load_config(None).model.learn_sigma is True
    cfg = load_config(None, [*FLOW, "flow.time_sampling=logit_normal", "flow.sampler=sde"])
    assert cfg.model.learn_sigma is False and cfg.flow.time_sampling == "logit_normal"


@pytest.mark.parametrize(
    "overrides,key",
    [
        ([*FLOW, "model.learn_sigma=true"], "model.learn_sigma"),
        ([*FLOW, "diffusion.loss_weighting=min_snr"], "diffusion.loss_weighting"),
        ([*FLOW, "diffusion.noise_schedule=cosine"], "diffusion.noise_schedule"),
        ([*FLOW, "diffusion.p2_gamma=0.5"], "diffusion.p2_gamma"),
        (["flow.time_sampling=logit_normal"], "flow.time_sampling"),
        (["flow.sampler=sde"], "flow.sampler"),
        (["diffusion.objective=rectified"], "diffusion.objective"),
        ([*FLOW, "flow.time_sampling=cosmap"], "flow.time_sampling"),
        ([*FLOW, "flow.logit_std=0"], "flow.logit_std"),
        ([*FLOW, "flow.sampler=ddim"], "flow.sampler"),
        ([*FLOW, "flow.guidance_low=0.8", "flow.guidance_high=0.3"], "flow.guidance_low"),
    ],
)
def test_settings_that_do_not_apply_to_the_objective_are_refused_by_name(overrides, key) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(None, overrides)
    message = str(err.value)
    assert key in message and "\n" not in message


# ------------------------------------------------------------------------------------------------ DTR


def test_dtr_row_of_flow_time_t_is_the_table_row_of_u_equal_t() -> None:
    # The invariant of docs/design-choices.md: the mask of time t is row round(t (T - 1)) of DTR's table, whose
    # formula puts u = row / (T - 1) = t; the window start never moves back as t grows, is 0 at t = 0 (data)
    # and C - C_b at t = 1 (noise), and moves fastest near t = 1 (alpha > 1: the noisiest tasks are the most
    # specific).
    T, C = 1000, 40
    model = DiT(input_size=4, patch_size=2, in_channels=2, hidden_size=C, depth=1, num_heads=2, num_classes=3,
                learn_sigma=False, routing=DTRConfig(alpha=4.0, beta=0.8, num_tasks=T)).eval()  # fmt: skip
    flow = FlowMatching(T)
    t = torch.linspace(0, 1, 2001, dtype=torch.float64)
    masks = model.routing_mask(flow.model_time(t).float(), torch.float32)[:, 0].bool()
    table = dtr_mask_table(T, C, 4.0, 0.8)
    rows = torch.tensor([round(v * (T - 1)) for v in t.tolist()])
    assert torch.equal(masks, table[rows])
    starts = masks.float().argmax(dim=1)
    active, free = int(C * 0.8), C - int(C * 0.8)
    assert masks.sum(dim=1).eq(active).all()
    assert (starts[1:] >= starts[:-1]).all() and starts[0] == 0 and starts[-1] == free
    # hand value at t = 0.75: s = round(0.75**4 * 8) = round(2.53) = 3 (row 749: u = 749/999 -> 2.53)
    assert int(starts[1500]) == 3
    moves_late = int(starts[-1] - starts[1800])  # t in [0.9, 1]
    moves_early = int(starts[200] - starts[0])  # t in [0, 0.1]
    assert moves_late > moves_early


# ------------------------------------------------------------------------------------------------ ANT


def test_flow_snr_grid_is_the_paths_snr_at_bin_centres() -> None:
    values = diffusion_snr(FlowMatching(10))
    t = np.arange(10) / 10 + 0.05
    np.testing.assert_allclose(values, ((1 - t) / t) ** 2, rtol=1e-13)
    assert values[0] == pytest.approx(361.0) and values[-1] == pytest.approx((0.05 / 0.95) ** 2)


def test_flow_clusters_are_intervals_of_the_t_bins() -> None:
    cfg = load_config(None, [*FLOW, "mtl.num_clusters=4", "mtl.objective=timestep"])
    assert resolve_clusters(cfg, diffusion_snr(FlowMatching(1000))) == [
        (0, 249),
        (250, 499),
        (500, 749),
        (750, 999),
    ]
    cfg = load_config(None, [*FLOW, "mtl.num_clusters=3", "mtl.objective=log_snr"])
    clusters = resolve_clusters(cfg, diffusion_snr(FlowMatching(1000)))
    # log SNR = 2 log((1 - t) / t) is odd about t = 1/2, so the middle cluster is centred on the bins around it.
    (_, r0), (l1, r1), _ = clusters
    assert abs((l1 + r1) / 2 - 499.5) <= 1 and r0 < 499 < r1


def test_auto_sampling_stratifies_equal_clusters_only_under_uniform_t() -> None:
    equal = [(0, 249), (250, 499), (500, 749), (750, 999)]
    assert resolve_sampling("auto", equal, 1000, uniform_density=True) is True
    assert resolve_sampling("auto", equal, 1000, uniform_density=False) is False


def _ks_distance(samples: np.ndarray, cdf) -> float:
    x = np.sort(samples)
    n = len(x)
    f = cdf(x)
    return float(max(np.max(np.arange(1, n + 1) / n - f), np.max(f - np.arange(n) / n)))


def logit_normal_cdf(x, m: float = 0.0, s: float = 1.0) -> np.ndarray:
    """Phi((logit(x) - m) / s) in float64 by hand (0 at x = 0, 1 at x = 1)."""
    x = np.asarray(x, dtype=np.float64)
    with np.errstate(divide="ignore"):
        z = (np.log(x) - np.log1p(-x) - m) / (s * math.sqrt(2))
    return 0.5 * (1 + np.vectorize(math.erf)(z))


@pytest.mark.parametrize(
    "density", [("uniform", 0.0, 1.0), ("logit_normal", 0.0, 1.0), ("logit_normal", -0.5, 0.8)]
)
def test_unstratified_times_follow_the_density_and_clusters_take_their_bins(density) -> None:
    clusters = [(0, 99), (100, 699), (700, 999)]
    sampler = FlowTimeSampler(1000, clusters, stratified=False, time_sampling=density[0], logit_mean=density[1],
                              logit_std=density[2])  # fmt: skip
    t, idx = sampler.sample(20000, torch.Generator().manual_seed(0))
    assert t.dtype == torch.float32 and t.min() >= 0 and t.max() <= 1
    bins = np.minimum(np.floor(t.double().numpy() * 1000), 999)
    expected_idx = np.searchsorted([99, 699, 999], bins)
    assert np.array_equal(idx.numpy(), expected_idx)
    # Kolmogorov-Smirnov distance to the density's CDF (hand formula): 1.63 / sqrt(n) is its 1% level.
    name, m, s = density
    cdf = (lambda x: x) if name == "uniform" else (lambda x: logit_normal_cdf(x, m, s))
    assert _ks_distance(t.double().numpy(), cdf) < 1.63 / math.sqrt(20000)


def test_stratified_times_fill_each_clusters_slots_from_the_restricted_density() -> None:
    clusters = [(0, 99), (100, 699), (700, 999)]
    sampler = FlowTimeSampler(1000, clusters, stratified=True, time_sampling="logit_normal")
    t, idx = sampler.sample(30000, torch.Generator().manual_seed(1))
    t = t.double().numpy()
    assert idx.tolist() == [0, 1, 2] * 10000  # slot g in cluster g mod k (as TimestepSampler)
    for j, (left, right) in enumerate(clusters):
        block = t[idx.numpy() == j]
        lo, hi = left / 1000, (right + 1) / 1000
        assert block.min() >= lo - 1e-7 and block.max() <= hi + 1e-7
        # within the cluster: the logit-normal restricted to [lo, hi] (float64 hand CDF)
        f_lo, f_hi = logit_normal_cdf(lo), logit_normal_cdf(hi)
        cdf = lambda x, f_lo=f_lo, f_hi=f_hi: (logit_normal_cdf(x) - f_lo) / (f_hi - f_lo)  # noqa: E731
        assert _ks_distance(block, cdf) < 1.63 / math.sqrt(len(block))
    # uniform density, equal clusters: stratifying keeps t uniform (each quarter holds its quarter of t)
    uniform = FlowTimeSampler(1000, [(0, 249), (250, 499), (500, 749), (750, 999)], stratified=True)
    tu, _ = uniform.sample(20000, torch.Generator().manual_seed(2))
    assert _ks_distance(tu.double().numpy(), lambda x: x) < 1.63 / math.sqrt(20000)


def test_cdf_of_uniform_is_t_and_sampler_checks_the_split() -> None:
    np.testing.assert_array_equal(time_cdf(np.array([0.0, 0.3, 1.0]), "uniform"), [0.0, 0.3, 1.0])
    with pytest.raises(ValueError, match="micro_batch_size"):
        FlowTimeSampler(1000, [(0, 499), (500, 999)], stratified=True).sample(3)


def test_loss_profile_bins_flow_times_on_the_unit_interval() -> None:
    buffer = ClusterLossBuffer(1, num_timesteps=1000, profile_bins=4)
    buffer.add(
        torch.tensor([1.0, 2.0, 3.0, 4.0]),
        torch.zeros(4, dtype=torch.long),
        torch.tensor([0.0, 0.3, 0.74, 1.0]),
    )
    assert buffer.bin_counts.tolist() == [1, 1, 1, 1] and buffer.bin_sums.tolist() == [1, 2, 3, 4]


def test_flow_loss_refuses_integer_timesteps() -> None:
    with pytest.raises(TypeError, match="float"):
        FlowMatching(1000).training_losses(lambda *a, **k: None, torch.zeros(1, 2, 2, 2), torch.tensor([3]))


@pytest.mark.parametrize("sampler", ["heun", "sde"])
def test_sample_i_is_the_same_drawn_alone_or_in_a_batch(sampler) -> None:
    # Every sample's starting and Euler-Maruyama noise come from its own generator (seed, i), so sample 1 drawn
    # with 0 and 2 equals sample 1 drawn alone, as at any world size (up to batched-kernel rounding).
    from dtr_scale.diffusion.sampling import denoise, sample_generators, sampling_parts

    torch.manual_seed(0)
    model = DiT(input_size=4, patch_size=2, in_channels=2, hidden_size=32, depth=1, num_heads=2, num_classes=3,
                learn_sigma=False, routing=DTRConfig(num_tasks=1000)).eval()  # fmt: skip
    for p in model.parameters():  # adaLN-Zero starts at a zero output: give the test model a real one
        torch.nn.init.normal_(p, std=0.2)
    section = {"objective": "flow", "noise_schedule": "linear", "diffusion_steps": 1000, "learn_sigma": False}
    solver, velocity = sampling_parts(model, section, sampler, 4, 2.0, torch.device("cpu"), 0.2, 0.9)

    def draw(indices):
        generators, labels = sample_generators(7, indices, 3)
        y = torch.tensor(labels)
        return denoise(solver, velocity, sampler, generators, y, (2, 4, 4), torch.device("cpu"))

    batch, alone = draw([0, 1, 2]), draw([1])
    assert batch.dtype == torch.float32 and batch.abs().max() > 0.1
    torch.testing.assert_close(batch[1:2], alone, rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="does not sample a flow model"):
        sampling_parts(model, section, "ddim", 4, 2.0, torch.device("cpu"))


def test_sit_xl2_config_is_repas_recipe_with_dtr_and_ant_uw() -> None:
    from pathlib import Path

    cfg = load_config(Path(__file__).resolve().parents[1] / "configs" / "sit-xl2-dtr-ant-repa.yaml")
    assert (cfg.diffusion.objective, cfg.flow.time_sampling, cfg.model.learn_sigma) == (
        "flow",
        "uniform",
        False,
    )
    assert (cfg.train.lr, cfg.train.global_batch_size, cfg.train.weight_decay, cfg.train.grad_clip) == (
        1e-4, 256, 0.0, 1.0)  # fmt: skip
    assert (cfg.repa.depth, cfg.repa.coeff, cfg.repa.projector_dim) == (8, 0.5, 2048)
    assert "dinov2-vitb" in cfg.repa.encoder and cfg.model.name == "DiT-XL/2"
    assert (cfg.flow.sampler, cfg.flow.guidance_high) == ("sde", 0.7)  # REPA's FID 1.42 sampling
    assert (cfg.mtl.method, cfg.mtl.num_clusters, cfg.routing.alpha, cfg.routing.beta) == ("uw", 8, 4.0, 0.8)


def test_task_affinity_over_flow_time_bins_is_a_cosine_matrix() -> None:
    from dtr_scale.mtl.affinity import compute_affinity

    torch.manual_seed(0)
    model = DiT(input_size=4, patch_size=2, in_channels=2, hidden_size=16, depth=1, num_heads=2, num_classes=3,
                learn_sigma=False)  # fmt: skip
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.1)
    seen = []
    flow = FlowMatching(100)

    def model_fn(x, time, y):
        seen.append(time / 99)
        return model(x, time, y)

    batches = [(torch.randn(4, 2, 4, 4), torch.tensor([0, 1, 2, 0]))]
    affinity = compute_affinity(model_fn, flow, batches, group_size=25, params=list(model.parameters()))
    assert (
        affinity.shape == (4, 4) and np.allclose(np.diag(affinity), 1.0) and np.allclose(affinity, affinity.T)
    )
    # group g's times lie in its bins [25 g / 100, 25 (g + 1) / 100)
    for g, times in enumerate(seen):
        assert times.dtype == torch.float32
        assert (times >= 0.25 * g - 1e-6).all() and (times < 0.25 * (g + 1) + 1e-6).all()
