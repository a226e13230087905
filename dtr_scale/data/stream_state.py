"""The data stream's saved position: the checks before a saved state is restored, and the resharding of every
old rank's state for a run resumed at another world size (docs/multi-node.md, "Elastic runs")."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

from dtr_scale.data.skipped import SkipLedger, merge_ledger_states


def check_saved_state(
    state: dict[str, Any],
    expected: dict[str, Any],
    manifest_path: Path,
    fmt: str,
    legacy: str,
    category: type,
) -> bool:
    """Whether `state` (a LatentStream.state_dict()) can be continued: True when its format is `fmt` and every
    setting in `expected` (the global order's: shards, interleave, buffer, seed, ...) is the same; False, with a
    warning of `category`, for a `legacy` state (saved before canonical streams: the stream starts over);
    ValueError naming the setting, both values and the manifest otherwise."""
    if state.get("format") == legacy:
        warnings.warn(
            f"data stream state: saved by a dtr-scale from before canonical streams ({legacy}), whose sample "
            f"order this one cannot continue: the data stream starts over from its first epoch ({manifest_path})",
            category,
            stacklevel=3,
        )
        return False
    if state.get("format") != fmt:
        raise ValueError(
            f"data stream state: format {state.get('format')!r}, expected {fmt!r} (a checkpoint from before "
            "canonical streams: its sample order cannot be continued)"
        )
    for key, value in expected.items():
        if state.get(key) != value:
            raise ValueError(
                f"data stream state: {key} was {state.get(key)!r} when saved but is {value!r} now "
                f"({manifest_path}); the exact position can only be restored with the same setting"
            )
    return True


def reshard_stream_states(
    states: list[dict[str, Any]], rank: int, world_size: int, micro_batch_size: int, streams: list[int]
) -> dict[str, Any]:
    """Rank `rank`'s stream state at `world_size` (reading canonical `streams`) from every old rank's `states`.

    The positions of all canonical streams are collected and this rank takes its own; its turns are the
    global samples taken (each old rank's turns x its world size, equal at a step boundary) over the new
    world size; the skip counts of all old ranks go to rank 0 (they are summed over ranks when logged);
    batch counters are converted through the samples taken."""
    old_world = int(states[0]["world_size"])
    positions = {int(c): [int(e), int(p)] for st in states for c, e, p in st["positions"]}
    samples = sum(int(st["samples"]) for st in states)
    merged = merge_ledger_states([st["skipped"] for st in states]) if rank == 0 else SkipLedger().state_dict()
    per_batch = micro_batch_size * world_size
    old_per_batch = int(states[0]["micro_batch_size"]) * old_world
    return {
        **states[0],
        "world_size": world_size,
        "rank": rank,
        "micro_batch_size": micro_batch_size,
        "positions": [[c, *positions[c]] for c in streams],
        "turns": int(states[0]["turns"]) * old_world // world_size,
        "batches": samples // per_batch,
        "epoch_batches": int(states[0]["epoch_batches"]) * old_per_batch // per_batch,
        "samples": samples // world_size,
        "skipped": merged,
    }
