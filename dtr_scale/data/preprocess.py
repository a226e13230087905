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
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dtr_scale.data.images import open_rgb8
from dtr_scale.data.shards import (
    MANIFEST_NAME,
    LatentSample,
    load_manifest,
    sha256_file,
    shard_name,
    write_manifest,
    write_shard,
)
from dtr_scale.data.vae import load_vae, vae_identity
from dtr_scale.fileio import atomic_write_text

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt")
IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff", ".ppm"}
PROGRESS_DIR = ".progress"


class UnreadableImageWarning(UserWarning):
    """An input image could not be decoded; it is skipped and counted."""


# ----------------------------------------------------------------------------------------------- inputs


def list_image_folder(root: str | os.PathLike) -> tuple[list[str], list[int], list[str]]:
    """(relative image paths, class indices, class names) of an ImageFolder, in a deterministic order."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"input folder {root} does not exist (expected INPUT/<class>/<image files>)")
    classes = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not classes:
        raise ValueError(
            f"input folder {root} has no class sub-folders (expected INPUT/<class>/<image files>)"
        )
    paths, labels = [], []
    for index, name in enumerate(classes):
        for file in sorted((root / name).iterdir()):
            if file.is_file() and file.suffix.lower() in IMAGE_EXTENSIONS:
                paths.append(f"{name}/{file.name}")
                labels.append(index)
    if not paths:
        raise ValueError(f"input folder {root} has no images with extensions {sorted(IMAGE_EXTENSIONS)}")
    return paths, labels, classes


def center_crop(image, image_size: int) -> np.ndarray:
    """ADM's center crop: halve with a BOX filter while the short side is >= 2x the size, resize the short
    side to `image_size` with BICUBIC, then crop the center square. Returns uint8 (size, size, 3)."""
    from PIL import Image

    while min(image.size) >= 2 * image_size:
        image = image.resize(tuple(s // 2 for s in image.size), resample=Image.BOX)
    scale = image_size / min(image.size)
    image = image.resize(tuple(round(s * scale) for s in image.size), resample=Image.BICUBIC)
    pixels = np.asarray(image)
    top, left = (pixels.shape[0] - image_size) // 2, (pixels.shape[1] - image_size) // 2
    return pixels[top : top + image_size, left : left + image_size]


def load_image(path: Path, image_size: int) -> np.ndarray | str:
    """Center-cropped uint8 HWC RGB image, or the reason (a message naming the file) it cannot be used.

    Any mode Pillow opens is turned into 8-bit RGB faithfully (data/images.py: 16-bit, float, alpha, CMYK
    ...); a file that cannot be opened or decoded for any reason Pillow or the OS gives (including Pillow's
    decompression-bomb refusal) is returned as a reason, never raised: one image never aborts a job.
    """
    from PIL import Image

    try:
        return center_crop(Image.fromarray(open_rgb8(path)), image_size)
    except (OSError, ValueError) as err:  # UnsupportedImage is a ValueError
        return str(err)


class _ImageList(torch.utils.data.Dataset):
    def __init__(self, root: Path, items: list[tuple[int, str, int]], image_size: int) -> None:
        self.root, self.items, self.image_size = root, items, image_size

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> tuple[int, str, int, np.ndarray | str]:
        number, rel, label = self.items[i]
        return number, rel, label, load_image(self.root / rel, self.image_size)


def _collate(batch: list) -> list:
    return batch  # images may be reasons (str: unreadable); the encoder loop sorts them out


# ----------------------------------------------------------------------------------------------- planning


def write_order(num_images: int, shuffle_seed: int) -> list[int]:
    """Image numbers (indices into the sorted listing) in the order they are written: a seeded permutation,
    so shard j holds images order[j*S : (j+1)*S], a random sample of every class. Sample keys stay the
    image numbers, so a key names its file whatever the seed."""
    return np.random.default_rng(shuffle_seed).permutation(num_images).tolist()


def shard_range(num_shards: int, rank: int, world_size: int) -> range:
    """The contiguous shard numbers owned by `rank` (disjoint across ranks, together all of them)."""
    return range(rank * num_shards // world_size, (rank + 1) * num_shards // world_size)


def input_fingerprint(paths: list[str], classes: list[str], settings: dict[str, Any]) -> str:
    """Hash of everything a shard's bytes depend on: inputs, class names, crop size, shard size, VAE config."""
    digest = hashlib.sha256(json.dumps({"classes": classes, **settings}, sort_keys=True).encode())
    for rel in paths:
        digest.update(rel.encode() + b"\n")
    return digest.hexdigest()


def shard_members(order: list[int], shard: int, shard_size: int) -> list[int]:
    """Image numbers written to shard number `shard` (a slice of the write order)."""
    return order[shard * shard_size : (shard + 1) * shard_size]


def inputs_digest(root: Path, rels: list[str], content: bool = False) -> str:
    """sha256 over a shard's input files: changes when any of them is edited, replaced or removed.

    Default: each file's path, size and modification time (as make and rsync judge a file; no content
    read). content=True (`--hash-inputs`): each file's bytes instead, which also catches an edit whose
    copy kept size and timestamp (`cp -p`, `rsync -t`), at the cost of reading every image once per run.
    """
    digest = hashlib.sha256()
    for rel in rels:
        try:
            if content:
                digest.update(f"{rel}\t{sha256_file(root / rel)}\n".encode())
            else:
                st = os.stat(root / rel)
                digest.update(f"{rel}\t{st.st_size}\t{st.st_mtime_ns}\n".encode())
        except OSError:
            digest.update(f"{rel}\tmissing\n".encode())
    return digest.hexdigest()


def vae_weights_sha256(vae_dir: Path) -> str:
    """sha256 over the VAE directory's weight files (names and bytes): new weights under an unchanged
    config.json are a different encoder, and shards made with the old one are stale."""
    digest = hashlib.sha256()
    files = sorted(p for p in vae_dir.iterdir() if p.is_file() and p.suffix in WEIGHT_SUFFIXES)
    for file in files:
        digest.update(file.name.encode() + b"\n" + sha256_file(file).encode() + b"\n")
    return digest.hexdigest()


def _finished_records(out_dir: Path, fingerprint: str) -> dict[str, dict[str, Any]]:
    """Shard name -> record of shards already written with these settings (manifest, then per-shard records)."""
    records: dict[str, dict[str, Any]] = {}
    try:
        manifest = load_manifest(out_dir / MANIFEST_NAME)
        if manifest.extra.get("fingerprint") == fingerprint:
            unreadable = manifest.extra.get("unreadable_by_shard", {})
            inputs = manifest.extra.get("inputs_by_shard", {})
            for s in manifest.shards:
                records[s["name"]] = {
                    **s, "unreadable": unreadable.get(s["name"], []), "inputs_sha256": inputs.get(s["name"])
                }  # fmt: skip
    except (OSError, ValueError):
        pass
    for file in sorted((out_dir / PROGRESS_DIR).glob("shard-*.json")):
        try:
            record = json.loads(file.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        if record.get("fingerprint") == fingerprint:
            records[record["name"]] = record
    return records


def _is_finished(out_dir: Path, record: dict[str, Any] | None, inputs_sha256: str) -> bool:
    """A shard is reused only when its file has the recorded sha256 and its inputs are unchanged."""
    path = out_dir / record["name"] if record else None
    return (
        bool(record)
        and record.get("inputs_sha256") == inputs_sha256
        and path.is_file()
        and sha256_file(path) == record["sha256"]
    )


def _settings_change(out_dir: Path, settings: dict[str, Any], fingerprint: str) -> str | None:
    """What differs between the settings an existing manifest in out_dir was written with and these."""
    try:
        manifest = load_manifest(out_dir / MANIFEST_NAME)
    except (OSError, ValueError):
        return None
    if manifest.extra.get("fingerprint") == fingerprint:
        return None
    before = manifest.extra.get("settings", {})
    changed = [k for k in sorted(settings) if before.get(k) != settings[k]]
    return ", ".join(changed) if changed else "the input file list or class names"


# ----------------------------------------------------------------------------------------------- encoding


def _device(choice: str, local_rank: int) -> torch.device:
    if choice == "cuda" or (choice == "auto" and torch.cuda.is_available()):
        return torch.device("cuda", local_rank % max(1, torch.cuda.device_count()))
    return torch.device("cpu")


def _autocast(device: torch.device, precision: str):
    if device.type != "cuda" or precision == "fp32":
        return torch.autocast("cpu", enabled=False)
    dtype = torch.float16 if precision == "fp16" else torch.bfloat16
    return torch.autocast("cuda", dtype=dtype)


@torch.no_grad()
def encode_images(
    vae, images: np.ndarray, device: torch.device, precision: str
) -> tuple[np.ndarray, np.ndarray]:
    """uint8 (B, H, W, 3) -> posterior mean and std, float16 (B, 2, C, h, w); [:, 1] is the flipped image."""
    x = torch.from_numpy(images).to(device).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    with _autocast(device, precision):
        posterior = vae.encode(torch.cat([x, x.flip(-1)])).latent_dist
    batch = len(images)

    def pair(t: torch.Tensor) -> np.ndarray:
        t = t.float().cpu()
        return torch.stack([t[:batch], t[batch:]], dim=1).numpy().astype(np.float16)

    return pair(posterior.mean), pair(posterior.std)


def _encode_shard_range(job: dict[str, Any]) -> list[str]:
    """Encode and write the shards of one consumer; returns the unreadable image paths it met."""
    if job["threads"]:  # several encoders on one machine: one thread each, not N x all cores
        torch.set_num_threads(job["threads"])
    out_dir, root = Path(job["out"]), Path(job["input"])
    rank, world = job["rank"], job["world_size"]
    device = _device(job["device"], job["local_rank"])
    paths, labels, size = job["paths"], job["labels"], job["shard_size"]
    num_shards = (len(paths) + size - 1) // size
    owned = shard_range(num_shards, rank, world)
    records = _finished_records(out_dir, job["fingerprint"])
    order = job["order"]
    inputs = {
        j: inputs_digest(root, [paths[n] for n in shard_members(order, j, size)], job["hash_inputs"])
        for j in owned
    }
    todo = [j for j in owned if not _is_finished(out_dir, records.get(shard_name(j)), inputs[j])]
    changed = [
        shard_name(j)
        for j in todo
        if shard_name(j) in records and records[shard_name(j)].get("inputs_sha256") != inputs[j]
    ]
    skipped = len(owned) - len(todo)
    show = rank == 0 and not job["quiet"]
    if show and skipped:
        print(
            f"preprocess: {skipped} of {len(owned)} shards of rank 0 already done (input images unchanged by "
            f"{'content' if job['hash_inputs'] else 'size and modification time'}; shard files' sha256 "
            "verified); skipping"
        )
    if rank == 0 and changed:
        print(
            f"preprocess: {len(changed)} shard(s) of rank 0 were written from input images that have changed "
            f"since (judged by {'content' if job['hash_inputs'] else 'size and modification time'}), "
            f"e.g. {changed[0]}; re-encoding them"
        )
    unreadable_all: list[str] = []
    if not todo:
        return unreadable_all
    vae = load_vae(job["vae"]).to(device).eval()
    from tqdm import tqdm

    total = sum(min(size, len(paths) - j * size) for j in todo)
    bar = tqdm(
        total=total, unit="img", desc=f"encode (rank 0 of {world})", disable=not show, dynamic_ncols=True
    )
    (out_dir / PROGRESS_DIR).mkdir(parents=True, exist_ok=True)
    for j in todo:
        items = [(n, paths[n], labels[n]) for n in shard_members(order, j, size)]
        loader = torch.utils.data.DataLoader(
            _ImageList(root, items, job["image_size"]),
            batch_size=job["batch_size"],
            num_workers=job["loader_workers"],
            collate_fn=_collate,
        )
        samples, unreadable = [], []
        for batch in loader:
            good = [b for b in batch if not isinstance(b[3], str)]
            for _, rel, _, reason in (b for b in batch if isinstance(b[3], str)):
                unreadable.append(rel)
                warnings.warn(f"{reason}; skipped", UnreadableImageWarning, stacklevel=1)
            if good:
                mean, std = encode_images(vae, np.stack([b[3] for b in good]), device, job["precision"])
                for k, (number, _, label, _) in enumerate(good):
                    samples.append(LatentSample(key=f"{number:09d}", label=label, mean=mean[k], std=std[k]))
            bar.update(len(batch))
        record = write_shard(out_dir / shard_name(j), samples)
        record.update(
            fingerprint=job["fingerprint"], unreadable=unreadable, rank=rank, inputs_sha256=inputs[j]
        )
        progress = out_dir / PROGRESS_DIR / f"{shard_name(j)}.json"
        atomic_write_text(progress, json.dumps(record, indent=1))
        unreadable_all += unreadable
    bar.close()
    return unreadable_all


# ----------------------------------------------------------------------------------------------- driver


def _env_rank() -> tuple[int, int, int]:
    """(global rank, world size, local rank) from the launcher's environment (torchrun, deepspeed, Slurm)."""
    world = int(os.environ.get("WORLD_SIZE", os.environ.get("SLURM_NTASKS", "1")))
    rank = int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0")))
    local = int(os.environ.get("LOCAL_RANK", os.environ.get("SLURM_LOCALID", "0")))
    return rank, world, local


def wait_for_shards(
    out_dir: Path, fingerprint: str, inputs: dict[str, str], poll_seconds: float = 2.0, quiet: bool = False
) -> None:
    """Rank 0: wait until every shard in `inputs` (name -> inputs digest) is finished, by any rank.

    Ranks synchronise through the shard records on disk, not a process group: a rank with nothing left to
    encode exits at once, and rank 0 waits as long as the busy ranks need (no collective timeout to run
    into on a long ImageNet encode). A rank that fails makes the launcher stop the job.
    """
    import time

    verified: set[str] = set()
    last_report = time.monotonic()
    while True:
        records = _finished_records(out_dir, fingerprint)
        for name, digest in inputs.items():
            if name not in verified and _is_finished(out_dir, records.get(name), digest):
                verified.add(name)
        missing = [name for name in inputs if name not in verified]
        if not missing:
            return
        if not quiet and time.monotonic() - last_report > 60:
            print(f"preprocess: rank 0 waiting for {len(missing)} shard(s) of other ranks, e.g. {missing[0]}")
            last_report = time.monotonic()
        time.sleep(poll_seconds)


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
) -> Path | None:
    """Encode `input_dir` into shards under `out_dir`; returns the manifest path on rank 0 (None elsewhere).

    shuffle_seed: seeds the global order the samples are written in. hflip: recorded in the manifest as the
    default of `data.hflip` (True for natural images; False where a mirror image is another symbol).
    hash_inputs: judge whether a finished shard's images changed by their bytes, not size + mtime (switching
    this setting re-encodes once, since the records are kept in the other form).
    """
    input_dir, out_dir, vae_dir = Path(input_dir), Path(out_dir), Path(vae_dir)
    vae_config = (
        json.loads((vae_dir / "config.json").read_text()) if (vae_dir / "config.json").is_file() else None
    )
    if vae_config is None or vae_config.get("_class_name") != "AutoencoderKL":
        load_vae(vae_dir, context="--vae")  # raises the clear error for a missing or non-VAE directory
    if image_size % 8:
        raise ValueError(f"--image-size must be a multiple of 8 (the VAE's downsampling), got {image_size}")
    paths, labels, classes = list_image_folder(input_dir)
    identity = vae_identity(vae_dir, vae_config, vae_name)
    identity["weights_sha256"] = vae_weights_sha256(vae_dir)
    settings = {
        "image_size": image_size,
        "shard_size": shard_size,
        "vae_config_sha256": identity["config_sha256"],
        "vae_weights_sha256": identity["weights_sha256"],
        "shuffle_seed": shuffle_seed,
    }
    fingerprint = input_fingerprint(paths, classes, settings)
    change = _settings_change(out_dir, settings, fingerprint)
    if change and not quiet and _env_rank()[0] == 0:
        print(f"preprocess: {out_dir} holds shards made with other settings ({change} changed); re-encoding")
    env_rank, env_world, local_rank = _env_rank()
    workers = max(1, workers)
    world = env_world * workers
    out_dir.mkdir(parents=True, exist_ok=True)
    job = {
        "input": str(input_dir), "out": str(out_dir), "vae": str(vae_dir), "paths": paths, "labels": labels,
        "order": write_order(len(paths), shuffle_seed),
        "fingerprint": fingerprint, "image_size": image_size, "shard_size": shard_size, "batch_size": batch_size,
        "loader_workers": loader_workers, "device": device, "precision": precision, "world_size": world,
        "quiet": quiet, "threads": 1 if workers > 1 else 0, "hash_inputs": hash_inputs,
    }  # fmt: skip
    if workers == 1:
        _encode_shard_range({**job, "rank": env_rank, "local_rank": local_rank})
    else:
        context = torch.multiprocessing.get_context("spawn")  # spawn, not fork: safe with CUDA and OpenMP
        processes = []
        for k in range(workers):
            local_job = {**job, "rank": env_rank * workers + k, "local_rank": local_rank * workers + k}
            processes.append(context.Process(target=_encode_shard_range, args=(local_job,)))
            processes[-1].start()
        for process in processes:
            process.join()
        failed = [p.exitcode for p in processes if p.exitcode != 0]
        if failed:
            raise RuntimeError(
                f"preprocess: {len(failed)} of {workers} worker processes failed (exit codes {failed})"
            )
    if env_rank != 0:
        return None
    size = shard_size
    wait_for_shards(out_dir, fingerprint, {
        shard_name(j): inputs_digest(
            input_dir, [paths[n] for n in shard_members(job["order"], j, size)], hash_inputs
        )
        for j in range((len(paths) + size - 1) // size)
    }, quiet=quiet)  # fmt: skip
    extra = {"shuffle_seed": shuffle_seed, "hflip": hflip, "settings": settings}
    return _write_final_manifest(out_dir, fingerprint, len(paths), shard_size, classes, vae_config, identity,
                                 image_size, scaling_factor, extra)  # fmt: skip


def _write_final_manifest(
    out_dir: Path, fingerprint: str, num_images: int, shard_size: int, classes: list[str], vae_config: dict,
    identity: dict, image_size: int, scaling_factor: float | None, extra: dict,
) -> Path:  # fmt: skip
    records = _finished_records(out_dir, fingerprint)
    names = [shard_name(j) for j in range((num_images + shard_size - 1) // shard_size)]
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
    parser.add_argument("--scaling-factor", type=float, default=None, help="override the VAE config's value")
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
        "--hflip",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="manifest default for data.hflip: random mirroring in training (--no-hflip for text, digits)",
    )


def run(args: argparse.Namespace) -> int:
    """`dtr-scale preprocess`: encode an image folder into latent shards (this rank's share); returns 0."""
    try:
        preprocess(
            args.input, args.vae, args.out, image_size=args.image_size, shard_size=args.shard_size,
            batch_size=args.batch_size, workers=args.workers, loader_workers=args.loader_workers,
            device=args.device, precision=args.precision, scaling_factor=args.scaling_factor,
            vae_name=args.vae_name, quiet=args.quiet, shuffle_seed=args.shuffle_seed, hflip=args.hflip,
            hash_inputs=args.hash_inputs,
        )  # fmt: skip
    except (FileNotFoundError, ValueError) as err:
        print(f"dtr-scale preprocess: error: {err}", file=sys.stderr)
        return 2
    return 0
