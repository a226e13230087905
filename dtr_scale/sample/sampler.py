"""`dtr-scale sample`: draw class-conditional samples from a model directory on any number of processes.

    dtr-scale sample --model MODEL_DIR --out DIR [--num-samples N] [--steps 250] [--sampler ddpm|ddim]
                     [--cfg-scale 1.5] [--guidance-channels all|3] [--weights ema|model] [--seed 0]
                     [--vae DIR] [--classes 0,1,2 | uniform]
    torchrun --nproc_per_node 8 -m dtr_scale sample ...       (or the deepspeed launcher, or Slurm + torchrun)

Output: DIR/%06d.png for every sample index, then DIR/samples.npz (`arr_0` uint8 NHWC with 3 channels,
the ADM evaluator's convention; `arr_1` int64 labels) and DIR/samples.json (the settings that made them).

Seeding. The issue asked for one generator per rank seeded `seed * world + rank`. That makes the
images depend on the number of processes and on the batch size. Here every sample index i owns its own
generator, seeded from `numpy.random.SeedSequence([seed, i])`, which draws (in this order) its uniform
label, its starting noise x_T and, for DDPM, its noise at every step. So sample i is the same image
whatever the world size, batch size or resume history (up to float non-associativity of batched
kernels), and streams of different indices never overlap: determinism and disjointness both hold.

Work split: index i belongs to global rank `i % world`; a rank samples only its indices whose PNG is
missing, so re-running the same command resumes (PNGs are written under a temporary name and renamed, so
a killed run never leaves a half-written one). All ranks must see the same DIR (a shared file system on
multi-node runs): rank 0 waits for every rank and then assembles samples.npz from the PNGs.

Guidance: eps = eps_uncond + s * (eps_cond - eps_uncond) (Ho & Salimans 2022) with the null label
`num_classes`, on all latent channels (DTR's choice) or the first 3 (the reference DiT's sample.py).
cfg_scale 1.0 runs the conditional model alone (no doubled batch).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image

import dtr_scale
from dtr_scale.data.images import to_uint8_nhwc
from dtr_scale.diffusion.sampling import denoise, guided_model_fn
from dtr_scale.fileio import atomic_path, atomic_write_text
from dtr_scale.models.dit import DiT
from dtr_scale.models.model_dir import load_model_dir, validate_config

SAMPLERS = ("ddpm", "ddim")
NPZ_NAME = "samples.npz"
JSON_NAME = "samples.json"
FORMAT_NAME = "dtr-scale-samples"
# Settings that decide what image index i is: a resumed run must use the same ones.
_IDENTITY_KEYS = ("model_step", "model_tag", "sampler", "steps", "cfg_scale", "guidance_channels", "weights")
_IDENTITY_KEYS += ("seed", "classes", "image_shape")


# ----------------------------------------------------------------------------------------------- seeds


def sample_generator(seed: int, index: int) -> torch.Generator:
    """The CPU generator that owns sample `index`: seeded from SeedSequence([seed, index]), so distinct
    indices get independent, non-overlapping streams."""
    if seed < 0 or index < 0:
        raise ValueError(f"seed and sample index must be >= 0, got seed={seed}, index={index}")
    state = np.random.SeedSequence([seed, index]).generate_state(1, dtype=np.uint64)[0]
    return torch.Generator("cpu").manual_seed(int(state))


def _draw_label(generator: torch.Generator, num_classes: int) -> int:
    # Always drawn first, even with an explicit class list, so that x_T does not depend on `classes`.
    return int(torch.randint(num_classes, (1,), generator=generator))


def sample_label(seed: int, index: int, classes: list[int] | None, num_classes: int) -> int:
    """Label of sample `index`: `classes` cycled in order, or uniform from the sample's own generator."""
    uniform = _draw_label(sample_generator(seed, index), num_classes)
    return uniform if classes is None else classes[index % len(classes)]


def parse_classes(text: str | list[int] | None, num_classes: int) -> list[int] | None:
    """`uniform` or None -> None; "3,1,4" or a list -> the validated list of class indices."""
    if text is None or text == "uniform":
        return None
    values = text if isinstance(text, list) else [v for v in str(text).split(",") if v.strip()]
    try:
        classes = [int(v) for v in values]
    except ValueError as err:
        raise ValueError(
            f"--classes must be 'uniform' or comma-separated class indices, got {text!r}"
        ) from err
    bad = [c for c in classes if not 0 <= c < num_classes]
    if not classes or bad:
        raise ValueError(
            f"--classes {text!r}: class indices must lie in 0..{num_classes - 1} (got {bad or 'none'})"
        )
    return classes


# ----------------------------------------------------------------------------------------------- processes


@contextlib.contextmanager
def _process_group(device: torch.device) -> Iterator[tuple[int, int]]:
    """(rank, world): an initialised torch.distributed group, or one started from RANK/WORLD_SIZE
    (and MASTER_ADDR/MASTER_PORT) set by torchrun / the deepspeed launcher, or a single process."""
    if dist.is_available() and dist.is_initialized():
        yield dist.get_rank(), dist.get_world_size()
        return
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        yield 0, 1
        return
    backend = "nccl" if device.type == "cuda" else "gloo"
    # Long timeout: on a resumed run one rank may have far more missing images than another, and the
    # others wait for it at the final barrier.
    dist.init_process_group(
        backend, rank=int(os.environ["RANK"]), world_size=world, timeout=datetime.timedelta(hours=12)
    )
    try:
        yield dist.get_rank(), dist.get_world_size()
    finally:
        dist.destroy_process_group()


def _barrier(world: int, device: torch.device) -> None:
    if world > 1:
        if dist.get_backend() == "nccl":
            dist.barrier(device_ids=[device.index or 0])
        else:
            dist.barrier()


def rank_indices(num_samples: int, rank: int, world: int) -> list[int]:
    """The sample indices that global `rank` owns: i % world == rank (disjoint; their union is all)."""
    return list(range(rank, num_samples, world))


def default_device() -> torch.device:
    """cuda:LOCAL_RANK where CUDA is present, else the CPU."""
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count())
        torch.cuda.set_device(device)
        return device
    return torch.device("cpu")


# ----------------------------------------------------------------------------------------------- sampling


def _png_path(out_dir: Path, index: int) -> Path:
    return out_dir / f"{index:06d}.png"


def _write_png(path: Path, image: np.ndarray) -> None:
    with atomic_path(path) as tmp:
        Image.fromarray(image[:, :, 0] if image.shape[2] == 1 else image).save(tmp, format="PNG")


def _read_png_rgb(path: Path) -> np.ndarray:
    with Image.open(path) as img:
        array = np.asarray(img)
    if array.ndim == 2:
        array = array[:, :, None]
    return np.repeat(array, 3, axis=2) if array.shape[2] == 1 else array[:, :, :3]


def _decoder(
    config: dict[str, Any], where: Path | None, vae_dir: str | os.PathLike | None, device: torch.device
):
    """The model dir's data section's decoder (built-in pixel codec or a diffusers VAE; data/vae.py)."""
    from dtr_scale.data.vae import build_decoder

    return build_decoder(config["data"], vae_dir=vae_dir, device=device)


def _check_resume(out_dir: Path, settings: dict[str, Any]) -> None:
    path = out_dir / JSON_NAME
    if not path.is_file():
        return
    try:
        previous = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON ({err}); remove it or choose another --out") from err
    changed = {k: (previous.get(k), settings[k]) for k in _IDENTITY_KEYS if previous.get(k) != settings[k]}
    if changed:
        detail = ", ".join(f"{k}: {old!r} -> {new!r}" for k, (old, new) in changed.items())
        raise ValueError(
            f"{out_dir} holds samples made with other settings ({detail}); resuming would mix them. "
            "Use another --out or the same settings."
        )


def _write_json(path: Path, document: dict[str, Any]) -> None:
    atomic_write_text(path, json.dumps(document, indent=2) + "\n")


def _assemble(out_dir: Path, settings: dict[str, Any], classes: list[int] | None, num_classes: int) -> None:
    """Rank 0, after every rank finished: samples.npz from the PNGs, then samples.json with complete=True."""
    count, seed = settings["count"], settings["seed"]
    missing = [i for i in range(count) if not _png_path(out_dir, i).is_file()]
    if missing:
        raise RuntimeError(
            f"{out_dir}: {len(missing)} of {count} PNGs are missing after sampling (first {missing[:5]}); "
            "did a rank fail, or do the ranks not share this directory?"
        )
    images = np.stack([_read_png_rgb(_png_path(out_dir, i)) for i in range(count)])
    labels = np.array([sample_label(seed, i, classes, num_classes) for i in range(count)], dtype=np.int64)
    with atomic_path(out_dir / NPZ_NAME) as tmp, open(tmp, "wb") as handle:
        np.savez(handle, arr_0=images, arr_1=labels)
    _write_json(out_dir / JSON_NAME, {**settings, "complete": True, "npz": NPZ_NAME})


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
    model_fn = guided_model_fn(model, job["cfg_scale"], job["device"])
    batch_size, class_list = job["batch_size"], job["class_list"]
    try:
        for start in range(0, len(todo), batch_size):
            batch = todo[start : start + batch_size]
            generators = [sample_generator(job["seed"], i) for i in batch]
            uniform = [_draw_label(g, job["num_classes"]) for g in generators]
            labels = uniform if class_list is None else [class_list[i % len(class_list)] for i in batch]
            y = torch.tensor(labels, device=job["device"], dtype=torch.long)
            latents = denoise(
                job["diffusion"], model_fn, job["sampler"], generators, y, job["latent_shape"], job["device"]
            )
            with torch.no_grad():
                images = to_uint8_nhwc(job["decode"](latents))
            for index, image in zip(batch, images):
                _write_png(_png_path(job["out_dir"], index), image)
            log(f"sample: rank {rank}: {min(start + batch_size, len(todo))}/{len(todo)}")
    finally:
        model.train(was_training)
        model.guidance_channels = previous_channels


def sample_to_dir(
    model: str | os.PathLike | DiT,
    out_dir: str | os.PathLike,
    *,
    config: dict[str, Any] | None = None,
    num_samples: int = 50_000,
    batch_size: int = 32,
    steps: int = 250,
    sampler: str = "ddpm",
    cfg_scale: float = 1.5,
    guidance_channels: str | int = "all",
    weights: str = "ema",
    seed: int = 0,
    vae_dir: str | os.PathLike | None = None,
    classes: str | list[int] | None = None,
    device: str | torch.device | None = None,
    log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Sample `num_samples` images into `out_dir` (PNGs + samples.npz + samples.json); returns the
    samples.json document. Every rank of an initialised torch.distributed group (or of a RANK/WORLD_SIZE
    launch) must call it with the same arguments. Images are uint8 RGB (H, W, 3); sample i's noise and
    label come from its own generator (seed, i), so the result does not depend on the number of ranks.

    `model` is a model directory (its `weights` are loaded), or a live DiT together with its model-dir
    `config` (`weights` is then only recorded). ValueError for bad arguments; resuming into a directory of
    other settings is refused by name.
    """
    if sampler not in SAMPLERS:
        raise ValueError(f"sampler must be one of {SAMPLERS}, got {sampler!r}")
    if num_samples < 1 or batch_size < 1 or steps < 1:
        raise ValueError(
            f"num_samples, batch_size and steps must be >= 1, got {num_samples}, {batch_size}, {steps}"
        )
    model, config, model_dir, device = _resolve_model(model, config, weights, device)
    num_classes = int(config["model"]["num_classes"])
    class_list = parse_classes(classes, num_classes)
    guided = _check_guidance(model, cfg_scale, guidance_channels, num_classes)
    from dtr_scale.diffusion import create_diffusion

    schedule = config["diffusion"]
    diffusion = create_diffusion(
        timestep_respacing=f"ddim{steps}" if sampler == "ddim" else str(steps),
        noise_schedule=schedule["noise_schedule"],
        learn_sigma=schedule["learn_sigma"],
        diffusion_steps=schedule["diffusion_steps"],
    )
    decode = _decoder(config, model_dir, vae_dir, device)
    latent_shape = tuple(config["data"]["latent_shape"])
    out_dir = Path(out_dir)
    log = log or (lambda message: print(message, file=sys.stderr, flush=True))
    with _process_group(device) as (rank, world):
        # The image shape is part of a run's identity; one decode of zeros finds it for any codec.
        with torch.no_grad():
            probe = to_uint8_nhwc(decode(torch.zeros(1, *latent_shape, device=device)))
        settings = {
            "format": FORMAT_NAME,
            "package_version": dtr_scale.__version__,
            "model": str(model_dir.resolve()) if model_dir is not None else None,
            "model_step": int(config["train"]["step"]),
            "model_tag": config["train"]["tag"],
            "model_run_dir": config["train"]["run_dir"],
            "weights": weights,
            "sampler": sampler,
            "steps": int(steps),
            "cfg_scale": float(cfg_scale),
            "guidance_channels": guided,
            "vae": {"identity": config["data"]["vae"], "dir": str(vae_dir) if vae_dir is not None else None},
            "seed": int(seed),
            "seeding": "per sample index i: torch CPU generator seeded by numpy SeedSequence([seed, i])",
            "classes": "uniform" if class_list is None else class_list,
            "count": int(num_samples),
            "image_shape": [int(probe.shape[1]), int(probe.shape[2]), 3],
            "complete": False,
        }
        out_dir.mkdir(parents=True, exist_ok=True)
        _check_resume(out_dir, settings)
        _barrier(world, device)  # every rank has checked the old samples.json before rank 0 replaces it
        if rank == 0:
            _write_json(out_dir / JSON_NAME, settings)
        owned = rank_indices(num_samples, rank, world)
        todo = [i for i in owned if not _png_path(out_dir, i).is_file()]
        log(f"sample: rank {rank}/{world}: {len(todo)} of {len(owned)} images to draw")
        job = dict(
            guidance_channels=guided, cfg_scale=float(cfg_scale), device=device, batch_size=batch_size,
            class_list=class_list, seed=seed, num_classes=num_classes, diffusion=diffusion, sampler=sampler,
            latent_shape=latent_shape, decode=decode, out_dir=out_dir,
        )  # fmt: skip
        _draw(model, job, todo, log, rank)
        _barrier(world, device)
        if rank == 0:
            _assemble(out_dir, settings, class_list, num_classes)
        _barrier(world, device)  # nobody returns before samples.npz exists
    return {**settings, "complete": True, "npz": NPZ_NAME}


# ----------------------------------------------------------------------------------------------- CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """CLI of `dtr-scale sample`."""
    parser.add_argument("--model", required=True, help="model directory written by `dtr-scale convert`")
    parser.add_argument("--out", required=True, help="output directory (re-running resumes)")
    parser.add_argument("--num-samples", type=int, default=50_000, help="total images over all ranks")
    parser.add_argument("--batch-size", type=int, default=32, help="images per forward pass on one rank")
    parser.add_argument("--steps", type=int, default=250, help="sampling steps (respacing of the 1000)")
    parser.add_argument("--sampler", choices=SAMPLERS, default="ddpm")
    parser.add_argument("--cfg-scale", type=float, default=1.5, help="classifier-free guidance; 1.0 = none")
    parser.add_argument(
        "--guidance-channels", default="all", choices=("all", "3"),
        help="latent channels CFG applies to: all (DTR) or 3 (reference DiT)",
    )  # fmt: skip
    parser.add_argument("--weights", choices=("ema", "model"), default="ema")
    parser.add_argument("--seed", type=int, default=0)
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
    )
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps({"npz": str(Path(args.out) / NPZ_NAME), "count": result["count"]}))
    return 0
