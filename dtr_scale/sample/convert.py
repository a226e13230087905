"""`dtr-scale convert`: a DeepSpeed training checkpoint -> a portable model directory.

    dtr-scale convert RUN_DIR [--tag TAG] --out MODEL_DIR [--dtype fp32|bf16] [--format dtr|dit|diffusers]

What goes in (written by `dtr_scale.train.checkpoint`):
    RUN_DIR/checkpoints/latest                    the newest complete tag (default for --tag)
    RUN_DIR/checkpoints/TAG/*.pt                  DeepSpeed's model / optimizer files (any ZeRO stage)
    RUN_DIR/checkpoints/TAG/dtr_scale/global.safetensors   step, samples seen, balancer, clusters, config
    RUN_DIR/checkpoints/TAG/dtr_scale/rankNNNNN.safetensors  each rank's EMA shard (+ RNG, stream)
What comes out (`dtr_scale.models.model_dir`): model.safetensors (the fp32 master weights),
ema.safetensors (the EMA reassembled from every rank's shard) and config.json, all with the reference
DiT key names; with `--format dit` also `dit.pt` = {"model", "ema"} for the reference DiT code. With
`--format diffusers` the output is instead a folder for `diffusers.DiTPipeline.from_pretrained`
(sample/diffusers_export.py), holding the `--weights` (EMA by default).

The model weights are consolidated by DeepSpeed's own `zero_to_fp32` utility (ZeRO 1/2/3, and bf16
runs' fp32 master copies), never by a home-made reader of its flat buffers. A ZeRO-0 fp32 run has no
optimizer-partition files; its full weights are the "module" entry of `mp_rank_00_model_states.pt`.
DeepSpeed unpickles its files with weights_only=False, so every file is first checked to load with
`torch.load(weights_only=True)` and a small allow-list (`check_deepspeed_files_safe`).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import yaml

from dtr_scale.checkpoint_format import (
    CHECKPOINTS_DIR,
    LATEST_NAME,
    assemble_ema_shards,
    check_deepspeed_files_safe,
    complete_tags,
    deepspeed_safe_loading,
    global_state_path,
    rank_state_path,
    read_latest,
    read_state_file,
)
from dtr_scale.config.objective import flow_section, learns_sigma
from dtr_scale.fileio import atomic_path

if TYPE_CHECKING:
    from dtr_scale.config import RunConfig
    from dtr_scale.data.shards import Manifest

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
FORMATS = ("dtr", "dit", "diffusers")
DIT_CHECKPOINT_NAME = "dit.pt"


# ------------------------------------------------------------------------------- locating a checkpoint


def resolve_tag(run_dir: Path, tag: str | None) -> tuple[str, Path]:
    """The checkpoint tag to convert (`latest` when None) and its directory; errors name what is missing."""
    ckpt_dir = run_dir / CHECKPOINTS_DIR
    if not run_dir.is_dir():
        raise FileNotFoundError(f"run directory {run_dir} does not exist")
    available = complete_tags(ckpt_dir)
    if tag is None:
        tag = read_latest(ckpt_dir)
        if tag is None:
            raise FileNotFoundError(
                f"{ckpt_dir / LATEST_NAME} does not exist: {run_dir} has no complete checkpoint yet (the trainer "
                f"writes one every train.checkpoint_every steps and at the last step)"
                + (f"; complete tags found: {available} (pass --tag)" if available else "")
            )
    tag_dir = ckpt_dir / tag
    if not global_state_path(tag_dir).is_file():
        state = "is not a complete dtr-scale checkpoint" if tag_dir.is_dir() else "does not exist"
        raise FileNotFoundError(
            f"checkpoint tag {tag!r} in {ckpt_dir} {state}; complete tags: {available or 'none'}"
        )
    return tag, tag_dir


# ------------------------------------------------------------------------------- weights


def consolidated_weights(tag_dir: Path) -> dict[str, torch.Tensor]:
    """The full fp32 state dict of DeepSpeed's wrapped module (keys `model.*`, `balancer.*`) at `tag_dir`."""

    check_deepspeed_files_safe(tag_dir)
    if any(tag_dir.glob("*_optim_states.pt")):
        # ZeRO 1/2/3 (and bf16 at any stage): the fp32 master weights live in the optimizer partitions.
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        # DeepSpeed reports its progress with print(); keep our stdout for the result.
        with contextlib.redirect_stdout(sys.stderr):
            state = get_fp32_state_dict_from_zero_checkpoint(str(tag_dir.parent), tag=tag_dir.name)
        return {k: v.float() for k, v in state.items()}
    model_file = tag_dir / "mp_rank_00_model_states.pt"
    if not model_file.is_file():
        raise FileNotFoundError(
            f"{tag_dir} holds neither DeepSpeed optimizer partitions (*_optim_states.pt) nor "
            f"{model_file.name}: not a DeepSpeed checkpoint, or an incomplete copy of one"
        )
    # ZeRO-0 without bf16: the module's own (fp32) weights are the trained weights, stored whole.
    with deepspeed_safe_loading():
        module = torch.load(model_file, map_location="cpu", weights_only=True)["module"]
    not_fp32 = sorted(k for k, v in module.items() if v.is_floating_point() and v.dtype != torch.float32)
    if not_fp32:
        raise ValueError(
            f"{model_file}: tensors {not_fp32[:3]} are stored in {module[not_fp32[0]].dtype} and the checkpoint "
            "has no optimizer partitions holding fp32 master weights; refusing to convert rounded weights"
        )
    return dict(module)


def split_module_state(
    state: dict[str, torch.Tensor], where: Path
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(DiT state with the `model.` prefix stripped, balancer state) from the TrainModule's state dict. REPA's
    projector (`repa_projector.*`) is dropped: sampling never uses it."""
    model_state = {k.removeprefix("model."): v for k, v in state.items() if k.startswith("model.")}
    balancer_state = {k.removeprefix("balancer."): v for k, v in state.items() if k.startswith("balancer.")}
    other = sorted(k for k in state if not k.startswith(("model.", "balancer.", "repa_projector.")))
    if other or not model_state:
        raise ValueError(
            f"{where}: expected the state of dtr-scale's TrainModule (keys 'model.*' and 'balancer.*'), "
            f"found {len(model_state)} model keys and other keys {other[:5]}"
        )
    return model_state, balancer_state


def assembled_ema(
    tag_dir: Path, world_size: int, shapes: dict[str, tuple[int, ...]]
) -> dict[str, torch.Tensor]:
    """The full fp32 EMA parameters from the shards of all `world_size` rank files."""
    states = []
    for rank in range(world_size):
        path = rank_state_path(tag_dir, rank)
        if not path.is_file():
            raise FileNotFoundError(
                f"{path} is missing: the run had {world_size} ranks and each holds one shard of the EMA, so "
                f"all {world_size} rank files are needed (copy the whole checkpoint directory {tag_dir})"
            )
        rank_state = read_state_file(path)
        if int(rank_state.get("world_size", world_size)) != world_size:
            raise ValueError(
                f"{path} was written by a run of {rank_state['world_size']} ranks, global.safetensors "
                f"says {world_size}: files from different runs are mixed in {tag_dir}"
            )
        states.append(rank_state["ema"])
    return assemble_ema_shards(states, shapes)


# ------------------------------------------------------------------------------- the conversion


def _check_reference_layout(model: torch.nn.Module) -> None:
    routing = model.routing
    if routing is not None and routing.beta < 1.0:
        raise ValueError(
            f"--format dit: this model uses DTR routing (alpha={routing.alpha}, beta={routing.beta}, "
            f"num_tasks={routing.num_tasks}): every block masks its activations with a timestep-dependent "
            "channel window, which the reference DiT (facebookresearch/DiT models.py) has no place for; its "
            "code would load these weights and silently compute something else. Use the model directory "
            "(config.json carries the routing) with `dtr-scale sample`, or train with routing.enabled=false "
            "(or routing.beta=1) for a reference-compatible model."
        )


def _read_checkpoint(
    run_dir: Path, tag: str | None, manifest: str | os.PathLike | None
) -> tuple[str, Path, dict, RunConfig, Manifest]:
    """(tag, tag dir, global state, the run's Config, the training data's Manifest) of checkpoint `tag`."""
    from dtr_scale.config import config_from_dict
    from dtr_scale.data.shards import load_manifest

    tag, tag_dir = resolve_tag(run_dir, tag)
    global_path = global_state_path(tag_dir)
    global_state = read_state_file(global_path)
    # The config saved WITH the checkpoint, not RUN_DIR/config.yaml (which a later resume may rewrite).
    cfg = config_from_dict(yaml.safe_load(global_state["run"]["config"]))
    manifest_path = manifest if manifest is not None else cfg.data.shards
    if manifest_path is None:
        raise ValueError(f"{global_path}: the run's config has no data.shards; pass the training manifest")
    try:
        data = load_manifest(manifest_path)
    except FileNotFoundError as err:
        raise FileNotFoundError(
            f"{err}. The data manifest (data.shards of run {run_dir}) gives the latent shape, labels and VAE "
            "recorded in config.json; pass its current location with --manifest"
        ) from err
    return tag, tag_dir, global_state, cfg, data


def _trained_states(
    cfg: RunConfig, data: Manifest, tag_dir: Path, global_state: dict, fmt: str
) -> tuple[torch.nn.Module, dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(meta-device model, fp32 model state, fp32 EMA state), both with the reference DiT key names."""
    from dtr_scale.models.build import build_model

    # The meta device gives the architecture and parameter shapes without allocating the weights.
    with torch.device("meta"):
        model = build_model(cfg, tuple(data.latent_shape), len(data.labels))
    if fmt == "dit":
        _check_reference_layout(model)  # before the (possibly long) consolidation
    shapes = {name: tuple(p.shape) for name, p in model.named_parameters()}

    model_state, _balancer_params = split_module_state(consolidated_weights(tag_dir), tag_dir)
    if "pos_embed" not in model_state:
        # A fixed sin-cos table (DiT); DeepSpeed stores persistent buffers, but do not depend on it.
        fresh = build_model(cfg, tuple(data.latent_shape), len(data.labels))
        model_state["pos_embed"] = fresh.pos_embed.detach().clone()
    ema_state = assembled_ema(tag_dir, int(global_state["world_size"]), shapes)
    ema_state["pos_embed"] = model_state["pos_embed"]
    return model, model_state, ema_state


def _model_config(
    model: torch.nn.Module, cfg: RunConfig, data: Manifest, global_state: dict, run_dir: Path, tag: str
) -> dict:
    """The model directory's config.json document (models/model_dir.py make_config)."""
    from dtr_scale.models.model_dir import data_section, make_config

    clusters = [list(c) for c in global_state["run"]["clusters"]]
    num_clusters = max(1, len(clusters))
    return make_config(
        model,
        data_section(data),
        name=cfg.model.name,
        diffusion={
            "noise_schedule": cfg.diffusion.noise_schedule,
            "diffusion_steps": cfg.diffusion.diffusion_steps,
            "learn_sigma": learns_sigma(cfg),
            **flow_section(cfg),
        },
        train={
            "step": int(global_state["progress"]["step"]),
            "samples_seen": int(global_state["progress"]["samples_seen"]),
            "run_dir": str(run_dir.resolve()),
            "tag": tag,
        },
        mtl={
            "method": cfg.mtl.method,
            "num_clusters": num_clusters,
            "clusters": clusters,
            "balancer_weights": list(global_state["balancer"]["weights"]),
        },
    )


def convert_checkpoint(
    run_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    tag: str | None = None,
    dtype: str = "fp32",
    fmt: str = "dtr",
    *,
    manifest: str | os.PathLike | None = None,
    diffusers: dict | None = None,
) -> Path:
    """Write the model directory of checkpoint `tag` (default: latest) of `run_dir` to `out_dir`; return it.

    `manifest`: the training data's manifest.json, when the path recorded in the run's config
    (data.shards) no longer resolves, e.g. after moving the run to another machine. `diffusers` (format
    "diffusers" only): keyword arguments of `export_run` (weights, scheduler, transformer_class, vae_dir, command).
    """
    from dtr_scale.models.model_dir import save_model_dir

    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    if fmt not in FORMATS:
        raise ValueError(f"format must be one of {list(FORMATS)}, got {fmt!r}")
    run_dir = Path(run_dir)
    tag, tag_dir, global_state, cfg, data = _read_checkpoint(run_dir, tag, manifest)
    if cfg.diffusion.objective == "flow" and fmt != "dtr":  # DiT's eps/variance outputs, a DDPM scheduler
        raise ValueError(f"--format {fmt}: {run_dir} trains diffusion.objective=flow; the {fmt} format holds DDPM "
                         "models (DiT's epsilon/variance outputs and a DDPM scheduler). Use --format dtr and `dtr-scale sample`")  # fmt: skip
    model, model_state, ema_state = _trained_states(cfg, data, tag_dir, global_state, fmt)
    config = _model_config(model, cfg, data, global_state, run_dir, tag)
    if fmt == "diffusers":
        from dtr_scale.sample.diffusers_export import export_run

        states = {"model": model_state, "ema": ema_state}
        e = cfg.eval
        evaluation = f"{e.num_samples} EMA samples, {e.steps} DDIM steps, CFG {e.cfg_scale:g}, against {e.reference or 'the held-out split'}"
        return export_run(
            out_dir, config, states, run_dir, dtype=DTYPES[dtype], evaluation=evaluation, **(diffusers or {})
        )
    out = save_model_dir(out_dir, model_state, ema_state, config, dtype=DTYPES[dtype])
    if fmt == "dit":
        write_reference_checkpoint(out / DIT_CHECKPOINT_NAME, model_state, ema_state, DTYPES[dtype])
    return out


def write_reference_checkpoint(
    path: Path, model_state: dict[str, torch.Tensor], ema_state: dict[str, torch.Tensor], dtype: torch.dtype
) -> None:
    """`{"model", "ema"}` as facebookresearch/DiT's train.py saves them (minus the optimizer and args)."""

    def plain(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {k: v.detach().to("cpu", dtype).contiguous().clone() for k, v in state.items()}

    with atomic_path(path) as tmp:
        torch.save({"model": plain(model_state), "ema": plain(ema_state)}, tmp)


# ------------------------------------------------------------------------------- CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """CLI of `dtr-scale convert`."""
    parser.add_argument("run_dir", help="the training run directory (holds checkpoints/)")
    parser.add_argument("--tag", default=None, help="checkpoint tag, e.g. step00010000 (default: latest)")
    parser.add_argument("--out", required=True, help="model directory to write (an old one is replaced)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32", help="dtype of the stored weights")
    parser.add_argument(
        "--format", choices=FORMATS, default="dtr",
        help="dit: also write dit.pt {'model', 'ema'} for the reference DiT code (models without routing); "
        "diffusers: a DiTPipeline folder instead of a model directory",
    )  # fmt: skip
    parser.add_argument("--manifest", default=None, help="training manifest.json, if moved since training")
    group = parser.add_argument_group("--format diffusers")
    group.add_argument(
        "--weights", choices=("ema", "model"), default=None, help="weights the folder holds (ema)"
    )
    group.add_argument(
        "--scheduler", choices=("ddim", "ddpm"), default=None, help="the folder's scheduler (ddim)"
    )
    group.add_argument(
        "--transformer-class", choices=("auto", "diffusers", "dtr"), default=None,
        help="auto (default): diffusers' DiTTransformer2DModel for unrouted models with an AutoencoderKL, "
        "dtr_scale.hf's exact class otherwise",
    )  # fmt: skip
    group.add_argument(
        "--vae", default=None, help="the run's AutoencoderKL directory, if moved since preprocess"
    )


def run(args: argparse.Namespace) -> int:
    """`dtr-scale convert`: write the model directory; prints its path; returns 0."""
    from dtr_scale.sample.diffusers_export import cli_options

    diffusers = cli_options(args)
    out = convert_checkpoint(
        args.run_dir, args.out, args.tag, args.dtype, args.format, manifest=args.manifest, diffusers=diffusers
    )
    print(out)
    return 0
