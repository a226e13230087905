"""The worker side of the training data stream: what runs in each DataLoader worker (or in-process).

A worker serves some canonical streams: for each it reads the stream's shards of the epoch (stream_order.py's
plan) front to back, several at once, hands the samples out in the plan's emission order, decodes and
augments them (points 3 and 4 of data/stream.py's docstring), and sends chunks of them to the main process,
each sample with the stream's position after it and the samples skipped before it (data/skipped.py).
LatentStream (stream.py) assembles these into micro-batches in the global order and keeps the position.
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

    roles[k] / starts[k]: the canonical streams physical worker k serves and the (epoch, position) each
    continues from. A worker takes `chunk` samples of each of its streams in turn and yields one message per
    chunk: "stream", latents float32 (n, C, H, W) scaled and augmented (or None), labels int64 (n,), "keys",
    "positions" ([epoch, position] of the stream after each sample), "skips" (per sample, the skip records
    (data/skipped.py) and {"finished": shard name} markers met in the stream since the previous sample), and
    "end" (epoch mode: the pass of this stream is over; its "tail" holds the skips after its last sample).
    Raises ShardError when in resampled mode two epochs in a row of a stream deliver no readable sample.
    """

    def __init__(
        self, cfg: dict[str, Any], manifest: Manifest, roles: list[list[int]], starts: list[list[list[int]]]
    ):
        super().__init__()
        self.cfg, self.manifest, self.roles, self.starts = cfg, manifest, roles, starts

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = torch.utils.data.get_worker_info()
        physical = 0 if info is None else info.id
        sources = [
            self.messages(stream, *start)
            for stream, start in zip(self.roles[physical], self.starts[physical])
        ]
        while sources:  # round robin over this worker's streams, one chunk each
            for source in list(sources):
                message = next(source, None)
                if message is None:
                    sources.remove(source)
                else:
                    yield message

    def messages(self, stream: int, epoch: int, position: int) -> Iterator[dict[str, Any]]:
        """Canonical stream `stream` from (epoch, position), as messages of up to `chunk` samples."""
        out = _empty(stream)
        for item in self.samples(stream, epoch, position):
            if len(item) == 1:  # epoch mode: the pass is over; item[0]: the skips after the last sample
                out["end"], out["tail"] = True, item[0]
                yield _message(out)
                return
            latent, label, repa, key, at, skips = item
            out["latents"].append(latent)
            out["labels"].append(label)
            out["keys"].append(key)
            out["positions"].append(at)
            out["skips"].append(skips)
            if repa is not None:
                out["repa"].append(repa)
            if len(out["labels"]) == self.cfg["chunk"]:
                yield _message(out)
                out = _empty(stream)

    def samples(self, stream: int, epoch: int, position: int) -> Iterator[tuple]:
        """Good samples of `stream` in emission order: (latent, label, repa or None, key, [epoch, position]
        after it, skips met since the previous good sample); epoch mode ends with (skips after the last,)."""
        cfg, manifest = self.cfg, self.manifest
        skips: list[dict] = []
        empty_epochs = 0
        while True:
            plan = WorkerPlan(cfg, manifest, stream, epoch)
            # Samples of each shard still to be handed out this epoch: at 0 the shard is finished.
            due = np.bincount(np.searchsorted(plan.offsets, plan.order[position:], side="right") - 1,
                              minlength=len(plan.shards))  # fmt: skip
            reader = _EpochReader(manifest, plan, position)
            delivered = 0
            for q, pos, index, raw in reader:
                position = q + 1
                taken = self._take(plan, reader, pos, index, raw, epoch, skips)
                due[pos] -= 1
                if due[pos] == 0:
                    skips.append({"finished": manifest.shards[int(plan.shards[pos])]["name"]})
                skips.extend(reader.notices)
                reader.notices.clear()
                if taken is None:
                    continue
                delivered += 1
                at = [epoch, position]
                if cfg["resampled"] and position == len(plan.order):
                    at = [epoch + 1, 0]
                yield (*taken, at, skips)
                skips = []
            if not cfg["resampled"]:
                yield (skips,)
                return
            # An epoch that delivers nothing at all means every shard of this stream is unreadable.
            empty_epochs = 0 if delivered else empty_epochs + 1
            if empty_epochs >= 2:
                names = sorted({manifest.shards[int(s)]["name"] for s in plan.shards})
                raise ShardError(f"{manifest.path}: no readable sample in shards {names} for two epochs")
            epoch, position = epoch + 1, 0

    def _take(
        self, plan: WorkerPlan, reader: _EpochReader, pos: int, index: int, raw, epoch: int, skips: list
    ) -> tuple | None:
        """Decode, check and augment one sample: (latent, label, repa or None, key), or None after adding its
        skip record to `skips`."""
        manifest = self.manifest
        shard = int(plan.shards[pos])
        name = manifest.shards[shard]["name"]
        if raw is None:  # lost with its shard
            kind, detail = reader.lost[pos]
            _add_skip(skips, record(name, kind, f"member {index}", detail))
            return None
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
            _add_skip(skips, record(name, err.kind, err.key, str(err)))
            return None
        latent, flip = self._augment(sample, epoch, int(plan.slots[pos]), index)
        # the REPA features of the same orientation as the latent
        repa = sample.repa[flip] if sample.repa is not None else None
        return latent, sample.label, repa, sample.key

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


def _empty(stream: int) -> dict[str, Any]:
    return {"stream": stream, "latents": [], "labels": [], "repa": [], "keys": [], "positions": [], "skips": [],
            "end": False, "tail": []}  # fmt: skip


def _message(out: dict[str, Any]) -> dict[str, Any]:
    """The message for what `out` holds: tensors stacked."""
    return {
        **out,
        "latents": torch.from_numpy(np.stack(out["latents"])) if out["latents"] else None,
        "labels": torch.tensor(out["labels"], dtype=torch.int64),
        "repa": torch.from_numpy(np.stack(out["repa"])) if out["repa"] else None,
    }
