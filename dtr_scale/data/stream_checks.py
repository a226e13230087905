"""The data stream's arguments, manifest and world size, checked before anything is read; errors name the
value, the key and what was expected."""

from __future__ import annotations

from dtr_scale.data.shards import Manifest
from dtr_scale.errors import UserError

ON_ERROR_CHOICES = ("warn", "raise", "ignore")


def check_arguments(
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


class StreamLayoutError(UserError, ValueError):
    """The world size cannot read the canonical streams (it must divide data.canonical_streams)."""


def check_canonical_streams(num_streams: int, world_size: int) -> None:
    """StreamLayoutError unless `world_size` divides `num_streams` (the family of world sizes that see one
    global sample order)."""
    if num_streams < 1 or num_streams % world_size:
        raise StreamLayoutError(
            f"data.canonical_streams={num_streams} cannot be split over {world_size} ranks: the sample order is "
            f"defined over canonical streams and every world size dividing their number sees the same order; "
            f"use a world size dividing {num_streams} or set data.canonical_streams to a multiple of {world_size} "
            "(a new run: the number fixes the order)"
        )


def check_manifest(
    manifest: Manifest, expected_latent_shape: tuple[int, ...] | None, resampled: bool, num_streams: int
) -> None:
    """The manifest fits the model and the run: latent shape, some samples, a shard per stream (epoch mode)."""
    path = manifest.path
    if expected_latent_shape is not None and tuple(expected_latent_shape) != tuple(manifest.latent_shape):
        raise ValueError(
            f"{path}: latent_shape {list(manifest.latent_shape)} does not match the configured "
            f"model input {list(expected_latent_shape)} (in_channels, input_size, input_size)"
        )
    if manifest.num_samples == 0:
        raise ValueError(f"{path}: the manifest's shards hold no samples")
    if not resampled and len(manifest.shards) < num_streams:
        raise ValueError(
            f"{path}: {len(manifest.shards)} shards cannot give each of {num_streams} canonical streams a "
            "shard in epoch mode; use fewer streams (data.canonical_streams), data.resampled=true, or write "
            "more, smaller shards"
        )
