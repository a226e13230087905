"""The training data stream: latent shards -> augmented, scaled micro-batches, deterministic and resumable.

What the trainer gets from `LatentStream`: batches `(latents float32 (B, C, H, W), labels int64 (B,))`,
latents already multiplied by the manifest's `scaling_factor`, where each sample's orientation (as stored
or flipped) is chosen at random and its latent drawn from the stored posterior, `mean + std * eps`
(MAR-style moments for both flips, so augmentation survives offline encoding; see
docs/data-and-preprocessing.md).

How the order is made (the design choice; docs/design-choices.md weighs it)
---------------------------------------------------------------------------
Everything random is a pure function of (seed, epoch, canonical stream) and never of rank, world size,
loader worker, timing or content, so a stream can be *recomputed* instead of saved, at any world size that
divides the number C of canonical streams (`data.canonical_streams`, MosaicML Streaming's idea):

1. Shard order. Epoch e's global shard list is a permutation of all shards drawn from (seed, e). Canonical
   stream c reads every C-th entry from c. In `resampled` (infinite) mode the list is extended with further
   permutations to at least C entries and cut to a multiple of C, so every stream reads the same number of
   shards per epoch, and each stream's epochs go on forever. In epoch mode each epoch is one pass.
2. Per stream, `interleave` shards are read at once (round robin) and a shuffle buffer permutes the
   arrivals, its slot choices drawn from (seed, e, c) up front: a stream's emission order is an integer
   array, and a stream yields its readable samples in that order.
3. The global sequence takes one sample of each stream in turn: global sample n is the (n // C)-th of
   stream n % C. Global-batch slot g of a step goes to rank g % world (the trainer's layout), and with
   world dividing C and the global batch that rank reads exactly the streams c with c % world == rank. Loader
   workers only share out a rank's streams: they never change the order.
4. Augmentation is keyed by the sample's identity in the epoch, (seed, e, slot in the global shard list,
   index in the shard): the same sample gets the same flip and noise whatever the world size or workers.
5. Position: (epoch, emitted plan entries) per canonical stream, after the last sample the trainer took,
   and the turns taken. A rebuilt stream recomputes each emission order and re-reads at most the shards
   still in a buffer. `reshard_states` gathers every rank's streams for a resume at another world size.

Errors: every sample the stream cannot use (a shard missing, unreadable, cut or short, a member that fails
to decode, latents of the wrong shape, a label outside the manifest) is counted by kind and shard in
`skipped` (a SkipLedger, data/skipped.py) and skipped; `on_error="warn"` names each shard and kind once, with
a count and the first key, when the shard's samples of the epoch have all been handed out; `"raise"` raises
ShardError at the first one; `"ignore"` only counts. Errors are deterministic, so skipping keeps the stream
deterministic (and resume exact). Missing files are also reported up front. Each skipped sample is counted
once, when its turn in the emission order comes, so a resume neither loses nor repeats counts.

Modules: stream_order.py computes the schedule (1-3), stream_worker.py runs in the loader workers (reads,
shuffles, augments: 2, 4), stream_assembly.py queues their samples per stream; this one is the trainer side
(the global order, positions, state_dict: 3, 5).
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
from dtr_scale.data.stream_assembly import SampleAssembler
from dtr_scale.data.stream_checks import (
    StreamLayoutError,
    check_arguments,
    check_canonical_streams,
    check_manifest,
)
from dtr_scale.data.stream_order import epoch_shard_list, rank_streams, stream_of, stream_slots
from dtr_scale.data.stream_state import check_saved_state, reshard_stream_states
from dtr_scale.data.stream_worker import ShardError, WorkerStream

STATE_FORMAT = "dtr-scale-stream/2"
LEGACY_FORMAT = "dtr-scale-stream/1"  # positions per (rank, loader worker), before canonical streams
__all__ = ["LatentStream", "ShardError", "ShardWarning", "StreamLayoutError", "check_canonical_streams"]


class ShardWarning(UserWarning):
    """A shard or sample could not be read and was skipped (on_error="warn")."""


class LatentStream:
    """Iterable of `(latents, labels)` micro-batches for one rank; see the module docstring.

    manifest: a manifest.json path (or its directory) or a loaded Manifest. rank / world_size: the
    *global* rank and world size. canonical_streams: the number C of canonical streams the global sample order
    is defined over (world_size must divide it; None: world_size x max(1, num_workers)); every world size that
    divides C sees the same global sequence. resampled=True: infinite (training); False: one pass per `iter()`,
    disjoint and complete across ranks, the last batch possibly short. drop_last (epoch mode, training): only
    whole optimizer steps of `accumulation` full micro-batches per rank, the same on every rank and for every
    world size (`full_batches_per_epoch`); `batches()` then rolls over into the next, reshuffled epoch.
    interleave: shards each canonical stream reads at once (round robin), before its shuffle buffer.
    hflip: pick the stored or the mirrored orientation at random per sample; None = the manifest's
    `hflip` field (absent: True, natural images), False = always the stored one (digits, text).
    expected_latent_shape: (C, H, W) the model is configured for; a mismatch is an error naming the
    manifest, raised here, before training starts. with_repa: yield `(latents, labels, repa)`, the stored
    REPA features (B, M, D) float16 of each latent's orientation (the manifest must have them).
    `last_keys`: the sample keys of the last batch yielded.
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
        canonical_streams: int | None = None,
        accumulation: int = 1,
    ) -> None:
        self.manifest = manifest if isinstance(manifest, Manifest) else load_manifest(manifest)
        check_arguments(micro_batch_size, rank, world_size, num_workers, interleave, shuffle_buffer, on_error)
        streams = world_size * max(1, num_workers) if canonical_streams is None else int(canonical_streams)
        check_canonical_streams(streams, world_size)
        check_manifest(self.manifest, expected_latent_shape, resampled, streams)
        # What defines the global sample order: the same for every world size of the family.
        self.cfg = {
            "seed": int(seed),
            "canonical_streams": streams,
            "shuffle_buffer": int(shuffle_buffer),
            "interleave": int(interleave),
            "hflip": bool(self.manifest.extra.get("hflip", True) if hflip is None else hflip),
            "resampled": bool(resampled),
        }
        if with_repa:  # precomputed REPA features (preprocess --repa-encoder), yielded as a third tensor
            repa = self.manifest.extra["repa"]
            self.cfg["repa_shape"] = (int(repa["tokens"]), int(repa["dim"]))
        self.rank, self.world_size, self.micro_batch_size = int(rank), int(world_size), int(micro_batch_size)
        self.streams = rank_streams(self.rank, self.world_size, streams)
        self.num_workers, self.on_error, self.pin_memory = (
            min(int(num_workers), len(self.streams)),
            on_error,
            pin_memory,
        )
        self.drop_last, self.accumulation = bool(drop_last), int(accumulation)
        self._epoch_batches = 0  # full micro-batches taken from the current epoch (epoch mode)
        self._positions = {
            c: [0, 0] for c in self.streams
        }  # (epoch, plan position) after the last sample taken
        self._turns = (
            0  # turns of this rank's local sequence taken (stream_of: global index turns * world + rank)
        )
        self._batches = 0
        self.stats: dict[str, Any] = {"samples": 0, "batches": 0}
        self.skipped = SkipLedger()
        self.last_keys: list[str] = []
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
        chunk = self.micro_batch_size  # samples per worker message (fewer, larger messages between processes)
        assembler = SampleAssembler(
            WorkerStream({**self.cfg, "chunk": chunk}, self.manifest, [], []),
            {c: list(p) for c, p in self._positions.items()},
            self.num_workers,
            self.pin_memory,
        )
        cap = None
        if self.drop_last and not self.cfg["resampled"]:
            cap = self.full_batches_per_epoch(max(e for e, _ in self._positions.values()))
        while cap is None or self._epoch_batches < cap:
            taken = self._next_batch(assembler)
            if not taken:
                break  # epoch mode: every stream of this rank finished its pass
            if cap is not None and len(taken) < self.micro_batch_size:
                break  # drop_last: the pass's short last batch
            self._batches += 1
            self._epoch_batches += 1
            self.stats["batches"] = self._batches
            self.stats["samples"] += len(taken)
            self.last_keys = [rec[3] for rec in taken]
            latents = torch.stack([rec[0] for rec in taken])
            labels = torch.tensor([rec[1] for rec in taken], dtype=torch.int64)
            repa = (torch.stack([rec[2] for rec in taken]),) if "repa_shape" in self.cfg else ()
            yield latents, labels, *repa
        assembler.close()
        for name, line in self.skipped.finish(None, len(self.manifest.labels)):
            self._say(name, line)  # shards the pass left unfinished (drop_last)
        if not self.cfg["resampled"]:  # the pass is complete: the next iter() starts the next epoch
            epoch = max(e for e, _ in self._positions.values()) + 1
            self._positions = {c: [epoch, 0] for c in self.streams}
            self._turns = 0
            self._epoch_batches = 0

    def _next_batch(self, assembler: SampleAssembler) -> list[tuple]:
        """Up to micro_batch_size samples in the global order (stream_of); short only at the end of a pass,
        where an exhausted stream's turns pass to the next of this rank's streams."""
        taken: list[tuple] = []
        num_streams = self.cfg["canonical_streams"]
        while len(taken) < self.micro_batch_size and assembler.live:
            stream, _ = stream_of(self._turns * self.world_size + self.rank, num_streams)
            self._turns += 1
            rec = assembler.pop(stream)
            if rec is None:  # epoch mode: this stream's pass is over (its trailing skips were returned)
                self._account(assembler.tail(stream), delivered=0)
                continue
            self._account(rec[5])
            self._positions[stream] = list(rec[4])
            taken.append(rec)
        return taken

    def full_batches_per_epoch(self, epoch: int) -> int:
        """Epoch mode with drop_last: the full micro-batches every rank takes from `epoch`.

        The global sequence takes one sample of each canonical stream in turn, so it runs whole as long as the
        smallest stream (n_min samples by the manifest's counts): C x n_min samples, of which whole optimizer
        steps (world x micro-batch x accumulation samples) are taken; every rank takes accumulation x steps
        micro-batches, the same for every world size. Raises ValueError when that is zero.
        """
        cfg = self.cfg
        num_streams = cfg["canonical_streams"]
        counts = np.array([s["num_samples"] for s in self.manifest.shards], dtype=np.int64)
        order = epoch_shard_list(len(counts), cfg["seed"], epoch, num_streams, resampled=False)
        smallest = min(
            int(counts[order[stream_slots(len(order), c, num_streams)]].sum()) for c in range(num_streams)
        )
        step = self.world_size * self.micro_batch_size * self.accumulation
        steps = num_streams * smallest // step
        if steps == 0:
            raise ValueError(
                f"{self.manifest.path}: in epoch {epoch} the smallest of the {num_streams} canonical streams holds "
                f"{smallest} samples, so one pass ({num_streams} x {smallest}) gives no full step of {step} samples; "
                "use fewer canonical streams (data.canonical_streams), a smaller batch, more shards, or "
                "data.resampled=true"
            )
        return steps * self.accumulation

    def batches(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Micro-batches without end: the infinite stream, or epoch after epoch (each reshuffled) in epoch
        mode. What the trainer consumes; resumable through state_dict() at any point."""
        while True:
            # An epoch resumed after its last batch (checkpointed between that batch and the rollover)
            # legitimately delivers nothing more; only an epoch started from its beginning must deliver.
            fresh = self._epoch_batches == 0 and self._turns == 0
            delivered = False
            for batch in self:
                delivered = True
                yield batch
            if self.cfg["resampled"]:
                return
            if fresh and not delivered:
                raise ShardError(
                    f"{self.manifest.path}: an epoch delivered no micro-batch on rank {self.rank}"
                )

    def _account(self, skips: list[dict], delivered: int = 1) -> None:
        """Count a sample and the skips before it (raising at the first skip when on_error="raise"), and warn
        once per shard and kind for the shards they finished."""
        for rec in skips:  # in order, so a shard's next epoch never joins this epoch's count
            if "finished" in rec:
                for shard, line in self.skipped.finish(rec["finished"], len(self.manifest.labels)):
                    self._say(shard, line)
                continue
            if self.on_error == "raise":
                raise ShardError(
                    f"{rec['detail']} ({self.manifest.root / rec['shard']}; data.on_error=raise)"
                )
            self.skipped.add(rec)
        self.skipped.delivered(delivered)

    def _say(self, name: str, text: str) -> None:
        """Report `text` about shard `name` per on_error: raise, warn, or stay silent (ignore)."""
        text = f"{self.manifest.root / name}: {text}"
        if self.on_error == "raise":
            raise ShardError(f"{text} (data.on_error=raise)")
        if self.on_error == "warn":
            warnings.warn(text, ShardWarning, stacklevel=3)

    @property
    def epoch(self) -> int:
        """The epoch the slowest of this rank's streams is in (resampled mode: per-stream epochs)."""
        return min(e for e, _ in self._positions.values())

    # -------------------------------------------------------------------------------- position

    def state_dict(self) -> dict[str, Any]:
        """The stream position, as plain ints, strings and lists (safe in a checkpoint's client state):
        [stream, epoch, position] for each of this rank's canonical streams and the turns taken."""
        return {
            "format": STATE_FORMAT,
            **self.cfg,
            "num_shards": len(self.manifest.shards),
            "world_size": self.world_size,
            "rank": self.rank,
            "micro_batch_size": self.micro_batch_size,
            "positions": [[c, *self._positions[c]] for c in self.streams],
            "turns": self._turns,
            "batches": self._batches,
            "epoch_batches": self._epoch_batches,
            "samples": int(self.stats["samples"]),
            "skipped": self.skipped.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from `state`: this rank's `state_dict()`, or `reshard_states` of every saved rank's (at
        another world size). The global order's settings (self.cfg) must be the same (data/stream_state.py)."""
        expected = {**self.cfg, "num_shards": len(self.manifest.shards)}
        if not check_saved_state(
            state, expected, self.manifest.path, STATE_FORMAT, LEGACY_FORMAT, ShardWarning
        ):
            return  # a legacy state: the stream starts over (warned)
        positions = {int(c): [int(e), int(p)] for c, e, p in state["positions"]}
        if sorted(positions) != self.streams:
            raise ValueError(
                f"data stream state holds streams {sorted(positions)}, rank {self.rank} of {self.world_size} "
                f"reads {self.streams}"
            )
        self._positions = positions
        self._turns = int(state["turns"])
        self._batches = int(state["batches"])
        self._epoch_batches = int(state["epoch_batches"])
        self.stats = {"samples": int(state["samples"]), "batches": self._batches}
        self.skipped.load_state_dict(state["skipped"])

    def reshard_states(self, states: list[dict[str, Any]], rank: int | None = None) -> dict[str, Any]:
        """This rank's state from every rank's saved state at another world size (a resharding resume; `rank`
        is this stream's own, accepted for the checkpointer's common call): data/stream_state.py."""
        return reshard_stream_states(states, self.rank, self.world_size, self.micro_batch_size, self.streams)
