"""`dtr-scale train --dry-run`: plan a run without doing it (resolved config, batch layout, DeepSpeed JSON,
and DeepSpeed's own estimate of the model-state memory per device), e.g. from a CPU login node for 32 GPUs."""

from __future__ import annotations

import contextlib
import io
import json
import os
from pathlib import Path

import torch

from dtr_scale.config import RunConfig, dump_yaml
from dtr_scale.models.build import build_model
from dtr_scale.train.plan import plan_run


def dry_run(
    cfg: RunConfig,
    world_size: int,
    user_ds_config: str | None,
    device_type: str | None = None,
    gpus_per_node: int | None = None,
) -> str:
    """Resolved config, batch layout, DeepSpeed JSON and DeepSpeed's memory estimate, without any work.

    device_type: the target ("cuda" or "cpu"; None = this machine's), so a CPU login node can plan a GPU
    run: precision and the DeepSpeed JSON are resolved as they would be there (cuda: bf16 available).
    A data manifest that is not reachable from here is replaced by the DiT defaults (4x32x32, 1000 classes).
    Raises ConfigError for an impossible layout and ValueError when the world is not whole nodes.
    """
    here = "cuda" if torch.cuda.is_available() else "cpu"
    device_type = device_type or here
    # The plan the trainer would make there (train/plan.py): missing cluster files and micro-batches that
    # stratified sampling cannot split fail here as they would in training.
    plan = plan_run(cfg, world_size, device_type, _bf16_supported(device_type, here), user_ds_config)
    cfg, precision, accumulation, ds = plan.cfg, plan.precision, plan.accumulation, plan.ds_config
    latent_shape, labels, note = _data_shape(cfg)
    with torch.device("meta"):
        model = build_model(cfg, latent_shape, labels)
    total = sum(p.numel() for p in model.parameters())
    largest = max(p.numel() for p in model.parameters())
    gpus = _devices_per_node(world_size, device_type, here, gpus_per_node)
    nodes = world_size // gpus
    stage = cfg.deepspeed.zero_stage
    return "\n".join(
        [
            *(
                ["# target device: cpu (plan a GPU cluster from here with --device cuda)"]
                if device_type == "cpu"
                else []
            ),
            "# resolved config",
            dump_yaml(cfg),
            f"# layout: micro-batch {cfg.train.micro_batch_size} x gradient accumulation {accumulation} x "
            f"world size {world_size} ({nodes} node(s) x {gpus} {device_type} device(s)) = global batch "
            f"{cfg.train.global_batch_size}; precision {precision}",
            f"# DeepSpeed JSON (world size {world_size}, precision {precision})",
            json.dumps(ds, indent=2),
            f"# model: {cfg.model.name}, {total / 1e6:.1f}M parameters, latent {list(latent_shape)}{note}",
            f"# memory estimate of the model states at ZeRO-{stage} "
            f"({'DeepSpeed' if stage >= 2 else 'ZeRO paper formula'}; activations not included)",
            model_state_memory(stage, total, largest, gpus, nodes),
        ]
    )


def _bf16_supported(device_type: str, here: str) -> bool:
    """Whether the target trains in bf16: here, the accelerator's own answer (on CPU, DeepSpeed's); when
    planning for elsewhere, yes (bf16 GPUs such as A100/H100, and DeepSpeed's CPU path)."""
    if device_type == here:
        from deepspeed.accelerator import get_accelerator

        return bool(get_accelerator().is_bf16_supported())
    return device_type in ("cuda", "cpu")


def _data_shape(cfg: RunConfig) -> tuple[tuple[int, ...], int, str]:
    """(latent shape (C, H, W), number of labels, a note when assumed) from the manifest when reachable."""
    from dtr_scale.data.shards import load_manifest

    if cfg.data.shards and Path(cfg.data.shards).exists():
        manifest = load_manifest(cfg.data.shards)
        if cfg.repa.encoder is not None and "repa" in manifest.extra:  # what the launch would refuse
            from dtr_scale.train.repa import _check_stored_features

            _check_stored_features(cfg, manifest, manifest.extra["repa"])
        return tuple(manifest.latent_shape), len(manifest.labels), ""
    size = cfg.model.input_size or 32
    latent_shape = (cfg.model.in_channels or 4, size, size)
    note = (
        f" (data.shards {cfg.data.shards} not reachable here: assumed; prepare the data for the real shape)"
        if cfg.data.shards
        else " (assumed)"
    )
    return latent_shape, cfg.model.num_classes or 1000, note


def _devices_per_node(world_size: int, device_type: str, here: str, gpus_per_node: int | None) -> int:
    """Devices per node: --gpus-per-node, else LOCAL_WORLD_SIZE, else 8 when planning CUDA from a CPU box,
    else this machine's count. ValueError when the world is not a whole number of such nodes."""
    local = (
        gpus_per_node
        or int(os.environ.get("LOCAL_WORLD_SIZE", "0"))
        or (8 if device_type == "cuda" and here == "cpu" else max(1, torch.cuda.device_count()))
    )
    gpus = min(world_size, local)
    if world_size % gpus:
        raise ValueError(
            f"--world-size {world_size} is not a whole number of nodes of {gpus} devices (--gpus-per-node)"
        )
    return gpus


def model_state_memory(stage: int, total: int, largest: int, gpus: int, nodes: int) -> str:
    """The model-state memory per device for `total` parameters (the largest layer has `largest`) at a ZeRO
    stage: DeepSpeed's own estimators at ZeRO-2/3 (their printed table), the ZeRO paper's accounting at 0/1."""
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs_all_cold
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs_all_cold

    if stage < 2:
        # DeepSpeed ships estimators for ZeRO-2/3 only; the ZeRO paper's accounting (Sec. 3, Fig. 1) with bf16
        # weights and gradients and fp32 master + Adam (K = 12 bytes): 2 + 2 + 12 bytes per parameter, the 12
        # divided by the world size at ZeRO-1.
        per_param = 2 + 2 + (12 / (gpus * nodes) if stage == 1 else 12)
        return (
            f"ZeRO-{stage} model states per device (ZeRO paper: 2 + 2 + {per_param - 4:g} bytes per parameter): "
            f"{total * per_param / 2**30:.2f} GiB"
        )
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        if stage == 3:
            estimate_zero3_model_states_mem_needs_all_cold(
                total, largest, num_gpus_per_node=gpus, num_nodes=nodes
            )
        else:
            estimate_zero2_model_states_mem_needs_all_cold(total, num_gpus_per_node=gpus, num_nodes=nodes)
    return buffer.getvalue().strip()
