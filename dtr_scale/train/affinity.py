"""`dtr-scale affinity`: ANT's task-affinity matrix of timestep groups, measured on a trained model.

    dtr-scale affinity --model MODEL_DIR --data manifest.json [--group-size 50] [--out affinity.npy]

Loads a model directory (`dtr-scale convert`) and a few batches of the training latents, and runs
mtl.affinity.compute_affinity (ANT, NeurIPS 2023, Sec. 3): `dtr-scale cluster --objective affinity`
then turns the matrix into timestep clusters for `mtl.clusters_file` / `mtl.objective: affinity`.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

from dtr_scale.errors import finite_float
from dtr_scale.mtl.affinity import compute_affinity


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """CLI of `dtr-scale affinity`."""
    parser.add_argument(
        "--model", type=Path, required=True, help="model directory written by `dtr-scale convert`"
    )
    parser.add_argument("--data", type=Path, required=True, help="manifest.json of latent shards")
    parser.add_argument(
        "--weights", choices=("ema", "model"), default="ema", help="which weights of the model dir"
    )
    parser.add_argument("--group-size", type=int, default=50, help="timesteps per group G (1: full T x T)")
    parser.add_argument("--batches", type=int, default=4, help="number of batches per group gradient")
    parser.add_argument("--batch-size", type=int, default=32, help="latents per gradient batch (default 32)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the batches, timesteps and noise")
    parser.add_argument(
        "--device", default="cuda" if torch.cuda.is_available() else "cpu", help="default: cuda if available"
    )
    parser.add_argument(
        "--max-memory-gb", type=finite_float, default=32.0, help="limit on the stored group gradients"
    )
    parser.add_argument("--out", type=Path, default=Path("affinity.npy"), help="output .npy")


def run(args: argparse.Namespace) -> int:
    """`dtr-scale affinity`: measure and save the affinity matrix (.npy); returns 0."""
    from dtr_scale.data.stream import LatentStream
    from dtr_scale.diffusion import create_diffusion
    from dtr_scale.diffusion.flow import FlowMatching
    from dtr_scale.models.model_dir import load_model_dir

    torch.manual_seed(args.seed)  # label dropout in train mode draws from the global generator
    model, config = load_model_dir(args.model, weights=args.weights, device=args.device)
    model.train()  # the training objective, label dropout included, as ANT's task_affinity_score does
    diffusion_cfg = config["diffusion"]
    if diffusion_cfg.get("objective", "ddpm") == "flow":  # groups of the T equal bins of flow time t
        diffusion = FlowMatching(diffusion_cfg["diffusion_steps"])
    else:
        diffusion = create_diffusion(
            "",
            noise_schedule=diffusion_cfg["noise_schedule"],
            learn_sigma=diffusion_cfg["learn_sigma"],
            diffusion_steps=diffusion_cfg["diffusion_steps"],
        )
    stream = LatentStream(
        args.data,
        args.batch_size,
        seed=args.seed,
        rank=0,
        world_size=1,
        expected_latent_shape=tuple(config["data"]["latent_shape"]),
    )
    batches = []
    for x, y in stream:
        batches.append((x.to(args.device), y.to(args.device)))
        if len(batches) == args.batches:
            break
    affinity = compute_affinity(
        model,
        diffusion,
        batches,
        args.group_size,
        seed=args.seed,
        max_gradient_bytes=int(args.max_memory_gb * 2**30),
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    np.save(args.out, affinity, allow_pickle=False)
    T = diffusion.num_timesteps
    print(
        f"task affinity of {affinity.shape[0]} groups of {args.group_size} timesteps "
        f"({len(batches)} batches of {args.batch_size}) -> {args.out}"
    )
    print(f"cluster it: dtr-scale cluster --objective affinity --affinity {args.out} --timesteps {T} --k 5")
    return 0
