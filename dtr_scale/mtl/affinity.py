"""Task affinity of the denoising tasks (ANT, NeurIPS 2023, Sec. 3 / task_affinity_score): the cosine
similarity between the loss gradients of timestep groups, measured on a trained model.

For each group of G consecutive timesteps the gradient of the mean diffusion loss is taken over a few
fixed batches, with every sample's t drawn uniformly inside the group; the result is the
(T/G) x (T/G) matrix of cosines between the group gradients (T x T for G = 1, as in the paper). The
same batches and the same noise are used for every group (common random numbers), so differences
between groups come from t alone. ``dtr-scale cluster --objective affinity`` clusters it.

The group gradients are held in memory (float32, ``num_groups * P`` values): restrict ``params`` or
raise G for a large model; ``compute_affinity`` checks the size before it starts.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from dtr_scale.mtl.gram import cosine_from_gram

_CHUNK = 1 << 22


def compute_affinity(
    model: Callable[..., torch.Tensor],
    diffusion: Any,
    batches: Sequence[tuple[torch.Tensor, torch.Tensor]],
    group_size: int,
    params: Sequence[torch.Tensor] | None = None,
    seed: int = 0,
    max_gradient_bytes: int = 32 << 30,
    storage_device: torch.device | str = "cpu",
) -> np.ndarray:
    """Cosine-similarity matrix (float64, num_groups x num_groups) of per-timestep-group loss gradients.

    ``model(x, t, y)``: the denoiser (its train/eval mode is left as the caller set it; DiT's train
    mode applies label dropout, as training does). ``diffusion``: has ``num_timesteps`` and
    ``training_losses(model, x_start, t, model_kwargs, noise)``; a flow objective (``objective == "flow"``)
    gets times drawn uniformly inside each group's bins of t. ``batches``: (latents, labels) pairs
    on the model's device, reused for every group. ``params``: the parameters whose gradient is
    compared (default: all of ``model.parameters()`` that require grad).
    """
    T = int(diffusion.num_timesteps)
    if group_size < 1 or T % group_size != 0:
        raise ValueError(f"group_size must divide the {T} diffusion timesteps, got {group_size}")
    if not batches:
        raise ValueError("compute_affinity needs at least one batch")
    if params is None:
        params = [p for p in model.parameters() if p.requires_grad]  # type: ignore[attr-defined]
    params = list(params)
    num_groups = T // group_size
    total = sum(p.numel() for p in params)
    needed = num_groups * total * 4
    if needed > max_gradient_bytes:
        raise ValueError(
            f"task affinity would hold {num_groups} group gradients of {total:,} parameters "
            f"({needed / 2**30:.1f} GiB > limit {max_gradient_bytes / 2**30:.1f} GiB); raise the group size "
            f"or compare a subset of the parameters"
        )
    # common random numbers: one noise tensor per batch, shared by all groups
    noise_gen = torch.Generator().manual_seed(seed)
    noises = [torch.randn(x.shape, generator=noise_gen).to(x.device) for x, _ in batches]
    t_gen = torch.Generator().manual_seed(seed + 1)

    gradients = torch.empty(num_groups, total, dtype=torch.float32, device=storage_device)
    for group in range(num_groups):
        flat = gradients[group]
        flat.zero_()
        for (x, y), noise in zip(batches, noises):
            t = group * group_size + torch.randint(0, group_size, (x.shape[0],), generator=t_gen)
            if getattr(diffusion, "objective", "ddpm") == "flow":  # bin i of flow time: [i / T, (i + 1) / T)
                t = ((t + torch.rand(t.shape, generator=t_gen, dtype=torch.float64)) / T).float()
            loss = diffusion.training_losses(model, x, t.to(x.device), {"y": y}, noise)["loss"].mean()
            grads = torch.autograd.grad(loss, params, allow_unused=True)
            offset = 0
            for p, g in zip(params, grads):
                if g is not None:
                    flat[offset : offset + p.numel()] += g.detach().reshape(-1).to(flat)
                offset += p.numel()
        flat /= len(batches)

    return cosine_from_gram(gram_in_chunks(gradients)).numpy()


def gram_in_chunks(gradients: torch.Tensor) -> torch.Tensor:
    """G = gradients @ gradients.T in float64 (num_groups x num_groups, on the CPU), _CHUNK columns at a time."""
    gram = torch.zeros(gradients.shape[0], gradients.shape[0], dtype=torch.float64)
    for lo in range(0, gradients.shape[1], _CHUNK):
        chunk = gradients[:, lo : lo + _CHUNK].to(torch.float64)
        gram += (chunk @ chunk.T).cpu()
    return gram


# ----------------------------------------------------------------------------- CLI
