"""The built-in MNIST latents: exact codec, splits, idempotence, CLI."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from dtr_scale.data.builtin import (
    heldout_images,
    mnist_images,
    prepare_builtin,
    split_indices,
)
from dtr_scale.data.images import quantize_uint8
from dtr_scale.data.shards import iter_raw_samples, load_manifest
from dtr_scale.data.stream import LatentStream
from dtr_scale.data.vae import build_decoder, pixel_decode, pixel_encode


@pytest.fixture(scope="module")
def builtin_dir(builtin_data: dict[str, Path]) -> Path:
    """The directory prepare_builtin wrote (conftest's session fixture, shared with other tests)."""
    return builtin_data["train"].parent.parent


def test_decode_inverts_encode_exactly() -> None:
    images = torch.from_numpy(np.random.default_rng(0).uniform(-1, 1, (2, 1, 32, 32)).astype(np.float32))
    latents = pixel_encode(images, 2)
    assert latents.shape == (2, 4, 16, 16)
    assert torch.equal(pixel_decode(latents, 2), images)


def test_splits_hold_4500_and_500_digits_balanced_by_class(builtin_dir: Path) -> None:
    train, heldout = load_manifest(builtin_dir / "train"), load_manifest(builtin_dir / "heldout")
    assert (train.num_samples, heldout.num_samples) == (4500, 500)
    assert train.latent_shape == (4, 16, 16) and train.scaling_factor == 1.0 and train.image_size == 32
    assert train.labels == [str(d) for d in range(10)]
    _, labels = mnist_images()
    train_idx, heldout_idx = split_indices(labels, 50)
    assert np.bincount(labels[heldout_idx]).tolist() == [50] * 10
    assert not set(train_idx) & set(heldout_idx)


def _as_sorted_rows(images: np.ndarray, labels: np.ndarray) -> list[bytes]:
    """(image, label) pairs as sortable bytes: compares two sets of digits regardless of their order."""
    return sorted(bytes([int(y)]) + x.tobytes() for x, y in zip(images, labels))


def test_stored_latents_decode_to_the_original_digits_exactly(builtin_dir: Path) -> None:
    images, labels = mnist_images()
    _, heldout_idx = split_indices(labels, 50)
    decoded, decoded_labels = heldout_images(builtin_dir, with_labels=True)
    assert decoded.shape == (500, 32, 32, 1) and decoded.dtype == np.uint8
    assert _as_sorted_rows(decoded[..., 0], decoded_labels) == _as_sorted_rows(
        images[heldout_idx], labels[heldout_idx]
    )
    assert heldout_images(builtin_dir, rgb=True).shape == (500, 32, 32, 3)


def test_every_training_shard_is_a_random_sample_of_all_ten_classes(builtin_dir: Path) -> None:
    # Written in a seeded random order, not class-sorted: each 500-digit shard holds every class at close
    # to its 10% share (a class-sorted writer gave one class per shard).
    manifest = load_manifest(builtin_dir / "train")
    assert manifest.extra["shuffle_seed"] == 0
    for i in range(len(manifest.shards)):
        shard_labels = [int(raw["cls"]) for raw in iter_raw_samples(manifest.shard_path(i))]
        shares = np.bincount(shard_labels, minlength=10) / len(shard_labels)
        assert shares.min() > 0.05 and shares.max() < 0.15, (manifest.shards[i]["name"], shares)


def test_16px_digits_are_the_2x2_block_means_of_the_32px_ones(tmp_path: Path) -> None:
    big, labels = mnist_images(32)
    small, small_labels = mnist_images(16)
    assert small.shape == (5000, 16, 16) and np.array_equal(labels, small_labels)
    k = 123
    expected = np.array([[round(big[k, 2 * i : 2 * i + 2, 2 * j : 2 * j + 2].mean()) for j in range(16)]
                         for i in range(16)])  # fmt: skip
    assert np.array_equal(small[k], expected)
    paths = prepare_builtin(tmp_path, image_size=16)
    manifest = load_manifest(paths["train"])
    assert manifest.latent_shape == (4, 8, 8) and manifest.image_size == 16
    decoded, decoded_labels = heldout_images(paths["heldout"], with_labels=True)
    _, heldout_idx = split_indices(labels, 50)
    assert _as_sorted_rows(decoded[..., 0], decoded_labels) == _as_sorted_rows(
        small[heldout_idx], labels[heldout_idx]
    )
    with pytest.raises(ValueError, match="image_size must be one of"):
        prepare_builtin(tmp_path, image_size=24)


def test_stream_over_builtin_shards_never_trains_on_mirrored_digits(builtin_dir: Path) -> None:
    manifest = load_manifest(builtin_dir / "train")
    assert manifest.extra["hflip"] is False  # a mirrored 2 or 7 is not a digit
    real = {x.tobytes() for x in heldout_images(manifest)[..., 0]}
    latents, labels = next(
        iter(LatentStream(manifest, 64, seed=0, rank=0, world_size=1, expected_latent_shape=(4, 16, 16)))
    )
    pixels = quantize_uint8(build_decoder(manifest)(latents))[:, 0]
    assert pixels.shape == (64, 32, 32)
    assert all(x.tobytes() in real for x in pixels)  # every training digit as stored, none mirrored
    flipped = LatentStream(manifest, 64, seed=0, rank=0, world_size=1, hflip=True)
    mirrored = quantize_uint8(build_decoder(manifest)(next(iter(flipped))[0]))[:, 0]
    assert 10 < sum(x.tobytes() not in real for x in mirrored) < 54  # hflip=True: about half mirrored
    assert labels.min() >= 0 and labels.max() <= 9


def test_prepare_builtin_is_idempotent_and_fast_when_done(builtin_dir: Path) -> None:
    shard = builtin_dir / "train" / "shard-000000.tar"
    before = shard.stat().st_mtime_ns
    start = time.perf_counter()
    prepare_builtin(builtin_dir)
    assert time.perf_counter() - start < 2.0
    assert shard.stat().st_mtime_ns == before


def test_prepare_builtin_rewrites_a_damaged_split(builtin_dir: Path, tmp_path: Path) -> None:
    shard = builtin_dir / "heldout" / "shard-000000.tar"
    good = shard.read_bytes()
    shard.write_bytes(good[:1000])
    prepare_builtin(builtin_dir)
    assert shard.read_bytes() == good  # byte-reproducible, so the rewrite is identical


def test_cli_prepare_builtin_reports_both_splits(builtin_dir: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "dtr_scale", "prepare-builtin", "--out", str(builtin_dir)],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    assert "train: 4500 samples in 9 shards" in result.stdout
    assert "heldout: 500 samples in 1 shards" in result.stdout
