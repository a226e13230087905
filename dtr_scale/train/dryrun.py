"""`dtr-scale train --dry-run`: plan a run without doing it (resolved config, batch layout, DeepSpeed JSON,
and DeepSpeed's own estimate of the model-state memory per device), e.g. from a CPU login node for 32 GPUs."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from dtr_scale.config import (
    RunConfig,
    deepspeed_config,
    dump_yaml,
    gradient_accumulation,
    merge_user_deepspeed_config,
    resolve_batch_layout,
    resolve_precision,
)
from dtr_scale.models.build import build_model


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
    """
    import contextlib
    import io
    import json

    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs_all_cold
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs_all_cold

    from dtr_scale.data.shards import load_manifest

    here = "cuda" if torch.cuda.is_available() else "cpu"
    device_type = device_type or here
    if device_type == here:  # what training here would get: the accelerator's own answer (CPU: DeepSpeed's)
        from deepspeed.accelerator import get_accelerator

        bf16 = bool(get_accelerator().is_bf16_supported())
    else:
        bf16 = device_type in (
            "cuda",
            "cpu",
        )  # planning elsewhere: bf16 GPUs (A100/H100), DeepSpeed's CPU path
    cfg = resolve_batch_layout(cfg, world_size)
    precision = resolve_precision(cfg, device_type, bf16)
    accumulation = gradient_accumulation(cfg, world_size)
    ds = deepspeed_config(cfg, world_size, precision, device_type)
    if user_ds_config or cfg.deepspeed.config_file:
        ds = merge_user_deepspeed_config(user_ds_config or cfg.deepspeed.config_file, ds)
    note = ""
    if cfg.data.shards and Path(cfg.data.shards).exists():
        manifest = load_manifest(cfg.data.shards)
        latent_shape, labels = tuple(manifest.latent_shape), len(manifest.labels)
    else:
        latent_shape = (cfg.model.in_channels or 4, cfg.model.input_size or 32, cfg.model.input_size or 32)
        labels = cfg.model.num_classes or 1000
        note = (
            f" (data.shards {cfg.data.shards} not reachable here: assumed; prepare the data for the real shape)"
            if cfg.data.shards
            else " (assumed)"
        )
    with torch.device("meta"):
        model = build_model(cfg, latent_shape, labels)
    total = sum(p.numel() for p in model.parameters())
    largest = max(p.numel() for p in model.parameters())
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
    nodes = world_size // gpus
    stage = cfg.deepspeed.zero_stage
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        if stage == 3:
            estimate_zero3_model_states_mem_needs_all_cold(
                total, largest, num_gpus_per_node=gpus, num_nodes=nodes
            )
        elif stage == 2:
            estimate_zero2_model_states_mem_needs_all_cold(total, num_gpus_per_node=gpus, num_nodes=nodes)
        else:  # DeepSpeed ships estimators for ZeRO-2/3 only; the ZeRO paper's accounting (Sec. 3, Fig. 1)
            # with bf16 weights and gradients and fp32 master + Adam (K = 12 bytes): 2 + 2 + 12 per parameter,
            # the 12 divided by the world size at ZeRO-1.
            per_param = 2 + 2 + (12 / world_size if stage == 1 else 12)
            print(
                f"ZeRO-{stage} model states per device (ZeRO paper: 2 + 2 + {per_param - 4:g} bytes per parameter): "
                f"{total * per_param / 2**30:.2f} GiB"
            )
    return "\n".join(
        [
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
            buffer.getvalue().strip(),
        ]
    )
