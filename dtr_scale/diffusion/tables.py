"""Schedule-table lookups: float64 numpy tables read for a batch of timesteps, cached per device."""

from __future__ import annotations

import weakref
from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

# Schedule tables copied to an accelerator once, not once per lookup: id(table) -> (weakref, {device: tensor}).
_DEVICE_TABLES: dict[int, tuple[weakref.ref, dict[torch.device, Tensor]]] = {}


def table_on(table: np.ndarray, device: torch.device) -> Tensor:
    """``table`` (float64 numpy, never modified in place) as a float64 tensor on ``device``.

    On the CPU a zero-copy view; elsewhere copied once per (table, device) and cached for the table's
    lifetime, so a training step issues no host-to-device copy of schedule coefficients.
    """
    if device.type == "cpu":
        return torch.from_numpy(table)
    key = id(table)
    entry = _DEVICE_TABLES.get(key)
    if entry is None or entry[0]() is not table:
        entry = (weakref.ref(table, lambda _ref, key=key: _DEVICE_TABLES.pop(key, None)), {})
        _DEVICE_TABLES[key] = entry
    cached = entry[1].get(device)
    if cached is None:
        cached = entry[1][device] = torch.from_numpy(table).to(device)
    return cached


def extract(table: np.ndarray, t: Tensor, shape: Sequence[int]) -> Tensor:
    """Read table[t] for a batch of timesteps as float32, broadcast to ``shape`` (B, ...).

    Indexing happens in float64 and the rounding to float32 after it, as in the reference.
    """
    values = table_on(table, t.device)[t].float()
    return values.reshape(-1, *([1] * (len(shape) - 1))).expand(*shape)
