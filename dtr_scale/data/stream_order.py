"""The stream's schedule: pure functions of (seed, epoch, rank, world size, worker), never of data or timing.

Points 1 and 2 of data/stream.py's docstring: which shards each (rank, loader worker) reads in an epoch
(`epoch_shard_list`, `consumer_slots`), the order in which their samples arrive when several shards are
read at once (`interleaved_arrival`), and the shuffle buffer's emission order (`emission_order`), all
computed up front as integer arrays, so a resumed stream can recompute them instead of saving them.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from dtr_scale.data.shards import Manifest

# Domain-separation tags for the seeded generators, so shard order, shuffling and augmentation never
# share a random stream.
TAG_SHARDS, TAG_SHUFFLE, TAG_AUGMENT = 1, 2, 3


def epoch_shard_list(num_shards: int, seed: int, epoch: int, consumers: int, resampled: bool) -> np.ndarray:
    """Epoch `epoch`'s global shard order (same on every rank). `consumers` = world_size * workers."""
    rng = np.random.default_rng([seed, epoch, TAG_SHARDS])
    order = [rng.permutation(num_shards)]
    if not resampled:
        return order[0]
    while sum(len(o) for o in order) < consumers:
        order.append(rng.permutation(num_shards))
    full = np.concatenate(order)
    return full[: (len(full) // consumers) * consumers]


def consumer_slots(list_length: int, rank: int, world_size: int, worker: int, num_workers: int) -> np.ndarray:
    """Indices into the global shard list read by (rank, worker): split by global rank first, then worker."""
    return np.arange(rank, list_length, world_size)[worker::num_workers]


def emission_order(num_items: int, buffer_size: int, rng: np.random.Generator) -> np.ndarray:
    """Shuffle-buffer order of items 0..n-1 arriving in order: fill the buffer, then emit a random slot and
    put the arriving item there; at the end, emit what is left in random order. Content-independent."""
    if buffer_size <= 1 or num_items <= 1:
        return np.arange(num_items, dtype=np.int64)
    out = np.empty(num_items, dtype=np.int64)
    fill = min(buffer_size, num_items)
    buffer = list(range(fill))
    choices = rng.integers(0, buffer_size, size=num_items - fill).tolist()
    for k, (item, slot) in enumerate(zip(range(fill, num_items), choices)):
        out[k] = buffer[slot]
        buffer[slot] = item
    out[num_items - fill :] = np.asarray(buffer, dtype=np.int64)[rng.permutation(fill)]
    return out


def interleaved_arrival(counts: np.ndarray, interleave: int) -> np.ndarray:
    """Arrival order of items when `interleave` shards are read at once, round robin, one item each turn.

    Items are numbered shard after shard (shard j holds items offsets[j] .. offsets[j+1]-1). Shards open in
    list order; an exhausted shard's turn passes to the next unopened shard of the list, which takes its
    place in the rotation. interleave=1 reads shard after shard. Content-independent (counts only), so the
    order can be recomputed on resume. Returns int64 (sum(counts),), a permutation of the item numbers.
    """
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    total = int(offsets[-1])
    if interleave <= 1 or len(counts) <= 1:
        return np.arange(total, dtype=np.int64)
    out = np.empty(total, dtype=np.int64)
    open_shards = list(range(min(interleave, len(counts))))
    taken = dict.fromkeys(open_shards, 0)
    next_shard, k = len(open_shards), 0
    while open_shards:
        still_open = []
        for j in open_shards:
            if taken[j] < counts[j]:
                out[k] = offsets[j] + taken[j]
                k += 1
                taken[j] += 1
            while taken.get(j, 0) >= counts[j] and next_shard < len(counts):  # refill the exhausted turn
                j, next_shard = next_shard, next_shard + 1
                taken[j] = 0
            if taken[j] < counts[j]:
                still_open.append(j)
        open_shards = still_open
    return out


class WorkerPlan:
    """One logical worker's epoch: its shards (global slot, manifest index), item offsets, emission order.

    `order[q]` is the item number emitted q-th: `interleave` shards are read round robin (arrival order),
    and the shuffle buffer permutes the arrivals (interleaving plus a buffer makes a micro-batch
    close to an i.i.d. draw even from shards that are not shuffled themselves).
    """

    def __init__(self, cfg: dict[str, Any], manifest: Manifest, role: int, epoch: int) -> None:
        workers = cfg["num_workers"]
        global_list = epoch_shard_list(
            len(manifest.shards), cfg["seed"], epoch, cfg["world_size"] * workers, cfg["resampled"]
        )
        self.slots = consumer_slots(len(global_list), cfg["rank"], cfg["world_size"], role, workers)
        self.shards = global_list[self.slots]
        counts = np.array([manifest.shards[s]["num_samples"] for s in self.shards], dtype=np.int64)
        self.offsets = np.concatenate([[0], np.cumsum(counts)])
        rng = np.random.default_rng([cfg["seed"], epoch, cfg["rank"], cfg["world_size"], role, TAG_SHUFFLE])
        arrival = interleaved_arrival(counts, cfg["interleave"])
        self.order = arrival[emission_order(int(self.offsets[-1]), cfg["shuffle_buffer"], rng)]
        self.epoch = epoch

    def locate(self, item: int) -> tuple[int, int]:
        """Item number -> (position in this worker's shard list, index within the shard)."""
        pos = int(np.searchsorted(self.offsets, item, side="right")) - 1
        return pos, item - int(self.offsets[pos])
