"""The run's view of skipped samples: totals for logging and the stop past `data.max_skipped_fraction`.

Each rank's stream keeps a SkipLedger (data/skipped.py). At every `log_every` the totals by kind are summed
over ranks into `data/skipped_<kind>` scalars (TensorBoard and metrics.jsonl). Before every checkpoint the
ranks compare their windows (samples seen and skipped since the previous checkpoint): when one skipped more
than `data.max_skipped_fraction` of what it saw, every rank raises the same one-line DataQualityError naming
that rank and its worst shards, so no checkpoint of a run that lost its data is written. docs/reliability.md
states the policy.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from dtr_scale.data.skipped import SKIP_KINDS, SkipLedger, judge_windows
from dtr_scale.errors import UserError


class DataQualityError(UserError, RuntimeError):
    """Too many samples were skipped (data.max_skipped_fraction); the message names the worst shards."""


def skipped_scalars(ledger: SkipLedger, device: torch.device) -> dict[str, float]:
    """{"data/skipped_<kind>": samples skipped so far, summed over ranks} plus "data/skipped_total".
    Collective when a process group is up (every rank calls it)."""
    counts = torch.tensor([ledger.totals[k] for k in SKIP_KINDS], dtype=torch.int64, device=device)
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(counts)
    values = counts.tolist()  # the log step's read: a host sync every log_every steps, not per step
    scalars = {f"data/skipped_{kind}": float(v) for kind, v in zip(SKIP_KINDS, values)}
    scalars["data/skipped_total"] = float(sum(values))
    return scalars


def check_skipped_fraction(ledger: SkipLedger, max_fraction: float, where: str) -> None:
    """Judge every rank's window (collective), start a new one, and raise DataQualityError on every rank
    when some rank skipped more than `max_fraction` of the samples it saw. `where`: the manifest, for the
    message."""
    window = ledger.window()
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        windows: list = [None] * dist.get_world_size()
        dist.all_gather_object(windows, window)
    else:
        windows = [window]
    ledger.reset_window()
    message = judge_windows(windows, max_fraction, where)
    if message is not None:
        raise DataQualityError(f"stopping before the checkpoint: {message}")
