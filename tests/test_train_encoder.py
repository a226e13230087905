"""bench/train_encoder.py on a toy budget: the saved directory loads through RepaEncoder unchanged (its tokens are
the ViT's patch tokens of the [-1, 1] pixels as they are), the probe record, and a train run with it as
`repa.encoder`; bench/repa_step_time.py through RepaEncoder."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from dtr_scale.compat import ensure_torchvision_importable

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))

import train_encoder  # noqa: E402

ensure_torchvision_importable()


@pytest.fixture(scope="module")
def encoder_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("encoder")
    toy = "--limit 100 --epochs 1 --batch 50 --width 16 --layers 1 --heads 2".split()
    assert train_encoder.main(["--out", str(out), "--threads", "1", *toy]) == 0
    return out


def test_probe_record_names_the_splits_and_accuracies(encoder_dir):
    record = json.loads((encoder_dir / "probe.json").read_text())
    # 50 digits per class held out
    assert record["train_split_digits"] == 100 and record["heldout_split_digits"] == 500
    assert record["optimizer_steps"] == 2  # 1 epoch of 100 digits in batches of 50
    for key in ("", "_random_init", "_raw_pixels"):
        assert 0.0 <= record["linear_probe_accuracy" + key] <= 1.0


def test_training_digits_exclude_the_heldout_split():
    """The held-out split (KID reference) is 50 digits per class the encoder never sees."""
    from dtr_scale.data.builtin import mnist_images, split_indices

    _, labels = mnist_images(16)
    train, heldout = split_indices(labels, train_encoder.HELDOUT_PER_CLASS)
    assert len(heldout) == 500 and len(train) == 4500 and not set(train) & set(heldout)
    assert np.bincount(labels[heldout]).tolist() == [50] * 10


def test_repa_encoder_loads_it_and_gives_the_vit_patch_tokens(encoder_dir):
    from transformers import ViTModel

    from dtr_scale.repa_encoder import RepaEncoder

    # the demo DiT's 4 x 4 token grid: 4 px patches x 4 = 16 px
    encoder = RepaEncoder(encoder_dir, dit_grid=4)
    assert (encoder.resolution, encoder.num_tokens, encoder.z_dim) == (16, 16, 16)
    images = torch.rand(3, 1, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    vit = ViTModel.from_pretrained(encoder_dir).eval()
    with torch.no_grad():  # mean = std = 0.5 turns [0, 1] back into [-1, 1]; no resize at 16 px; CLS dropped
        expected = vit(pixel_values=images.expand(-1, 3, -1, -1)).last_hidden_state[:, 1:]
    torch.testing.assert_close(encoder(images), expected, rtol=1e-4, atol=1e-4)


@pytest.mark.minutes  # a DeepSpeed run (~11 s): `make test-slow`
def test_a_train_run_with_it_as_repa_encoder_starts(encoder_dir, tmp_path):
    from distributed import launcher_env

    from dtr_scale.data.builtin import prepare_builtin

    # the demo's 16 px digits (4 x 4 tokens)
    builtin_data = prepare_builtin(tmp_path / "digits16", image_size=16)

    run_dir = tmp_path / "run"
    command = [sys.executable, "-m", "dtr_scale", "train", "--config", str(REPO / "configs/demo-cpu.yaml"),
               f"run_dir={run_dir}", f"data.shards={builtin_data['train']}", "model.hidden_size=32", "model.depth=2",
               "model.num_heads=2", "train.global_batch_size=8", "train.max_micro_batch_size=8", "train.max_steps=2",
               "train.log_every=1", "monitor.sample_every=0", "eval.every=0", "monitor.progress=false",
               "monitor.tensorboard=false", f"repa.encoder={encoder_dir}", "repa.depth=1",
               "repa.projector_dim=16"]  # fmt: skip
    done = subprocess.run(command, env=launcher_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert len(metrics) == 2 and all(-1.0 <= m["loss/repa"] <= 1.0 for m in metrics)


@pytest.mark.minutes  # ~7 s: `make test-slow`
def test_repa_step_time_runs_through_repa_encoder(encoder_dir):
    command = [sys.executable, str(REPO / "bench/repa_step_time.py"), "--model", "DiT-S/2", "--input-size", "8",
               "--encoder-dir", str(encoder_dir), "--resolution", "16", "--image-size", "16", "--batch", "2",
               "--rounds", "1", "--threads", "1", "--projector-dim", "16"]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert f"| {encoder_dir} @ 16 px | 2 |" in done.stdout
