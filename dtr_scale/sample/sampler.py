"""`dtr-scale sample`: draw class-conditional samples from a model directory on any number of processes.

    dtr-scale sample --model MODEL_DIR --out DIR [--num-samples N] [--steps 250] [--sampler ddpm|ddim]
                     [--cfg-scale 1.5] [--guidance-channels all|3] [--weights ema|model] [--seed 0]
                     [--vae DIR] [--classes 0,1,2 | uniform]
    flow models (diffusion.objective=flow): [--sampler euler|heun|sde] [--steps 50]
                     [--guidance-low 0.0] [--guidance-high 1.0]
    torchrun --nproc_per_node 8 -m dtr_scale sample ...       (or the deepspeed launcher, or Slurm + torchrun)

Output: DIR/%06d.png for every sample index, then DIR/samples.npz (`arr_0` uint8 NHWC with 3 channels,
the ADM evaluator's convention; `arr_1` int64 labels) and DIR/samples.json (the settings that made them).

Seeding (sample/seeds.py): every sample index i owns its own generator, seeded from
`numpy.random.SeedSequence([seed, i])`, which draws its label and all its noise; so sample i is the same
image whatever the world size, batch size or resume history, and streams of different indices never
overlap. The output folder's files and the resume check: sample/outputs.py.

Work split: index i belongs to global rank `i % world`; a rank samples only its indices whose PNG is
missing, so re-running the same command resumes (PNGs are written under a temporary name and renamed, so
a killed run never leaves a half-written one). All ranks must see the same DIR (a shared file system on
multi-node runs): rank 0 waits for every rank and then assembles samples.npz from the PNGs.

Guidance: eps = eps_uncond + s * (eps_cond - eps_uncond) (Ho & Salimans 2022) with the null label
`num_classes`, on all latent channels (DTR's choice) or the first 3 (the reference DiT's sample.py).
cfg_scale 1.0 runs the conditional model alone (no doubled batch). Flow models guide the velocity, only for
guidance_low <= t <= guidance_high (REPA's guidance interval; diffusion/flow_sampling.py).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

import dtr_scale
from dtr_scale.data.images import to_uint8_nhwc
from dtr_scale.data.vae import build_decoder
from dtr_scale.diffusion.flow_sampling import FLOW_SAMPLERS
from dtr_scale.diffusion.sampling import denoise, sample_generators, sampling_parts
from dtr_scale.distributed import barrier, launcher_ranks
from dtr_scale.errors import finite_float
from dtr_scale.models.dit import DiT
from dtr_scale.models.model_dir import load_model_dir, validate_config
from dtr_scale.sample.outputs import (
    FORMAT_NAME,
    JSON_NAME,
    NPZ_NAME,
    assemble,
    check_resume,
    png_path,
    write_json,
    write_png,
)
from dtr_scale.sample.processes import default_device, process_group, rank_indices
from dtr_scale.sample.seeds import parse_classes

SAMPLERS = ("ddpm", "ddim", *FLOW_SAMPLERS)
DEFAULT_STEPS = {"ddpm": 250, "flow": 50}  # DiT sample.py; REPA generate.py


# ----------------------------------------------------------------------------------------------- sampling


def _resolve_model(
    model: str | os.PathLike | DiT, config: dict[str, Any] | None, weights: str, device
) -> tuple[DiT, dict[str, Any], Path | None, torch.device]:
    """(model, model-dir config, model dir or None, device) from a model directory or a live DiT + config."""
    if isinstance(model, DiT):
        # A live model samples where it lives unless told otherwise; a model dir goes to the default device.
        device = torch.device(device) if device is not None else next(model.parameters()).device
        if config is None:
            raise ValueError(
                "sample_to_dir(model=DiT, ...) needs the model-dir config of that model (config=...)"
            )
        validate_config(config)
        return model, config, None, device
    device = torch.device(device) if device is not None else default_device()
    model_dir = Path(model)
    model, config = load_model_dir(model_dir, weights=weights, device=device)
    return model, config, model_dir, device


def _check_guidance(model: DiT, cfg_scale: float, guidance_channels: str | int | None, num_classes: int):
    """The guided channel count ("all" or 1..in_channels); ValueError for a bad count, or CFG without a null class."""
    if guidance_channels not in ("all", None):
        guidance_channels = int(guidance_channels)
        if not 1 <= guidance_channels <= model.in_channels:
            raise ValueError(
                f"guidance_channels must be 'all' or 1..{model.in_channels}, got {guidance_channels}"
            )
    if cfg_scale != 1.0 and model.y_embedder.embedding_table.num_embeddings <= num_classes:
        raise ValueError(
            "classifier-free guidance needs the null class, but this model was built with "
            "class_dropout_prob = 0 (no null label); use --cfg-scale 1.0"
        )
    return "all" if guidance_channels in ("all", None) else guidance_channels


def _draw(model: DiT, job: dict[str, Any], todo: list[int], log: Callable[[str], None], rank: int) -> None:
    """Draw the samples `todo` in batches and write each as its PNG (resumable: one file per index)."""
    was_training, previous_channels = model.training, model.guidance_channels
    model.eval()
    model.guidance_channels = None if job["guidance_channels"] == "all" else job["guidance_channels"]
    model_fn = job["model_fn"]
    batch_size, class_list = job["batch_size"], job["class_list"]
    try:
        for start in range(0, len(todo), batch_size):
            batch = todo[start : start + batch_size]
            generators, labels = sample_generators(job["seed"], batch, job["num_classes"], class_list)
            y = torch.tensor(labels, device=job["device"], dtype=torch.long)
            latents = denoise(
                job["diffusion"], model_fn, job["sampler"], generators, y, job["latent_shape"], job["device"]
            )
            with torch.no_grad():
                images = to_uint8_nhwc(job["decode"](latents))
            for index, image in zip(batch, images):
                write_png(png_path(job["out_dir"], index), image)
            log(f"sample: rank {rank}: {min(start + batch_size, len(todo))}/{len(todo)}")
    finally:
        model.train(was_training)
        model.guidance_channels = previous_channels


def _resolve_sampler(
    config: dict[str, Any], sampler: str | None, steps: int | None, low: float | None, high: float | None
) -> tuple[str, int, dict[str, Any]]:
    """(sampler, steps, the flow-only samples.json entries) for the model dir's objective and defaults."""
    section = config["diffusion"]
    objective = section.get("objective", "ddpm")
    steps = DEFAULT_STEPS[objective] if steps is None else steps
    if objective != "flow":
        if low is not None or high is not None:
            raise ValueError("--guidance-low/--guidance-high apply to flow models; this model is ddpm")
        return sampler or "ddpm", steps, {}
    low = float(section.get("guidance_low", 0.0) if low is None else low)
    high = float(section.get("guidance_high", 1.0) if high is None else high)
    if not 0.0 <= low <= high <= 1.0:
        raise ValueError(f"guidance interval must satisfy 0 <= low <= high <= 1, got [{low}, {high}]")
    return sampler or section.get("sampler", "heun"), steps, {"guidance_interval": [low, high]}


def _check_arguments(sampler: str, num_samples: int, batch_size: int, steps: int) -> None:
    if sampler not in SAMPLERS:
        raise ValueError(f"sampler must be one of {SAMPLERS}, got {sampler!r}")
    if num_samples < 1 or batch_size < 1 or steps < 1:
        raise ValueError(
            f"num_samples, batch_size and steps must be >= 1, got {num_samples}, {batch_size}, {steps}"
        )


def _settings(
    config: dict[str, Any],
    model_dir: Path | None,
    job: dict[str, Any],
    image_shape: list[int],
    *,
    weights: str,
    steps: int,
    vae_dir: str | os.PathLike | None,
    count: int,
) -> dict[str, Any]:
    """The samples.json document (complete=False) of this run."""
    class_list = job["class_list"]
    return {
        "format": FORMAT_NAME,
        "package_version": dtr_scale.__version__,
        "model": str(model_dir.resolve()) if model_dir is not None else None,
        "model_step": int(config["train"]["step"]),
        "model_tag": config["train"]["tag"],
        "model_run_dir": config["train"]["run_dir"],
        "weights": weights,
        "sampler": job["sampler"],
        "steps": int(steps),
        "cfg_scale": job["cfg_scale"],
        **job["flow_settings"],
        "guidance_channels": job["guidance_channels"],
        "vae": {"identity": config["data"]["vae"], "dir": str(vae_dir) if vae_dir is not None else None},
        "seed": int(job["seed"]),
        "seeding": "per sample index i: torch CPU generator seeded by numpy SeedSequence([seed, i])",
        "classes": "uniform" if class_list is None else class_list,
        "count": int(count),
        "image_shape": image_shape,
        "complete": False,
    }


def _image_shape(job: dict[str, Any]) -> list[int]:
    """[H, W, 3] of the images that `job`'s decoder makes from its latent shape."""
    with torch.no_grad():
        probe = to_uint8_nhwc(job["decode"](torch.zeros(1, *job["latent_shape"], device=job["device"])))
    return [int(probe.shape[1]), int(probe.shape[2]), 3]


def _sample_on_rank(
    model: DiT, job: dict[str, Any], settings: dict[str, Any], rank: int, world: int, log: Callable
) -> None:
    """Every rank: check the resume, draw this rank's missing PNGs; rank 0 then assembles samples.npz."""
    out_dir, device = job["out_dir"], job["device"]
    out_dir.mkdir(parents=True, exist_ok=True)
    check_resume(out_dir, settings)
    barrier(device)  # every rank has checked the old samples.json before rank 0 replaces it
    if rank == 0:
        write_json(out_dir / JSON_NAME, settings)
    owned = rank_indices(settings["count"], rank, world)
    todo = [i for i in owned if not png_path(out_dir, i).is_file()]
    log(f"sample: rank {rank}/{world}: {len(todo)} of {len(owned)} images to draw")
    _draw(model, job, todo, log, rank)
    barrier(device)
    if rank == 0:
        assemble(out_dir, settings, job["class_list"], job["num_classes"])
    barrier(device)  # nobody returns before samples.npz exists


def sample_to_dir(
    model: str | os.PathLike | DiT,
    out_dir: str | os.PathLike,
    *,
    config: dict[str, Any] | None = None,
    num_samples: int = 50_000,
    batch_size: int = 32,
    steps: int | None = None,
    sampler: str | None = None,
    cfg_scale: float = 1.5,
    guidance_channels: str | int = "all",
    weights: str = "ema",
    seed: int = 0,
    vae_dir: str | os.PathLike | None = None,
    classes: str | list[int] | None = None,
    device: str | torch.device | None = None,
    log: Callable[[str], None] | None = None,
    guidance_low: float | None = None,
    guidance_high: float | None = None,
) -> dict[str, Any]:
    """Sample `num_samples` images into `out_dir` (PNGs + samples.npz + samples.json); returns the
    samples.json document. Every rank of an initialised torch.distributed group (or of a RANK/WORLD_SIZE
    launch) must call it with the same arguments. Images are uint8 RGB (H, W, 3); sample i's noise and
    label come from its own generator (seed, i), so the result does not depend on the number of ranks.

    `model` is a model directory (its `weights` are loaded), or a live DiT together with its model-dir
    `config` (`weights` is then only recorded). sampler / steps None: the objective's defaults (DDPM: ddpm,
    250 steps; flow: the sampler the model dir records, 50 steps); guidance_low / guidance_high (flow models
    only) None: the recorded guidance interval. ValueError for bad arguments; resuming into a directory of
    other settings is refused by name.
    """
    model, config, model_dir, device = _resolve_model(model, config, weights, device)
    sampler, steps, flow_settings = _resolve_sampler(config, sampler, steps, guidance_low, guidance_high)
    _check_arguments(sampler, num_samples, batch_size, steps)
    if flow_settings and guidance_channels not in ("all", None):
        raise ValueError("guidance_channels applies to DDPM models; a flow model guides all channels")
    num_classes = int(config["model"]["num_classes"])
    class_list = parse_classes(classes, num_classes)
    guided = _check_guidance(model, cfg_scale, guidance_channels, num_classes)
    interval = flow_settings.get("guidance_interval", [0.0, 1.0])
    diffusion, model_fn = sampling_parts(
        model, config["diffusion"], sampler, steps, cfg_scale, device, *interval
    )
    job = dict(
        guidance_channels=guided, cfg_scale=float(cfg_scale), device=device, batch_size=batch_size,
        class_list=class_list, seed=seed, num_classes=num_classes, diffusion=diffusion, sampler=sampler,
        latent_shape=tuple(config["data"]["latent_shape"]), out_dir=Path(out_dir), model_fn=model_fn,
        decode=build_decoder(config["data"], vae_dir=vae_dir, device=device),  # data/vae.py's codec
        flow_settings=flow_settings,
    )  # fmt: skip
    log = log or (lambda message: print(message, file=sys.stderr, flush=True))
    with process_group(device) as (rank, world):
        # The image shape is part of a run's identity; one decode of zeros finds it for any codec.
        image_shape = _image_shape(job)
        settings = _settings(config, model_dir, job, image_shape, weights=weights, steps=steps, vae_dir=vae_dir,
                             count=num_samples)  # fmt: skip
        _sample_on_rank(model, job, settings, rank, world, log)
    return {**settings, "complete": True, "npz": NPZ_NAME}


# ----------------------------------------------------------------------------------------------- CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """CLI of `dtr-scale sample`."""
    parser.add_argument("--model", required=True, help="model directory written by `dtr-scale convert`")
    parser.add_argument("--out", required=True, help="output directory (re-running resumes)")
    parser.add_argument("--num-samples", type=int, default=50_000, help="total images over all ranks")
    parser.add_argument("--batch-size", type=int, default=32, help="images per forward pass on one rank")
    parser.add_argument(
        "--steps", type=int, default=None,
        help="sampling steps (DDPM: respacing of the 1000, default 250; flow: default 50)",
    )  # fmt: skip
    parser.add_argument(
        "--sampler", choices=SAMPLERS, default=None,
        help="DDPM models: ddpm (ancestral, the DiT paper; default) or ddim (eta 0); flow models: euler, heun "
        "(ODE) or sde (Euler-Maruyama, REPA's default); default: the one the model dir records",
    )  # fmt: skip
    parser.add_argument("--guidance-low", type=finite_float, default=None,
                        help="flow models: CFG only for t >= this (default 0)")  # fmt: skip
    parser.add_argument("--guidance-high", type=finite_float, default=None,
                        help="flow models: CFG only for t <= this (default 1)")  # fmt: skip
    parser.add_argument(
        "--cfg-scale", type=finite_float, default=1.5, help="classifier-free guidance; 1.0 = none"
    )
    parser.add_argument(
        "--guidance-channels", default="all", choices=("all", "3"),
        help="latent channels CFG applies to: all (DTR) or 3 (reference DiT)",
    )  # fmt: skip
    parser.add_argument(
        "--weights", choices=("ema", "model"), default="ema", help="EMA (default) or raw weights"
    )
    parser.add_argument("--seed", type=int, default=0, help="sample i draws from SeedSequence([seed, i])")
    parser.add_argument("--vae", default=None, help="diffusers VAE directory (default: the one recorded)")
    parser.add_argument("--classes", default="uniform", help="'uniform' or comma-separated class indices")
    parser.add_argument("--device", default=None, help="default: cuda:LOCAL_RANK if available, else cpu")


def run(args: argparse.Namespace) -> int:
    """`dtr-scale sample`: sample into --out on every rank of the launch; prints the npz path on rank 0;
    returns 0."""
    result = sample_to_dir(
        args.model,
        args.out,
        num_samples=args.num_samples,
        batch_size=args.batch_size,
        steps=args.steps,
        sampler=args.sampler,
        cfg_scale=args.cfg_scale,
        guidance_channels=args.guidance_channels,
        weights=args.weights,
        seed=args.seed,
        vae_dir=args.vae,
        classes=args.classes,
        device=args.device,
        guidance_low=args.guidance_low,
        guidance_high=args.guidance_high,
    )
    if launcher_ranks()[0] == 0:
        print(json.dumps({"npz": str(Path(args.out) / NPZ_NAME), "count": result["count"]}))
    return 0
