"""`dtr-scale preprocess`: ImageFolder -> tiny random AutoencoderKL -> shards + manifest."""

from __future__ import annotations

import json
import os
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from dtr_scale.cli import main as cli_main
from dtr_scale.data.image_folder import UnreadableImageWarning, center_crop
from dtr_scale.data.preprocess import preprocess
from dtr_scale.data.preprocess_state import shard_range, write_order
from dtr_scale.data.shards import (
    decode_sample,
    iter_raw_samples,
    load_manifest,
    shard_name,
)
from dtr_scale.data.vae import build_decoder, load_vae

os.environ["HF_HUB_OFFLINE"] = "1"
IMAGE_SIZE = 64  # tiny VAE: 4 blocks -> downsampling 8 -> 4x8x8 latents
SIZES = {"cat": [(80, 100), (130, 64), (300, 200)], "dog": [(64, 64), (90, 70), (200, 400)]}


@pytest.fixture(scope="module")
def vae_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from dtr_scale.compat import ensure_torchvision_importable

    ensure_torchvision_importable()
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1, norm_num_groups=8,
        block_out_channels=(8, 8, 16, 16), down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4, sample_size=IMAGE_SIZE, scaling_factor=0.18215,
    )  # fmt: skip
    out = tmp_path_factory.mktemp("vae")
    vae.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from PIL import Image

    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for name, sizes in SIZES.items():
        (root / name).mkdir()
        for k, (w, h) in enumerate(sizes):
            ramp = np.linspace(0, 255, w, dtype=np.float32)[None, :, None] * np.ones((h, 1, 3), np.float32)
            pixels = (0.6 * ramp + 0.4 * rng.uniform(0, 255, (h, w, 3))).astype(np.uint8)
            Image.fromarray(pixels).save(root / name / f"{name}{k}.{'png' if k % 2 else 'JPEG'}")
    (root / "dog" / "dog9_broken.jpg").write_bytes(b"\xff\xd8 this is not a jpeg")
    (root / "dog" / "notes.txt").write_text("ignored: not an image extension")
    return root


@pytest.fixture(scope="module")
def encoded(image_dir: Path, vae_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("latents")
    with pytest.warns(UnreadableImageWarning, match="dog/dog9_broken.jpg"):
        preprocess(image_dir, vae_dir, out, image_size=IMAGE_SIZE, shard_size=2, batch_size=3, quiet=True,
                   max_skipped_fraction=0.2)  # fmt: skip
    return out


def _read(out: Path) -> list:
    manifest = load_manifest(out)
    return [decode_sample(raw, manifest.latent_shape) for i in range(len(manifest.shards))
            for raw in iter_raw_samples(manifest.shard_path(i))]  # fmt: skip


def test_manifest_describes_the_shards(encoded: Path, vae_dir: Path) -> None:
    manifest = load_manifest(encoded)
    assert manifest.num_samples == 6 and len(manifest.shards) == 4  # 7 images, shard size 2, one unreadable
    broken_shard = shard_name(write_order(7, 0).index(6) // 2)  # dog9_broken.jpg is image 6 of the listing
    assert [s["num_samples"] for s in manifest.shards] == [
        1 if s["name"] == broken_shard else (1 if s["name"] == shard_name(3) else 2) for s in manifest.shards
    ]
    assert manifest.extra["shuffle_seed"] == 0 and manifest.extra["hflip"] is True
    assert manifest.latent_shape == (4, 8, 8) and manifest.image_size == IMAGE_SIZE
    assert manifest.labels == ["cat", "dog"] and manifest.scaling_factor == pytest.approx(0.18215)
    assert manifest.vae["class"] == "AutoencoderKL" and manifest.vae["path"] == str(vae_dir.resolve())
    assert len(manifest.vae["config_sha256"]) == 64
    assert manifest.extra["num_unreadable"] == 1
    assert manifest.extra["unreadable_by_shard"] == {broken_shard: ["dog/dog9_broken.jpg"]}


def test_shards_hold_the_posterior_of_both_orientations(
    encoded: Path, image_dir: Path, vae_dir: Path
) -> None:
    from PIL import Image

    samples = _read(encoded)
    # Written in the seeded order; keys are the image numbers of the sorted listing (6: the broken one).
    assert [s.key for s in samples] == [f"{n:09d}" for n in write_order(7, 0) if n != 6]
    assert {s.key: s.label for s in samples} == {f"{n:09d}": int(n >= 3) for n in range(6)}
    vae = load_vae(vae_dir).eval()
    with Image.open(image_dir / "cat" / "cat2.JPEG") as image:
        pixels = center_crop(image.convert("RGB"), IMAGE_SIZE)
    x = torch.from_numpy(pixels.copy()).permute(2, 0, 1)[None].float() / 127.5 - 1
    with torch.no_grad():
        plain, flipped = vae.encode(x).latent_dist, vae.encode(x.flip(-1)).latent_dist
    sample = next(s for s in samples if s.key == f"{2:09d}")  # cat2.JPEG
    for k, posterior in enumerate((plain, flipped)):
        np.testing.assert_allclose(sample.mean[k], posterior.mean[0].numpy(), rtol=2e-3, atol=2e-3)
        np.testing.assert_allclose(sample.std[k], posterior.std[0].numpy(), rtol=2e-3, atol=2e-3)
    assert not np.allclose(sample.mean[0], sample.mean[1], atol=1e-2)


def test_center_crop_is_adm_box_then_bicubic_then_center() -> None:
    from PIL import Image

    pixels = np.zeros((200, 300, 3), np.uint8)
    pixels[:, 150:] = 255  # left half black, right half white
    crop = center_crop(Image.fromarray(pixels), 64)
    assert crop.shape == (64, 64, 3)
    assert crop[:, :20].max() == 0 and crop[:, -20:].min() == 255  # centred: the edge falls mid-crop
    # Worked by hand. 8x8 of four constant 4x4 blocks, size 2: short side 8 >= 4 -> BOX to 4x4, 4 >= 4 -> BOX
    # to 2x2, each pixel the exact mean of one block; then scale 1 (no resampling). A BILINEAR or BICUBIC
    # halving would blend neighbouring blocks.
    blocks = np.kron(np.array([[10, 50], [90, 200]], np.uint8), np.ones((4, 4), np.uint8))
    crop = center_crop(Image.fromarray(np.repeat(blocks[..., None], 3, axis=2)), 2)
    assert crop.shape == (2, 2, 3) and crop[..., 0].tolist() == [[10, 50], [90, 200]]
    # 6 wide x 2 high, size 2: short side 2 < 4, scale 1, then columns (6 - 2) // 2 = 2 and 3.
    wide = np.arange(12, dtype=np.uint8).reshape(2, 6) * 20
    crop = center_crop(Image.fromarray(np.repeat(wide[..., None], 3, axis=2)), 2)
    assert crop[..., 0].tolist() == [[40, 60], [160, 180]]


def test_rerun_skips_finished_shards(encoded: Path, image_dir: Path, vae_dir: Path, capsys) -> None:
    stamps = {p.name: p.stat().st_mtime_ns for p in encoded.glob("shard-*.tar")}
    preprocess(image_dir, vae_dir, encoded, image_size=IMAGE_SIZE, shard_size=2, batch_size=3,
               max_skipped_fraction=0.2)  # fmt: skip
    assert "4 of 4 shards of rank 0 already done" in capsys.readouterr().out
    assert stamps == {p.name: p.stat().st_mtime_ns for p in encoded.glob("shard-*.tar")}


def test_rerun_rewrites_only_a_damaged_shard(
    encoded: Path, image_dir: Path, vae_dir: Path, tmp_path: Path
) -> None:
    out = tmp_path / "copy"
    shutil.copytree(encoded, out)
    damaged, intact = out / "shard-000001.tar", out / "shard-000000.tar"
    good, stamp = damaged.read_bytes(), intact.stat().st_mtime_ns
    damaged.write_bytes(good[: len(good) // 2])
    preprocess(image_dir, vae_dir, out, image_size=IMAGE_SIZE, shard_size=2, batch_size=3, quiet=True,
               max_skipped_fraction=0.2)  # fmt: skip
    assert damaged.read_bytes() == good and intact.stat().st_mtime_ns == stamp


def test_write_order_gives_every_shard_of_a_class_sorted_folder_many_classes() -> None:
    # 10 classes x 40 images listed class after class, shards of 40: written in listing order each shard
    # would hold exactly one class; in the seeded order each holds close to all ten.
    labels = np.repeat(np.arange(10), 40)
    order = write_order(400, shuffle_seed=0)
    assert sorted(order) == list(range(400))
    classes_per_shard = [len(set(labels[order[j : j + 40]])) for j in range(0, 400, 40)]
    assert min(classes_per_shard) >= 7, classes_per_shard
    assert write_order(400, 0) == order and write_order(400, 1) != order


def test_shard_ranges_of_ranks_are_disjoint_and_complete() -> None:
    for num_shards, world in ((10, 3), (2, 4), (7, 7)):
        ranges = [set(shard_range(num_shards, r, world)) for r in range(world)]
        assert sum(len(r) for r in ranges) == num_shards and set().union(*ranges) == set(range(num_shards))


@pytest.mark.slow
@pytest.mark.multiprocess
def test_two_worker_processes_write_disjoint_shards_identical_to_one(
    encoded: Path, image_dir: Path, vae_dir: Path, tmp_path: Path
) -> None:
    out = tmp_path / "two"
    code = cli_main(["preprocess", "--input", str(image_dir), "--vae", str(vae_dir), "--out", str(out),
                     "--image-size", str(IMAGE_SIZE), "--shard-size", "2", "--workers", "2", "--quiet",
                     "--max-skipped-fraction", "0.2"])  # fmt: skip
    assert code == 0
    writers = {
        json.loads(p.read_text())["name"]: json.loads(p.read_text())["rank"]
        for p in (out / ".progress").iterdir()
    }
    assert writers == {
        "shard-000000.tar": 0,
        "shard-000001.tar": 0,
        "shard-000002.tar": 1,
        "shard-000003.tar": 1,
    }
    assert load_manifest(out).shards == load_manifest(encoded).shards  # same bytes, whoever wrote them


def test_decoder_of_a_vae_manifest_undoes_the_scaling_and_decodes_with_the_vae(
    encoded: Path, vae_dir: Path
) -> None:
    from diffusers import AutoencoderKL

    manifest = load_manifest(encoded)
    posterior_mean = torch.from_numpy(_read(encoded)[0].mean[:1].astype(np.float32))
    images = build_decoder(manifest)(
        posterior_mean * manifest.scaling_factor
    )  # latents as the model sees them
    # The reference: diffusers' own decode of the unscaled latent, clipped to the image range [-1, 1].
    vae = AutoencoderKL.from_pretrained(vae_dir, local_files_only=True).eval()
    with torch.no_grad():
        expected = vae.decode(posterior_mean).sample.clamp(-1, 1)
        still_scaled = vae.decode(posterior_mean * manifest.scaling_factor).sample.clamp(-1, 1)
    assert images.shape == (1, 3, IMAGE_SIZE, IMAGE_SIZE)
    torch.testing.assert_close(images, expected, rtol=1e-5, atol=1e-5)
    assert (still_scaled - expected).abs().max() > 1e-3  # forgetting 1 / scaling_factor would show


def test_missing_vae_directory_is_a_clear_cli_error(image_dir: Path, tmp_path: Path, capsys) -> None:
    code = cli_main(
        ["preprocess", "--input", str(image_dir), "--vae", str(tmp_path / "no-vae"), "--out", str(tmp_path)]
    )
    assert code == 2
    assert f"VAE directory {tmp_path / 'no-vae'} does not exist" in capsys.readouterr().err


def test_a_directory_that_is_not_a_vae_is_refused(image_dir: Path, tmp_path: Path) -> None:
    (tmp_path / "unet").mkdir()
    (tmp_path / "unet" / "config.json").write_text(json.dumps({"_class_name": "UNet2DModel"}))
    with pytest.raises(ValueError, match="_class_name is 'UNet2DModel', expected 'AutoencoderKL'"):
        preprocess(image_dir, tmp_path / "unet", tmp_path / "out")


def test_rerun_re_encodes_the_shard_of_an_edited_image_and_says_so(
    encoded: Path, image_dir: Path, vae_dir: Path, tmp_path: Path, capsys
) -> None:
    from PIL import Image

    images, out = tmp_path / "images", tmp_path / "out"
    shutil.copytree(image_dir, images)
    shutil.copytree(encoded, out)
    edited = images / "cat" / "cat1.png"  # image number 1 of the sorted listing
    size = edited.stat().st_size
    with Image.open(edited) as image:
        pixels = 255 - np.asarray(image)  # same name, same dimensions, other content
    Image.fromarray(pixels).save(edited)
    os.utime(edited, ns=(edited.stat().st_atime_ns, edited.stat().st_mtime_ns + 10**9))
    shard = shard_name(write_order(7, 0).index(1) // 2)
    before = {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in out.glob("shard-*.tar")}
    preprocess(images, vae_dir, out, image_size=IMAGE_SIZE, shard_size=2, batch_size=3,
               max_skipped_fraction=0.2)  # fmt: skip
    text = capsys.readouterr().out
    assert "1 shard(s) of rank 0 were written from input images that have changed" in text, (text, size)
    assert shard in text
    after = {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in out.glob("shard-*.tar")}
    assert after[shard][0] != before[shard][0]  # re-encoded from the new pixels
    assert all(after[name] == before[name] for name in before if name != shard)  # the others untouched


def test_new_vae_weights_under_the_same_config_make_every_shard_stale(
    encoded: Path, image_dir: Path, vae_dir: Path, tmp_path: Path, capsys
) -> None:
    new_vae, out = tmp_path / "vae", tmp_path / "out"
    shutil.copytree(vae_dir, new_vae)
    shutil.copytree(encoded, out)
    vae = load_vae(new_vae)
    with torch.no_grad():
        for p in vae.parameters():
            p.mul_(1.01)
    config_before = (new_vae / "config.json").read_text()
    vae.save_pretrained(new_vae)
    (new_vae / "config.json").write_text(config_before)  # new weights, config.json byte for byte unchanged
    before = {p.name: p.read_bytes() for p in out.glob("shard-*.tar")}
    preprocess(image_dir, new_vae, out, image_size=IMAGE_SIZE, shard_size=2, batch_size=3,
               max_skipped_fraction=0.2)  # fmt: skip
    assert "vae_weights_sha256 changed" in capsys.readouterr().out
    after = {p.name: p.read_bytes() for p in out.glob("shard-*.tar")}
    changed = [name for name in before if after[name] != before[name]]
    assert len(changed) >= 3  # every shard holding a sample is re-encoded with the new weights
    assert load_manifest(out).vae["weights_sha256"] != load_manifest(encoded).vae["weights_sha256"]


@pytest.mark.slow
@pytest.mark.multiprocess
def test_ranks_sync_through_shard_files_so_an_idle_rank_never_waits_on_a_busy_one(
    encoded: Path, image_dir: Path, vae_dir: Path, tmp_path: Path
) -> None:
    # Rank 0 starts alone and must wait (no process group, no collective timeout) until rank 1, started
    # later, has written its shards; rank 1 exits as soon as its own shards are done.
    import subprocess
    import sys
    import time

    from distributed import REPO, rank_env

    out = tmp_path / "ranks"
    args = [sys.executable, "-m", "dtr_scale", "preprocess", "--input", str(image_dir), "--vae", str(vae_dir),
            "--out", str(out), "--image-size", str(IMAGE_SIZE), "--shard-size", "2", "--quiet",
            "--max-skipped-fraction", "0.2"]  # fmt: skip
    rank0 = subprocess.Popen(
        args, env=rank_env(0, 2, 0), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    time.sleep(8)
    assert rank0.poll() is None  # still waiting for rank 1's shards
    rank1 = subprocess.run(args, env=rank_env(1, 2, 0), cwd=REPO, capture_output=True, text=True, timeout=300)
    assert rank1.returncode == 0, rank1.stderr
    assert rank0.wait(timeout=120) == 0, rank0.stdout.read()
    assert load_manifest(out).shards == load_manifest(encoded).shards


def test_hash_inputs_catches_an_edit_that_kept_size_and_timestamp(
    encoded: Path, image_dir: Path, vae_dir: Path, tmp_path: Path, capsys
) -> None:
    images, out = tmp_path / "images", tmp_path / "out"
    shutil.copytree(image_dir, images)
    kwargs = dict(
        image_size=IMAGE_SIZE, shard_size=2, batch_size=3, hash_inputs=True, max_skipped_fraction=0.2
    )
    preprocess(images, vae_dir, out, **kwargs)
    edited = images / "cat" / "cat0.JPEG"
    stat = edited.stat()
    data = bytearray(edited.read_bytes())
    data[-10] ^= 0xFF  # same size; then the old timestamp back, as `cp -p` / `rsync -t` would leave it
    edited.write_bytes(bytes(data))
    os.utime(edited, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    capsys.readouterr()
    preprocess(images, vae_dir, out, **{**kwargs, "image_size": IMAGE_SIZE})
    text = capsys.readouterr().out
    assert "1 shard(s) of rank 0 were written from input images that have changed" in text
    assert "(judged by content)" in text
    preprocess(
        images, vae_dir, out, **{**kwargs, "hash_inputs": False}
    )  # by size + mtime: switching re-encodes
    assert "re-encoding" in capsys.readouterr().out


def test_unusable_images_are_one_line_per_shard_and_kind_then_a_table_and_a_bound(
    image_dir: Path, vae_dir: Path, tmp_path: Path, capsys
) -> None:
    # One shard of 10: 6 good images, 3 undecodable and 1 with no faithful 8-bit form (a float TIFF past 1).
    from PIL import Image

    images = tmp_path / "images"
    shutil.copytree(image_dir, images)
    for k in range(2):
        (images / "cat" / f"zz{k}_broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)
    Image.fromarray(np.array([[0.0, 3.0]], dtype=np.float32), "F").save(images / "dog" / "zz_hdr.tif")
    out, args = tmp_path / "out", dict(image_size=IMAGE_SIZE, shard_size=10, batch_size=4)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(
            ValueError, match=r"4 of 10 images could not be used \(40\.00% > --max-skipped-frac"
        ):
            preprocess(images, vae_dir, out, **args)
    lines = [str(w.message) for w in caught if issubclass(w.category, UnreadableImageWarning)]
    assert sorted(line.split(" first ")[0] for line in lines) == [
        "shard-000000.tar: 1 unsupported image skipped,",
        "shard-000000.tar: 3 undecodable images skipped,",
    ]
    table = capsys.readouterr().out
    assert (
        "| shard-000000.tar | undecodable | 3 |" in table
        and "| shard-000000.tar | unsupported | 1 |" in table
    )
    assert "| total | | 4 of 10 (40.00%) |" in table
    assert not (out / "manifest.json").exists() and (out / "shard-000000.tar").exists()
    # The CLI says it in one line with exit 2; a larger bound writes the manifest without encoding again.
    common = ["preprocess", "--input", str(images), "--vae", str(vae_dir), "--out", str(out),
              "--image-size", str(IMAGE_SIZE), "--shard-size", "10", "--quiet"]  # fmt: skip
    assert cli_main(common) == 2
    assert "worst shards: shard-000000.tar (3 undecodable, first " in capsys.readouterr().err
    stamp = (out / "shard-000000.tar").stat().st_mtime_ns
    assert cli_main([*common, "--max-skipped-fraction", "0.5"]) == 0
    assert load_manifest(out).extra["num_unreadable"] == 4
    assert (out / "shard-000000.tar").stat().st_mtime_ns == stamp
