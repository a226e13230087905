"""Train a small `transformers` ViT on the bundled digits as REPA's frozen encoder (`repa.encoder=DIR`).

REPA needs a frozen encoder whose patch tokens describe the data well; no pretrained DINOv2 exists on these
machines, and users of their own domain (medical, satellite, digits) train one. This is the recipe at CPU scale:

- **Model**: `transformers` `ViTModel` (a ViT-like model with a square patch grid, which `RepaEncoder` reads as
  it reads DINOv2: `last_hidden_state` without the CLS token), `--width` 96, `--layers` 4, patch 4: at 16x16
  digits a 4x4 token grid, the demo DiT's grid (DiT-S/2 on 4x8x8 latents), so `repa.resolution` stays null.
- **Objective: supervised** (cross-entropy on the digit labels, through a linear head on the *mean of the patch
  tokens*). Why: labels exist for this data and a supervised ViT reaches a useful representation in ~1 CPU
  minute, where self-supervised recipes (DINO, MAE) need far more steps and tuning to beat raw pixels; pooling
  the patch tokens (not the CLS) makes the tokens REPA aligns to carry the class. Users without labels would
  train self-supervised instead; the directory format is the same.
- **Data: the built-in *training* split only** (`dtr_scale/data/builtin.py`: 4,500 digits, 450 per class), the
  split the DiT trains on. The held-out split (50 per class), the KID reference, is never trained on; here it
  only scores the linear probe. The digit classifier that judges samples (`dtr_scale/sample/digits.py`) is
  also fitted on the training split (the two never see each other: it reads pixels, not these features).
- **Preprocessing** as `RepaEncoder` does it: images in [-1, 1], one channel repeated to three, normalised
  by the `preprocessor_config.json` written beside the weights (mean = std = 0.5, i.e. the [-1, 1] pixels as
  they are), input side `--image-size`.
- **Output**: `OUT/` written with `save_pretrained` (config.json, model.safetensors) and a ViTImageProcessor's
  preprocessor_config.json, so `repa.encoder=OUT` and `dtr-scale preprocess --repa-encoder OUT` load it
  unchanged; `OUT/probe.json`: linear-probe accuracy (scikit-learn LogisticRegression on the frozen encoder's
  mean patch token, fitted on the training split, scored on the held-out split), the same probe on a
  random-weight encoder of the same config and on raw pixels (baselines), training loss, time and settings.

    python bench/train_encoder.py --out runs/encoder-digits16      # ~1-2 min on 2 CPU cores
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dtr_scale.data.builtin import mnist_images, split_indices, to_unit_range  # noqa: E402

HELDOUT_PER_CLASS = 50  # the built-in split's default (prepare-builtin, DigitClassifier.fit_builtin)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="directory the encoder is saved to (save_pretrained)")
    p.add_argument("--image-size", type=int, default=16, choices=[16, 32], help="digit side in pixels")
    p.add_argument("--patch-size", type=int, default=4)
    p.add_argument("--width", type=int, default=96, help="hidden_size")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--epochs", type=float, default=12.0, help="passes over the training split")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-3, help="AdamW peak learning rate (cosine decay)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--limit", type=int, default=None, help="use only this many training digits (tests)")
    return p.parse_args(argv)


def build_encoder(args: argparse.Namespace):
    """A ViTModel with random weights (3 input channels, as RepaEncoder feeds it)."""
    from dtr_scale.compat import ensure_torchvision_importable

    ensure_torchvision_importable()
    from transformers import ViTConfig, ViTModel

    config = ViTConfig(
        image_size=args.image_size,
        patch_size=args.patch_size,
        num_channels=3,
        hidden_size=args.width,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        intermediate_size=4 * args.width,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    return ViTModel(config)


def pixels(images_uint8: np.ndarray) -> torch.Tensor:
    """uint8 (N, S, S) -> float32 (N, 3, S, S): [-1, 1], i.e. what RepaEncoder feeds a model whose
    preprocessor_config has mean = std = 0.5 (((x + 1) / 2 - 0.5) / 0.5 = x), one channel repeated."""
    x = torch.from_numpy(to_unit_range(images_uint8))[:, None]
    return x.expand(-1, 3, -1, -1).contiguous()


def patch_mean(encoder, x: torch.Tensor) -> torch.Tensor:
    """(N, 3, S, S) -> (N, D): the mean of the patch tokens (CLS dropped, as RepaEncoder drops it)."""
    return encoder(pixel_values=x).last_hidden_state[:, 1:].mean(dim=1)


@torch.no_grad()
def features(encoder, x: torch.Tensor, batch: int = 500) -> np.ndarray:
    encoder.eval()
    return torch.cat([patch_mean(encoder, x[i : i + batch]) for i in range(0, len(x), batch)]).numpy()


def linear_probe(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, test_y: np.ndarray) -> float:
    """Held-out accuracy of a LogisticRegression on standardised frozen features."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    probe = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000))
    return float(probe.fit(train_x, train_y).score(test_x, test_y))


def train(encoder, x: torch.Tensor, y: torch.Tensor, args: argparse.Namespace) -> list[float]:
    """Supervised training (cross-entropy through a linear head on the mean patch token); per-epoch mean loss."""
    head = torch.nn.Linear(encoder.config.hidden_size, 10)
    params = list(encoder.parameters()) + list(head.parameters())
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.05)
    steps = max(1, math.ceil(args.epochs * len(x) / args.batch))
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=args.lr, total_steps=steps, pct_start=0.1)
    g = torch.Generator().manual_seed(args.seed)
    encoder.train()
    losses, order, pos = [], torch.randperm(len(x), generator=g), 0
    for _ in range(steps):
        if pos + args.batch > len(x):
            order, pos = torch.randperm(len(x), generator=g), 0
        idx = order[pos : pos + args.batch]
        pos += args.batch
        loss = torch.nn.functional.cross_entropy(head(patch_mean(encoder, x[idx])), y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.item())
    return losses


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    images, labels = mnist_images(args.image_size)
    train_idx, heldout_idx = split_indices(labels, HELDOUT_PER_CLASS)
    if args.limit:
        train_idx = np.random.default_rng(args.seed).permutation(train_idx)[: args.limit]
    x_train, y_train = pixels(images[train_idx]), torch.from_numpy(labels[train_idx])
    x_test, y_test = pixels(images[heldout_idx]), labels[heldout_idx]

    encoder = build_encoder(args)
    random_probe = linear_probe(
        features(encoder, x_train), y_train.numpy(), features(encoder, x_test), y_test
    )
    start = time.perf_counter()
    losses = train(encoder, x_train, y_train, args)
    seconds = time.perf_counter() - start
    probe = linear_probe(features(encoder, x_train), y_train.numpy(), features(encoder, x_test), y_test)
    pixel_probe = linear_probe(
        x_train[:, 0].flatten(1).numpy(), y_train.numpy(), x_test[:, 0].flatten(1).numpy(), y_test
    )
    save(encoder.eval(), Path(args.out), args)
    record = {
        "linear_probe_accuracy": probe,
        "linear_probe_accuracy_random_init": random_probe,
        "linear_probe_accuracy_raw_pixels": pixel_probe,
        "probe": "LogisticRegression (standardised mean patch token), fitted on the training split, "
        "scored on the held-out split",
        "train_split_digits": int(len(train_idx)),
        "heldout_split_digits": int(len(heldout_idx)),
        "objective": "supervised cross-entropy on labels (linear head on the mean patch token)",
        "final_train_loss": float(np.mean(losses[-10:])),
        "train_seconds": round(seconds, 1),
        "optimizer_steps": len(losses),
        "settings": {k: v for k, v in vars(args).items() if k != "out"},
        "torch_threads": torch.get_num_threads(),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }
    (Path(args.out) / "probe.json").write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps({k: record[k] for k in list(record)[:3] + ["train_seconds"]}))
    return 0


def save(encoder, out: Path, args: argparse.Namespace) -> None:
    """save_pretrained the encoder and a ViTImageProcessor whose mean/std RepaEncoder reads (0.5: [-1, 1] as is)."""
    from transformers import ViTImageProcessor

    out.mkdir(parents=True, exist_ok=True)
    encoder.save_pretrained(out)
    size = {"height": args.image_size, "width": args.image_size}
    ViTImageProcessor(image_mean=[0.5] * 3, image_std=[0.5] * 3, size=size).save_pretrained(out)


if __name__ == "__main__":
    raise SystemExit(main())
