"""Training-step time with REPA off, REPA with the encoder on the fly, and REPA with precomputed features.

One DiT (same weights in all three modes) and one batch; a step is forward + backward of the DiT, plus for
REPA the projector and the alignment loss on the tokens after block `--depth`, plus for "on the fly" the frozen
encoder's forward (no grad, eval mode) on the batch's images, as the trainer does (train/repa.py). The
encoder is a DINOv2 built from its published config (`--encoder small|base|large`: sizes of facebook/dinov2-*)
with random weights (its cost does not depend on its weights), or a local directory (`--encoder-dir`). The
images are random at `--image-size`, resized by the encoder's preprocessing to `--resolution` (REPA: 224 for
DiT-*/2 at 256 px). The VAE decode that on-the-fly REPA needs for AutoencoderKL latents is not included.
Modes are timed in rotating order, one step each, so load from other processes hits all alike; reported are
median wall times and the ratios to "off", of the medians and as the median of neighbouring-step ratios.

    python bench/repa_step_time.py --model DiT-S/2 --encoder small --batch 4 --threads 2 --header
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common import timed  # noqa: E402

from dtr_scale.models.dit import DiT_models  # noqa: E402
from dtr_scale.models.repa import build_projector, match_token_grid, repa_loss  # noqa: E402

# Published DINOv2 sizes (facebook/dinov2-{small,base,large} config.json): hidden, layers, heads, MLP width.
DINOV2 = {"small": (384, 12, 6, 1536), "base": (768, 12, 12, 3072), "large": (1024, 24, 16, 4096)}
HEADER = (
    "| model | encoder | batch | threads | device | off ms | precomputed ms | on the fly ms | precomputed/off "
    "| on the fly/off | on the fly/off (median of pairs) |\n|---|---|---|---|---|---|---|---|---|---|---|"
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="DiT-S/2", choices=sorted(DiT_models))
    p.add_argument(
        "--input-size", type=int, default=32, help="latent side (32: 256 px images with an 8x VAE)"
    )
    p.add_argument("--encoder", choices=sorted(DINOV2), default="small", help="DINOv2 size (random weights)")
    p.add_argument("--encoder-dir", default=None, help="a local transformers encoder instead of --encoder")
    p.add_argument("--resolution", type=int, default=224, help="encoder input side (REPA: 224 at 256 px)")
    p.add_argument("--image-size", type=int, default=256, help="side of the images the encoder sees")
    p.add_argument("--depth", type=int, default=None, help="REPA block (default: a third of the DiT's depth)")
    p.add_argument("--projector-dim", type=int, default=2048)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--rounds", type=int, default=6, help="timed steps per mode")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--header", action="store_true")
    return p.parse_args(argv)


def build_encoder(args: argparse.Namespace, device: torch.device, tmp: str):
    """(RepaEncoder, name): `--encoder-dir` as it is, or a random-weight DINOv2 of the published size saved to
    `tmp` with save_pretrained. RepaEncoder preprocesses as the trainer does (normalise, bicubic resize, patch
    tokens without CLS and register tokens)."""
    from dtr_scale.compat import ensure_torchvision_importable
    from dtr_scale.repa_encoder import RepaEncoder

    ensure_torchvision_importable()
    from transformers import Dinov2Config, Dinov2Model

    if args.encoder_dir:
        directory, name = args.encoder_dir, args.encoder_dir
    else:
        hidden, layers, heads, mlp = DINOV2[args.encoder]
        config = Dinov2Config(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                              intermediate_size=mlp, patch_size=14, image_size=518)  # fmt: skip
        Dinov2Model(config).save_pretrained(tmp)
        directory, name = tmp, f"DINOv2-{args.encoder} (random)"
    return RepaEncoder(directory, resolution=args.resolution, device=device), name


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(0)
    model = DiT_models[args.model](input_size=args.input_size).to(device).train()
    depth = args.depth or max(1, len(model.blocks) // 3)
    with tempfile.TemporaryDirectory() as tmp:
        encoder, encoder_name = build_encoder(args, device, tmp)
    width = model.t_embedder.mlp[2].out_features
    projector = build_projector(width, args.projector_dim, encoder.z_dim).to(device)
    hidden: list[torch.Tensor] = []
    model.blocks[depth - 1].register_forward_hook(lambda _m, _i, out: hidden.append(out))

    g = torch.Generator().manual_seed(0)
    x = torch.randn(args.batch, 4, args.input_size, args.input_size, generator=g).to(device)
    t = torch.randint(0, 1000, (args.batch,), generator=g).to(device)
    y = torch.randint(0, 1000, (args.batch,), generator=g).to(device)
    images = (torch.rand(args.batch, 3, args.image_size, args.image_size, generator=g) * 2 - 1).to(device)
    stored = encoder(images)  # precomputed: the same tokens, computed once

    def run(mode: str) -> None:
        model.zero_grad(set_to_none=True)
        projector.zero_grad(set_to_none=True)
        hidden.clear()
        loss = model(x, t, y).square().mean()
        if mode != "off":
            if mode == "on the fly":
                features = encoder(images)  # no grad, eval mode, the trainer's preprocessing
            else:
                features = stored
            target = match_token_grid(features, hidden[0].shape[1])
            loss = loss + 0.5 * repa_loss(projector(hidden[0]), target)
        loss.backward()

    modes = ["off", "precomputed", "on the fly"]
    for mode in modes * args.warmup:
        run(mode)
    wall: dict[str, list[float]] = {m: [] for m in modes}
    pairs = []
    for r in range(args.rounds):
        for mode in modes[r % 3 :] + modes[: r % 3]:  # rotating order
            wall[mode].append(timed(lambda mode=mode: run(mode), device)[0])
        pairs.append(wall["on the fly"][-1] / wall["off"][-1])
    ms = {m: 1e3 * statistics.median(v) for m, v in wall.items()}
    if args.header:
        print(HEADER)
    print(
        f"| {args.model} (REPA after block {depth}) | {encoder_name} @ {args.resolution} px | {args.batch} | "
        f"{args.threads} | {device.type} | {ms['off']:.0f} | {ms['precomputed']:.0f} | {ms['on the fly']:.0f} | "
        f"{ms['precomputed'] / ms['off']:.3f} | {ms['on the fly'] / ms['off']:.3f} | {statistics.median(pairs):.3f} |"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
