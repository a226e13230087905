"""Latents per second that LatentStream delivers to the trainer, against what DiT-B/2 training consumes.

Writes synthetic 4x32x32 latent shards (random posterior mean and std, float16, the real format) to a
temporary directory, then times the resampled training stream with 0, 1 and 2 DataLoader workers: the
first batch (worker start-up, first shard open) is left out of the rate, which is then measured over
`--seconds`. With `--dit` it also times forward + backward of DiT-B/2 (batch 8, 4x32x32, fp32 on CPU)
and prints the ratio loader rate / training consumption (the goal is >= 10).

    python bench/loader.py                    # 0, 1, 2 workers, batch 64, 8 shards of 500
    python bench/loader.py --world 1 2        # rank 0 of world 1 and of world 2
    python bench/loader.py --dit --threads 2  # plus the DiT-B/2 step rate

It times whichever `dtr_scale` is importable, so `PYTHONPATH=<an older checkout>` times that one with the
same script (an older stream without canonical streams is given its own default split).
"""

from __future__ import annotations

import argparse
import inspect
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from dtr_scale.data.shards import LatentSample, shard_name, write_manifest, write_shard
from dtr_scale.data.stream import LatentStream

LATENT_SHAPE = (4, 32, 32)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2], help="DataLoader worker counts")
    parser.add_argument("--batch", type=int, default=64, help="micro-batch size of the stream")
    parser.add_argument("--world", type=int, nargs="+", default=[1], help="world sizes (rank 0 is timed)")
    parser.add_argument("--canonical-streams", type=int, default=8, help="data.canonical_streams")
    parser.add_argument("--shards", type=int, default=8, help="synthetic shards to write")
    parser.add_argument("--shard-size", type=int, default=500, help="samples per shard")
    parser.add_argument("--seconds", type=float, default=8.0, help="timed seconds per worker count")
    parser.add_argument("--dit", action="store_true", help="also time DiT-B/2 forward+backward, batch 8")
    parser.add_argument("--dit-steps", type=int, default=5, help="timed DiT steps (after one warm-up)")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads for the DiT timing")
    return parser.parse_args(argv)


def write_synthetic_shards(directory: Path, num_shards: int, shard_size: int) -> Path:
    rng = np.random.default_rng(0)
    shards = []
    for j in range(num_shards):
        samples = [
            LatentSample(
                key=f"{j * shard_size + i:09d}",
                label=int(rng.integers(1000)),
                mean=rng.standard_normal((2, *LATENT_SHAPE), dtype=np.float32).astype(np.float16),
                std=rng.uniform(0.01, 0.5, (2, *LATENT_SHAPE)).astype(np.float16),
            )
            for i in range(shard_size)
        ]
        shards.append(write_shard(directory / shard_name(j), samples))
    return write_manifest(
        directory, shards, latent_shape=LATENT_SHAPE, scaling_factor=0.18215, vae={"name": "synthetic"},
        image_size=256, labels=[str(c) for c in range(1000)],
    )  # fmt: skip


def loader_rate(manifest: Path, batch: int, workers: int, seconds: float, world: int, streams: int) -> float:
    extra = (
        {"canonical_streams": streams}
        if "canonical_streams" in inspect.signature(LatentStream).parameters
        else {}
    )
    stream = LatentStream(manifest, batch, seed=0, rank=0, world_size=world, num_workers=workers, **extra)
    iterator = iter(stream)
    next(iterator)  # start-up excluded
    samples, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        latents, _ = next(iterator)
        samples += len(latents)
    return samples / (time.perf_counter() - start)


def dit_rate(steps: int, threads: int) -> float:
    from dtr_scale.models.dit import DiT_models

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = DiT_models["DiT-B/2"](input_size=32, in_channels=4, num_classes=1000)
    x, y = torch.randn(8, *LATENT_SHAPE), torch.randint(0, 1000, (8,))
    times = []
    for step in range(steps + 1):
        t = torch.randint(0, 1000, (8,))
        begin = time.perf_counter()
        model(x, t, y).square().mean().backward()
        model.zero_grad(set_to_none=True)
        if step:  # the first step is warm-up
            times.append(time.perf_counter() - begin)
    return 8 / statistics.median(times)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        manifest = write_synthetic_shards(Path(tmp), args.shards, args.shard_size)
        total = args.shards * args.shard_size
        print(f"wrote {total} samples of {LATENT_SHAPE} in {time.perf_counter() - start:.1f} s")
        print("| world | workers | batch | latents/s |\n|---|---|---|---|")
        rates = {}
        for world in args.world:
            for workers in args.workers:
                rate = loader_rate(manifest, args.batch, workers, args.seconds, world, args.canonical_streams)
                rates[workers] = rate
                print(f"| {world} | {workers} | {args.batch} | {rate:.0f} |")
    if args.dit:
        consumed = dit_rate(args.dit_steps, args.threads)
        print(f"DiT-B/2 fwd+bwd, batch 8, 4x32x32, {args.threads} threads: {consumed:.2f} samples/s "
              f"({8 / consumed:.2f} s/step)")  # fmt: skip
        for workers, rate in rates.items():
            print(f"loader / training with {workers} workers: {rate / consumed:.0f}x")


if __name__ == "__main__":
    main()
