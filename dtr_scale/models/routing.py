"""Denoising Task Routing (DTR; Park et al., ICLR 2024).

Each timestep t (a denoising "task") activates a contiguous window of `C_b = int(C * beta)`
channels starting at `s_t`. The start slides with t as `s_t = round(u_t**alpha * (C - C_b))`,
`u_t = t / (T - 1)` (paper Eq. 4 as the official code implements it), so neighbouring timesteps
share most channels (task affinity) and, with alpha > 1, the early, noisy timesteps (large t)
move through more channels per step than the late ones, i.e. get more task-specific channels.
beta is the ACTIVE fraction; beta = 1 turns routing into plain DiT. No parameters are learned.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass(frozen=True)
class DTRConfig:
    """Routing settings of a model: window slope `alpha`, active fraction `beta`, number of tasks."""

    alpha: float = 4.0
    beta: float = 0.8
    num_tasks: int = 1000

    def __post_init__(self) -> None:
        _check_arguments(self.num_tasks, 1, self.alpha, self.beta)


def _check_arguments(num_tasks: int, channels: int, alpha: float, beta: float) -> None:
    if int(num_tasks) != num_tasks or num_tasks < 1:
        raise ValueError(f"routing.num_tasks must be an integer >= 1, got {num_tasks!r}")
    if int(channels) != channels or channels < 1:
        raise ValueError(f"routing channels must be an integer >= 1, got {channels!r}")
    if not (alpha > 0):
        raise ValueError(f"routing.alpha must be > 0, got {alpha!r}")
    if not (0 < beta <= 1):
        raise ValueError(f"routing.beta (active fraction) must be in (0, 1], got {beta!r}")


def dtr_mask_table(num_tasks: int, channels: int, alpha: float = 4.0, beta: float = 0.8) -> torch.Tensor:
    """BoolTensor[num_tasks, channels]; row t is True on channels s_t <= j < s_t + C_b.

    DTR Eq. 4 (official construction): C_b = int(channels * beta) truncated, L = channels - C_b,
    u_t = linspace(0, 1, num_tasks)[t] in float64, s_t = round_half_even(u_t**alpha * L).
    """
    _check_arguments(num_tasks, channels, alpha, beta)
    active = int(channels * beta)
    if active < 1:
        raise ValueError(
            f"routing.beta={beta} leaves int({channels} * {beta}) = 0 active channels; "
            f"need beta >= 1/{channels}"
        )
    free = channels - active
    u = np.linspace(0.0, 1.0, num_tasks, dtype=np.float64)
    start = np.round(u**alpha * free).astype(np.int64)  # numpy rounds half to even
    j = np.arange(channels, dtype=np.int64)
    table = (j[None, :] >= start[:, None]) & (j[None, :] < start[:, None] + active)
    return torch.from_numpy(table)
