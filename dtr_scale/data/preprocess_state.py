"""What `dtr-scale preprocess` writes where, and how it knows a shard is already done (resume, idempotence).

Planning: the samples are written in a seeded permutation of the sorted image listing (`write_order`),
shard j holding the slice `shard_members(order, j, shard_size)`; consumer r of W owns the contiguous shard
numbers `shard_range(num_shards, r, W)`.

Bookkeeping: every shard, once written, gets a record `OUT/.progress/shard-N.json` (its manifest entry
plus the settings fingerprint, the digest of its input images and its unreadable images); the final
manifest carries the same records. A shard is reused only when its file has the recorded sha256 for the
same settings (`input_fingerprint`) and unchanged inputs (`inputs_digest`); `wait_for_shards` lets rank 0
watch these records on disk instead of joining a process group.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from dtr_scale.data.shards import MANIFEST_NAME, load_manifest
from dtr_scale.fileio import sha256_file

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt")
PROGRESS_DIR = ".progress"


# ----------------------------------------------------------------------------------------------- planning


def write_order(num_images: int, shuffle_seed: int) -> list[int]:
    """Image numbers (indices into the sorted listing) in the order they are written: a seeded permutation,
    so shard j holds images order[j*S : (j+1)*S], a random sample of every class. Sample keys stay the
    image numbers, so a key names its file whatever the seed."""
    return np.random.default_rng(shuffle_seed).permutation(num_images).tolist()


def count_shards(num_images: int, shard_size: int) -> int:
    """Shards needed for `num_images` samples at `shard_size` per shard (the last one possibly short)."""
    return (num_images + shard_size - 1) // shard_size


def shard_range(num_shards: int, rank: int, world_size: int) -> range:
    """The contiguous shard numbers owned by `rank` (disjoint across ranks, together all of them)."""
    return range(rank * num_shards // world_size, (rank + 1) * num_shards // world_size)


def shard_members(order: list[int], shard: int, shard_size: int) -> list[int]:
    """Image numbers written to shard number `shard` (a slice of the write order)."""
    return order[shard * shard_size : (shard + 1) * shard_size]


# ----------------------------------------------------------------------------------------------- digests


def input_fingerprint(paths: list[str], classes: list[str], settings: dict[str, Any]) -> str:
    """Hash of everything a shard's bytes depend on: inputs, class names, crop size, shard size, VAE config."""
    digest = hashlib.sha256(json.dumps({"classes": classes, **settings}, sort_keys=True).encode())
    for rel in paths:
        digest.update(rel.encode() + b"\n")
    return digest.hexdigest()


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


def shard_inputs_digest(
    root: Path, paths: list[str], order: list[int], shard: int, shard_size: int, content: bool = False
) -> str:
    """`inputs_digest` of the images written to shard number `shard` (paths: the sorted listing)."""
    return inputs_digest(root, [paths[n] for n in shard_members(order, shard, shard_size)], content)


def vae_weights_sha256(vae_dir: Path) -> str:
    """sha256 over the VAE directory's weight files (names and bytes): new weights under an unchanged
    config.json are a different encoder, and shards made with the old one are stale."""
    digest = hashlib.sha256()
    files = sorted(p for p in vae_dir.iterdir() if p.is_file() and p.suffix in WEIGHT_SUFFIXES)
    for file in files:
        digest.update(file.name.encode() + b"\n" + sha256_file(file).encode() + b"\n")
    return digest.hexdigest()


# ----------------------------------------------------------------------------------------------- records


def finished_records(out_dir: Path, fingerprint: str) -> dict[str, dict[str, Any]]:
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


def is_finished(out_dir: Path, record: dict[str, Any] | None, inputs_sha256: str) -> bool:
    """A shard is reused only when its file has the recorded sha256 and its inputs are unchanged."""
    path = out_dir / record["name"] if record else None
    return (
        bool(record)
        and record.get("inputs_sha256") == inputs_sha256
        and path.is_file()
        and sha256_file(path) == record["sha256"]
    )


def settings_change(out_dir: Path, settings: dict[str, Any], fingerprint: str) -> str | None:
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
        records = finished_records(out_dir, fingerprint)
        for name, digest in inputs.items():
            if name not in verified and is_finished(out_dir, records.get(name), digest):
                verified.add(name)
        missing = [name for name in inputs if name not in verified]
        if not missing:
            return
        if not quiet and time.monotonic() - last_report > 60:
            print(f"preprocess: rank 0 waiting for {len(missing)} shard(s) of other ranks, e.g. {missing[0]}")
            last_report = time.monotonic()
        time.sleep(poll_seconds)
