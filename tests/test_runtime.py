"""Process set-up: which device a rank uses."""

from __future__ import annotations

import pytest


def test_local_rank_maps_onto_the_visible_devices():
    # SLURM with one GPU bound per task: every task sees device 0 whatever its SLURM_LOCALID.
    from dtr_scale.errors import UserError
    from dtr_scale.train.runtime import device_index

    assert [device_index(r, 1) for r in range(4)] == [0, 0, 0, 0]
    assert [device_index(r, 4) for r in range(6)] == [0, 1, 2, 3, 0, 1]
    with pytest.raises(UserError, match="no CUDA device is visible"):
        device_index(0, 0)
