"""Training-step time of the ANT loss balancers relative to none (plain mean loss).

Every method trains its own copy of the same DiT (same initial weights) with AdamW on the same
batch, with stratified timesteps over k uniform clusters: forward, per-sample diffusion loss,
per-cluster means, the balancer's scalar, backward, optimizer step. nash and pcgrad additionally
compute the Gram matrix of the per-cluster gradients on their update steps (nash every 25 steps,
pcgrad every step) and solve for their weights, in one of two ways:

- ``retain``: ``global_cluster_gram`` on the training graph: k extra backward passes of the whole batch;
- ``split``:  ``global_cluster_gram_from_fn``: one forward+backward per cluster on its own samples,
  about one extra forward+backward of the batch in total.

Methods alternate block by block (a block is ``--block`` steps, default 25 so that every nash block
holds exactly one update) for ``--rounds`` rounds after a warm-up block each. Reports the median
per-step time of each method over rounds and its ratio to none, as one markdown table.

    python bench/balancers.py                                   # DiT-S/4 on 32x32x4, batch 16, k 8
    python bench/balancers.py --model DiT-B/2 --batch 32 --device cuda --rounds 5
"""

from __future__ import annotations

import argparse
import copy
import statistics

import torch
from common import timed

from dtr_scale.diffusion import create_diffusion
from dtr_scale.models.dit import DiT_models
from dtr_scale.mtl.balancers import build
from dtr_scale.mtl.cluster_losses import per_cluster_mean
from dtr_scale.mtl.clustering import uniform_intervals
from dtr_scale.mtl.gram import global_cluster_gram, global_cluster_gram_from_fn
from dtr_scale.mtl.sampling import TimestepSampler

METHODS = ("none", "uw", "nash/retain", "nash/split", "pcgrad/retain", "pcgrad/split")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="DiT-S/4", choices=sorted(DiT_models))
    parser.add_argument("--input-size", type=int, default=32)
    parser.add_argument("--in-channels", type=int, default=4)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--k", type=int, default=8, help="number of timestep clusters")
    parser.add_argument("--block", type=int, default=25, help="steps per method per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (CPU)")
    return parser.parse_args(argv)


class Trainer:
    """One method's model, optimizer and balancer; ``step`` runs one full training step."""

    def __init__(self, method: str, base_model: torch.nn.Module, k: int) -> None:
        name, _, self.gram_mode = method.partition("/")
        self.model = copy.deepcopy(base_model)
        self.balancer = build(name, k).to(next(self.model.parameters()).device)
        groups = [{"params": list(self.model.parameters())}, *self.balancer.param_groups(1e-4)]
        self.optimizer = torch.optim.AdamW(groups, lr=1e-4, weight_decay=0.0)
        self.k = k
        self.steps = 0

    def step(self, diffusion, x, y, t, cluster_idx, noise) -> None:
        params = list(self.model.parameters())

        def losses(select: torch.Tensor | slice) -> torch.Tensor:
            return diffusion.training_losses(
                self.model, x[select], t[select], {"y": y[select]}, noise[select]
            )["loss"]

        per_sample = losses(slice(None))
        means, counts = per_cluster_mean(per_sample, cluster_idx, self.k)
        if self.balancer.should_update(self.steps):
            if self.gram_mode == "split":
                G = global_cluster_gram_from_fn(params, lambda i: losses(cluster_idx == i).mean(), self.k)
            else:
                G = global_cluster_gram(params, means)
            self.balancer.update_from_gram(G)
        self.optimizer.zero_grad(set_to_none=True)
        self.balancer(means, counts).backward()
        self.optimizer.step()
        self.steps += 1


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    base = DiT_models[args.model](input_size=args.input_size, in_channels=args.in_channels, num_classes=10)
    base = base.to(device).train()
    diffusion = create_diffusion("")
    sampler = TimestepSampler(1000, uniform_intervals(1000, args.k))
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(args.batch, args.in_channels, args.input_size, args.input_size, generator=gen).to(device)
    y = torch.randint(0, 10, (args.batch,), generator=gen).to(device)
    noise = torch.randn(x.shape, generator=gen).to(device)
    t, cluster_idx = sampler.sample(args.batch, generator=gen, device=device)

    trainers = {method: Trainer(method, base, args.k) for method in args.methods}
    per_step: dict[str, list[float]] = {method: [] for method in args.methods}
    for round_index in range(args.rounds + 1):  # round 0 is the warm-up
        for method, trainer in trainers.items():

            def block(trainer: Trainer = trainer) -> None:
                for _ in range(args.block):
                    trainer.step(diffusion, x, y, t, cluster_idx, noise)

            seconds, _ = timed(block, device)
            if round_index > 0:
                per_step[method].append(seconds / args.block)

    params = sum(p.numel() for p in base.parameters())
    print(
        f"{args.model} ({params / 1e6:.1f}M params), latent {args.in_channels}x{args.input_size}^2, "
        f"batch {args.batch}, k {args.k}, device {device}"
        + (f" ({args.threads} threads)" if device.type == "cpu" else "")
        + f", {args.rounds} rounds of {args.block} steps"
    )
    print("| method | ms/step (median of rounds) | ratio to none |\n|---|---|---|")
    reference = statistics.median(per_step["none"]) if "none" in per_step else None
    for method, times in per_step.items():
        median = statistics.median(times)
        ratio = f"{median / reference:.3f}x" if reference else "-"
        print(f"| {method} | {1000 * median:.1f} | {ratio} |")


if __name__ == "__main__":
    main()
