"""One consumer's share of `dtr-scale preprocess`: its shards' images -> VAE posterior moments -> shard files.

A consumer (one process: env rank x local worker) gets a `job` dict from preprocess.py (plain values, so it
pickles into a spawned process) and encodes the shards `shard_range` gives it that are not finished yet
(preprocess_state.py), each image with its horizontal flip, writing the shard and then its per-shard
record. Unreadable images are warned about, skipped and listed in the record.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dtr_scale.data.image_folder import ImageList, UnreadableImageWarning, UnusableImage, collate_as_list
from dtr_scale.data.preprocess_state import (
    PROGRESS_DIR,
    count_shards,
    finished_records,
    is_finished,
    shard_inputs_digest,
    shard_members,
    shard_range,
)
from dtr_scale.data.shards import LatentSample, shard_name, write_shard
from dtr_scale.data.vae import load_vae
from dtr_scale.distributed import cuda_device
from dtr_scale.fileio import atomic_write_text


def _device(choice: str, local_rank: int) -> torch.device:
    """--device cuda (or auto with CUDA present): this local rank's GPU; else the CPU."""
    if choice == "cuda" or (choice == "auto" and torch.cuda.is_available()):
        return cuda_device(local_rank)
    return torch.device("cpu")


def _autocast(device: torch.device, precision: str):
    if device.type != "cuda" or precision == "fp32":
        return torch.autocast("cpu", enabled=False)
    dtype = torch.float16 if precision == "fp16" else torch.bfloat16
    return torch.autocast("cuda", dtype=dtype)


def with_flips(images: np.ndarray, device: torch.device) -> torch.Tensor:
    """uint8 (B, H, W, 3) -> float (2B, 3, H, W) in [-1, 1] on `device`: the images, then their horizontal flips."""
    x = torch.from_numpy(images).to(device).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    return torch.cat([x, x.flip(-1)])


def as_pairs(t: torch.Tensor) -> np.ndarray:
    """(2B, ...) in `with_flips` order -> float16 (B, 2, ...): [:, 0] as stored, [:, 1] flipped."""
    t = t.float().cpu()
    batch = len(t) // 2
    return torch.stack([t[:batch], t[batch:]], dim=1).numpy().astype(np.float16)


@torch.no_grad()
def encode_images(
    vae, both: torch.Tensor, device: torch.device, precision: str
) -> tuple[np.ndarray, np.ndarray]:
    """`with_flips` images -> posterior mean and std, float16 (B, 2, C, h, w); [:, 1] is the flipped image."""
    with _autocast(device, precision):
        posterior = vae.encode(both).latent_dist
    return as_pairs(posterior.mean), as_pairs(posterior.std)


@torch.no_grad()
def encode_repa(encoder, both: torch.Tensor) -> np.ndarray:
    """`with_flips` images -> REPA encoder tokens, float16 (B, 2, M, D); [:, 1] is the flipped image's, so the
    flipped latent is trained against the flipped image's features."""
    return as_pairs(encoder(both))


def _shards_to_encode(job: dict[str, Any]) -> tuple[list[int], dict[int, str]]:
    """(this consumer's shards still to write, inputs digest per owned shard); rank 0 says what it skips."""
    out_dir, root, rank = Path(job["out"]), Path(job["input"]), job["rank"]
    paths, size, order = job["paths"], job["shard_size"], job["order"]
    owned = shard_range(count_shards(len(paths), size), rank, job["world_size"])
    records = finished_records(out_dir, job["fingerprint"])
    inputs = {j: shard_inputs_digest(root, paths, order, j, size, job["hash_inputs"]) for j in owned}
    todo = [j for j in owned if not is_finished(out_dir, records.get(shard_name(j)), inputs[j])]
    changed = [
        shard_name(j)
        for j in todo
        if shard_name(j) in records and records[shard_name(j)].get("inputs_sha256") != inputs[j]
    ]
    skipped = len(owned) - len(todo)
    judged_by = "content" if job["hash_inputs"] else "size and modification time"
    if rank == 0 and not job["quiet"] and skipped:
        print(
            f"preprocess: {skipped} of {len(owned)} shards of rank 0 already done (input images unchanged by "
            f"{judged_by}; shard files' sha256 verified); skipping"
        )
    if rank == 0 and changed:
        print(
            f"preprocess: {len(changed)} shard(s) of rank 0 were written from input images that have changed "
            f"since (judged by {judged_by}), e.g. {changed[0]}; re-encoding them"
        )
    return todo, inputs


def _encode_shard(
    job: dict[str, Any], shard: int, inputs_sha256: str, vae, device, bar, repa=None
) -> list[str]:
    """Encode and write shard number `shard` and its per-shard record; returns its unreadable image paths."""
    out_dir, paths, labels = Path(job["out"]), job["paths"], job["labels"]
    items = [(n, paths[n], labels[n]) for n in shard_members(job["order"], shard, job["shard_size"])]
    loader = torch.utils.data.DataLoader(
        ImageList(Path(job["input"]), items, job["image_size"]),
        batch_size=job["batch_size"],
        num_workers=job["loader_workers"],
        collate_fn=collate_as_list,
    )
    samples, unreadable, kinds, first = [], [], [], {}
    for batch in loader:
        good = [b for b in batch if not isinstance(b[3], UnusableImage)]
        for _, rel, _, reason in (b for b in batch if isinstance(b[3], UnusableImage)):
            unreadable.append(rel)
            kinds.append(reason.kind)
            first.setdefault(reason.kind, reason.message)
        if good:
            both = with_flips(np.stack([b[3] for b in good]), device)  # one transfer for the VAE and REPA
            mean, std = encode_images(vae, both, device, job["precision"])
            features = encode_repa(repa, both) if repa is not None else [None] * len(good)
            for k, (number, _, label, _) in enumerate(good):
                samples.append(
                    LatentSample(key=f"{number:09d}", label=label, mean=mean[k], std=std[k], repa=features[k])
                )
        bar.update(len(batch))
    for kind, message in first.items():  # one line per shard and kind, with the count and the first file
        warnings.warn(
            f"{shard_name(shard)}: {kinds.count(kind)} {kind} image{'' if kinds.count(kind) == 1 else 's'} "
            f"skipped, first {message}",
            UnreadableImageWarning,
            stacklevel=1,
        )
    record = write_shard(out_dir / shard_name(shard), samples)
    record.update(
        fingerprint=job["fingerprint"], unreadable=unreadable, unreadable_kinds=kinds, rank=job["rank"],
        inputs_sha256=inputs_sha256,
    )  # fmt: skip
    progress = out_dir / PROGRESS_DIR / f"{shard_name(shard)}.json"
    atomic_write_text(progress, json.dumps(record, indent=1))
    return unreadable


def encode_shard_range(job: dict[str, Any]) -> list[str]:
    """Encode and write the shards of one consumer; returns the unreadable image paths it met.

    job: the plain dict preprocess.py builds (input/out/vae directories, the listing, write order, settings
    fingerprint, sizes, device, precision) plus this consumer's `rank` and `local_rank`; `world_size` counts
    consumers. Shards already finished with these settings and unchanged inputs are skipped.
    """
    if job["threads"]:  # several encoders on one machine: one thread each, not N x all cores
        torch.set_num_threads(job["threads"])
    device = _device(job["device"], job["local_rank"])
    todo, inputs = _shards_to_encode(job)
    unreadable_all: list[str] = []
    if not todo:
        return unreadable_all
    vae = load_vae(job["vae"]).to(device).eval()
    repa = None
    if job.get("repa_encoder"):  # fp32: the features are stored once and trained against for the whole run
        from dtr_scale.repa_encoder import RepaEncoder

        repa = RepaEncoder(job["repa_encoder"], job["repa_resolution"], device=device)
    from tqdm import tqdm

    size, num_images = job["shard_size"], len(job["paths"])
    total = sum(min(size, num_images - j * size) for j in todo)
    show = job["rank"] == 0 and not job["quiet"]
    bar = tqdm(
        total=total,
        unit="img",
        desc=f"encode (rank 0 of {job['world_size']})",
        disable=not show,
        dynamic_ncols=True,
    )
    (Path(job["out"]) / PROGRESS_DIR).mkdir(parents=True, exist_ok=True)
    for j in todo:
        unreadable_all += _encode_shard(job, j, inputs[j], vae, device, bar, repa)
    bar.close()
    return unreadable_all
