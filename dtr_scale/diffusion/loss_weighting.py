"""Per-timestep weights on the MSE term of the diffusion loss: none, Min-SNR-gamma, P2.

The options the official DTR code offers beside ANT-UW (byeongjun-park/DTR, diffusion/gaussian_diffusion.py,
`mse_loss_weight_type`), for epsilon prediction, applied as there: `mse = w_t * mean_flat((eps - eps_hat)^2)`,
the VB term (learned variance) unweighted, `loss = mse + vb`.

- `min_snr` (Hang et al., ICCV 2023, "Efficient Diffusion Training via Min-SNR Weighting Strategy", Eq. 6 with
  the epsilon-prediction form of Sec. 3.4): w_t = min(SNR(t), gamma) / SNR(t), gamma = 5 by default.
  For x0-prediction the weight is min(SNR(t), gamma) itself.
- `p2` (Choi et al., CVPR 2022, "Perception Prioritized Training of Diffusion Models", Eq. 8 with
  lambda_t = 1 for L_simple): w_t = 1 / (k + SNR(t))^gamma, defaults k = 1, gamma = 1 (the paper's
  setting). The official DTR code builds the same table from 1/(1-abar) - 1 = SNR.

SNR(t) = abar_t / (1 - abar_t), computed in float64; the table is rounded to float32 once, as the reference
code's `_extract_into_tensor` does.
"""

from __future__ import annotations

import numpy as np

from dtr_scale.diffusion.schedules import snr

LOSS_WEIGHTINGS = ("none", "min_snr", "p2")


def mse_loss_weights(
    alphas_cumprod: np.ndarray,
    weighting: str,
    *,
    min_snr_gamma: float = 5.0,
    p2_k: float = 1.0,
    p2_gamma: float = 1.0,
    predict_xstart: bool = False,
) -> np.ndarray:
    """w_t for t = 0..T-1, float64 (T,), for the named weighting (see the module docstring).

    Raises ValueError for an unknown name or a non-positive gamma / negative k.
    """
    ratio = snr(alphas_cumprod)
    if weighting == "none":
        return np.ones_like(ratio)
    if weighting == "min_snr":
        if not min_snr_gamma > 0:
            raise ValueError(f"min_snr_gamma must be > 0, got {min_snr_gamma}")
        clipped = np.minimum(ratio, min_snr_gamma)
        return clipped if predict_xstart else clipped / ratio
    if weighting == "p2":
        if p2_k < 0 or p2_gamma < 0:
            raise ValueError(f"p2 needs k >= 0 and gamma >= 0, got k={p2_k}, gamma={p2_gamma}")
        return 1.0 / (p2_k + ratio) ** p2_gamma
    raise ValueError(f"unknown loss weighting {weighting!r}; expected one of {', '.join(LOSS_WEIGHTINGS)}")
