"""Quality, not plumbing: the demo chain must train a model that draws the digits it is asked for."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from distributed import REPO, rank_env

from dtr_scale.data.builtin import heldout_images, mnist_images, split_indices
from dtr_scale.sample.digits import DigitClassifier


def test_digit_classifier_reads_real_heldout_digits_and_not_noise(tmp_path) -> None:
    # The judge itself: ~96% on real held-out digits, chance-level on noise (independent expectations).
    judge = DigitClassifier.fit_builtin(image_size=16)
    images, labels = mnist_images(16)
    _, heldout = split_indices(labels, 50)
    assert judge.accuracy(images[heldout], labels[heldout]) > 0.93
    noise = np.random.default_rng(0).integers(0, 256, (200, 16, 16, 3), dtype=np.uint8)
    assert judge.accuracy(noise, np.arange(200) % 10) < 0.25
    with pytest.raises(ValueError, match=r"expected images of shape \(N, 16, 16"):
        judge.predict(np.zeros((2, 32, 32), dtype=np.uint8))


@pytest.mark.slow
@pytest.mark.minutes  # the whole demo: ~7 min on 2 cores (DDPM), ~3-4 min (flow)
@pytest.mark.parametrize("config", ["demo-cpu.yaml", "demo-cpu-flow.yaml"], ids=["ddpm", "flow"])
def test_make_demo_draws_digits_a_classifier_reads_as_their_class(tmp_path, config) -> None:
    # The whole chain as `make demo` (and `make demo OBJECTIVE=flow`) runs it (prepare 16x16 digits, DeepSpeed
    # training with DTR + ANT-UW, convert, sample 500 class-conditional digits, classify, KID/FID).
    env = rank_env(0, 1, 0)
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key)
    # Under `make test-slow` (pytest-xdist, two workers) the two demos run side by side: one thread each.
    threads = "1" if int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")) > 1 else "2"
    env["OMP_NUM_THREADS"] = threads
    result = subprocess.run(
        [sys.executable, "-m", "dtr_scale", "demo", "--out", str(tmp_path / "demo"), "--config",
         str(REPO / "configs" / config), "--threads", threads],
        env=env, cwd=REPO, capture_output=True, text=True, timeout=1500,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    metrics = json.loads((tmp_path / "demo" / "metrics.json").read_text())
    assert metrics["class_accuracy"] >= 0.9, metrics
    assert min(metrics["class_accuracy_per_class"].values()) >= 0.6, metrics["class_accuracy_per_class"]
    assert "class accuracy:" in result.stdout
    assert (tmp_path / "demo" / "class_grid.png").is_file()
    # The data it trained on: 16x16 digits, shuffled shards, no mirrors.
    manifest = json.loads((tmp_path / "demo" / "data" / "train" / "manifest.json").read_text())
    assert manifest["image_size"] == 16 and manifest["hflip"] is False
    assert heldout_images(tmp_path / "demo" / "data").shape == (500, 16, 16, 1)
