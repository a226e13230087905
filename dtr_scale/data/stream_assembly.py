"""The main process's side of the stream's workers: the samples of each canonical stream received and not yet
taken, handed out one at a time in whatever order the global sequence asks for them (data/stream.py).

With loader workers, each physical worker serves some of the rank's canonical streams and sends chunks of
their samples (stream_worker.WorkerStream); the DataLoader hands the chunks over in a fixed round robin, and
a sample waits here until its turn. In-process (no workers) each stream is read on demand.
"""

from __future__ import annotations

from collections import deque
from typing import Any

import torch

from dtr_scale.data.stream_worker import WorkerStream


class SampleAssembler:
    """Per canonical stream of one rank: a queue of received samples, each a tuple (latent float32 tensor,
    label int, REPA features or None, key, [epoch, position] of the stream after it, skip records before it).

    positions: stream -> [epoch, position] to start from. num_workers: physical loader workers (0: read
    in-process); each serves every num_workers-th of the rank's streams.
    """

    def __init__(
        self, dataset: WorkerStream, positions: dict[int, list[int]], num_workers: int, pin_memory: bool
    ) -> None:
        streams = sorted(positions)
        self.queues: dict[int, deque] = {c: deque() for c in streams}
        self.tails: dict[int, list[dict]] = {}  # stream -> skips after its last sample, once its pass ended
        self.done: set[int] = set()  # streams whose pass ended and whose tail was handed out
        self._sources: dict[int, Any] = {}
        self._loader = None
        if num_workers == 0:
            self._sources = {c: dataset.messages(c, *positions[c]) for c in streams}
        else:
            dataset.roles = [streams[k::num_workers] for k in range(num_workers)]
            dataset.starts = [[list(positions[c]) for c in role] for role in dataset.roles]
            # A private generator: the DataLoader draws its workers' base seed from it instead of from the
            # global torch RNG (the workers' randomness never matters: every draw is keyed by seed, epoch, ...).
            self._loader = iter(
                torch.utils.data.DataLoader(
                    dataset,
                    batch_size=None,
                    num_workers=num_workers,
                    pin_memory=pin_memory,
                    generator=torch.Generator().manual_seed(dataset.cfg["seed"]),
                )
            )

    @property
    def live(self) -> bool:
        """Whether some stream still has samples or an unreported end."""
        return len(self.done) < len(self.queues)

    def pop(self, stream: int) -> tuple | None:
        """The next sample of `stream`, or None when its pass is over (epoch mode)."""
        queue = self.queues[stream]
        while not queue and stream not in self.tails:
            if self._loader is None:
                self._receive(next(self._sources[stream]))
            else:
                self._receive(next(self._loader))
        return queue.popleft() if queue else None

    def tail(self, stream: int) -> list[dict]:
        """The skips after the last sample of an ended stream, handed out once (then [])."""
        if stream in self.done:
            return []
        self.done.add(stream)
        return self.tails.get(stream, [])

    def _receive(self, message: dict[str, Any]) -> None:
        labels = message["labels"].tolist()
        if not labels:
            latents, repa = [], []
        else:  # one view per sample, made at once
            latents = message["latents"].unbind(0)
            repa = [None] * len(labels) if message["repa"] is None else message["repa"].unbind(0)
        self.queues[message["stream"]].extend(
            zip(latents, labels, repa, message["keys"], message["positions"], message["skips"], strict=True)
        )
        if message["end"]:
            self.tails[message["stream"]] = message["tail"]

    def close(self) -> None:
        """Stop the workers (or the in-process readers, closing their shards)."""
        for source in self._sources.values():
            source.close()
        self._loader = None
