"""Sampling from a model directory: determinism, process split, output format, resume."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from dtr_scale.diffusion.sampling import sample_generator
from dtr_scale.distributed import free_port
from dtr_scale.models.dit import DiT
from dtr_scale.models.model_dir import load_model_dir, make_config, save_model_dir
from dtr_scale.sample.sampler import rank_indices, sample_to_dir
from dtr_scale.sample.seeds import sample_label

REPO = Path(__file__).resolve().parents[1]
NUM_CLASSES = 10
# A large scaling factor keeps the random model's decoded pixels inside [-1, 1], so that the uint8
# images compared below are not saturated to 0/255 (which would hide differences).
DATA = {
    "latent_shape": [4, 8, 8],
    "scaling_factor": 300.0,
    "vae": {"name": "builtin-pixel-unshuffle", "downscale_factor": 2},
    "image_size": 16,
    "labels": [str(i) for i in range(NUM_CLASSES)],
    "manifest": None,
}
FAST = {"num_samples": 6, "batch_size": 4, "steps": 5, "sampler": "ddim", "seed": 3}


def quiet(_: str) -> None:
    pass


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    model = DiT(input_size=8, patch_size=2, in_channels=4, hidden_size=64, depth=2, num_heads=2,
                num_classes=NUM_CLASSES, routing={"alpha": 4.0, "beta": 0.8, "num_tasks": 1000})  # fmt: skip
    for p in model.parameters():  # a random model whose output depends on x, t and y
        torch.nn.init.normal_(p, std=0.05)
    ema = {k: v * 0.5 for k, v in model.state_dict().items()}
    path = tmp_path_factory.mktemp("model") / "tiny"
    return save_model_dir(path, model.state_dict(), ema, make_config(model, DATA))


def draw(model_dir: Path, out: Path, **overrides) -> dict[str, np.ndarray]:
    sample_to_dir(model_dir, out, **{**FAST, **overrides}, device="cpu", log=quiet)
    with np.load(out / "samples.npz") as data:
        return {key: data[key] for key in data.files}


def test_npz_holds_uint8_nhwc_rgb_images_and_int64_labels(model_dir, tmp_path):
    npz = draw(model_dir, tmp_path / "s")
    assert sorted(npz) == ["arr_0", "arr_1"]
    assert npz["arr_0"].dtype == np.uint8 and npz["arr_0"].shape == (6, 16, 16, 3)
    assert np.array_equal(npz["arr_0"][..., 0], npz["arr_0"][..., 2])  # 1-channel digits repeated to RGB
    assert npz["arr_1"].dtype == np.int64 and npz["arr_1"].shape == (6,)
    assert (
        (npz["arr_0"] > 0) & (npz["arr_0"] < 255)
    ).mean() > 0.5  # not saturated: comparisons mean something
    assert sorted(p.name for p in (tmp_path / "s").glob("*.png")) == [f"{i:06d}.png" for i in range(6)]


def test_json_records_model_settings_and_count(model_dir, tmp_path):
    draw(model_dir, tmp_path / "s", cfg_scale=2.0, guidance_channels="3", weights="model")
    meta = json.loads((tmp_path / "s" / "samples.json").read_text())
    expected = {"sampler": "ddim", "steps": 5, "cfg_scale": 2.0, "guidance_channels": 3, "weights": "model",
                "seed": 3, "count": 6, "classes": "uniform", "model_step": 0, "complete": True}  # fmt: skip
    assert {k: meta[k] for k in expected} == expected
    assert meta["model"] == str(model_dir.resolve())
    assert meta["vae"]["identity"]["name"] == "builtin-pixel-unshuffle"


def test_same_seed_gives_identical_npz_and_another_seed_differs(model_dir, tmp_path):
    first, second = draw(model_dir, tmp_path / "a"), draw(model_dir, tmp_path / "b")
    other = draw(model_dir, tmp_path / "c", seed=4)
    assert np.array_equal(first["arr_0"], second["arr_0"]) and np.array_equal(first["arr_1"], second["arr_1"])
    assert not np.array_equal(first["arr_0"], other["arr_0"])


def test_ddpm_sample_does_not_depend_on_batch_size(model_dir, tmp_path):
    # Each index draws x_T and every step's noise from its own generator, so batching changes nothing.
    batched = draw(model_dir, tmp_path / "a", sampler="ddpm", batch_size=6)
    single = draw(model_dir, tmp_path / "b", sampler="ddpm", batch_size=1)
    assert np.abs(batched["arr_0"].astype(int) - single["arr_0"].astype(int)).max() <= 1
    assert np.array_equal(batched["arr_1"], single["arr_1"])


def test_class_list_is_cycled_over_indices(model_dir, tmp_path):
    npz = draw(model_dir, tmp_path / "s", classes="7,2")
    assert npz["arr_1"].tolist() == [7, 2, 7, 2, 7, 2]


def test_uniform_labels_come_from_each_index_own_generator():
    n = 2000
    labels = [sample_label(5, i, None, NUM_CLASSES) for i in range(n)]
    # Each index owns its generator: neither the global RNG nor the order of the calls changes a label.
    torch.manual_seed(123)
    assert [sample_label(5, i, None, NUM_CLASSES) for i in reversed(range(n))][::-1] == labels
    # Uniform over the classes: chi-square with 9 degrees of freedom, below its 99.9% quantile 27.88.
    counts = np.bincount(labels, minlength=NUM_CLASSES)
    assert ((counts - n / NUM_CLASSES) ** 2 / (n / NUM_CLASSES)).sum() < 27.88
    # Streams of (seed, index) do not overlap: seed 6's index i is not seed 5's index i + 1 (as a
    # seed + index scheme would make it); independent labels agree about 10% of the time.
    shifted = [sample_label(6, i, None, NUM_CLASSES) for i in range(n - 1)]
    assert np.mean(np.array(shifted) == np.array(labels[1:])) < 0.2
    assert not torch.equal(
        torch.randn(8, generator=sample_generator(5, 0)), torch.randn(8, generator=sample_generator(5, 1))
    )


def test_rank_indices_partition_the_samples():
    world = 3
    parts = [rank_indices(10, rank, world) for rank in range(world)]
    assert sorted(i for part in parts for i in part) == list(range(10))
    assert parts[1] == [1, 4, 7]


def test_resume_draws_only_the_missing_images(model_dir, tmp_path):
    out = tmp_path / "s"
    before = draw(model_dir, out)
    for index in (1, 4):
        (out / f"{index:06d}.png").unlink()
    (out / "samples.npz").unlink()
    kept = {p.name: p.stat().st_mtime_ns for p in out.glob("*.png")}
    os.utime(out / "000000.png", ns=(1, 1))  # a redrawn image would get a fresh mtime
    kept["000000.png"] = 1
    after = draw(model_dir, out)
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("*.png") if p.name in kept} == kept
    assert (out / "000001.png").is_file() and (out / "000004.png").is_file()
    assert np.array_equal(before["arr_0"], after["arr_0"])


def test_resume_with_other_settings_is_refused(model_dir, tmp_path):
    draw(model_dir, tmp_path / "s")
    with pytest.raises(ValueError, match=r"other settings \(seed: 3 -> 9\)"):
        draw(model_dir, tmp_path / "s", seed=9)


def test_live_model_samples_like_its_model_dir(model_dir, tmp_path):
    from_dir = draw(model_dir, tmp_path / "a", weights="model")
    model, config = load_model_dir(model_dir, weights="model")
    model.train()
    sample_to_dir(model, tmp_path / "b", config=config, **FAST, weights="model", device="cpu", log=quiet)
    assert model.training  # the caller's mode is restored
    with np.load(tmp_path / "b" / "samples.npz") as live:
        assert np.array_equal(live["arr_0"], from_dir["arr_0"])


def test_ema_and_model_weights_give_different_images(model_dir, tmp_path):
    ema, raw = (
        draw(model_dir, tmp_path / "a", weights="ema"),
        draw(model_dir, tmp_path / "b", weights="model"),
    )
    assert not np.array_equal(ema["arr_0"], raw["arr_0"])


def test_guidance_without_null_class_is_refused(tmp_path):
    model = DiT(input_size=8, patch_size=2, in_channels=4, hidden_size=64, depth=1, num_heads=2,
                num_classes=NUM_CLASSES, class_dropout_prob=0.0)  # fmt: skip
    with pytest.raises(ValueError, match="null label"):
        sample_to_dir(model, tmp_path, config=make_config(model, DATA), **FAST, cfg_scale=2.0, log=quiet)


@pytest.mark.multiprocess
def test_two_processes_split_indices_and_match_one_process(model_dir, tmp_path):
    single = draw(model_dir, tmp_path / "one", sampler="ddpm", batch_size=2)
    port = free_port()
    command = [sys.executable, "-m", "dtr_scale", "sample", "--model", str(model_dir), "--out", str(tmp_path / "two"),
               "--num-samples", "6", "--batch-size", "2", "--steps", "5", "--sampler", "ddpm", "--seed", "3",
               "--device", "cpu"]  # fmt: skip
    procs = []
    for rank in range(2):
        env = {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2",
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1"}  # fmt: skip
        env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
        procs.append(
            subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        )
    outputs = [p.communicate(timeout=180) for p in procs]
    for p, (_, err) in zip(procs, outputs):
        assert p.returncode == 0, err
    # Each rank drew exactly its 3 indices (i % 2 == rank): disjoint, and together all 6.
    assert "rank 0/2: 3 of 3 images to draw" in outputs[0][1]
    assert "rank 1/2: 3 of 3 images to draw" in outputs[1][1]
    with np.load(tmp_path / "two" / "samples.npz") as two:
        assert np.array_equal(two["arr_1"], single["arr_1"])
        assert np.abs(two["arr_0"].astype(int) - single["arr_0"].astype(int)).max() <= 1
    assert json.loads(outputs[0][0])["count"] == 6 and outputs[1][0] == ""
