"""Respacing: sample (or train) with a subset of a diffusion's timesteps (improved DDPM, Section 4).

Keeping steps S = {s_0 < s_1 < ...} of the original process and setting
beta'_k = 1 - abar_{s_k} / abar_{s_{k-1}} gives a shorter process with exactly the original abar at
the kept steps. The model still sees the original timestep index s_k: DTR looks up its mask table
(one row per original timestep) with it.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from .gaussian_diffusion import GaussianDiffusion, ModelFn


def space_timesteps(num_timesteps: int, section_counts: str | Sequence[int]) -> set[int]:
    """The timesteps of a ``num_timesteps`` process to keep.

    ``section_counts`` splits the process into equal sections and takes that many evenly strided steps
    from each: "250" or [250] is 250 steps over the whole range, "10,15,20" three sections.
    "ddimN" takes the integer stride of the DDIM paper, range(0, num_timesteps, stride), with N steps.
    """
    if isinstance(section_counts, str):
        if section_counts.startswith("ddim"):
            desired_count = int(section_counts[len("ddim") :])
            for stride in range(1, num_timesteps + 1):
                if len(range(0, num_timesteps, stride)) == desired_count:
                    return set(range(0, num_timesteps, stride))
            raise ValueError(
                f"timestep respacing {section_counts!r}: no integer stride gives exactly {desired_count} "
                f"of {num_timesteps} steps"
            )
        try:
            section_counts = [int(count) for count in section_counts.split(",")]
        except ValueError:
            raise ValueError(
                f"timestep respacing {section_counts!r}: expected comma-separated integers or 'ddimN'"
            ) from None
    if not section_counts:
        raise ValueError("timestep respacing: at least one section count is needed")
    size_per = num_timesteps // len(section_counts)
    extra = num_timesteps % len(section_counts)
    start = 0
    steps: list[int] = []
    for i, count in enumerate(section_counts):
        size = size_per + (1 if i < extra else 0)
        if not 1 <= count <= size:
            raise ValueError(f"timestep respacing: cannot take {count} steps from a section of {size} steps")
        stride = 1.0 if count == 1 else (size - 1) / (count - 1)
        # Accumulated (not multiplied) and rounded half to even, as the reference does, so that the
        # same steps are kept.
        position = 0.0
        for _ in range(count):
            steps.append(start + round(position))
            position += stride
        start += size
    return set(steps)


class SpacedDiffusion(GaussianDiffusion):
    """A diffusion over the ``use_timesteps`` of a base diffusion built from ``kwargs``.

    Timesteps given to its methods are indices into the kept steps (0..len(use_timesteps)-1); the
    model receives the original index ``timestep_map[t]`` as a long tensor.
    """

    def __init__(self, use_timesteps: Iterable[int], **kwargs: Any) -> None:
        self.use_timesteps = set(int(step) for step in use_timesteps)
        base = GaussianDiffusion(**kwargs)
        self.original_num_steps = base.num_timesteps
        outside = sorted(s for s in self.use_timesteps if not 0 <= s < base.num_timesteps)
        if outside:
            raise ValueError(f"use_timesteps {outside[:5]} lie outside 0..{base.num_timesteps - 1}")
        self.timestep_map: list[int] = sorted(self.use_timesteps)
        kept_alphas_cumprod = base.alphas_cumprod[self.timestep_map]
        previous = np.append(1.0, kept_alphas_cumprod[:-1])
        kwargs["betas"] = 1.0 - kept_alphas_cumprod / previous
        super().__init__(**kwargs)
        self._timestep_map_array = np.array(self.timestep_map, dtype=np.int64)

    def _call_model(
        self, model: ModelFn, x: Tensor, t: Tensor, model_kwargs: dict[str, Any] | None
    ) -> Tensor:
        original_t = torch.from_numpy(self._timestep_map_array).to(t.device)[t.long()]
        return model(x, original_t, **(model_kwargs or {}))
