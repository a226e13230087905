"""Latent shard format: the WebDataset tar layout, its writer, the manifest, and the decoder.

One sample in a shard is three tar members sharing a key:

    {key}.cls        class index, ASCII decimal
    {key}.mean.npy   float16 (2, C, H, W): VAE posterior mean, [0] as stored, [1] horizontally flipped
    {key}.std.npy    float16 (2, C, H, W): posterior standard deviation, same order
    {key}.repa.npy   optional float16 (2, M, D): REPA encoder tokens of the image and its flip (manifest: `repa`)

Latents are stored *unscaled*; the reader multiplies by the manifest's `scaling_factor`. Arrays are
decoded with `np.load(allow_pickle=False)` and only these known members are ever decoded, so a shard
can never make the reader unpickle anything.

Tars are written with mtime 0, uid/gid 0 and empty owner names: the same samples give the same bytes,
which is what lets `preprocess` skip finished shards by comparing sha256 with the manifest.

`manifest.json` (one per split, beside its shards) describes the split; `load_manifest` validates it and
names the file and field on any error.
"""

from __future__ import annotations

import io
import json
import os
import tarfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

import dtr_scale
from dtr_scale.fileio import atomic_path, atomic_write_text, sha256_file

MANIFEST_NAME = "manifest.json"
FORMAT_NAME = "dtr-scale-latents"
# Tar members of one sample, by WebDataset extension (everything after the key's first dot).
MEMBER_CLASS = "cls"
MEMBER_MEAN = "mean.npy"
MEMBER_STD = "std.npy"
MEMBER_REPA = "repa.npy"
SAMPLE_MEMBERS = (MEMBER_CLASS, MEMBER_MEAN, MEMBER_STD)
# The VAE identity of the built-in dataset (data/builtin.py): latents are pixel_unshuffle(2) of images.


@dataclass
class LatentSample:
    """One image's latents: `mean` and `std` are float16 arrays of shape (2, C, H, W) (as stored, flipped)."""

    key: str
    label: int
    mean: np.ndarray
    std: np.ndarray
    repa: np.ndarray | None = None  # float16 (2, M, D): REPA encoder tokens, as stored and flipped


@dataclass
class Manifest:
    """A validated `manifest.json`. `shards` entries are dicts {name, num_samples, sha256}."""

    path: Path
    root: Path
    shards: list[dict[str, Any]]
    latent_shape: tuple[int, ...]
    dtype: str
    scaling_factor: float
    vae: dict[str, Any]
    image_size: int
    labels: list[str]
    version: str
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def num_samples(self) -> int:
        """Samples over all shards."""
        return sum(int(s["num_samples"]) for s in self.shards)

    @property
    def num_classes(self) -> int:
        """Number of labels (classes) the manifest names."""
        return len(self.labels)

    def shard_path(self, index: int) -> Path:
        """Absolute path of shard `index` (names are relative to the manifest's directory)."""
        return self.root / self.shards[index]["name"]


# ----------------------------------------------------------------------------------------------- writing


def _npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, np.ascontiguousarray(array), allow_pickle=False)
    return buffer.getvalue()


def encode_sample(sample: LatentSample) -> dict[str, bytes]:
    """Member extension -> bytes for one sample (float16, C-contiguous)."""
    if sample.mean.shape != sample.std.shape or sample.mean.ndim != 4 or sample.mean.shape[0] != 2:
        raise ValueError(
            f"sample {sample.key!r}: mean and std must both have shape (2, C, H, W) (as stored, flipped); "
            f"got {sample.mean.shape} and {sample.std.shape}"
        )
    members = {
        MEMBER_CLASS: str(int(sample.label)).encode("ascii"),
        MEMBER_MEAN: _npy_bytes(sample.mean.astype(np.float16)),
        MEMBER_STD: _npy_bytes(sample.std.astype(np.float16)),
    }
    if sample.repa is not None:  # (2, M, D), checked by decode_sample against the manifest's repa field
        members[MEMBER_REPA] = _npy_bytes(sample.repa.astype(np.float16))
    return members


def _add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 0  # byte-reproducible shards (NOTES.md, WebDataset)
    info.mode = 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    tar.addfile(info, io.BytesIO(data))


def write_shard(path: str | os.PathLike, samples: Iterable[LatentSample]) -> dict[str, Any]:
    """Write `samples` to the tar at `path` atomically; returns its manifest entry {name, num_samples, sha256}.

    The tar is written to a temporary name and renamed, so a crash never leaves a half-written shard
    under its final name (and concurrent ranks never write the same file: each owns its shard names).
    """
    path = Path(path)
    count = 0
    with atomic_path(path) as tmp, tarfile.open(tmp, "w", format=tarfile.USTAR_FORMAT) as tar:
        for sample in samples:
            for ext, data in encode_sample(sample).items():
                _add_member(tar, f"{sample.key}.{ext}", data)
            count += 1
    return {"name": path.name, "num_samples": count, "sha256": sha256_file(path)}


def shard_name(index: int) -> str:
    """File name of shard `index`: shard-000000.tar, ..."""
    return f"shard-{index:06d}.tar"


def write_manifest(
    directory: str | os.PathLike,
    shards: list[dict[str, Any]],
    *,
    latent_shape: tuple[int, ...],
    scaling_factor: float,
    vae: dict[str, Any],
    image_size: int,
    labels: list[str],
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write `directory/manifest.json` (atomically) and return its path."""
    document = {
        "format": FORMAT_NAME,
        "version": dtr_scale.__version__,
        "shards": [
            {"name": s["name"], "num_samples": int(s["num_samples"]), "sha256": s["sha256"]} for s in shards
        ],
        "num_samples": sum(int(s["num_samples"]) for s in shards),
        "latent_shape": [int(d) for d in latent_shape],
        "dtype": "float16",
        "scaling_factor": float(scaling_factor),
        "vae": vae,
        "image_size": int(image_size),
        "labels": list(labels),
        **(extra or {}),
    }
    path = Path(directory) / MANIFEST_NAME
    atomic_write_text(path, json.dumps(document, indent=2, sort_keys=True) + "\n")
    return path


# ----------------------------------------------------------------------------------------------- reading


def _require(document: dict[str, Any], key: str, kind: type | tuple[type, ...], path: Path) -> Any:
    if key not in document:
        raise ValueError(f"{path}: manifest field {key!r} is missing")
    value = document[key]
    if not isinstance(value, kind) or isinstance(value, bool):
        expected = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
        raise ValueError(f"{path}: manifest field {key!r} must be {expected}, got {value!r}")
    return value


def load_manifest(path: str | os.PathLike) -> Manifest:
    """Read and validate a manifest; `path` is the manifest.json file or the directory holding it."""
    path = Path(path)
    if path.is_dir():
        path = path / MANIFEST_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such manifest (expected a manifest.json written by dtr-scale)")
    try:
        document = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON ({err})") from err
    if not isinstance(document, dict):
        raise ValueError(f"{path}: expected a JSON object at the top level")
    shards = _require(document, "shards", list, path)
    if not shards:
        raise ValueError(f"{path}: manifest field 'shards' is empty; there is nothing to train on")
    for i, entry in enumerate(shards):
        if not isinstance(entry, dict):
            raise ValueError(f"{path}: shards[{i}] must be an object {{name, num_samples, sha256}}")
        for key, kind in (("name", str), ("num_samples", int), ("sha256", str)):
            if not isinstance(entry.get(key), kind) or isinstance(entry.get(key), bool):
                raise ValueError(f"{path}: shards[{i}].{key} must be {kind.__name__}, got {entry.get(key)!r}")
        if entry["num_samples"] < 0:
            raise ValueError(f"{path}: shards[{i}].num_samples must be >= 0, got {entry['num_samples']}")
    latent_shape = _require(document, "latent_shape", list, path)
    if len(latent_shape) != 3 or not all(isinstance(d, int) and d > 0 for d in latent_shape):
        raise ValueError(
            f"{path}: manifest field 'latent_shape' must be [C, H, W] of positive ints, got {latent_shape}"
        )
    dtype = _require(document, "dtype", str, path)
    if dtype != "float16":
        raise ValueError(f"{path}: manifest field 'dtype' must be 'float16', got {dtype!r}")
    scaling_factor = float(_require(document, "scaling_factor", (int, float), path))
    if not scaling_factor > 0:
        raise ValueError(f"{path}: manifest field 'scaling_factor' must be > 0, got {scaling_factor}")
    known = {"format", "version", "shards", "num_samples", "latent_shape", "dtype", "scaling_factor", "vae"}
    known |= {"image_size", "labels"}
    return Manifest(
        path=path,
        root=path.parent,
        shards=shards,
        latent_shape=tuple(latent_shape),
        dtype=dtype,
        scaling_factor=scaling_factor,
        vae=_require(document, "vae", dict, path),
        image_size=_require(document, "image_size", int, path),
        labels=[str(label) for label in _require(document, "labels", list, path)],
        version=_require(document, "version", str, path),
        extra={k: v for k, v in document.items() if k not in known},
    )


class ShardReadError(RuntimeError):
    """A shard could not be read to its end (missing, truncated, not a tar)."""


def iter_raw_samples(path: str | os.PathLike) -> Iterator[dict[str, Any]]:
    """Yield {"__key__", ext: bytes, ...} for each sample of a tar, in stored order, without decoding.

    Reading goes through WebDataset's tar iterator. Any failure to read the tar (missing file,
    truncation, garbage) is raised as ShardReadError naming the shard, after the samples that were
    complete before the failure have been yielded.
    """
    from webdataset.tariterators import base_plus_ext, tar_file_iterator

    path = Path(path)
    current: dict[str, Any] | None = None
    try:
        with open(path, "rb") as stream:
            for member in tar_file_iterator(stream):
                key, ext = base_plus_ext(member["fname"])
                if key is None:
                    continue
                if current is not None and current["__key__"] != key:
                    yield current
                    current = None
                if current is None:
                    current = {"__key__": key}
                current[ext.lower()] = member["data"]
    except (OSError, tarfile.TarError, EOFError) as err:
        # The sample being assembled when the tar broke may be missing members: drop it.
        raise ShardReadError(f"{path}: cannot read shard ({type(err).__name__}: {err})") from err
    if current is not None:
        yield current


# .npy header bytes -> (dtype, shape): every member of a dataset has the same header, and parsing it
# (np.load evaluates the header's dict literal) costs more than reading the array itself.
_NPY_HEADERS: dict[bytes, tuple[np.dtype, tuple[int, ...]]] = {}


def _load_npy(data: bytes, what: str) -> np.ndarray:
    if data[:6] == b"\x93NUMPY" and len(data) >= 12:
        size_bytes = 2 if data[6] == 1 else 4
        end = 8 + size_bytes + int.from_bytes(data[8 : 8 + size_bytes], "little")
        known = _NPY_HEADERS.get(data[:end])
        if known is not None:
            dtype, shape = known
            if len(data) - end == dtype.itemsize * int(np.prod(shape)):
                return np.frombuffer(data, dtype=dtype, offset=end).reshape(shape)
    try:
        array = np.load(io.BytesIO(data), allow_pickle=False)
    except Exception as err:  # np.load raises ValueError/OSError/EOFError on corrupt headers
        raise ValueError(f"{what}: not a valid .npy ({type(err).__name__}: {err})") from err
    if array.flags.c_contiguous and len(_NPY_HEADERS) < 64:
        _NPY_HEADERS[data[: len(data) - array.nbytes]] = (array.dtype, array.shape)
    return array


class SampleError(ValueError):
    """A sample that cannot be used; `kind` is its skip kind (data/skipped.py), `key` the sample's key."""

    def __init__(self, message: str, kind: str, key: str) -> None:
        super().__init__(message)
        self.kind, self.key = kind, key


def decode_sample(
    raw: dict[str, Any],
    latent_shape: tuple[int, ...],
    where: str = "",
    repa_shape: tuple[int, ...] | None = None,
) -> LatentSample:
    """Decode the known members of a raw sample; SampleError (a ValueError) naming the key and member on any
    defect, with kind "undecodable" (missing or corrupt member, NaN or inf values) or "wrong_shape".
    repa_shape (M, D): also decode the REPA features, which must then be there with shape (2, M, D)."""
    key = raw.get("__key__", "?")
    what = f"{where}:{key}" if where else str(key)
    members = SAMPLE_MEMBERS + ((MEMBER_REPA,) if repa_shape is not None else ())
    missing = [m for m in members if m not in raw]
    if missing:
        raise SampleError(f"{what}: sample lacks member(s) {missing}", "undecodable", key)
    try:
        label = int(raw[MEMBER_CLASS].decode("ascii"))
    except (UnicodeDecodeError, ValueError) as err:
        raise SampleError(f"{what}.{MEMBER_CLASS}: not an ASCII integer", "undecodable", key) from err
    shapes = {MEMBER_MEAN: (2, *latent_shape), MEMBER_STD: (2, *latent_shape)}
    if repa_shape is not None:
        shapes[MEMBER_REPA] = (2, *repa_shape)
    arrays = {}
    for member, shape in shapes.items():
        try:
            array = _load_npy(raw[member], f"{what}.{member}")
        except ValueError as err:
            raise SampleError(str(err), "undecodable", key) from err
        if array.shape != shape or array.dtype != np.float16:
            raise SampleError(
                f"{what}.{member}: expected float16 of shape {shape}, got {array.dtype} {array.shape}",
                "wrong_shape",
                key,
            )
        if not np.isfinite(array).all():  # NaN/inf latents would poison the loss; never train on them
            raise SampleError(f"{what}.{member}: holds non-finite values (NaN or inf)", "undecodable", key)
        arrays[member] = array
    return LatentSample(
        key=key, label=label, mean=arrays[MEMBER_MEAN], std=arrays[MEMBER_STD], repa=arrays.get(MEMBER_REPA)
    )
