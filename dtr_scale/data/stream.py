"""The training data stream: latent shards -> augmented, scaled micro-batches, deterministic and resumable.

What the trainer gets from `LatentStream`: batches `(latents float32 (B, C, H, W), labels int64 (B,))`,
latents already multiplied by the manifest's `scaling_factor`, where each sample's orientation (as stored
or flipped) is chosen at random and its latent drawn from the stored posterior, `mean + std * eps`
(DESIGN §7; MAR-style moments for both flips, so augmentation survives offline encoding).

How exact resume works (the design choice)
------------------------------------------
Everything random is a pure function of (seed, epoch, rank, world size, worker) and never of timing or
content, so a stream can be *recomputed* instead of saved:

1. Shard order. Epoch e's global shard list is a permutation of all shards drawn from (seed, e), the same
   on every rank. Rank r takes every world_size-th entry starting at r (the *global* rank), and loader
   worker w of R workers takes every R-th entry of that. In `resampled` (infinite) mode the list is
   extended with further permutations to at least world_size * R entries and cut to a multiple of it, so
   every (rank, worker) reads the same number of shards per epoch, even with fewer shards than
   consumers, and the epochs simply go on forever. In epoch mode each epoch is one pass: disjoint and
   complete across ranks and workers.
2. Shuffle buffer in index space. A worker's samples, numbered in read order, are shuffled by the usual
   buffer algorithm (fill `shuffle_buffer`, then emit a random slot and refill it), but the random slot
   choices are drawn from (seed, e, rank, world, worker) before any data is read. The emission order of
   an epoch is therefore a plain integer array computed up front.
3. Augmentation is keyed by the sample's identity in the epoch, (seed, e, slot in the global shard list,
   index in the shard): the same sample gets the same flip and noise whatever the world size or the
   number of workers.
4. Position. A worker's position is (epoch, number of emitted plan entries). Each batch carries its
   worker's new position to the main process, which records it together with the round-robin pointer of
   the DataLoader (it hands out batches worker 0, 1, ..., R-1, 0, ...). `state_dict()` is just these
   integers. A rebuilt stream recomputes each worker's emission order, skips shards whose samples were all
   emitted already, keeps only the not-yet-emitted samples of the others, and maps the new loader's
   worker k to logical worker (pointer + k) mod R: it yields exactly the batches the original would have.
   The cost of a resume is re-reading at most the shards still in the shuffle buffer.

Errors: a shard that is missing, truncated or unreadable, or holds fewer samples than the manifest says,
and a member that fails to decode, are named in a warning (`on_error="warn"`), counted in `stats`, and the
lost samples skipped; `on_error="raise"` raises ShardError instead, `"ignore"` only counts. Errors are
deterministic, so skipping keeps the stream deterministic (and resume exact). Missing files are detected
up front. After a resume, a broken shard whose lost samples were due both before and after the saved
position is counted again when it is re-read; the counts are diagnostics, not part of the position.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from dtr_scale.data.shards import Manifest, ShardReadError, decode_sample, iter_raw_samples, load_manifest
from dtr_scale.errors import UserError

STATE_FORMAT = "dtr-scale-stream/1"
ON_ERROR_CHOICES = ("warn", "raise", "ignore")
# Domain-separation tags for the seeded generators, so shard order, shuffling and augmentation never
# share a random stream.
_TAG_SHARDS, _TAG_SHUFFLE, _TAG_AUGMENT = 1, 2, 3


class ShardError(UserError, RuntimeError):
    """A shard or sample could not be read and the stream was told to raise (on_error="raise")."""


class ShardWarning(UserWarning):
    """A shard or sample could not be read and was skipped (on_error="warn")."""


# --------------------------------------------------------------------------------------- pure schedule


def epoch_shard_list(num_shards: int, seed: int, epoch: int, consumers: int, resampled: bool) -> np.ndarray:
    """Epoch `epoch`'s global shard order (same on every rank). `consumers` = world_size * workers."""
    rng = np.random.default_rng([seed, epoch, _TAG_SHARDS])
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


# --------------------------------------------------------------------------------------- worker side


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


class _WorkerPlan:
    """One logical worker's epoch: its shards (global slot, manifest index), item offsets, emission order.

    `order[q]` is the item number emitted q-th: `interleave` shards are read round robin (arrival order),
    and the shuffle buffer permutes the arrivals (DESIGN §7: interleaving plus a buffer makes a micro-batch
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
        rng = np.random.default_rng([cfg["seed"], epoch, cfg["rank"], cfg["world_size"], role, _TAG_SHUFFLE])
        arrival = interleaved_arrival(counts, cfg["interleave"])
        self.order = arrival[emission_order(int(self.offsets[-1]), cfg["shuffle_buffer"], rng)]
        self.epoch = epoch

    def locate(self, item: int) -> tuple[int, int]:
        """Item number -> (position in this worker's shard list, index within the shard)."""
        pos = int(np.searchsorted(self.offsets, item, side="right")) - 1
        return pos, item - int(self.offsets[pos])


class _EpochReader:
    """Reads a worker's shards, each front to back, and hands out samples in the plan's emission order.

    Yields (plan position, shard index, slot, member, raw sample or None) for q = start.., where None means
    the sample was lost with a broken shard. Several shards are open at once (interleaving); a sample read
    before its turn waits in `store` (about the shuffle buffer's size). Samples emitted before a resume
    (`order[:start]`) are skipped without being kept, and shards holding none still due are never opened.
    Broken shards add (shard name, message) to `errors`.
    """

    def __init__(self, manifest: Manifest, plan: _WorkerPlan, start: int, errors: list) -> None:
        self.manifest, self.plan, self.start, self.errors = manifest, plan, start, errors
        self.needed = np.zeros(int(plan.offsets[-1]), dtype=bool)
        self.needed[plan.order[start:]] = True

    def __iter__(self) -> Iterator[tuple[int, int, int, int, dict | None]]:
        plan, store = self.plan, {}
        readers: dict[int, Any] = {}  # plan position -> open sample iterator
        read = np.zeros(len(plan.shards), dtype=np.int64)  # members read so far, per plan position
        lost_from = np.full(len(plan.shards), np.iinfo(np.int64).max)  # first member lost, per position
        try:
            for q in range(self.start, len(plan.order)):
                item = int(plan.order[q])
                pos, index = plan.locate(item)
                while item not in store and index < lost_from[pos] and read[pos] <= index:
                    self._read_one(pos, readers, read, lost_from, store)
                yield q, int(plan.shards[pos]), int(plan.slots[pos]), index, store.pop(item, None)
        finally:
            for samples in readers.values():
                samples.close()

    def _read_one(
        self, pos: int, readers: dict, read: np.ndarray, lost_from: np.ndarray, store: dict
    ) -> None:
        """Read the next member of the shard at plan position `pos` (opening it first if needed)."""
        plan = self.plan
        shard = int(plan.shards[pos])
        name = self.manifest.shards[shard]["name"]
        lo, hi = int(plan.offsets[pos]), int(plan.offsets[pos + 1])
        if pos not in readers:
            readers[pos] = iter_raw_samples(self.manifest.shard_path(shard))
        try:
            raw = next(readers[pos])
        except StopIteration:
            raw = None
            self.errors.append((name, f"ended after {read[pos]} of {hi - lo} samples (truncated?)"))
        except ShardReadError as err:
            raw = None
            self.errors.append((name, f"{err}; lost {hi - lo - read[pos]} of {hi - lo} samples"))
        if raw is None:
            lost_from[pos] = read[pos]
            readers.pop(pos).close()
            return
        if self.needed[lo + read[pos]]:
            store[lo + int(read[pos])] = raw
        read[pos] += 1
        if read[pos] == hi - lo:  # the last listed sample: the shard must end here
            samples = readers.pop(pos)
            try:
                extra = next(samples, None) is not None
            except ShardReadError:
                extra = False  # every listed sample was read; a broken tail loses nothing
            if extra:
                self.errors.append((name, f"holds more than the {hi - lo} samples the manifest lists"))
            samples.close()


class _WorkerStream(torch.utils.data.IterableDataset):
    """What runs inside each DataLoader worker (or in-process when num_workers == 0)."""

    def __init__(self, cfg: dict[str, Any], manifest: Manifest, roles: list[int], starts: list[list[int]]):
        super().__init__()
        self.cfg, self.manifest, self.roles, self.starts = cfg, manifest, roles, starts

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = torch.utils.data.get_worker_info()
        physical = 0 if info is None else info.id
        role = self.roles[physical]
        epoch, position = self.starts[physical]
        cfg, manifest = self.cfg, self.manifest
        batch_size, shape = cfg["micro_batch_size"], tuple(manifest.latent_shape)
        num_labels = len(manifest.labels)
        latents, labels, errors = [], [], []
        empty_epochs = 0
        while True:
            plan = _WorkerPlan(cfg, manifest, role, epoch)
            delivered = 0
            for q, shard, slot, member, raw in _EpochReader(manifest, plan, position, errors):
                position = q + 1
                if raw is None:
                    continue  # lost with its shard; the error was recorded when the shard broke
                where = f"{manifest.root / manifest.shards[shard]['name']}"
                try:
                    sample = decode_sample(raw, shape, where)
                    if not 0 <= sample.label < num_labels:  # num_labels is the CFG null class: never data
                        raise ValueError(
                            f"{where}:{sample.key}.cls: label {sample.label} is outside the manifest's "
                            f"{num_labels} labels (expected 0..{num_labels - 1})"
                        )
                except ValueError as err:
                    errors.append((manifest.shards[shard]["name"], str(err)))
                    continue
                latents.append(self._augment(sample, epoch, slot, member))
                labels.append(sample.label)
                delivered += 1
                if len(latents) == batch_size:
                    next_epoch, next_position = epoch, position
                    if cfg["resampled"] and position == len(plan.order):
                        next_epoch, next_position = epoch + 1, 0
                    yield self._message(role, next_epoch, next_position, latents, labels, errors)
                    latents, labels = [], []
                    errors.clear()  # in place: the epoch reader appends to this very list
            if not cfg["resampled"]:
                if latents or errors:  # the partial last batch of the pass, and late errors
                    yield self._message(role, epoch, position, latents, labels, errors)
                return
            # An epoch that delivers nothing at all means every shard of this worker is unreadable.
            empty_epochs = 0 if delivered else empty_epochs + 1
            if empty_epochs >= 2:
                names = sorted({manifest.shards[int(s)]["name"] for s in plan.shards})
                raise ShardError(f"{manifest.path}: no readable sample in shards {names} for two epochs")
            epoch, position = epoch + 1, 0

    def _augment(self, sample, epoch: int, slot: int, member: int) -> np.ndarray:
        # Random flip per sample (only where the data allows it: data.hflip), then a posterior draw
        # z = mean + std * eps (the VAE's reparameterisation), scaled by the VAE's scaling factor (0.18215
        # for SD's VAE), as DiT's online encoding does. The flip is drawn either way, so the noise of a
        # sample does not depend on the flip setting.
        rng = np.random.default_rng([self.cfg["seed"], epoch, slot, member, _TAG_AUGMENT])
        drawn = int(rng.integers(2))
        flip = drawn if self.cfg["hflip"] else 0
        eps = rng.standard_normal(sample.mean.shape[1:], dtype=np.float32)
        z = sample.mean[flip].astype(np.float32) + sample.std[flip].astype(np.float32) * eps
        return z * np.float32(self.manifest.scaling_factor)

    @staticmethod
    def _message(role, epoch, position, latents, labels, errors) -> dict[str, Any]:
        return {
            "latents": torch.from_numpy(np.stack(latents)) if latents else None,
            "labels": torch.tensor(labels, dtype=torch.int64),
            "role": role,
            "epoch": epoch,
            "position": position,
            "errors": list(errors),
        }


# --------------------------------------------------------------------------------------- trainer side


class LatentStream:
    """Iterable of `(latents, labels)` micro-batches for one rank; see the module docstring.

    manifest: a manifest.json path (or its directory) or a loaded Manifest. rank / world_size: the
    *global* rank and world size. resampled=True: infinite (training); False: one pass per `iter()`,
    disjoint and complete across ranks and workers, the last batch of each worker possibly short.
    drop_last (epoch mode, training): only full micro-batches, the same number on every rank per epoch
    (`full_batches_per_epoch`); `batches()` then rolls over into the next, reshuffled epoch.
    interleave: shards each loader worker reads at once (round robin), before the shuffle buffer.
    hflip: pick the stored or the mirrored orientation at random per sample; None = the manifest's
    `hflip` field (absent: True, natural images), False = always the stored one (digits, text).
    expected_latent_shape: (C, H, W) the model is configured for; a mismatch is an error naming the
    manifest, raised here, before training starts.
    """

    def __init__(
        self,
        manifest: str | os.PathLike | Manifest,
        micro_batch_size: int,
        *,
        seed: int,
        rank: int,
        world_size: int,
        num_workers: int = 0,
        shuffle_buffer: int = 1000,
        interleave: int = 8,
        hflip: bool | None = None,
        resampled: bool = True,
        drop_last: bool = False,
        on_error: str = "warn",
        expected_latent_shape: tuple[int, ...] | None = None,
        pin_memory: bool = False,
    ) -> None:
        self.manifest = manifest if isinstance(manifest, Manifest) else load_manifest(manifest)
        path = self.manifest.path
        if micro_batch_size < 1:
            raise ValueError(f"micro_batch_size must be >= 1, got {micro_batch_size}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size); got rank {rank}, world_size {world_size}")
        if num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {num_workers}")
        if interleave < 1:
            raise ValueError(f"interleave must be >= 1 (shards read at once per worker), got {interleave}")
        if shuffle_buffer < 0:
            raise ValueError(f"shuffle_buffer must be >= 0, got {shuffle_buffer}")
        if on_error not in ON_ERROR_CHOICES:
            raise ValueError(f"on_error must be one of {ON_ERROR_CHOICES}, got {on_error!r}")
        if expected_latent_shape is not None and tuple(expected_latent_shape) != tuple(
            self.manifest.latent_shape
        ):
            raise ValueError(
                f"{path}: latent_shape {list(self.manifest.latent_shape)} does not match the configured "
                f"model input {list(expected_latent_shape)} (in_channels, input_size, input_size)"
            )
        if self.manifest.num_samples == 0:
            raise ValueError(f"{path}: the manifest's shards hold no samples")
        if not resampled and len(self.manifest.shards) < world_size:
            raise ValueError(
                f"{path}: {len(self.manifest.shards)} shards cannot give each of {world_size} ranks a "
                "shard in epoch mode; use resampled=True or write more, smaller shards"
            )
        self.cfg = {
            "seed": int(seed),
            "rank": int(rank),
            "world_size": int(world_size),
            "num_workers": max(1, int(num_workers)),  # logical workers; 0 means one, in-process
            "micro_batch_size": int(micro_batch_size),
            "shuffle_buffer": int(shuffle_buffer),
            "interleave": int(interleave),
            "hflip": bool(self.manifest.extra.get("hflip", True) if hflip is None else hflip),
            "resampled": bool(resampled),
        }
        self.num_workers, self.on_error, self.pin_memory = int(num_workers), on_error, pin_memory
        self.drop_last = bool(drop_last)
        self._epoch_batches = 0  # full micro-batches taken from the current epoch (epoch mode)
        self._workers = [[0, 0] for _ in range(self.cfg["num_workers"])]
        self._next_worker = 0
        self._batches = 0
        self.stats: dict[str, Any] = {"samples": 0, "batches": 0, "errors": {}}
        missing = [
            s["name"] for i, s in enumerate(self.manifest.shards) if not self.manifest.shard_path(i).is_file()
        ]
        if missing:
            self._report([(name, "file is missing") for name in missing], count=False)

    # -------------------------------------------------------------------------------- iteration

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        workers = self.cfg["num_workers"]
        roles = [(self._next_worker + k) % workers for k in range(workers)]
        dataset = _WorkerStream(self.cfg, self.manifest, roles, [list(self._workers[r]) for r in roles])
        if self.num_workers == 0:
            source = iter(dataset)
        else:
            # A private generator: the DataLoader draws its workers' base seed from it instead of from the
            # global torch RNG, which the trainer restores on resume and uses for label dropout (exact
            # resume). The workers' randomness never matters here: every draw is keyed by (seed, epoch, ...).
            source = iter(
                torch.utils.data.DataLoader(
                    dataset,
                    batch_size=None,
                    num_workers=self.num_workers,
                    pin_memory=self.pin_memory,
                    generator=torch.Generator().manual_seed(self.cfg["seed"]),
                )
            )
        cap = None
        if self.drop_last and not self.cfg["resampled"]:
            cap = self.full_batches_per_epoch(max(e for e, _ in self._workers))
        for message in source:
            if cap is not None and self._epoch_batches >= cap:
                break  # every rank has taken its equal share of this epoch
            role = message["role"]
            self._workers[role] = [message["epoch"], message["position"]]
            self._next_worker = (role + 1) % workers
            if message["errors"]:
                self._report(message["errors"])
            if message["latents"] is None:
                continue
            if cap is not None and len(message["labels"]) < self.cfg["micro_batch_size"]:
                continue  # drop_last: a worker's short last batch of the pass
            self._batches += 1
            self._epoch_batches += 1
            self.stats["batches"] = self._batches
            self.stats["samples"] += len(message["labels"])
            yield message["latents"], message["labels"]
        if not self.cfg["resampled"]:  # the pass is complete: the next iter() starts the next epoch
            epoch = max(e for e, _ in self._workers) + 1
            self._workers = [[epoch, 0] for _ in range(workers)]
            self._next_worker = 0
            self._epoch_batches = 0

    def full_batches_per_epoch(self, epoch: int) -> int:
        """Epoch mode with drop_last: the full micro-batches every rank takes from `epoch`.

        Rank r's loader worker w can fill floor(n_rw / B) micro-batches from the n_rw samples of its shards
        (the manifest's counts), so rank r can fill sum_w of that; every rank takes the minimum over ranks,
        so all ranks make the same number of optimizer steps per epoch (no rank waits in a collective for
        one that ran dry). Raises ValueError when that is zero.
        """
        cfg = self.cfg
        workers, world, batch = cfg["num_workers"], cfg["world_size"], cfg["micro_batch_size"]
        counts = np.array([s["num_samples"] for s in self.manifest.shards], dtype=np.int64)
        order = epoch_shard_list(len(counts), cfg["seed"], epoch, world * workers, resampled=False)
        per_rank = [
            sum(int(counts[order[consumer_slots(len(order), r, world, w, workers)]].sum()) // batch
                for w in range(workers))
            for r in range(world)
        ]  # fmt: skip
        if min(per_rank) == 0:
            rank = int(np.argmin(per_rank))
            raise ValueError(
                f"{self.manifest.path}: in epoch {epoch} rank {rank}'s shards give no loader worker a full "
                f"micro-batch of {batch} samples ({world} ranks x {workers} workers over "
                f"{len(counts)} shards); use fewer workers, smaller micro-batches, more shards, or "
                "data.resampled=true"
            )
        return min(per_rank)

    def batches(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Micro-batches without end: the infinite stream, or epoch after epoch (each reshuffled) in epoch
        mode. What the trainer consumes; resumable through state_dict() at any point."""
        while True:
            # An epoch resumed after its last batch (checkpointed between that batch and the rollover)
            # legitimately delivers nothing more; only an epoch started from its beginning must deliver.
            fresh = self._epoch_batches == 0 and all(position == 0 for _, position in self._workers)
            delivered = False
            for batch in self:
                delivered = True
                yield batch
            if self.cfg["resampled"]:
                return
            if fresh and not delivered:
                raise ShardError(
                    f"{self.manifest.path}: an epoch delivered no micro-batch on rank {self.cfg['rank']}"
                )

    def _report(self, errors: list[tuple[str, str]], count: bool = True) -> None:
        for name, message in errors:
            if count:
                self.stats["errors"][name] = self.stats["errors"].get(name, 0) + 1
            text = f"{self.manifest.root / name}: {message}"
            if self.on_error == "raise":
                raise ShardError(f"{text} (data.on_error=raise)")
            if self.on_error == "warn":
                warnings.warn(f"{text}; skipped", ShardWarning, stacklevel=3)

    @property
    def epoch(self) -> int:
        """The epoch the slowest worker is in (resampled mode: per-worker epochs are a fraction of the data)."""
        return min(e for e, _ in self._workers)

    # -------------------------------------------------------------------------------- position

    def state_dict(self) -> dict[str, Any]:
        """The stream position, as plain ints, strings and lists (safe in a checkpoint's client state)."""
        return {
            "format": STATE_FORMAT,
            **self.cfg,
            "num_shards": len(self.manifest.shards),
            "batches": self._batches,
            "next_worker": self._next_worker,
            "workers": [list(w) for w in self._workers],
            "epoch_batches": self._epoch_batches,
            "samples": int(self.stats["samples"]),
            "errors": dict(self.stats["errors"]),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from `state` (from `state_dict()`); the stream's configuration must be the same."""
        if state.get("format") != STATE_FORMAT:
            raise ValueError(f"data stream state: format {state.get('format')!r}, expected {STATE_FORMAT!r}")
        expected = {**self.cfg, "num_shards": len(self.manifest.shards)}
        for key, value in expected.items():
            if state.get(key) != value:
                raise ValueError(
                    f"data stream state: {key} was {state.get(key)!r} when saved but is {value!r} now "
                    f"({self.manifest.path}); the exact position can only be restored with the same setting"
                )
        if len(state["workers"]) != self.cfg["num_workers"]:
            raise ValueError(
                f"data stream state: 'workers' has {len(state['workers'])} entries, expected "
                f"{self.cfg['num_workers']}"
            )
        self._workers = [[int(e), int(p)] for e, p in state["workers"]]
        self._next_worker = int(state["next_worker"])
        self._batches = int(state["batches"])
        self._epoch_batches = int(state.get("epoch_batches", 0))
        self.stats = {
            "samples": int(state["samples"]),
            "batches": self._batches,
            "errors": dict(state["errors"]),
        }
