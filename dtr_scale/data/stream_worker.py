"""The worker side of the training data stream: what runs in each DataLoader worker (or in-process).

A worker reads its shards of the epoch (stream_order.py's plan) front to back, several at once, hands the
samples out in the plan's emission order, decodes and augments them (points 3 and 4 of data/stream.py's
docstring), and sends each micro-batch to the main process with the worker's new position and the errors
it met on the way. LatentStream (stream.py) turns these messages into batches and a resumable position.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from dtr_scale.data.shards import Manifest, ShardReadError, decode_sample, iter_raw_samples
from dtr_scale.data.stream_order import TAG_AUGMENT, WorkerPlan
from dtr_scale.errors import UserError


class ShardError(UserError, RuntimeError):
    """A shard or sample could not be read and the stream was told to raise (on_error="raise")."""


class _EpochReader:
    """Reads a worker's shards, each front to back, and hands out samples in the plan's emission order.

    Yields (plan position, shard index, slot, member, raw sample or None) for q = start.., where None means
    the sample was lost with a broken shard. Several shards are open at once (interleaving); a sample read
    before its turn waits in `store` (about the shuffle buffer's size). Samples emitted before a resume
    (`order[:start]`) are skipped without being kept, and shards holding none still due are never opened.
    Broken shards add (shard name, message) to `errors`.
    """

    def __init__(self, manifest: Manifest, plan: WorkerPlan, start: int, errors: list) -> None:
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


class WorkerStream(torch.utils.data.IterableDataset):
    """What runs inside each DataLoader worker (or in-process when num_workers == 0).

    roles[k] / starts[k]: the logical worker and its (epoch, position) that physical worker k continues.
    Yields one message per micro-batch: latents float32 (B, C, H, W), scaled and augmented, or None (only
    errors to report), labels int64 (B,), the logical worker ("role") and its position after the batch
    ("epoch", "position"), and "errors", (shard name, message) pairs. Raises ShardError when in resampled
    mode two epochs in a row deliver no readable sample.
    """

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
            plan = WorkerPlan(cfg, manifest, role, epoch)
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
        rng = np.random.default_rng([self.cfg["seed"], epoch, slot, member, TAG_AUGMENT])
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
