"""Specification of the DTR mask table (Park et al., ICLR 2024, Eq. 4 as the official code builds it).

C_b = int(C * beta) active channels (truncated), L = C - C_b, u_t = linspace(0, 1, T)[t] in float64,
s_t = round_half_even(u_t**alpha * L); row t is True exactly on s_t <= j < s_t + C_b.
"""

from __future__ import annotations

import pytest
import torch

from dtr_scale.models.routing import DTRConfig, dtr_mask_table


def window_starts(table: torch.Tensor) -> list[int]:
    """Index of the first True channel of every row."""
    return table.int().argmax(dim=1).tolist()


def test_table_has_one_bool_row_per_task_and_one_column_per_channel():
    table = dtr_mask_table(1000, 384)
    assert table.shape == (1000, 384)
    assert table.dtype == torch.bool


@pytest.mark.parametrize(
    ("channels", "beta", "active"),
    [
        (16, 0.8, 12),  # 12.8 -> 12
        (384, 0.8, 307),  # 307.2 -> 307
        (1152, 0.8, 921),  # 921.6 -> 921 (DiT-XL)
        (100, 0.29, 28),  # 100 * 0.29 = 28.999999999999996 in float: truncation gives 28, rounding 29
    ],
)
def test_every_row_has_int_of_channels_times_beta_active_channels(channels, beta, active):
    table = dtr_mask_table(50, channels, beta=beta)
    assert table.sum(dim=1).tolist() == [active] * 50


def test_rows_are_contiguous_windows():
    table = dtr_mask_table(200, 64, alpha=2.0, beta=0.7)
    for row in table:
        on = torch.nonzero(row).flatten()
        assert on.tolist() == list(range(int(on[0]), int(on[-1]) + 1))


def test_window_slides_from_first_channels_at_t0_to_last_channels_at_t_max():
    channels, beta = 64, 0.75  # C_b = 48, L = 16
    table = dtr_mask_table(1000, channels, beta=beta)
    assert table[0, :48].all() and not table[0, 48:].any()
    assert table[-1, 16:].all() and not table[-1, :16].any()


def test_window_start_never_moves_backwards():
    starts = window_starts(dtr_mask_table(1000, 384, alpha=4.0, beta=0.8))
    assert all(a <= b for a, b in zip(starts, starts[1:]))
    assert starts[0] == 0 and starts[-1] == 384 - 307


def test_tiny_case_worked_out_by_hand():
    # T=10, C=16, alpha=4, beta=0.8: C_b = int(12.8) = 12, L = 16 - 12 = 4, u_t = t/9.
    # u_t**4 * 4 = 4 t^4 / 6561:
    #   t=0: 0          -> 0
    #   t=1: 4/6561     = 0.0006 -> 0
    #   t=2: 64/6561    = 0.0098 -> 0
    #   t=3: 324/6561   = 0.0494 -> 0
    #   t=4: 1024/6561  = 0.1561 -> 0
    #   t=5: 2500/6561  = 0.3810 -> 0
    #   t=6: 5184/6561  = 0.7901 -> 1
    #   t=7: 9604/6561  = 1.4638 -> 1
    #   t=8: 16384/6561 = 2.4972 -> 2   (just below .5: a ceil or a 2.5-threshold bug gives 3)
    #   t=9: 4          -> 4           (window ends on the last channel, 15)
    table = dtr_mask_table(10, 16, alpha=4.0, beta=0.8)
    expected_starts = [0, 0, 0, 0, 0, 0, 1, 1, 2, 4]
    expected = torch.zeros(10, 16, dtype=torch.bool)
    for t, s in enumerate(expected_starts):
        expected[t, s : s + 12] = True
    assert torch.equal(table, expected)


@pytest.mark.parametrize(
    ("channels", "beta", "middle_start"),
    [
        (10, 0.5, 2),  # L = 5, u_1 = 0.5 -> 2.5 rounds to even 2 (half-up would give 3)
        (14, 0.5, 4),  # L = 7, u_1 = 0.5 -> 3.5 rounds to even 4 (half-down would give 3)
    ],
)
def test_window_start_rounds_half_to_even(channels, beta, middle_start):
    # T = 3 and alpha = 1 put u_1 exactly at 0.5, so u_1 * L lands exactly on x.5 for odd L.
    table = dtr_mask_table(3, channels, alpha=1.0, beta=beta)
    assert window_starts(table) == [0, middle_start, channels - int(channels * beta)]


def test_beta_one_activates_every_channel_for_every_task():
    assert dtr_mask_table(100, 32, beta=1.0).all()


def test_single_task_table_uses_the_first_window():
    # linspace(0, 1, 1) == [0.0]: the only task starts at channel 0.
    table = dtr_mask_table(1, 10, beta=0.5)
    assert table[0].tolist() == [True] * 5 + [False] * 5


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"beta": 0.0}, "beta"),
        ({"beta": -0.1}, "beta"),
        ({"beta": 1.5}, "beta"),
        ({"beta": float("nan")}, "beta"),
        ({"alpha": 0.0}, "alpha"),
        ({"alpha": -1.0}, "alpha"),
        ({"channels": 0}, "channels"),
        ({"num_tasks": 0}, "num_tasks"),
    ],
)
def test_invalid_arguments_are_rejected_naming_the_argument(kwargs, name):
    arguments = {"num_tasks": 10, "channels": 16, "alpha": 4.0, "beta": 0.8, **kwargs}
    with pytest.raises(ValueError, match=name):
        dtr_mask_table(**arguments)


def test_beta_leaving_no_active_channel_is_rejected():
    with pytest.raises(ValueError, match="beta"):
        dtr_mask_table(10, 4, beta=0.2)  # int(0.8) = 0 active channels


def test_routing_config_validates_like_the_table():
    with pytest.raises(ValueError, match="beta"):
        DTRConfig(beta=0.0)
    with pytest.raises(ValueError, match="alpha"):
        DTRConfig(alpha=-2.0)
    assert DTRConfig() == DTRConfig(alpha=4.0, beta=0.8, num_tasks=1000)
