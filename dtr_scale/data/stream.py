"""The training data stream: latent shards -> augmented, scaled micro-batches, deterministic and resumable.

What the trainer gets from `LatentStream`: batches `(latents float32 (B, C, H, W), labels int64 (B,))`,
latents already multiplied by the manifest's `scaling_factor`, where each sample's orientation (as stored
or flipped) is chosen at random and its latent drawn from the stored posterior, `mean + std * eps`
(MAR-style moments for both flips, so augmentation survives offline encoding; see
docs/data-and-preprocessing.md).

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

Errors: every sample the stream cannot use (a shard missing, unreadable, cut or short, a member that fails
to decode, latents of the wrong shape, a label outside the manifest) is counted by kind and shard in
`skipped` (a SkipLedger, data/skipped.py) and skipped; `on_error="warn"` names each shard and kind once, with
a count and the first key, when the shard's samples of the epoch have all been handed out; `"raise"` raises
ShardError at the first one; `"ignore"` only counts. Errors are deterministic, so skipping keeps the stream
deterministic (and resume exact). Missing files are also reported up front. Each skipped sample is counted
once, when its turn in the emission order comes, so a resume neither loses nor repeats counts.

Modules: stream_order.py computes the schedule (1, 2), stream_worker.py runs in the loader workers (reads,
shuffles, augments: 2, 3); this one is the trainer side (positions, state_dict: 4).
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from dtr_scale.data.shards import Manifest, load_manifest
from dtr_scale.data.skipped import SkipLedger
from dtr_scale.data.stream_order import consumer_slots, epoch_shard_list
from dtr_scale.data.stream_worker import ShardError, WorkerStream

STATE_FORMAT = "dtr-scale-stream/1"
ON_ERROR_CHOICES = ("warn", "raise", "ignore")


class ShardWarning(UserWarning):
    """A shard or sample could not be read and was skipped (on_error="warn")."""


def _check_arguments(
    micro_batch_size: int,
    rank: int,
    world_size: int,
    num_workers: int,
    interleave: int,
    shuffle_buffer: int,
    on_error: str,
) -> None:
    """LatentStream's arguments, each in its range; ValueError naming the first that is not."""
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


def _check_manifest(
    manifest: Manifest, expected_latent_shape: tuple[int, ...] | None, resampled: bool, world_size: int
) -> None:
    """The manifest fits the model and the run: latent shape, some samples, a shard per rank (epoch mode)."""
    path = manifest.path
    if expected_latent_shape is not None and tuple(expected_latent_shape) != tuple(manifest.latent_shape):
        raise ValueError(
            f"{path}: latent_shape {list(manifest.latent_shape)} does not match the configured "
            f"model input {list(expected_latent_shape)} (in_channels, input_size, input_size)"
        )
    if manifest.num_samples == 0:
        raise ValueError(f"{path}: the manifest's shards hold no samples")
    if not resampled and len(manifest.shards) < world_size:
        raise ValueError(
            f"{path}: {len(manifest.shards)} shards cannot give each of {world_size} ranks a "
            "shard in epoch mode; use resampled=True or write more, smaller shards"
        )


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
    manifest, raised here, before training starts. with_repa: yield `(latents, labels, repa)`, the stored
    REPA features (B, M, D) float16 of each latent's orientation (the manifest must have them).
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
        with_repa: bool = False,
    ) -> None:
        self.manifest = manifest if isinstance(manifest, Manifest) else load_manifest(manifest)
        _check_arguments(
            micro_batch_size, rank, world_size, num_workers, interleave, shuffle_buffer, on_error
        )
        _check_manifest(self.manifest, expected_latent_shape, resampled, world_size)
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
        if with_repa:  # precomputed REPA features (preprocess --repa-encoder), yielded as a third tensor
            repa = self.manifest.extra["repa"]
            self.cfg["repa_shape"] = (int(repa["tokens"]), int(repa["dim"]))
        self.num_workers, self.on_error, self.pin_memory = int(num_workers), on_error, pin_memory
        self.drop_last = bool(drop_last)
        self._epoch_batches = 0  # full micro-batches taken from the current epoch (epoch mode)
        self._workers = [[0, 0] for _ in range(self.cfg["num_workers"])]
        self._next_worker = 0
        self._batches = 0
        self.stats: dict[str, Any] = {"samples": 0, "batches": 0}
        self.skipped = SkipLedger()
        self._report_missing_files()

    def _report_missing_files(self) -> None:
        """Report missing shard files up front, per `on_error`; their samples are counted when their turn
        comes (as "unreadable_shard"), without a second warning."""
        for i, shard in enumerate(self.manifest.shards):
            if not self.manifest.shard_path(i).is_file():
                self._say(
                    shard["name"], f"file is missing; its {shard['num_samples']} samples will be skipped"
                )
                self.skipped.mark_warned(shard["name"], "unreadable_shard")

    # -------------------------------------------------------------------------------- iteration

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        workers = self.cfg["num_workers"]
        roles = [(self._next_worker + k) % workers for k in range(workers)]
        dataset = WorkerStream(self.cfg, self.manifest, roles, [list(self._workers[r]) for r in roles])
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
            self._account(message)
            if message["latents"] is None:
                continue
            if cap is not None and len(message["labels"]) < self.cfg["micro_batch_size"]:
                continue  # drop_last: a worker's short last batch of the pass
            self._batches += 1
            self._epoch_batches += 1
            self.stats["batches"] = self._batches
            self.stats["samples"] += len(message["labels"])
            repa = (message["repa"],) if "repa_shape" in self.cfg else ()
            yield message["latents"], message["labels"], *repa
        for name, line in self.skipped.finish(None, len(self.manifest.labels)):
            self._say(name, line)  # shards the pass left unfinished (drop_last)
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

    def _account(self, message: dict[str, Any]) -> None:
        """Count a message's samples and skips (raising at the first skip when on_error="raise"), and warn
        once per shard and kind for the shards it finished."""
        for rec in message["skips"]:  # in order, so a shard's next epoch never joins this epoch's count
            if "finished" in rec:
                for shard, line in self.skipped.finish(rec["finished"], len(self.manifest.labels)):
                    self._say(shard, line)
                continue
            if self.on_error == "raise":
                raise ShardError(
                    f"{rec['detail']} ({self.manifest.root / rec['shard']}; data.on_error=raise)"
                )
            self.skipped.add(rec)
        self.skipped.delivered(len(message["labels"]))

    def _say(self, name: str, text: str) -> None:
        """Report `text` about shard `name` per on_error: raise, warn, or stay silent (ignore)."""
        text = f"{self.manifest.root / name}: {text}"
        if self.on_error == "raise":
            raise ShardError(f"{text} (data.on_error=raise)")
        if self.on_error == "warn":
            warnings.warn(text, ShardWarning, stacklevel=3)

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
            "skipped": self.skipped.state_dict(),
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
        self.stats = {"samples": int(state["samples"]), "batches": self._batches}
        if "skipped" in state:  # absent in checkpoints written before skip accounting
            self.skipped.load_state_dict(state["skipped"])
