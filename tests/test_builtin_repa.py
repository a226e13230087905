"""Precomputed REPA on the built-in digits (`prepare-builtin --repa-encoder`): the stored targets are the
encoder's tokens of each digit, and training on them equals REPA with the encoder on the fly."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from distributed import REPO
from test_repa import tiny_dinov2, train_tiny_repa
from test_train_distributed import final_weights

from dtr_scale.data.builtin import mnist_images, prepare_builtin
from dtr_scale.data.shards import decode_sample, iter_raw_samples, load_manifest
from dtr_scale.repa_encoder import RepaEncoder


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    root = tmp_path_factory.mktemp("digits-repa")
    encoder = tiny_dinov2(root / "encoder")  # patch 4, width 32
    plain = prepare_builtin(root / "plain", image_size=16)
    stored = prepare_builtin(root / "stored", image_size=16, repa_encoder=encoder)
    return {"encoder": encoder, "plain": plain, "stored": stored}


def test_the_stored_targets_are_the_encoders_tokens_of_each_digit_and_its_flip(digits):
    manifest = load_manifest(digits["stored"]["train"])
    repa = manifest.extra["repa"]
    # A DiT-*/2 on 4x8x8 latents has a 4x4 token grid: 4 patches of 4 px a side = 16 px, 16 tokens of width 32.
    assert (repa["resolution"], repa["tokens"], repa["dim"]) == (16, 16, 32)
    assert "repa" not in load_manifest(digits["stored"]["heldout"]).extra  # the held-out split trains nothing
    images, _ = mnist_images(16)
    encoder = RepaEncoder(digits["encoder"], resolution=16)
    checked = 0
    for raw in iter_raw_samples(manifest.shard_path(0)):
        sample = decode_sample(raw, tuple(manifest.latent_shape), repa_shape=(16, 32))
        digit = images[int(sample.key.removeprefix("mnist"))]  # the original uint8 digit, not the latents
        x = torch.from_numpy(digit.astype(np.float32) / 127.5 - 1)[None, None]
        with torch.no_grad():
            expected = torch.cat([encoder(x), encoder(x.flip(-1))]).numpy()
        np.testing.assert_allclose(sample.repa.astype(np.float32), expected, rtol=2e-3, atol=2e-3)
        checked += 1
        if checked == 20:
            break
    assert checked == 20
    # The same latents, in the same order, as without features: only the targets were added.
    plain = load_manifest(digits["plain"]["train"])
    for i in range(len(plain.shards)):
        pairs = zip(
            iter_raw_samples(plain.shard_path(i)), iter_raw_samples(manifest.shard_path(i)), strict=True
        )
        for a, b in pairs:
            a = decode_sample(a, tuple(plain.latent_shape))
            b = decode_sample(b, tuple(manifest.latent_shape), repa_shape=(16, 32))
            assert a.key == b.key and np.array_equal(a.mean, b.mean) and a.repa is None


def test_prepare_builtin_with_an_encoder_is_idempotent_and_rewritten_without_it(digits, tmp_path):
    import shutil

    root = tmp_path / "d"
    shutil.copytree(digits["stored"]["train"].parent.parent, root)
    manifest = root / "train" / "manifest.json"
    stamps = {p.name: p.stat().st_mtime_ns for p in (root / "train").iterdir()}
    prepare_builtin(root, image_size=16, repa_encoder=digits["encoder"])  # the same settings: left alone
    assert {p.name: p.stat().st_mtime_ns for p in (root / "train").iterdir()} == stamps
    prepare_builtin(root, image_size=16)  # no encoder now: the split is rewritten without targets
    assert "repa" not in load_manifest(manifest).extra


def _train(run_dir, manifest, encoder) -> list[dict]:
    return train_tiny_repa(run_dir, "demo-cpu.yaml", manifest, encoder, 4, "train.global_batch_size=8",
                           "train.checkpoint_every=4")  # fmt: skip


def test_training_on_stored_targets_equals_the_encoder_on_the_fly(digits, tmp_path):
    fly = _train(tmp_path / "fly", digits["plain"]["train"], digits["encoder"])
    stored = _train(tmp_path / "stored", digits["stored"]["train"], digits["encoder"])
    # The same samples, noise and steps; the targets differ only by their float16 storage.
    assert [m["loss/repa"] for m in stored] == pytest.approx(
        [m["loss/repa"] for m in fly], rel=1e-3, abs=1e-4
    )
    a, b = final_weights(tmp_path / "fly", "step00000004"), final_weights(tmp_path / "stored", "step00000004")
    a, b = (torch.cat([w[k].detach().double().flatten() for k in sorted(a)]) for w in (a, b))
    assert float((a - b).norm() / a.norm()) < 1e-4


@pytest.mark.parametrize("resolution", [10, 0, -4, 2])
def test_an_encoder_input_that_cuts_patches_is_refused_by_flag_and_by_key(digits, tmp_path, resolution):
    # 10 px at patch 4 would keep a 2 x 2 grid and drop 2 px; 0 and -4 crashed inside the encoder.
    with pytest.raises(ValueError, match=rf"--repa-resolution {resolution}: expected a positive multiple of the "
                                         r"patch size 4"):  # fmt: skip
        prepare_builtin(
            tmp_path / "d", image_size=16, repa_encoder=digits["encoder"], repa_resolution=resolution
        )
    from dtr_scale.config import ConfigError

    with pytest.raises(ConfigError, match=rf"repa.resolution={resolution}: expected a positive multiple"):
        RepaEncoder(digits["encoder"], resolution=resolution)
    assert not (tmp_path / "d" / "train").exists()  # nothing written


def test_an_encoder_resolution_without_an_encoder_is_refused(tmp_path):
    with pytest.raises(ValueError, match=r"--repa-resolution 16 needs --repa-encoder"):
        prepare_builtin(tmp_path / "d", image_size=16, repa_resolution=16)


def test_dry_run_refuses_targets_of_another_encoder_as_the_launch_does(digits, tmp_path, capsys):
    from dtr_scale.cli import main

    other = tiny_dinov2(tmp_path / "other")  # same config and seed: same weights...
    with torch.no_grad():
        from transformers import AutoModel

        model = AutoModel.from_pretrained(other)
        next(model.parameters()).add_(1.0)  # ...until changed
        model.save_pretrained(other)
    argv = ["train", "--config", str(REPO / "configs/demo-cpu.yaml"), "--dry-run",
            f"data.shards={digits['stored']['train']}", "repa.depth=1"]  # fmt: skip
    assert main([*argv, f"repa.encoder={digits['encoder']}"]) == 0
    capsys.readouterr()
    assert main([*argv, f"repa.encoder={other}"]) == 2
    assert "its precomputed REPA features were made by encoder" in capsys.readouterr().err
