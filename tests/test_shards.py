"""Shard format, writer reproducibility, manifest validation and the built-in decoder."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from dtr_scale.data.shards import (
    LatentSample,
    decode_sample,
    iter_raw_samples,
    load_manifest,
    write_manifest,
    write_shard,
)
from dtr_scale.data.vae import BUILTIN_VAE_NAME, build_decoder


def _samples(n: int = 3, shape=(4, 2, 2)) -> list[LatentSample]:
    rng = np.random.default_rng(0)
    return [
        LatentSample(
            key=f"{i:05d}",
            label=i % 2,
            mean=rng.standard_normal((2, *shape)).astype(np.float16),
            std=rng.random((2, *shape)).astype(np.float16),
        )
        for i in range(n)
    ]


def _manifest(directory: Path, shards, **overrides) -> Path:
    fields = dict(
        latent_shape=(4, 2, 2), scaling_factor=0.18215, vae={"name": "x"}, image_size=16, labels=["a", "b"]
    )
    return write_manifest(directory, shards, **{**fields, **overrides})


def test_shards_are_byte_reproducible(tmp_path: Path) -> None:
    a = write_shard(tmp_path / "a.tar", _samples())
    b = write_shard(tmp_path / "b.tar", _samples())
    assert a["sha256"] == b["sha256"] and a["num_samples"] == 3
    assert (tmp_path / "a.tar").read_bytes() == (tmp_path / "b.tar").read_bytes()
    with tarfile.open(tmp_path / "a.tar") as tar:
        assert {m.mtime for m in tar.getmembers()} == {0}
        assert tar.getnames()[:3] == ["00000.cls", "00000.mean.npy", "00000.std.npy"]


def test_samples_round_trip_through_a_shard(tmp_path: Path) -> None:
    samples = _samples()
    write_shard(tmp_path / "s.tar", samples)
    decoded = [decode_sample(raw, (4, 2, 2)) for raw in iter_raw_samples(tmp_path / "s.tar")]
    assert [d.key for d in decoded] == [s.key for s in samples]
    assert [d.label for d in decoded] == [s.label for s in samples]
    assert all(
        np.array_equal(d.mean, s.mean) and np.array_equal(d.std, s.std) for d, s in zip(decoded, samples)
    )


def test_a_pickled_npy_member_is_rejected_not_unpickled(tmp_path: Path) -> None:
    buffer = io.BytesIO()
    np.save(buffer, np.array([{"evil": 1}], dtype=object), allow_pickle=True)
    raw = {"__key__": "k", "cls": b"1", "mean.npy": buffer.getvalue(), "std.npy": buffer.getvalue()}
    with pytest.raises(ValueError, match=r"k\.mean\.npy: not a valid \.npy"):
        decode_sample(raw, (4, 2, 2))


def test_a_member_of_the_wrong_shape_is_rejected() -> None:
    sample = _samples(1, shape=(4, 3, 3))[0]
    buffer = io.BytesIO()
    np.save(buffer, sample.mean)
    raw = {"__key__": "k", "cls": b"0", "mean.npy": buffer.getvalue(), "std.npy": buffer.getvalue()}
    with pytest.raises(ValueError, match=r"expected float16 of shape \(2, 4, 2, 2\)"):
        decode_sample(raw, (4, 2, 2))


def test_manifest_round_trips_and_counts_samples(tmp_path: Path) -> None:
    shard = write_shard(tmp_path / "shard-000000.tar", _samples())
    manifest = load_manifest(_manifest(tmp_path, [shard, shard]))
    assert manifest.num_samples == 6
    assert manifest.latent_shape == (4, 2, 2) and manifest.dtype == "float16"
    assert manifest.scaling_factor == pytest.approx(0.18215)
    assert manifest.labels == ["a", "b"] and manifest.root == tmp_path
    assert manifest.shard_path(0) == tmp_path / "shard-000000.tar"
    assert load_manifest(tmp_path).path == manifest.path  # the directory works too


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("shards", [], "'shards' is empty"),
        ("latent_shape", [4, 2], "'latent_shape' must be \\[C, H, W\\]"),
        ("scaling_factor", "big", "'scaling_factor' must be int or float"),
        ("dtype", "float32", "'dtype' must be 'float16'"),
        (
            "shards",
            [{"name": "a.tar", "num_samples": "3", "sha256": "00"}],
            r"shards\[0\]\.num_samples must be int",
        ),
    ],
)
def test_manifest_errors_name_the_file_and_field(tmp_path: Path, field: str, value, message: str) -> None:
    path = _manifest(tmp_path, [{"name": "a.tar", "num_samples": 1, "sha256": "00"}])
    document = json.loads(path.read_text())
    document[field] = value
    path.write_text(json.dumps(document))
    with pytest.raises(ValueError, match=f"{path}: .*{message}"):
        load_manifest(path)


def test_missing_manifest_field_is_named(tmp_path: Path) -> None:
    path = _manifest(tmp_path, [{"name": "a.tar", "num_samples": 1, "sha256": "00"}])
    document = json.loads(path.read_text())
    del document["vae"]
    path.write_text(json.dumps(document))
    with pytest.raises(ValueError, match=f"{path}: manifest field 'vae' is missing"):
        load_manifest(path)


def test_builtin_decoder_is_pixel_shuffle_with_one_channel(tmp_path: Path) -> None:
    path = _manifest(
        tmp_path, [{"name": "a.tar", "num_samples": 1, "sha256": "00"}], scaling_factor=1.0,
        vae={"name": BUILTIN_VAE_NAME, "downscale_factor": 2},
    )  # fmt: skip
    images = torch.rand(3, 1, 8, 8) * 2 - 1
    decode = build_decoder(load_manifest(path))
    assert torch.equal(decode(torch.nn.functional.pixel_unshuffle(images, 2)), images)


def test_decoder_with_a_missing_vae_directory_says_so(tmp_path: Path) -> None:
    path = _manifest(tmp_path, [{"name": "a.tar", "num_samples": 1, "sha256": "00"}])
    with pytest.raises(FileNotFoundError, match=f"VAE directory {tmp_path / 'nope'} does not exist"):
        build_decoder(load_manifest(path), vae_dir=tmp_path / "nope")
