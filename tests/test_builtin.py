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
    decode,
    encode,
    heldout_images,
    mnist_images,
    prepare_builtin,
    split_indices,
)
from dtr_scale.data.shards import build_decoder, load_manifest
from dtr_scale.data.stream import LatentStream


@pytest.fixture(scope="module")
def builtin_dir(builtin_data: dict[str, Path]) -> Path:
    """The directory prepare_builtin wrote (conftest's session fixture, shared with other tests)."""
    return builtin_data["train"].parent.parent


def test_decode_inverts_encode_exactly() -> None:
    images = torch.from_numpy(np.random.default_rng(0).uniform(-1, 1, (2, 1, 32, 32)).astype(np.float32))
    latents = encode(images)
    assert latents.shape == (2, 4, 16, 16)
    assert torch.equal(decode(latents), images)


def test_splits_hold_4500_and_500_digits_balanced_by_class(builtin_dir: Path) -> None:
    train, heldout = load_manifest(builtin_dir / "train"), load_manifest(builtin_dir / "heldout")
    assert (train.num_samples, heldout.num_samples) == (4500, 500)
    assert train.latent_shape == (4, 16, 16) and train.scaling_factor == 1.0 and train.image_size == 32
    assert train.labels == [str(d) for d in range(10)]
    _, labels = mnist_images()
    train_idx, heldout_idx = split_indices(labels, 50)
    assert np.bincount(labels[heldout_idx]).tolist() == [50] * 10
    assert not set(train_idx) & set(heldout_idx)


def test_stored_latents_decode_to_the_original_digits_exactly(builtin_dir: Path) -> None:
    images, labels = mnist_images()
    _, heldout_idx = split_indices(labels, 50)
    decoded = heldout_images(builtin_dir)
    assert decoded.shape == (500, 32, 32, 1) and decoded.dtype == np.uint8
    assert np.array_equal(decoded[..., 0], images[heldout_idx])
    assert heldout_images(builtin_dir, rgb=True).shape == (500, 32, 32, 3)


def test_stream_over_builtin_shards_decodes_to_digits_or_their_mirror(builtin_dir: Path) -> None:
    manifest = load_manifest(builtin_dir / "train")
    latents, labels = next(
        iter(LatentStream(manifest, 8, seed=0, rank=0, world_size=1, expected_latent_shape=(4, 16, 16)))
    )
    pixels = build_decoder(manifest)(latents)
    assert pixels.shape == (8, 1, 32, 32)
    assert pixels[:, :, :2].eq(-1).all()  # the padding is background
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
