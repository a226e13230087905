"""The random draws of a training sample, keyed by (seed, global step, slot in the global batch).

Every draw that decides what a training step computes for one sample (its timestep's uniform, its label
dropout for classifier-free guidance, its diffusion noise) comes from a generator seeded by a hash of
(train.seed, step, slot), never from a rank's or a worker's generator, so the step is the same computation at
every world size (docs/design-choices.md, "Elastic runs"); the sample in each slot, its flip and its
posterior draw come from the data stream, keyed by the sample's identity (data/stream.py).

Slot layout: rank r's micro-batch m of B samples holds slots (m * B + i) * world + r, i = 0..B-1; the data
stream puts global sample g of the step on rank g % world in that order.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

TAG_STEP = 0x5A17  # domain separation from the data stream's generators (stream_order.TAG_*)


def slot_generator(seed: int, step: int, slot: int) -> torch.Generator:
    """A CPU torch.Generator for slot `slot` of optimizer step `step` (0-based), seeded by numpy's SeedSequence
    hash of (seed, step, slot): independent streams for different slots and steps."""
    words = np.random.SeedSequence([seed, step, slot, TAG_STEP]).generate_state(2, dtype=np.uint32)
    return torch.Generator().manual_seed(int(words[0]) << 32 | int(words[1]))


def micro_batch_slots(rank: int, world: int, micro: int, micro_batch_size: int) -> list[int]:
    """The global-batch slots of rank `rank`'s micro-batch `micro` (see the module docstring)."""
    return [(micro * micro_batch_size + i) * world + rank for i in range(micro_batch_size)]


@dataclass
class SlotDraws:
    """A micro-batch's draws: u (B,) float64 uniform in [0, 1), the timestep's source
    (mtl.sampling.TimestepSampler.from_uniform; a continuous-time objective maps it the same way); drop (B,)
    long, 1 where the label is replaced by the null class; noise (B, C, H, W) float32 standard normal."""

    u: torch.Tensor
    drop: torch.Tensor
    noise: torch.Tensor


def draw_slots(
    seed: int, step: int, slots: list[int], noise_shape: tuple[int, ...], label_dropout: float
) -> SlotDraws:
    """The draws of `slots` at optimizer step `step`, on the CPU. Per slot, in this order: two float64
    uniforms (the timestep's, the label dropout's), then the noise; a new kind of draw goes after these, so
    the existing ones keep their values."""
    u, drop, noise = [], [], []
    for slot in slots:
        generator = slot_generator(seed, step, slot)
        uniforms = torch.rand(2, generator=generator, dtype=torch.float64)
        u.append(uniforms[0])
        drop.append(uniforms[1] < label_dropout)
        noise.append(torch.randn(noise_shape, generator=generator))
    return SlotDraws(torch.stack(u), torch.stack(drop).long(), torch.stack(noise))
