"""Specification of dtr_scale.diffusion: schedules, forward process, posterior, losses, samplers, respacing.

Expected values are computed independently in float64 (closed forms, Bayes' rule), not by re-running
the implementation's own formulas.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from dtr_scale.diffusion import (
    GaussianDiffusion,
    LossType,
    ModelMeanType,
    ModelVarType,
    SpacedDiffusion,
    create_diffusion,
    get_named_beta_schedule,
    snr,
    space_timesteps,
)

T = 1000


class TinyModel(nn.Module):
    """A 1x1 conv plus a per-timestep bias, so the output depends on x and t; records every t and y it sees."""

    def __init__(self, channels: int = 4, learn_sigma: bool = True, num_timesteps: int = T) -> None:
        super().__init__()
        out_channels = 2 * channels if learn_sigma else channels
        self.conv = nn.Conv2d(channels, out_channels, 1)
        self.t_bias = nn.Embedding(num_timesteps, out_channels)
        self.seen_t: list[torch.Tensor] = []
        self.seen_y: list[torch.Tensor | None] = []

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        self.seen_t.append(t.clone())
        self.seen_y.append(y)
        # tanh keeps the variance channel in [-1, 1], as the learned-range parameterisation expects.
        return torch.tanh(self.conv(x) + self.t_bias(t)[:, :, None, None])


class EpsOracle:
    """Returns the exact eps for a known x0: eps = (x_t - sqrt(abar_t) x0) / sqrt(1 - abar_t).

    abar is indexed by the ORIGINAL timestep, so it only gives the right answer if a respaced diffusion
    passes original indices. Variance channels are 0 (the middle of the learned range).
    """

    def __init__(self, x0: torch.Tensor, alphas_cumprod: np.ndarray, learn_sigma: bool = True) -> None:
        self.x0 = x0.double()
        self.alphas_cumprod = torch.from_numpy(alphas_cumprod)
        self.learn_sigma = learn_sigma

    def __call__(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        abar = self.alphas_cumprod[t].view(-1, 1, 1, 1)
        eps = ((x.double() - abar.sqrt() * self.x0) / (1 - abar).sqrt()).float()
        return torch.cat([eps, torch.zeros_like(eps)], dim=1) if self.learn_sigma else eps


def linear_diffusion(var_type: ModelVarType = ModelVarType.LEARNED_RANGE) -> GaussianDiffusion:
    return GaussianDiffusion(
        get_named_beta_schedule("linear", T), ModelMeanType.EPSILON, var_type, LossType.MSE
    )


def approx_cdf64(x: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(np.sqrt(2.0 / np.pi) * (x + 0.044715 * x**3)))


# ----- schedules ------------------------------------------------------------------------------------


def test_linear_schedule_runs_from_1e4_to_002_in_float64():
    betas = get_named_beta_schedule("linear", T)
    assert betas.dtype == np.float64 and betas.shape == (T,)
    assert betas[0] == pytest.approx(1e-4, rel=1e-12) and betas[-1] == pytest.approx(0.02, rel=1e-12)
    assert np.allclose(np.diff(betas), (0.02 - 1e-4) / (T - 1), rtol=1e-9)


def test_linear_schedule_scales_endpoints_by_1000_over_steps():
    betas = get_named_beta_schedule("linear", 250)
    assert betas.shape == (250,)
    assert betas[0] == pytest.approx(4e-4, rel=1e-12) and betas[-1] == pytest.approx(0.08, rel=1e-12)


def test_cosine_schedule_follows_squared_cosine_alpha_bar_and_caps_beta():
    betas = get_named_beta_schedule("cosine", T)
    f = np.cos((np.arange(T + 1) / T + 0.008) / 1.008 * np.pi / 2) ** 2
    alphas_cumprod = np.cumprod(1 - betas)
    uncapped = betas < 0.999
    assert uncapped[:-1].all() and betas[-1] == 0.999
    assert np.allclose(alphas_cumprod[:-1], f[1:-1] / f[0], rtol=1e-9)
    assert np.array_equal(betas, get_named_beta_schedule("squaredcos_cap_v2", T))


def test_unknown_schedule_is_an_error_naming_it():
    with pytest.raises(ValueError, match="quadratic"):
        get_named_beta_schedule("quadratic", T)


def test_alphas_cumprod_is_cumulative_product_and_snr_is_its_odds():
    diffusion = linear_diffusion()
    betas = get_named_beta_schedule("linear", T)
    expected = np.cumprod(1.0 - betas)
    assert np.array_equal(diffusion.alphas_cumprod, expected)
    assert np.allclose(snr(diffusion.alphas_cumprod), expected / (1 - expected), rtol=1e-12)
    t = torch.tensor([0, 1, 500, 999])
    snr_t = diffusion.snr(t)
    assert snr_t.dtype == torch.float64 and snr_t.shape == (4,)
    assert torch.allclose(snr_t, torch.from_numpy(expected / (1 - expected))[t])
    assert (np.diff(snr(expected)) < 0).all()


# ----- forward process and posterior ----------------------------------------------------------------


def test_q_sample_empirical_moments_match_sqrt_abar_x0_and_one_minus_abar():
    diffusion = linear_diffusion()
    t = torch.tensor([0, 100, 500, 999])
    x0_values = torch.tensor([0.5, -1.0, 2.0, 0.3])
    x_start = x0_values[:, None].expand(4, 200_000).contiguous()
    torch.manual_seed(0)
    x_t = diffusion.q_sample(x_start, t).double()
    abar = torch.from_numpy(diffusion.alphas_cumprod)[t]
    assert torch.allclose(x_t.mean(dim=1), abar.sqrt() * x0_values.double(), atol=0.01)
    assert torch.allclose(x_t.var(dim=1), 1 - abar, rtol=0.02, atol=1e-5)


def test_posterior_at_t0_has_mean_x0_and_variance_clipped_to_t1():
    diffusion = linear_diffusion()
    assert diffusion.posterior_mean_coef1[0] == pytest.approx(1.0, rel=1e-12)
    assert diffusion.posterior_mean_coef2[0] == 0.0
    assert diffusion.posterior_variance[0] == 0.0
    assert diffusion.posterior_log_variance_clipped[0] == np.log(diffusion.posterior_variance[1])
    x_start = torch.randn(3, 4, 2, 2, generator=torch.Generator().manual_seed(2))
    x_t = torch.randn(3, 4, 2, 2, generator=torch.Generator().manual_seed(3))
    mean, variance, _ = diffusion.q_posterior_mean_variance(x_start, x_t, torch.zeros(3, dtype=torch.long))
    assert torch.allclose(mean, x_start, atol=1e-6)
    assert (variance == 0).all()


def test_posterior_matches_bayes_rule_in_float64():
    # q(x_{t-1}|x_t,x_0) ∝ N(x_t; sqrt(alpha_t) x_{t-1}, beta_t) N(x_{t-1}; sqrt(abar_{t-1}) x_0, 1-abar_{t-1}):
    # precision = alpha_t/beta_t + 1/(1-abar_{t-1}), mean = var (sqrt(alpha_t) x_t/beta_t + sqrt(abar_{t-1}) x_0/(1-abar_{t-1})).
    for schedule in ("linear", "cosine"):
        betas = get_named_beta_schedule(schedule, T)
        diffusion = GaussianDiffusion(betas)
        t = torch.tensor([1, 2, 250, 998])
        x_start = torch.randn(4, 4, 2, 2, generator=torch.Generator().manual_seed(4))
        x_t = torch.randn(4, 4, 2, 2, generator=torch.Generator().manual_seed(5))
        mean, variance, log_variance = diffusion.q_posterior_mean_variance(x_start, x_t, t)

        beta = torch.from_numpy(betas)[t].view(4, 1, 1, 1)
        abar_prev = torch.from_numpy(np.cumprod(1 - betas))[t - 1].view(4, 1, 1, 1)
        expected_var = 1.0 / ((1 - beta) / beta + 1.0 / (1 - abar_prev))
        expected_mean = expected_var * (
            (1 - beta).sqrt() * x_t.double() / beta + abar_prev.sqrt() * x_start.double() / (1 - abar_prev)
        )
        assert torch.allclose(mean.double(), expected_mean, rtol=1e-5, atol=1e-6), schedule
        assert torch.allclose(variance.double(), expected_var.expand_as(x_t), rtol=1e-5), schedule
        assert torch.allclose(log_variance.double(), expected_var.log().expand_as(x_t), rtol=1e-5), schedule


def test_learned_range_interpolates_log_variance_between_posterior_and_beta():
    diffusion = linear_diffusion()
    t = torch.tensor([0, 10, 999])
    x = torch.randn(3, 2, 2, 2, generator=torch.Generator().manual_seed(6))
    eps = torch.zeros_like(x)
    for v, expected in (
        (-1.0, diffusion.posterior_log_variance_clipped[t.numpy()]),
        (1.0, np.log(diffusion.betas[t.numpy()])),
        (
            0.0,
            0.5 * (diffusion.posterior_log_variance_clipped[t.numpy()] + np.log(diffusion.betas[t.numpy()])),
        ),
    ):
        output = torch.cat([eps, torch.full_like(x, v)], dim=1)
        out = diffusion.p_mean_variance(lambda x, t, out=output: out, x, t)
        got = out["log_variance"][:, 0, 0, 0].double()
        assert torch.allclose(got, torch.from_numpy(expected), rtol=1e-5), v
        assert torch.allclose(out["variance"], out["log_variance"].exp())


def test_fixed_variances_are_posterior_small_and_beta_large():
    t = torch.tensor([0, 5, 999])
    x = torch.randn(3, 2, 2, 2, generator=torch.Generator().manual_seed(7))
    small = linear_diffusion(ModelVarType.FIXED_SMALL)
    large = linear_diffusion(ModelVarType.FIXED_LARGE)
    out_small = small.p_mean_variance(lambda x, t: torch.zeros_like(x), x, t)
    out_large = large.p_mean_variance(lambda x, t: torch.zeros_like(x), x, t)
    post = small.posterior_variance
    assert torch.allclose(out_small["variance"][:, 0, 0, 0].double(), torch.from_numpy(post[[0, 5, 999]]))
    expected_large = np.array([post[1], small.betas[5], small.betas[999]])
    assert torch.allclose(
        out_large["variance"][:, 0, 0, 0].double(), torch.from_numpy(expected_large), rtol=1e-6
    )


# ----- training losses ------------------------------------------------------------------------------


def test_training_losses_are_finite_per_sample_float32_even_for_bf16_models():
    diffusion = create_diffusion("")
    model = TinyModel()
    x_start = torch.randn(5, 4, 4, 4, generator=torch.Generator().manual_seed(8))
    t = torch.tensor([0, 1, 10, 500, 999])
    for cast in (torch.float32, torch.bfloat16):
        torch.manual_seed(0)
        terms = diffusion.training_losses(lambda x, t, m=model, c=cast: m(x, t).to(c), x_start, t)
        assert set(terms) == {"loss", "mse", "vb"}
        for name, value in terms.items():
            assert value.shape == (5,) and value.dtype == torch.float32, name
            assert torch.isfinite(value).all(), name
        assert torch.allclose(terms["loss"], terms["mse"] + terms["vb"])
        assert (terms["vb"] > 0).all()


def test_mse_is_mean_squared_error_between_predicted_and_true_noise():
    diffusion = create_diffusion("")
    generator = torch.Generator().manual_seed(9)
    x_start = torch.randn(3, 4, 2, 2, generator=generator)
    noise = torch.randn(3, 4, 2, 2, generator=generator)
    eps_pred = torch.randn(3, 4, 2, 2, generator=generator)
    output = torch.cat([eps_pred, torch.zeros_like(eps_pred)], dim=1)
    terms = diffusion.training_losses(lambda x, t: output, x_start, torch.tensor([0, 40, 999]), noise=noise)
    expected = ((eps_pred - noise) ** 2).mean(dim=(1, 2, 3))
    assert torch.allclose(terms["mse"], expected, rtol=1e-6)


def test_model_is_given_q_sample_of_x_start_with_the_given_noise():
    diffusion = create_diffusion("")
    x_start = torch.randn(2, 4, 2, 2, generator=torch.Generator().manual_seed(10))
    noise = torch.randn(2, 4, 2, 2, generator=torch.Generator().manual_seed(11))
    t = torch.tensor([7, 600])
    seen = {}

    def model(x, t):
        seen["x"] = x
        return torch.zeros(2, 8, 2, 2)

    diffusion.training_losses(model, x_start, t, noise=noise)
    abar = torch.from_numpy(diffusion.alphas_cumprod)[t].view(2, 1, 1, 1)
    expected = abar.sqrt() * x_start.double() + (1 - abar).sqrt() * noise.double()
    assert torch.allclose(seen["x"].double(), expected, atol=1e-6)


def _vb_inputs(t: torch.Tensor, seed: int):
    generator = torch.Generator().manual_seed(seed)
    batch = t.shape[0]
    x_start = torch.rand(batch, 4, 3, 3, generator=generator) * 1.9 - 0.95  # inside the interior bins
    noise = torch.randn(batch, 4, 3, 3, generator=generator)
    eps_pred = noise + 0.3 * torch.randn(batch, 4, 3, 3, generator=generator)
    v = torch.rand(batch, 4, 3, 3, generator=generator) * 2 - 1
    return x_start, noise, eps_pred, v


def _posterior_mean64(diffusion, x0, x_t, t):
    """Mean of q(x_{t-1}|x_t, x_0) in float64: (beta sqrt(abar_prev) x0 + (1 - abar_prev) sqrt(alpha) x_t) / (1 - abar)."""
    n = t.shape[0]
    abar = torch.from_numpy(diffusion.alphas_cumprod)[t].view(n, 1, 1, 1)
    abar_prev = torch.from_numpy(diffusion.alphas_cumprod_prev)[t].view(n, 1, 1, 1)
    beta = torch.from_numpy(diffusion.betas)[t].view(n, 1, 1, 1)
    return (beta * abar_prev.sqrt() * x0 + (1 - abar_prev) * (1 - beta).sqrt() * x_t) / (1 - abar)


def _model_gaussian64(diffusion, x_start, noise, eps_pred, v, t):
    """Mean and log variance of p(x_{t-1}|x_t) computed in float64 from first principles."""
    n = t.shape[0]
    abar = torch.from_numpy(diffusion.alphas_cumprod)[t].view(n, 1, 1, 1)
    beta = torch.from_numpy(diffusion.betas)[t].view(n, 1, 1, 1)
    x_t = abar.sqrt() * x_start.double() + (1 - abar).sqrt() * noise.double()
    pred_x0 = (x_t - (1 - abar).sqrt() * eps_pred.double()) / abar.sqrt()
    mean = _posterior_mean64(diffusion, pred_x0, x_t, t)
    post_var = torch.from_numpy(diffusion.posterior_variance)
    min_log = torch.log(torch.where(t == 0, post_var[1], post_var[t])).view(n, 1, 1, 1)
    frac = (v.double() + 1) / 2
    log_var = frac * beta.log() + (1 - frac) * min_log
    return x_t, mean, log_var, min_log


def test_vb_at_t0_is_the_discretized_decoder_nll_in_bits():
    diffusion = create_diffusion("")
    t = torch.zeros(3, dtype=torch.long)
    x_start, noise, eps_pred, v = _vb_inputs(t, seed=12)
    terms = diffusion.training_losses(lambda x, t: torch.cat([eps_pred, v], 1), x_start, t, noise=noise)

    _, mean, log_var, _ = _model_gaussian64(diffusion, x_start, noise, eps_pred, v, t)
    inv_std = torch.exp(-0.5 * log_var).numpy()
    centered = (x_start.double() - mean).numpy()
    bin_mass = approx_cdf64(inv_std * (centered + 1 / 255)) - approx_cdf64(inv_std * (centered - 1 / 255))
    expected_bits = (-np.log(bin_mass) / np.log(2)).mean(axis=(1, 2, 3))
    assert np.allclose(terms["vb"].numpy(), expected_bits, rtol=1e-4)


def test_vb_at_t_positive_is_the_posterior_kl_in_bits():
    diffusion = create_diffusion("")
    t = torch.tensor([1, 300, 999])
    x_start, noise, eps_pred, v = _vb_inputs(t, seed=13)
    terms = diffusion.training_losses(lambda x, t: torch.cat([eps_pred, v], 1), x_start, t, noise=noise)

    x_t, mean, log_var, true_log_var = _model_gaussian64(diffusion, x_start, noise, eps_pred, v, t)
    true_mean = _posterior_mean64(diffusion, x_start.double(), x_t, t)
    # KL(N(m1, s1^2) || N(m2, s2^2)) = log(s2/s1) + (s1^2 + (m1 - m2)^2) / (2 s2^2) - 1/2
    kl = (
        0.5 * (log_var - true_log_var)
        + (true_log_var.exp() + (true_mean.double() - mean) ** 2) / (2 * log_var.exp())
        - 0.5
    )
    expected_bits = kl.mean(dim=(1, 2, 3)) / math.log(2)
    assert torch.allclose(terms["vb"].double(), expected_bits, rtol=1e-3, atol=1e-6)


def test_vb_trains_only_the_variance_and_mse_only_the_mean():
    diffusion = create_diffusion("")
    output = torch.randn(2, 8, 2, 2, generator=torch.Generator().manual_seed(14)).tanh().requires_grad_()
    x_start = torch.rand(2, 4, 2, 2, generator=torch.Generator().manual_seed(15)) - 0.5
    t = torch.tensor([0, 321])
    terms = diffusion.training_losses(lambda x, t: output, x_start, t)
    (vb_grad,) = torch.autograd.grad(terms["vb"].sum(), output, retain_graph=True)
    (mse_grad,) = torch.autograd.grad(terms["mse"].sum(), output)
    assert (vb_grad[:, :4] == 0).all() and (vb_grad[:, 4:] != 0).any()
    assert (mse_grad[:, 4:] == 0).all() and (mse_grad[:, :4] != 0).any()


def test_fixed_variance_diffusion_has_zero_vb_and_wrong_channel_count_is_an_error():
    diffusion = create_diffusion("", learn_sigma=False)
    assert diffusion.model_var_type == ModelVarType.FIXED_LARGE
    x_start = torch.randn(2, 4, 2, 2)
    terms = diffusion.training_losses(TinyModel(learn_sigma=False), x_start, torch.tensor([0, 5]))
    assert (terms["vb"] == 0).all() and torch.equal(terms["loss"], terms["mse"])
    with pytest.raises(ValueError, match="expected \\(2, 4, 2, 2\\)"):
        diffusion.training_losses(TinyModel(learn_sigma=True), x_start, torch.tensor([0, 5]))


# ----- respacing ------------------------------------------------------------------------------------


def test_space_timesteps_250_and_ddim50_keep_the_reference_steps():
    steps_250 = sorted(space_timesteps(T, "250"))
    assert len(steps_250) == 250 and steps_250[0] == 0 and steps_250[-1] == 999
    assert max(np.diff(steps_250)) <= 5 and min(np.diff(steps_250)) >= 4
    assert space_timesteps(T, "ddim50") == set(range(0, 1000, 20))
    assert space_timesteps(300, "10,15,20") == space_timesteps(300, [10, 15, 20])
    assert len(space_timesteps(300, "10,15,20")) == 45
    # Fractional strides are rounded, half to even: 3.667 -> 4, 7.333 -> 7; 2.5 -> 2.
    assert space_timesteps(12, "4") == {0, 4, 7, 11}
    assert space_timesteps(6, "3") == {0, 2, 5}
    with pytest.raises(ValueError, match="ddim999"):
        space_timesteps(T, "ddim999")
    with pytest.raises(ValueError, match="2000"):
        space_timesteps(T, "2000")


def test_spaced_betas_reproduce_original_alphas_cumprod_at_kept_steps():
    base = get_named_beta_schedule("linear", T)
    original = np.cumprod(1 - base)
    for respacing in ("250", "ddim50", "10"):
        diffusion = create_diffusion(respacing)
        kept = diffusion.timestep_map
        assert diffusion.original_num_steps == T and diffusion.num_timesteps == len(kept)
        assert kept == sorted(kept)
        assert np.allclose(diffusion.alphas_cumprod, original[kept], rtol=1e-12)


def test_unspaced_diffusion_keeps_all_steps_in_order():
    diffusion = create_diffusion("")
    assert diffusion.num_timesteps == T and diffusion.timestep_map == list(range(T))
    assert np.allclose(diffusion.betas, get_named_beta_schedule("linear", T), rtol=1e-9)
    assert isinstance(diffusion, SpacedDiffusion)
    assert diffusion.model_mean_type == ModelMeanType.EPSILON and diffusion.loss_type == LossType.MSE


def test_spaced_diffusion_passes_original_timestep_indices_to_the_model():
    diffusion = create_diffusion("ddim50")
    model = TinyModel()
    diffusion.training_losses(model, torch.randn(3, 4, 2, 2), torch.tensor([0, 1, 49]))
    assert model.seen_t[-1].dtype == torch.long
    assert model.seen_t[-1].tolist() == [0, 20, 980]

    model.seen_t.clear()
    diffusion.p_sample_loop(model, (2, 4, 2, 2), generator=torch.Generator().manual_seed(0))
    assert [t[0].item() for t in model.seen_t] == list(range(980, -1, -20))
    assert all(t.dtype == torch.long for t in model.seen_t)


def test_plain_diffusion_passes_timesteps_unchanged_to_the_model():
    diffusion = linear_diffusion()
    model = TinyModel()
    diffusion.training_losses(model, torch.randn(3, 4, 2, 2), torch.tensor([5, 0, 999]))
    assert model.seen_t[-1].tolist() == [5, 0, 999]


# ----- samplers -------------------------------------------------------------------------------------


@pytest.mark.parametrize("loop", ["p_sample_loop", "ddim_sample_loop"])
def test_sampler_output_shape_and_determinism_per_generator_seed(loop):
    diffusion = create_diffusion("25")
    torch.manual_seed(0)
    model = TinyModel()
    shape = (3, 4, 4, 4)

    def sample(seed: int) -> torch.Tensor:
        torch.manual_seed(1234)  # the global RNG must not matter
        kwargs = {"eta": 0.5} if loop == "ddim_sample_loop" else {}
        return getattr(diffusion, loop)(model, shape, generator=torch.Generator().manual_seed(seed), **kwargs)

    first, again, other = sample(7), sample(7), sample(8)
    assert first.shape == shape and torch.isfinite(first).all()
    assert torch.equal(first, again)
    assert not torch.allclose(first, other)


@pytest.mark.parametrize("respacing", ["ddim10", "", "250"])
def test_ddim_eta0_with_exact_eps_recovers_x0(respacing):
    diffusion = create_diffusion(respacing)
    x0 = torch.rand(2, 4, 3, 3, generator=torch.Generator().manual_seed(16)) * 2 - 1
    oracle = EpsOracle(x0, np.cumprod(1 - get_named_beta_schedule("linear", T)))
    sample = diffusion.ddim_sample_loop(oracle, x0.shape, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(sample, x0, atol=1e-4)


@pytest.mark.parametrize("respacing", ["50", None])
def test_ddpm_with_exact_eps_recovers_x0(respacing):
    # With the true eps, pred_x0 = x0 at every step; the last step (t = 0) has posterior mean x0 and no noise.
    # None: the plain GaussianDiffusion (no respacing wrapper) over all 1000 steps.
    betas = get_named_beta_schedule("linear", T)
    diffusion = GaussianDiffusion(betas) if respacing is None else create_diffusion(respacing)
    x0 = torch.rand(2, 4, 3, 3, generator=torch.Generator().manual_seed(17)) * 2 - 1
    oracle = EpsOracle(x0, np.cumprod(1 - betas))
    sample = diffusion.p_sample_loop(oracle, x0.shape, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(sample, x0, atol=1e-4)


def test_ddpm_step_adds_noise_with_the_model_variance():
    diffusion = create_diffusion("")
    x = torch.zeros(20_000, 1, 1, 1)
    t = torch.full((20_000,), 500, dtype=torch.long)
    v = 0.4  # learned-range interpolation value
    model = lambda x, t: torch.cat([torch.zeros_like(x), torch.full_like(x, v)], dim=1)  # noqa: E731
    out = diffusion.p_mean_variance(model, x, t)
    step = diffusion.p_sample(model, x, t, generator=torch.Generator().manual_seed(0))
    residual = (step["sample"] - out["mean"]).double()
    expected_var = math.exp(
        (v + 1) / 2 * math.log(diffusion.betas[500])
        + (1 - v) / 2 * diffusion.posterior_log_variance_clipped[500]
    )
    assert residual.var().item() == pytest.approx(expected_var, rel=0.05)


def test_ddpm_progressive_yields_one_step_per_kept_timestep_and_chains_them():
    # "5" over 1000 steps: stride 999 / 4 = 249.75 -> 0, 249.75, 499.5, 749.25, 999, rounded half to even
    # -> 0, 250, 500, 749, 999 (the original indices the model must see, from the noisiest down).
    diffusion = create_diffusion("5")
    x0 = torch.rand(1, 4, 2, 2, generator=torch.Generator().manual_seed(18)) * 2 - 1
    oracle = EpsOracle(x0, np.cumprod(1 - get_named_beta_schedule("linear", T)))
    inputs, seen_t = [], []

    def model(x, t):
        inputs.append(x.clone())
        seen_t.append(int(t[0]))
        return oracle(x, t)

    z = torch.randn(1, 4, 2, 2, generator=torch.Generator().manual_seed(19))
    steps = list(
        diffusion.p_sample_loop_progressive(model, (1, 4, 2, 2), noise=z, generator=torch.Generator())
    )
    assert seen_t == [999, 749, 500, 250, 0] and len(steps) == 5
    assert torch.equal(inputs[0], z)
    for i, step in enumerate(steps):
        torch.testing.assert_close(step["pred_xstart"], x0, rtol=0, atol=1e-4)  # the exact eps gives x0
        if i + 1 < len(steps):
            assert torch.equal(inputs[i + 1], step["sample"])  # each yielded sample is the next step's input
    torch.testing.assert_close(steps[-1]["sample"], x0, rtol=0, atol=1e-4)  # t = 0: posterior mean, no noise


def test_sampler_accepts_a_bound_method_and_model_kwargs_like_forward_with_cfg():
    diffusion = create_diffusion("5")
    model = TinyModel()
    labels = torch.tensor([1, 2])
    out = diffusion.ddim_sample_loop(
        model.forward, (2, 4, 2, 2), model_kwargs={"y": labels}, generator=torch.Generator().manual_seed(0)
    )
    assert out.shape == (2, 4, 2, 2)
    assert len(model.seen_y) == 5 and all(torch.equal(y, labels) for y in model.seen_y)  # every step got y
    with pytest.raises(ValueError, match="noise has shape"):
        diffusion.p_sample_loop(model, (2, 4, 2, 2), noise=torch.zeros(1, 4, 2, 2))


def test_dit_trains_and_samples_with_cfg_through_the_diffusion():
    from dtr_scale.models.dit import DiT_models

    torch.manual_seed(0)
    model = DiT_models["DiT-S/8"](input_size=16, num_classes=10)
    generator = torch.Generator().manual_seed(1)
    x_start = torch.randn(2, 4, 16, 16, generator=generator)
    noise = torch.randn(2, 4, 16, 16, generator=generator)
    terms = create_diffusion("").training_losses(
        model, x_start, torch.tensor([3, 900]), {"y": torch.tensor([1, 2])}, noise=noise
    )
    # adaLN-Zero: a fresh DiT predicts eps = 0, so the MSE term is the mean square of the true noise.
    torch.testing.assert_close(terms["mse"], noise.pow(2).mean(dim=(1, 2, 3)), rtol=1e-6, atol=0)
    assert torch.isfinite(terms["vb"]).all()

    # CFG needs a model whose conditional and unconditional predictions differ: give adaLN-Zero values.
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "adaLN_modulation" in name or name.startswith("final_layer.linear"):
                param.copy_(0.02 * torch.randn(param.shape, generator=generator))
    model.eval()

    def guided_by_hand(x, t, y, cfg_scale):
        # DiT sample.py: batch [z; z] with labels then null labels; eps = uncond + s (cond - uncond) on
        # the 4 latent channels of both halves, the variance channels unguided.
        out = model(x, t, y)
        cond, uncond = out[:2, :4], out[2:, :4]
        eps = uncond + cfg_scale * (cond - uncond)
        return torch.cat([torch.cat([eps, eps]), out[:, 4:]], dim=1)

    z = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    diffusion = create_diffusion("ddim5")

    def sample(fn, cfg_scale):
        kwargs = {"y": torch.tensor([1, 2, 10, 10]), "cfg_scale": cfg_scale}
        return diffusion.ddim_sample_loop(fn, (4, 4, 16, 16), noise=torch.cat([z, z]), model_kwargs=kwargs)

    guided = sample(model.forward_with_cfg, 4.0)
    torch.testing.assert_close(guided, sample(guided_by_hand, 4.0), rtol=1e-5, atol=1e-5)
    assert torch.equal(guided[:2], guided[2:])  # both halves follow the same guided eps
    assert (guided - sample(model.forward_with_cfg, 1.0)).abs().max() > 1e-2  # guidance changed the result
