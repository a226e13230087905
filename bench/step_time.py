"""Training-step time of DiT with and without DTR routing (forward + backward, no optimizer step).

Both models hold the same weights and see the same batch (mixed timesteps, so every sample picks its
own mask row). After a warm-up, steps alternate between the two models one by one in ABBA order, so
that load from other processes hits both alike. Reports the median step time of each and the ratio
DTR / plain: of the median wall times, as the median ratio of neighbouring (plain, DTR) step pairs,
and of the median process CPU times. Prints one markdown table row (the header with --header).

    python bench/step_time.py                       # DiT-S/2, 32x32x4 latents, batch 8, 2 threads
    python bench/step_time.py --model DiT-B/2 --batch 4 --rounds 5 --threads 1
    python bench/step_time.py --repa [bench/repa_step_time.py options]   # REPA off / precomputed / on the fly
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import timed  # noqa: E402

from dtr_scale.models.dit import DiT, DiT_models  # noqa: E402

HEADER = (
    "| model | latent | batch | threads | device | plain ms/step | DTR ms/step | DTR/plain (medians) "
    "| DTR/plain (median of pairs) | DTR/plain (CPU time) |\n|---|---|---|---|---|---|---|---|---|---|"
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="DiT-S/2", choices=sorted(DiT_models), help="DiT configuration")
    parser.add_argument("--input-size", type=int, default=32, help="latent height and width")
    parser.add_argument("--in-channels", type=int, default=4, help="latent channels")
    parser.add_argument("--batch", type=int, default=8, help="samples per step")
    parser.add_argument("--rounds", type=int, default=10, help="rounds of --iters step pairs")
    parser.add_argument("--iters", type=int, default=3, help="timed (plain, DTR) step pairs per round")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per model before timing")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    parser.add_argument("--alpha", type=float, default=4.0, help="DTR window slope")
    parser.add_argument("--beta", type=float, default=0.8, help="DTR active channel fraction")
    parser.add_argument("--num-tasks", type=int, default=1000, help="diffusion training timesteps")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--header", action="store_true", help="print the markdown table header first")
    return parser.parse_args(argv)


def build_models(args: argparse.Namespace) -> tuple[DiT, DiT]:
    """Plain DiT and DTR DiT with identical weights."""
    torch.manual_seed(args.seed)
    factory = DiT_models[args.model]
    common = dict(input_size=args.input_size, in_channels=args.in_channels)
    plain = factory(**common)
    routing = {"alpha": args.alpha, "beta": args.beta, "num_tasks": args.num_tasks}
    routed = factory(routing=routing, **common)
    routed.load_state_dict(plain.state_dict(), strict=True)
    return plain.to(args.device).train(), routed.to(args.device).train()


def step(model: DiT, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> None:
    """One forward + backward pass with a mean-squared output as the loss."""
    model.zero_grad(set_to_none=True)
    model(x, t, y).square().mean().backward()


def timed_step(model: DiT, batch: tuple[torch.Tensor, ...], device: torch.device) -> tuple[float, float]:
    """Wall-clock and process CPU seconds of one step."""
    return timed(lambda: step(model, *batch), device)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--repa" in argv:  # the REPA comparison has its own options: bench/repa_step_time.py
        from repa_step_time import main as repa_main

        return repa_main([a for a in argv if a != "--repa"])
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    plain, routed = build_models(args)

    generator = torch.Generator().manual_seed(args.seed)
    x = torch.randn(args.batch, args.in_channels, args.input_size, args.input_size, generator=generator)
    t = torch.randint(0, args.num_tasks, (args.batch,), generator=generator)
    y = torch.randint(0, 1000, (args.batch,), generator=generator)
    batch = (x.to(device), t.to(device), y.to(device))

    models = {"plain": plain, "dtr": routed}
    for model in models.values():
        for _ in range(args.warmup):
            step(model, *batch)

    wall: dict[str, list[float]] = {"plain": [], "dtr": []}
    cpu: dict[str, list[float]] = {"plain": [], "dtr": []}
    pair_ratios = []  # DTR / plain of two neighbouring steps: load changes hit both alike
    for pair in range(args.rounds * args.iters):
        # ABBA order: neither model always runs first (warm caches, load trends).
        order = ("plain", "dtr") if pair % 2 == 0 else ("dtr", "plain")
        for name in order:
            torch.manual_seed(args.seed + pair)  # label dropout is random: the same draws for both models
            step_wall, step_cpu = timed_step(models[name], batch, device)
            wall[name].append(step_wall)
            cpu[name].append(step_cpu)
        pair_ratios.append(wall["dtr"][-1] / wall["plain"][-1])

    plain_ms = 1e3 * statistics.median(wall["plain"])
    dtr_ms = 1e3 * statistics.median(wall["dtr"])
    # CPU time of this process: less sensitive than wall time to other processes on a shared machine.
    cpu_ratio = statistics.median(cpu["dtr"]) / statistics.median(cpu["plain"])
    if args.header:
        print(HEADER)
    latent = f"{args.in_channels}x{args.input_size}x{args.input_size}"
    print(
        f"| {args.model} | {latent} | {args.batch} | {args.threads} | {device.type} | {plain_ms:.1f} | "
        f"{dtr_ms:.1f} | {dtr_ms / plain_ms:.3f} | {statistics.median(pair_ratios):.3f} | {cpu_ratio:.3f} |"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
