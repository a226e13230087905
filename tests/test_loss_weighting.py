"""Min-SNR and P2 weights against hand-computed values, and how they enter the training loss."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dtr_scale.diffusion import create_diffusion, mse_loss_weights


def _linear_abar(t: int) -> float:
    """abar_t of the linear schedule (betas 1e-4..0.02 over 1000 steps), by a plain Python product."""
    product = 1.0
    for i in range(t + 1):
        product *= 1.0 - (1e-4 + (0.02 - 1e-4) * i / 999)
    return product


@pytest.mark.parametrize("t", [0, 10, 300, 999])
def test_min_snr_and_p2_weights_match_hand_computed_values(t):
    abar = np.array([_linear_abar(s) for s in range(1000)])
    snr = _linear_abar(t) / (1 - _linear_abar(t))
    assert mse_loss_weights(abar, "min_snr")[t] == pytest.approx(min(snr, 5.0) / snr, rel=1e-12)
    assert mse_loss_weights(abar, "min_snr", min_snr_gamma=1.0, predict_xstart=True)[t] == pytest.approx(
        min(snr, 1.0), rel=1e-12
    )
    assert mse_loss_weights(abar, "p2")[t] == pytest.approx(1.0 / (1.0 + snr), rel=1e-12)
    assert mse_loss_weights(abar, "p2", p2_k=2.0, p2_gamma=0.5)[t] == pytest.approx(
        (2.0 + snr) ** -0.5, rel=1e-12
    )
    assert mse_loss_weights(abar, "none")[t] == 1.0


def test_min_snr_is_one_at_high_noise_and_gamma_over_snr_at_low_noise():
    # Independent landmarks: SNR(t=0) = abar/(1-abar) ~ 9999 >> 5, so w = 5 / 9999; SNR(999) << 5, so w = 1.
    abar = np.array([_linear_abar(s) for s in range(1000)])
    w = mse_loss_weights(abar, "min_snr")
    assert w[0] == pytest.approx(5.0 * (1 - 0.9999) / 0.9999, rel=1e-9)
    assert w[999] == 1.0 and (np.diff(w) >= 0).all()


def test_weighting_multiplies_the_mse_term_only():
    torch.manual_seed(0)
    x = torch.randn(4, 2, 4, 4)
    t = torch.tensor([0, 5, 400, 999])
    noise = torch.randn_like(x)

    def model(x_t, timesteps, **_):  # eps and a variance channel, fixed
        return torch.cat([0.5 * x_t, torch.zeros_like(x_t)], dim=1)

    plain = create_diffusion("", diffusion_steps=1000).training_losses(model, x, t, noise=noise)
    weighted = create_diffusion("", diffusion_steps=1000, loss_weighting="min_snr").training_losses(
        model, x, t, noise=noise
    )
    abar = np.array([_linear_abar(s) for s in t.tolist()])
    snr = abar / (1 - abar)
    w = torch.tensor(np.minimum(snr, 5.0) / snr, dtype=torch.float32)
    torch.testing.assert_close(weighted["mse"], w * plain["mse"], rtol=1e-5, atol=0)
    torch.testing.assert_close(weighted["vb"], plain["vb"])
    torch.testing.assert_close(weighted["loss"], weighted["mse"] + weighted["vb"])


def test_unknown_weighting_and_sampling_with_a_weighting_are_refused():
    with pytest.raises(ValueError, match="unknown loss weighting 'snr'"):
        mse_loss_weights(np.array([0.5, 0.4]), "snr")
    with pytest.raises(ValueError, match="loss_weighting is a training setting"):
        create_diffusion("ddim50", loss_weighting="p2")
    # create_diffusion wires the named weighting in: P2 (k = 1, gamma = 1) is 1 / (1 + SNR_t) at every t
    # (to 1e-5: the diffusion rounds its schedule to float32 as the reference does, DESIGN §4).
    weights = create_diffusion("", loss_weighting="p2").mse_loss_weights
    for t in (0, 1, 500, 999):
        snr = _linear_abar(t) / (1 - _linear_abar(t))
        assert weights[t] == pytest.approx(1.0 / (1.0 + snr), rel=1e-5)
