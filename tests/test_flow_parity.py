"""Flow matching against the official code's numbers (float64, fixed inputs): the training loss, x_t and target
of REPA's `loss.py` (SILoss, linear path, v prediction) and of SiT's `transport` (its time reversed: t_SiT = 1 - t,
target x1 - x0 = -(ours)), the logit-normal ("lognormal") times, and one trajectory of REPA's `samplers.py`
(euler_sampler with and without Heun, euler_maruyama_sampler), without and with CFG inside a guidance interval.

tests/data/flow_reference.npz was computed once outside this repository by running REPA's loss.py / samplers.py
(sihyun-yu/REPA 67f714503e3892f993844aab088ffc5791c92613) and SiT's transport/ (willisma/SiT
947f95bd3a510e9af441d38c1e9f72e0eee873c5) in float64 on a tiny deterministic velocity model v(x, t, y) =
tanh(((1 + t) x) A^T + sin(y f + ph) + b t) (x flattened per sample; its parameters A, b, f, ph are in the file),
with torch.rand / randn / randn_like replaced by the stored times and noises. Null label 1000 (REPA's).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from dtr_scale.diffusion.flow import FlowMatching, time_cdf, time_quantile
from dtr_scale.diffusion.flow_sampling import flow_sample, flow_velocity_fn

REF = dict(np.load(Path(__file__).parent / "data" / "flow_reference.npz"))
T = 1000  # our network sees t * (T - 1)


class ReferenceVelocity(nn.Module):
    """The reference's fake model as a float64 module taking our time input t * (T - 1)."""

    num_classes = 1000

    def __init__(self) -> None:
        super().__init__()
        for name in ("A", "b", "f", "ph"):
            self.register_buffer(name, torch.from_numpy(REF[name]))
        self.dummy = nn.Parameter(torch.zeros((), dtype=torch.float64))  # sets the model dtype: float64

    def forward(self, x: torch.Tensor, time: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        t = (time / (T - 1))[:, None]
        h = (x.reshape(len(x), -1) * (1 + t)) @ self.A.T + torch.sin(y[:, None].double() * self.f + self.ph)
        return torch.tanh(h + self.b * t).reshape(x.shape)


def ref(name: str) -> torch.Tensor:
    return torch.from_numpy(np.asarray(REF[name]))


def test_training_loss_x_t_and_target_match_repa_and_sit() -> None:
    seen = {}
    model = ReferenceVelocity()

    def model_fn(x_t, time, y):
        seen["x_t"], seen["time"] = x_t, time
        return model(x_t, time, y)

    terms = FlowMatching(T).training_losses(
        model_fn, ref("images"), ref("t"), model_kwargs={"y": ref("y")}, noise=ref("noise")
    )
    torch.testing.assert_close(terms["loss"], ref("loss"), rtol=0, atol=1e-6)
    torch.testing.assert_close(terms["loss"], ref("sit_loss"), rtol=0, atol=1e-6)
    torch.testing.assert_close(seen["x_t"], ref("x_t"), rtol=0, atol=1e-6)
    torch.testing.assert_close(seen["x_t"], ref("sit_x_t"), rtol=0, atol=1e-6)  # SiT: the same point
    torch.testing.assert_close(1 - seen["time"] / (T - 1), ref("sit_t"), rtol=0, atol=1e-12)
    target = ref("noise") - ref("images")  # REPA: d_alpha x + d_sigma eps with alpha = 1 - t, sigma = t
    torch.testing.assert_close(target, ref("target"), rtol=0, atol=1e-12)
    # With the exact target as the output the loss is 0: the loss compares against exactly that target.
    exact = FlowMatching(T).training_losses(
        lambda x_t, time, y: ref("target"), ref("images"), ref("t"), {"y": ref("y")}, noise=ref("noise")
    )
    assert float(exact["loss"].abs().max()) < 1e-12


def test_logit_normal_times_are_repas_lognormal_times() -> None:
    # REPA: sigma = exp(n), t = sigma / (1 + sigma) (logit-normal with m = 0, s = 1); ours: the quantile of
    # the uniform draw Phi(n).
    n = ref("lognormal_n")
    ours = time_quantile(torch.special.ndtr(n), "logit_normal", 0.0, 1.0)
    torch.testing.assert_close(ours, ref("lognormal_t"), rtol=0, atol=1e-9)


@pytest.mark.parametrize("m,s", [(0.0, 1.0), (0.3, 1.2), (-0.5, 0.7)])
def test_logit_normal_quantile_and_cdf_are_sd3s_law(m, s) -> None:
    # SD3 (Esser et al. 2024, Eq. 19): t = sigmoid(m + s n), n ~ N(0, 1); hand formula in float64.
    n = torch.tensor([-2.5, -0.4, 0.0, 0.9, 3.0], dtype=torch.float64)
    expected = 1 / (1 + torch.exp(-(m + s * n)))
    ours = time_quantile(torch.special.ndtr(n), "logit_normal", m, s)
    torch.testing.assert_close(ours, expected, rtol=0, atol=1e-9)
    np.testing.assert_allclose(
        time_cdf(expected.numpy(), "logit_normal", m, s), torch.special.ndtr(n).numpy(), atol=1e-12
    )
    assert time_cdf(np.array([0.0, 1.0]), "logit_normal", m, s).tolist() == [0.0, 1.0]


@pytest.mark.parametrize("sampler,steps", [("euler", 5), ("heun", 5), ("sde", 6)])
@pytest.mark.parametrize("cfg_scale,low,high", [(1.0, 0.0, 1.0), (4.0, 0.3, 0.8)])
def test_sampler_trajectory_matches_repa(sampler, steps, cfg_scale, low, high) -> None:
    velocity = flow_velocity_fn(ReferenceVelocity(), cfg_scale, T, torch.device("cpu"))
    draws = iter(ref("sde_noise"))
    out = flow_sample(
        velocity, sampler, ref("latents"), ref("y"), steps, lambda: next(draws), guidance_low=low,
        guidance_high=high,
    )  # fmt: skip
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, ref(f"{sampler}_cfg{cfg_scale:g}"), rtol=0, atol=1e-6)
