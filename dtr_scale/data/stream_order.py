"""The stream's schedule: pure functions of (seed, epoch, canonical stream), never of rank, data or timing.

Points 1 and 2 of data/stream.py's docstring: which shards each canonical stream reads in an epoch
(`epoch_shard_list`, `stream_slots`), the order in which their samples arrive when several shards are
read at once (`interleaved_arrival`), and the shuffle buffer's emission order (`emission_order`), all
computed up front as integer arrays, so a resumed stream can recompute them instead of saving them. The
canonical streams a rank reads (`rank_streams`) and which stream feeds each sample of the global sequence
(`stream_of`) are the only places the world size enters.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from dtr_scale.data.shards import Manifest

# Domain-separation tags for the seeded generators, so shard order, shuffling and augmentation never
# share a random stream.
TAG_SHARDS, TAG_SHUFFLE, TAG_AUGMENT = 1, 2, 3


def epoch_shard_list(num_shards: int, seed: int, epoch: int, consumers: int, resampled: bool) -> np.ndarray:
    """Epoch `epoch`'s global shard order (same on every rank). `consumers`: the canonical streams."""
    rng = np.random.default_rng([seed, epoch, TAG_SHARDS])
    order = [rng.permutation(num_shards)]
    if not resampled:
        return order[0]
    while sum(len(o) for o in order) < consumers:
        order.append(rng.permutation(num_shards))
    full = np.concatenate(order)
    return full[: (len(full) // consumers) * consumers]


def stream_slots(list_length: int, stream: int, num_streams: int) -> np.ndarray:
    """Indices into the global shard list read by canonical stream `stream` of `num_streams`."""
    return np.arange(stream, list_length, num_streams)


def rank_streams(rank: int, world_size: int, num_streams: int) -> list[int]:
    """The canonical streams global rank `rank` reads: every world_size-th, from `rank` (world_size must divide
    num_streams). They are exactly the streams that feed its slots of the global sequence (`stream_of`)."""
    return list(range(rank, num_streams, world_size))


def stream_of(global_index: int, num_streams: int) -> tuple[int, int]:
    """Sample `global_index` of the global sequence -> (canonical stream, its n-th good sample): round robin,
    one sample per stream in turn. With world_size dividing both num_streams and the global batch, global slot
    g of a step lands on rank g mod world_size, whose streams are those with stream mod world_size == rank."""
    return global_index % num_streams, global_index // num_streams


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
    """One canonical stream's epoch: its shards (global slot, manifest index), item offsets, emission order.

    `order[q]` is the item number emitted q-th: `interleave` shards are read round robin (arrival order),
    and the shuffle buffer permutes the arrivals (interleaving plus a buffer makes a micro-batch
    close to an i.i.d. draw even from shards that are not shuffled themselves).
    """

    def __init__(self, cfg: dict[str, Any], manifest: Manifest, stream: int, epoch: int) -> None:
        streams = cfg["canonical_streams"]
        global_list = epoch_shard_list(len(manifest.shards), cfg["seed"], epoch, streams, cfg["resampled"])
        self.slots = stream_slots(len(global_list), stream, streams)
        self.shards = global_list[self.slots]
        counts = np.array([manifest.shards[s]["num_samples"] for s in self.shards], dtype=np.int64)
        self.offsets = np.concatenate([[0], np.cumsum(counts)])
        rng = np.random.default_rng([cfg["seed"], epoch, stream, streams, TAG_SHUFFLE])
        arrival = interleaved_arrival(counts, cfg["interleave"])
        self.order = arrival[emission_order(int(self.offsets[-1]), cfg["shuffle_buffer"], rng)]
        self.epoch = epoch

    def locate(self, item: int) -> tuple[int, int]:
        """Item number -> (position in this worker's shard list, index within the shard)."""
        pos = int(np.searchsorted(self.offsets, item, side="right")) - 1
        return pos, item - int(self.offsets[pos])
