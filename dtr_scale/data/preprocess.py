"""`dtr-scale preprocess`: an ImageFolder of class-labelled images -> VAE latent shards + manifest.json.

    dtr-scale preprocess --input /data/imagenet/train --vae /models/sd-vae-ft-ema --out /data/latents/train

Input layout: `INPUT/<class name>/<image>` (ImageNet's `train/<wnid>/*.JPEG`); classes are the sorted
folder names, images the sorted file names, and the samples are written in the order of a permutation
seeded by `--shuffle-seed` (recorded in the manifest), so every shard is a random sample of all classes
(never a class-sorted run, which would put one or two classes in each micro-batch) and the order, like
every shard's content, is a pure function of the folder and the seed. Each image is ADM-center-cropped to `--image-size`, encoded with its horizontal
flip by a diffusers AutoencoderKL loaded from a local directory, and the posterior mean and std of both
orientations are stored unscaled as float16 (shards.py has the format).

Parallelism: launched under torchrun / the deepspeed launcher, each process reads its global RANK and
WORLD_SIZE from the environment; `--workers N` starts N local processes. The consumers (env ranks x local
workers) own disjoint, contiguous ranges of shard numbers and never write the same file. Rank 0 writes
the manifest once every shard is finished, watching the per-shard records on disk (no process group, so
no collective timeout however long the other ranks take; other ranks exit when their shards are done).

Idempotent: a shard whose file exists with the sha256 recorded for the same settings (crop size, shard size,
shuffle seed, VAE config *and* weights) and whose input images are unchanged (path, size and modification
time of each: `inputs_digest`) is skipped; the record lives in the manifest and in the per-shard record
`.progress/shard-N.json` written as each shard completes, so an interrupted run resumes too. Anything else
is (re)written, and the run says why (which setting changed, or which shards' images changed). Unreadable images are reported by
path, counted in the manifest (`unreadable`) and skipped; their keys (global image numbers) stay unused
so the other samples' keys do not depend on which files happened to fail.

Modules: image_folder.py lists and loads the images, preprocess_state.py plans the shards and keeps the
records above, encode.py is one consumer's encoder; this one is the driver and the CLI.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

from dtr_scale.data.encode import encode_shard_range
from dtr_scale.data.image_folder import list_image_folder
from dtr_scale.data.preprocess_state import (
    count_shards,
    finished_records,
    input_fingerprint,
    settings_change,
    shard_inputs_digest,
    vae_weights_sha256,
    wait_for_shards,
    write_order,
)
from dtr_scale.data.shards import shard_name, write_manifest
from dtr_scale.data.vae import load_vae, vae_identity
from dtr_scale.distributed import launcher_ranks
from dtr_scale.errors import finite_float


def _vae_config(vae_dir: Path) -> dict | None:
    """The VAE directory's config.json; raises the clear error for a missing or non-VAE directory."""
    vae_config = (
        json.loads((vae_dir / "config.json").read_text()) if (vae_dir / "config.json").is_file() else None
    )
    if vae_config is None or vae_config.get("_class_name") != "AutoencoderKL":
        load_vae(vae_dir, context="--vae")
    return vae_config


def _settings(
    vae_dir: Path, vae_config: dict, vae_name: str | None, image_size: int, shard_size: int, shuffle_seed: int
) -> tuple[dict, dict]:
    """(VAE identity for the manifest, the settings every shard's bytes depend on)."""
    identity = vae_identity(vae_dir, vae_config, vae_name)
    identity["weights_sha256"] = vae_weights_sha256(vae_dir)
    settings = {
        "image_size": image_size,
        "shard_size": shard_size,
        "vae_config_sha256": identity["config_sha256"],
        "vae_weights_sha256": identity["weights_sha256"],
        "shuffle_seed": shuffle_seed,
    }
    return identity, settings


def repa_settings(
    encoder: str | os.PathLike | None, resolution: int | None, image_size: int, settings: dict
) -> dict | None:
    """The manifest's `repa` field for `preprocess --repa-encoder`, which stores each image's (and its flip's)
    encoder tokens at `resolution` (None: patch x image_size / 16, REPA's 224 px for DINOv2 at 256 px): the
    encoder's identity, input resolution, tokens M and width D per image,
    and the bytes per sample the features add (float16, image and flip); None without an encoder. Adds what
    the shard bytes depend on to `settings` (other features: other shards)."""
    if encoder is None:
        if resolution is not None:
            raise ValueError(
                f"--repa-resolution {resolution} needs --repa-encoder (the encoder it is the input of)"
            )
        return None
    from dtr_scale.repa_encoder import check_resolution, encoder_config, encoder_identity

    config = encoder_config(encoder)
    patch, dim = int(config["patch_size"]), int(config["hidden_size"])
    resolution = int(resolution if resolution is not None else patch * image_size // 16)  # DiT-*/2, 8x VAE
    check_resolution(resolution, patch, f"--repa-resolution {resolution}", encoder)
    tokens = (resolution // patch) ** 2
    identity = encoder_identity(encoder)
    settings["repa"] = {"config_sha256": identity["config_sha256"], "weights_sha256": identity["weights_sha256"],
                        "resolution": resolution}  # fmt: skip
    return {
        **identity,
        "resolution": resolution,
        "tokens": tokens,
        "dim": dim,
        "bytes_per_sample": 2 * tokens * dim * 2,
    }


def _check_arguments(image_size: int, max_skipped_fraction: float) -> None:
    if image_size % 8:
        raise ValueError(f"--image-size must be a multiple of 8 (the VAE's downsampling), got {image_size}")
    if not 0.0 <= max_skipped_fraction <= 1.0:
        raise ValueError(f"--max-skipped-fraction must be in [0, 1], got {max_skipped_fraction}")


def _run_consumers(job: dict, workers: int, env_rank: int, local_rank: int) -> None:
    """Encode this env rank's share: in-process, or in `workers` spawned processes (consumers)."""
    if workers == 1:
        encode_shard_range({**job, "rank": env_rank, "local_rank": local_rank})
        return
    context = torch.multiprocessing.get_context("spawn")  # spawn, not fork: safe with CUDA and OpenMP
    processes = []
    for k in range(workers):
        local_job = {**job, "rank": env_rank * workers + k, "local_rank": local_rank * workers + k}
        processes.append(context.Process(target=encode_shard_range, args=(local_job,)))
        processes[-1].start()
    for process in processes:
        process.join()
    failed = [p.exitcode for p in processes if p.exitcode != 0]
    if failed:
        raise RuntimeError(
            f"preprocess: {len(failed)} of {workers} worker processes failed (exit codes {failed})"
        )


def preprocess(
    input_dir: str | os.PathLike,
    vae_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    image_size: int = 256,
    shard_size: int = 1000,
    batch_size: int = 32,
    workers: int = 1,
    loader_workers: int = 0,
    device: str = "auto",
    precision: str = "bf16",
    scaling_factor: float | None = None,
    vae_name: str | None = None,
    quiet: bool = False,
    shuffle_seed: int = 0,
    hflip: bool = True,
    hash_inputs: bool = False,
    max_skipped_fraction: float = 0.01,
    repa_encoder: str | os.PathLike | None = None,
    repa_resolution: int | None = None,
) -> Path | None:
    """Encode `input_dir` into shards under `out_dir`; returns the manifest path on rank 0 (None elsewhere).

    shuffle_seed: seeds the global write order. hflip: the manifest's default of `data.hflip` (True for natural
    images, False where a mirror image is another symbol). hash_inputs: judge a finished shard's images changed
    by their bytes, not size + mtime (switching re-encodes once). max_skipped_fraction: past this share of
    unusable images, ValueError names the worst shards instead of a manifest (the shards stay). repa_encoder:
    also store REPA features (`repa_settings`)."""
    input_dir, out_dir, vae_dir = Path(input_dir), Path(out_dir), Path(vae_dir)
    vae_config = _vae_config(vae_dir)
    _check_arguments(image_size, max_skipped_fraction)
    paths, labels, classes = list_image_folder(input_dir)
    identity, settings = _settings(vae_dir, vae_config, vae_name, image_size, shard_size, shuffle_seed)
    repa = repa_settings(repa_encoder, repa_resolution, image_size, settings)
    fingerprint = input_fingerprint(paths, classes, settings)
    env_rank, env_world, local_rank = launcher_ranks()
    change = settings_change(out_dir, settings, fingerprint)
    if change and not quiet and env_rank == 0:
        print(f"preprocess: {out_dir} holds shards made with other settings ({change} changed); re-encoding")
    out_dir.mkdir(parents=True, exist_ok=True)
    workers, order = max(1, workers), write_order(len(paths), shuffle_seed)
    job = {
        "input": str(input_dir), "out": str(out_dir), "vae": str(vae_dir), "paths": paths, "labels": labels,
        "order": order, "fingerprint": fingerprint, "image_size": image_size, "shard_size": shard_size, "batch_size": batch_size,
        "loader_workers": loader_workers, "device": device, "precision": precision,
        "world_size": env_world * workers, "quiet": quiet, "threads": 1 if workers > 1 else 0,
        "hash_inputs": hash_inputs, "repa_encoder": repa and str(repa_encoder), "repa_resolution": repa and repa["resolution"],
    }  # fmt: skip
    _run_consumers(job, workers, env_rank, local_rank)
    if env_rank != 0:
        return None
    wait_for_shards(out_dir, fingerprint, {shard_name(j): shard_inputs_digest(input_dir, paths, order, j, shard_size,
                    hash_inputs) for j in range(count_shards(len(paths), shard_size))}, quiet=quiet)  # fmt: skip
    _judge_skipped(out_dir, fingerprint, len(paths), shard_size, max_skipped_fraction)
    extra = {"shuffle_seed": shuffle_seed, "hflip": hflip, "settings": settings, **({"repa": repa} if repa else {})}  # fmt: skip
    return _write_final_manifest(out_dir, fingerprint, len(paths), shard_size, classes, vae_config, identity,
                                 image_size, scaling_factor, extra)  # fmt: skip


def _judge_skipped(
    out_dir: Path, fingerprint: str, num_images: int, shard_size: int, max_fraction: float
) -> None:
    """Print the table of skipped images by shard and kind; ValueError past `max_fraction` of the images."""
    records = finished_records(out_dir, fingerprint)
    rows = []
    for name in (shard_name(j) for j in range(count_shards(num_images, shard_size))):
        record = records.get(name, {})
        paths = record.get("unreadable", [])
        # Records of shards encoded before kinds were recorded (or rebuilt from a manifest) have none.
        kinds = record.get("unreadable_kinds") or ["unusable"] * len(paths)
        for kind in dict.fromkeys(kinds):
            rows.append((name, kind, kinds.count(kind), paths[kinds.index(kind)]))
    total = sum(count for _, _, count, _ in rows)
    if rows:  # printed even with --quiet (which only drops the progress bar)
        print("preprocess: skipped images\n| shard | kind | images | first |\n|---|---|---|---|")
        print("\n".join(f"| {name} | {kind} | {count} | {first} |" for name, kind, count, first in rows))
        print(f"| total | | {total} of {num_images} ({total / num_images:.2%}) | |")
    if total > max_fraction * num_images:
        worst = sorted(rows, key=lambda row: (-row[2], row[0]))[:3]
        raise ValueError(
            f"{out_dir}: {total} of {num_images} images could not be used ({total / num_images:.2%} > "
            f"--max-skipped-fraction={max_fraction:g}); worst shards: "
            + ", ".join(f"{name} ({count} {kind}, first {first})" for name, kind, count, first in worst)
            + "; manifest.json not written (the encoded shards are kept)"
        )


def _write_final_manifest(
    out_dir: Path, fingerprint: str, num_images: int, shard_size: int, classes: list[str], vae_config: dict,
    identity: dict, image_size: int, scaling_factor: float | None, extra: dict,
) -> Path:  # fmt: skip
    records = finished_records(out_dir, fingerprint)
    names = [shard_name(j) for j in range(count_shards(num_images, shard_size))]
    missing = [name for name in names if name not in records]
    if missing:
        raise RuntimeError(
            f"{out_dir}: shards {missing[:5]}{'...' if len(missing) > 5 else ''} were not written"
        )
    factor = 2 ** (len(vae_config.get("block_out_channels", [0, 0, 0, 0])) - 1)
    latent_shape = (int(vae_config.get("latent_channels", 4)), image_size // factor, image_size // factor)
    unreadable = {
        name: records[name].get("unreadable", []) for name in names if records[name].get("unreadable")
    }
    path = write_manifest(
        out_dir,
        [records[name] for name in names],
        latent_shape=latent_shape,
        scaling_factor=scaling_factor
        if scaling_factor is not None
        else vae_config.get("scaling_factor", 0.18215),
        vae=identity,
        image_size=image_size,
        labels=classes,
        extra={
            **extra,
            "fingerprint": fingerprint,
            "num_unreadable": sum(len(v) for v in unreadable.values()),
            "unreadable_by_shard": unreadable,
            "inputs_by_shard": {name: records[name].get("inputs_sha256") for name in names},
        },
    )
    count = sum(len(v) for v in unreadable.values())
    print(f"preprocess: wrote {path} ({sum(r['num_samples'] for r in records.values() if r['name'] in names)} "
          f"samples in {len(names)} shards; {count} unreadable images skipped)")  # fmt: skip
    return path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """CLI of `dtr-scale preprocess`."""
    parser.add_argument(
        "--input", required=True, help="ImageFolder root: INPUT/<class>/<images> (e.g. imagenet/train)"
    )
    parser.add_argument(
        "--vae", required=True, help="local diffusers AutoencoderKL directory (config.json + weights)"
    )
    parser.add_argument("--out", required=True, help="output directory for shards and manifest.json")
    parser.add_argument("--image-size", type=int, default=256, help="center-crop size (default 256)")
    parser.add_argument("--shard-size", type=int, default=1000, help="samples per shard (default 1000)")
    parser.add_argument("--batch-size", type=int, default=32, help="images per VAE forward (default 32)")
    parser.add_argument("--workers", type=int, default=1, help="local encoding processes (default 1)")
    parser.add_argument("--loader-workers", type=int, default=0, help="image-decoding processes per rank")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument(
        "--precision", choices=("bf16", "fp16", "fp32"), default="bf16", help="autocast on GPU"
    )
    parser.add_argument(
        "--scaling-factor", type=finite_float, default=None, help="override the VAE config's value"
    )
    parser.add_argument("--vae-name", default=None, help="VAE identity for the manifest (e.g. its hub id)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.add_argument(
        "--hash-inputs",
        action="store_true",
        help="judge changed input images by content (sha256) rather than size + modification time",
    )
    parser.add_argument(
        "--shuffle-seed", type=int, default=0, help="seed of the global order samples are written in"
    )
    parser.add_argument(
        "--max-skipped-fraction",
        type=finite_float,
        default=0.01,
        help="refuse to write the manifest when more than this share of the images cannot be used (default 0.01)",
    )
    parser.add_argument(
        "--hflip",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="manifest default for data.hflip: random mirroring in training (--no-hflip for text, digits)",
    )
    parser.add_argument(
        "--repa-encoder", default=None,
        help="local transformers encoder (DINOv2...): also store each image's REPA features (precomputed REPA)",
    )  # fmt: skip
    parser.add_argument(
        "--repa-resolution",
        type=int,
        default=None,
        help="encoder input side (default: patch x image size / 16)",
    )


def run(args: argparse.Namespace) -> int:
    """`dtr-scale preprocess`: encode an image folder into latent shards (this rank's share); returns 0."""
    try:
        preprocess(
            args.input, args.vae, args.out, image_size=args.image_size, shard_size=args.shard_size,
            batch_size=args.batch_size, workers=args.workers, loader_workers=args.loader_workers,
            device=args.device, precision=args.precision, scaling_factor=args.scaling_factor,
            vae_name=args.vae_name, quiet=args.quiet, shuffle_seed=args.shuffle_seed, hflip=args.hflip,
            hash_inputs=args.hash_inputs, max_skipped_fraction=args.max_skipped_fraction,
            repa_encoder=args.repa_encoder, repa_resolution=args.repa_resolution,
        )  # fmt: skip
    except (FileNotFoundError, ValueError) as err:
        print(f"dtr-scale preprocess: error: {err}", file=sys.stderr)
        return 2
    return 0
