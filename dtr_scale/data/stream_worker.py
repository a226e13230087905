"""The worker side of the training data stream: what runs in each DataLoader worker (or in-process).

A worker reads its shards of the epoch (stream_order.py's plan) front to back, several at once, hands the
samples out in the plan's emission order, decodes and augments them (points 3 and 4 of data/stream.py's
docstring), and sends each micro-batch to the main process with the worker's new position and the samples
it had to skip on the way (data/skipped.py). LatentStream (stream.py) turns these messages into batches and a resumable position.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from dtr_scale.data.shards import Manifest, SampleError, ShardReadError, decode_sample, iter_raw_samples
from dtr_scale.data.skipped import record
from dtr_scale.data.stream_order import TAG_AUGMENT, WorkerPlan
from dtr_scale.errors import UserError


class ShardError(UserError, RuntimeError):
    """A shard or sample could not be read and the stream was told to raise (on_error="raise")."""


class _EpochReader:
    """Reads a worker's shards, each front to back, and hands out samples in the plan's emission order.

    Yields (plan position q, position of the shard in the worker's list, index in the shard, raw sample or
    None) for q = start.., where None means the sample was lost with a broken shard; `lost[pos]` then holds
    (skip kind, detail) for that shard. Several shards are open at once (interleaving); a sample read before
    its turn waits in `store` (about the shuffle buffer's size). Samples emitted before a resume
    (`order[:start]`) are skipped without being kept, and shards holding none still due are never opened.
    A shard holding more samples than listed adds a "surplus" record to `notices`.
    """

    def __init__(self, manifest: Manifest, plan: WorkerPlan, start: int) -> None:
        self.manifest, self.plan, self.start = manifest, plan, start
        self.needed = np.zeros(int(plan.offsets[-1]), dtype=bool)
        self.needed[plan.order[start:]] = True
        self.lost: dict[int, tuple[str, str]] = {}
        self.notices: list[dict] = []

    def __iter__(self) -> Iterator[tuple[int, int, int, dict | None]]:
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
                yield q, pos, index, store.pop(item, None)
        finally:
            for samples in readers.values():
                samples.close()

    def _read_one(
        self, pos: int, readers: dict, read: np.ndarray, lost_from: np.ndarray, store: dict
    ) -> None:
        """Read the next member of the shard at plan position `pos` (opening it first if needed)."""
        plan = self.plan
        shard = int(plan.shards[pos])
        lo, hi = int(plan.offsets[pos]), int(plan.offsets[pos + 1])
        if pos not in readers:
            readers[pos] = iter_raw_samples(self.manifest.shard_path(shard))
        try:
            raw = next(readers[pos])
        except StopIteration:
            raw = None
            self.lost[pos] = ("short_shard", f"the tar ends after {read[pos]} of its {hi - lo} samples")
        except ShardReadError as err:
            raw = None
            kind = "corrupt_tar" if read[pos] else "unreadable_shard"
            reason = str(err).removeprefix(f"{self.manifest.shard_path(shard)}: ")  # the report names it
            self.lost[pos] = (kind, f"{reason}; lost {hi - lo - read[pos]} of {hi - lo} samples")
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
                name = self.manifest.shards[shard]["name"]
                detail = f"the shard holds more than the {hi - lo} samples the manifest lists"
                self.notices.append(record(name, "surplus", f"member {hi - lo}", detail, count=0))
            samples.close()


def _add_skip(skips: list[dict], rec: dict) -> None:
    """Append a skip record, merging it into the previous one of the same shard and kind."""
    if skips and skips[-1].get("shard") == rec["shard"] and skips[-1].get("kind") == rec["kind"]:
        skips[-1]["count"] += rec["count"]
    else:
        skips.append(rec)


class WorkerStream(torch.utils.data.IterableDataset):
    """What runs inside each DataLoader worker (or in-process when num_workers == 0).

    roles[k] / starts[k]: the logical worker and its (epoch, position) that physical worker k continues.
    Yields one message per micro-batch: latents float32 (B, C, H, W), scaled and augmented, or None (only
    skips to report), labels int64 (B,), the logical worker ("role") and its position after the batch
    ("epoch", "position"), and "skips", in order: the skip records (data/skipped.py) of the samples handed
    out since the last message and {"finished": shard name} markers for shards whose samples of this epoch
    were all handed out (so their skips are reported once, with the epoch's count). Raises ShardError when in resampled mode two epochs in
    a row deliver no readable sample.
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
        out = {"latents": [], "labels": [], "skips": []}
        empty_epochs = 0
        while True:
            plan = WorkerPlan(cfg, manifest, role, epoch)
            # Samples of each shard still to be handed out this epoch: at 0 the shard is finished.
            due = np.bincount(np.searchsorted(plan.offsets, plan.order[position:], side="right") - 1,
                              minlength=len(plan.shards))  # fmt: skip
            reader = _EpochReader(manifest, plan, position)
            delivered = 0
            for q, pos, index, raw in reader:
                position = q + 1
                delivered += self._take(plan, reader, pos, index, raw, epoch, out)
                due[pos] -= 1
                if due[pos] == 0:
                    out["skips"].append({"finished": manifest.shards[int(plan.shards[pos])]["name"]})
                out["skips"].extend(reader.notices)
                reader.notices.clear()
                if len(out["latents"]) == cfg["micro_batch_size"]:
                    next_epoch, next_position = epoch, position
                    if cfg["resampled"] and position == len(plan.order):
                        next_epoch, next_position = epoch + 1, 0
                    yield self._message(role, next_epoch, next_position, out)
            if not cfg["resampled"]:
                if out["latents"] or out["skips"]:  # the pass's partial last batch
                    yield self._message(role, epoch, position, out)
                return
            # An epoch that delivers nothing at all means every shard of this worker is unreadable.
            empty_epochs = 0 if delivered else empty_epochs + 1
            if empty_epochs >= 2:
                names = sorted({manifest.shards[int(s)]["name"] for s in plan.shards})
                raise ShardError(f"{manifest.path}: no readable sample in shards {names} for two epochs")
            epoch, position = epoch + 1, 0

    def _take(
        self, plan: WorkerPlan, reader: _EpochReader, pos: int, index: int, raw, epoch: int, out
    ) -> int:
        """Decode, check and augment one sample into `out`, or add its skip record; returns 1 if taken."""
        manifest = self.manifest
        shard = int(plan.shards[pos])
        name = manifest.shards[shard]["name"]
        if raw is None:  # lost with its shard
            kind, detail = reader.lost[pos]
            _add_skip(out["skips"], record(name, kind, f"member {index}", detail))
            return 0
        num_labels = len(manifest.labels)
        try:
            # Details name the key, not the shard: the report puts the shard's path in front once.
            sample = decode_sample(raw, tuple(manifest.latent_shape), repa_shape=self.cfg.get("repa_shape"))
            if not 0 <= sample.label < num_labels:  # num_labels is the CFG null class: never data
                raise SampleError(
                    f"{sample.key}.cls: label {sample.label} is outside the manifest's {num_labels} labels",
                    "label",
                    sample.key,
                )
        except SampleError as err:
            _add_skip(out["skips"], record(name, err.kind, err.key, str(err)))
            return 0
        latent, flip = self._augment(sample, epoch, int(plan.slots[pos]), index)
        out["latents"].append(latent)
        out["labels"].append(sample.label)
        if sample.repa is not None:  # the REPA features of the same orientation as the latent
            out.setdefault("repa", []).append(sample.repa[flip])
        return 1

    def _augment(self, sample, epoch: int, slot: int, member: int) -> tuple[np.ndarray, int]:
        # Random flip per sample (only where the data allows it: data.hflip), then a posterior draw
        # z = mean + std * eps (the VAE's reparameterisation), scaled by the VAE's scaling factor (0.18215
        # for SD's VAE), as DiT's online encoding does. The flip is drawn either way, so the noise of a
        # sample does not depend on the flip setting.
        rng = np.random.default_rng([self.cfg["seed"], epoch, slot, member, TAG_AUGMENT])
        drawn = int(rng.integers(2))
        flip = drawn if self.cfg["hflip"] else 0
        eps = rng.standard_normal(sample.mean.shape[1:], dtype=np.float32)
        z = sample.mean[flip].astype(np.float32) + sample.std[flip].astype(np.float32) * eps
        return z * np.float32(self.manifest.scaling_factor), flip

    @staticmethod
    def _message(role: int, epoch: int, position: int, out: dict[str, list]) -> dict[str, Any]:
        """The message for what `out` holds; empties `out` for the next batch."""
        message = {
            "latents": torch.from_numpy(np.stack(out["latents"])) if out["latents"] else None,
            "labels": torch.tensor(out["labels"], dtype=torch.int64),
            "role": role,
            "epoch": epoch,
            "position": position,
            "skips": out["skips"],
            "repa": torch.from_numpy(np.stack(out["repa"])) if out.get("repa") else None,
        }
        for key in out:
            out[key] = []
        return message
