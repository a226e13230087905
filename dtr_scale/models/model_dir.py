"""The portable model directory that `dtr-scale convert` writes and `sample` / `evaluate` read.

    MODEL_DIR/config.json         architecture, DTR routing, diffusion, data (latent shape, VAE), training
                                  provenance and ANT clusters; see `CONFIG_SECTIONS` for the keys
    MODEL_DIR/model.safetensors   the trained weights
    MODEL_DIR/ema.safetensors     the EMA weights (optional)

Weight files hold state dicts with the reference DiT key names (facebookresearch/DiT models.py) and no
prefix, in fp32 or bf16. The DTR mask table is not stored: it is rebuilt from `routing`. `pos_embed` is a
persistent buffer, so it is stored, as in the reference checkpoints. Everything is read with
safetensors and JSON only: a model directory can never make the reader unpickle anything.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

import dtr_scale
from dtr_scale.fileio import atomic_directory
from dtr_scale.models.dit import DiT
from dtr_scale.models.routing import DTRConfig

FORMAT_NAME = "dtr-scale-model"
FORMAT_VERSION = 1
CONFIG_NAME = "config.json"
WEIGHT_FILES = {"model": "model.safetensors", "ema": "ema.safetensors"}

# section -> {key: accepted types}; None in a tuple means the value may be null.
CONFIG_SECTIONS: dict[str, dict[str, tuple]] = {
    "model": {
        "name": (str, type(None)),
        "input_size": (int,),
        "patch_size": (int,),
        "in_channels": (int,),
        "hidden_size": (int,),
        "depth": (int,),
        "num_heads": (int,),
        "mlp_ratio": (int, float),
        "class_dropout_prob": (int, float),
        "num_classes": (int,),
        "learn_sigma": (bool,),
    },
    "routing": {"enabled": (bool,), "alpha": (int, float), "beta": (int, float), "num_tasks": (int,)},
    "diffusion": {"noise_schedule": (str,), "diffusion_steps": (int,), "learn_sigma": (bool,)},
    "data": {
        "latent_shape": (list,),
        "scaling_factor": (int, float),
        "vae": (dict,),
        "image_size": (int,),
        "labels": (list,),
        "manifest": (str, type(None)),
    },
    "train": {"step": (int,), "samples_seen": (int,), "run_dir": (str,), "tag": (str,)},
    "mtl": {"method": (str,), "num_clusters": (int,), "clusters": (list,)},
}
_DTYPES = {torch.float32: "float32", torch.bfloat16: "bfloat16"}


def architecture_config(model: DiT, name: str | None = None) -> dict[str, dict[str, Any]]:
    """The "model" and "routing" sections of config.json, read off a live DiT."""
    hidden_size = model.t_embedder.mlp[2].out_features
    mlp_ratio = model.blocks[0].mlp.fc1.out_features / hidden_size if len(model.blocks) else 4.0
    routing = model.routing
    return {
        "model": {
            "name": name,
            "input_size": int(model.input_size),
            "patch_size": int(model.patch_size),
            "in_channels": int(model.in_channels),
            "hidden_size": int(hidden_size),
            "depth": len(model.blocks),
            "num_heads": int(model.num_heads),
            "mlp_ratio": float(mlp_ratio),
            "class_dropout_prob": float(model.y_embedder.dropout_prob),
            "num_classes": int(model.num_classes),
            "learn_sigma": bool(model.learn_sigma),
        },
        "routing": {
            "enabled": routing is not None,
            "alpha": float(routing.alpha if routing is not None else DTRConfig.alpha),
            "beta": float(routing.beta if routing is not None else 1.0),
            "num_tasks": int(routing.num_tasks if routing is not None else DTRConfig.num_tasks),
        },
    }


def data_section(manifest: Any) -> dict[str, Any]:
    """The "data" section of config.json from a `dtr_scale.data.shards.Manifest` (the training split's)."""
    return {
        "latent_shape": [int(d) for d in manifest.latent_shape],
        "scaling_factor": float(manifest.scaling_factor),
        "vae": dict(manifest.vae),
        "image_size": int(manifest.image_size),
        "labels": list(manifest.labels),
        "manifest": str(Path(manifest.path).resolve()),
    }


def make_config(
    model: DiT,
    data: dict[str, Any],
    *,
    name: str | None = None,
    diffusion: dict[str, Any] | None = None,
    train: dict[str, Any] | None = None,
    mtl: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """A complete, validated config.json document for `model`; the optional sections get neutral values."""
    config = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "package_version": dtr_scale.__version__,
        **architecture_config(model, name),
        "diffusion": diffusion
        or {"noise_schedule": "linear", "diffusion_steps": 1000, "learn_sigma": bool(model.learn_sigma)},
        "data": data,
        "train": train or {"step": 0, "samples_seen": 0, "run_dir": "", "tag": ""},
        "mtl": mtl or {"method": "none", "num_clusters": 1, "clusters": []},
    }
    validate_config(config)
    return config


def validate_config(config: dict[str, Any], where: str = "model config") -> None:
    """Raise ValueError naming `where` and the key if `config` is not a valid config.json document."""
    if not isinstance(config, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(config).__name__}")
    if config.get("format") != FORMAT_NAME:
        raise ValueError(f"{where}: 'format' is {config.get('format')!r}, expected {FORMAT_NAME!r}")
    if config.get("format_version") != FORMAT_VERSION:
        raise ValueError(
            f"{where}: 'format_version' is {config.get('format_version')!r}; this dtr-scale "
            f"({dtr_scale.__version__}) reads version {FORMAT_VERSION}"
        )
    for section, keys in CONFIG_SECTIONS.items():
        block = config.get(section)
        if not isinstance(block, dict):
            raise ValueError(f"{where}: section {section!r} is missing or not an object")
        for key, kinds in keys.items():
            if key not in block:
                raise ValueError(f"{where}: key '{section}.{key}' is missing")
            value = block[key]
            # bool is an int in Python; only accept it where bool is asked for.
            if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
                expected = " or ".join("null" if k is type(None) else k.__name__ for k in kinds)
                raise ValueError(f"{where}: key '{section}.{key}' must be {expected}, got {value!r}")
    shape = config["data"]["latent_shape"]
    if len(shape) != 3 or not all(isinstance(d, int) and d > 0 for d in shape):
        raise ValueError(f"{where}: key 'data.latent_shape' must be [C, H, W] of positive ints, got {shape}")
    model = config["model"]
    expected_shape = [model["in_channels"], model["input_size"], model["input_size"]]
    if list(shape) != expected_shape:
        raise ValueError(
            f"{where}: 'data.latent_shape' {shape} does not match the model's "
            f"[in_channels, input_size, input_size] = {expected_shape}"
        )
    if config["model"]["learn_sigma"] != config["diffusion"]["learn_sigma"]:
        raise ValueError(f"{where}: 'model.learn_sigma' and 'diffusion.learn_sigma' disagree")
    _validate_objective(config["diffusion"], where)


def _validate_objective(section: dict[str, Any], where: str) -> None:
    """The optional flow keys of the "diffusion" section (absent: a ddpm model, as every dir before them)."""
    objective = section.get("objective", "ddpm")
    if objective not in ("ddpm", "flow"):
        raise ValueError(f"{where}: 'diffusion.objective' must be ddpm or flow, got {objective!r}")
    if objective == "ddpm":
        return
    if section["learn_sigma"]:
        raise ValueError(f"{where}: a flow model has no learned variance ('diffusion.learn_sigma' is true)")
    if section.get("sampler", "heun") not in ("euler", "heun", "sde"):
        raise ValueError(
            f"{where}: 'diffusion.sampler' must be euler, heun or sde, got {section['sampler']!r}"
        )
    low, high = section.get("guidance_low", 0.0), section.get("guidance_high", 1.0)
    if not (isinstance(low, int | float) and isinstance(high, int | float) and 0 <= low <= high <= 1):
        raise ValueError(
            f"{where}: 'diffusion.guidance_low/high' must satisfy 0 <= low <= high <= 1, got {low}, {high}"
        )


def build_model_from_config(config: dict[str, Any]) -> DiT:
    """A freshly initialised DiT with the architecture and routing of a config.json document."""
    validate_config(config)
    arch = {k: v for k, v in config["model"].items() if k != "name"}
    routing = config["routing"]
    dtr = (
        DTRConfig(
            alpha=float(routing["alpha"]), beta=float(routing["beta"]), num_tasks=int(routing["num_tasks"])
        )
        if routing["enabled"]
        else None
    )
    return DiT(**arch, routing=dtr)


def _expected_shapes(config: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    # The meta device builds the module graph without allocating or initialising weights.
    with torch.device("meta"):
        model = build_model_from_config(config)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def _check_state_dict(
    state: dict[str, torch.Tensor], expected: dict[str, tuple[int, ...]], where: str
) -> None:
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        hint = ""
        if any(k.startswith(("module.", "_orig_mod.")) for k in unexpected):
            hint = " (keys carry a wrapper prefix; store the bare DiT state dict)"
        raise ValueError(
            f"{where}: state dict does not match the architecture in config.json{hint}: "
            f"missing keys {missing[:8]}{' ...' if len(missing) > 8 else ''}, "
            f"unexpected keys {unexpected[:8]}{' ...' if len(unexpected) > 8 else ''}"
        )
    for key, shape in expected.items():
        if tuple(state[key].shape) != shape:
            raise ValueError(
                f"{where}: tensor {key!r} has shape {tuple(state[key].shape)}, the config's architecture "
                f"expects {shape}"
            )
        if not state[key].is_floating_point():
            raise ValueError(f"{where}: tensor {key!r} has dtype {state[key].dtype}, expected a float tensor")


def save_model_dir(
    out_dir: str | os.PathLike,
    model_state: dict[str, torch.Tensor],
    ema_state: dict[str, torch.Tensor] | None,
    config: dict[str, Any],
    dtype: torch.dtype = torch.float32,
) -> Path:
    """Write a model directory and return its path.

    The directory is written beside `out_dir` under a temporary name and renamed into place, so a
    reader sees it complete or not at all. An existing model directory at `out_dir` is replaced; any
    other existing, non-empty path is left alone and reported.
    """
    if dtype not in _DTYPES:
        raise ValueError(f"model dir dtype must be torch.float32 or torch.bfloat16, got {dtype}")
    out_dir = Path(out_dir).resolve()  # "." or "x/.." have no name to put a temporary sibling beside
    validate_config(config, where=f"config for {out_dir}")
    if out_dir.exists() and any(out_dir.iterdir()) and not (out_dir / CONFIG_NAME).is_file():
        raise FileExistsError(
            f"{out_dir} exists and is not a dtr-scale model directory; refusing to replace it"
        )
    expected = _expected_shapes(config)
    with atomic_directory(out_dir, CONFIG_NAME) as tmp:
        for kind, state in (("model", model_state), ("ema", ema_state)):
            if state is None:
                continue
            _check_state_dict(state, expected, where=f"{kind} weights for {out_dir}")
            # clone(): safetensors refuses tensors that share storage (e.g. views of one flat buffer).
            tensors = {k: v.detach().to("cpu", dtype).contiguous().clone() for k, v in state.items()}
            save_file(tensors, tmp / WEIGHT_FILES[kind], metadata={"format": "pt", "dtype": _DTYPES[dtype]})
            os.chmod(tmp / WEIGHT_FILES[kind], 0o644)  # safetensors creates 0600 files; a model dir is shared
        (tmp / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return out_dir


def read_config(path: str | os.PathLike) -> dict[str, Any]:
    """Read and validate MODEL_DIR/config.json."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"model directory {path} does not exist (write one with `dtr-scale convert`)")
    config_path = path / CONFIG_NAME
    if not config_path.is_file():
        raise FileNotFoundError(
            f"{path} has no {CONFIG_NAME}; it is not a dtr-scale model directory (write one with `dtr-scale convert`)"
        )
    try:
        config = json.loads(config_path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{config_path}: not valid JSON ({err})") from err
    validate_config(config, where=str(config_path))
    return config


def load_model_dir(
    path: str | os.PathLike, weights: str = "ema", device: str | torch.device = "cpu"
) -> tuple[DiT, dict[str, Any]]:
    """Build the DiT of a model directory, load its `weights` ("ema" or "model") strictly, in fp32, eval mode."""
    if weights not in WEIGHT_FILES:
        raise ValueError(f"weights must be one of {sorted(WEIGHT_FILES)}, got {weights!r}")
    path = Path(path)
    config = read_config(path)
    weight_path = path / WEIGHT_FILES[weights]
    if not weight_path.is_file():
        other = "model" if weights == "ema" else "ema"
        alt = (
            f"; {WEIGHT_FILES[other]} is there (use weights={other!r})"
            if (path / WEIGHT_FILES[other]).is_file()
            else ""
        )
        raise FileNotFoundError(f"{weight_path} does not exist{alt}")
    try:
        state = load_file(weight_path, device="cpu")
    except (SafetensorError, OSError) as err:
        raise ValueError(f"{weight_path}: not a readable safetensors file ({err})") from err
    model = build_model_from_config(config)
    _check_state_dict(
        state, {k: tuple(v.shape) for k, v in model.state_dict().items()}, where=str(weight_path)
    )
    model.load_state_dict(state, strict=True)  # copy_ casts bf16 files to the fp32 parameters
    return model.to(device).eval(), config
