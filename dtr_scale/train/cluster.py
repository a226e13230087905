"""`dtr-scale cluster`: print (and write as JSON for `mtl.clusters_file`) ANT's interval clusters of a named
DDPM schedule's timesteps, of flow matching's bins of t (`--diffusion flow`), or of a task-affinity matrix
from `dtr-scale affinity`."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from dtr_scale.diffusion.flow import FlowMatching
from dtr_scale.diffusion.schedules import get_named_beta_schedule, snr
from dtr_scale.errors import UserError
from dtr_scale.mtl.clustering import OBJECTIVES, expand_group_intervals, interval_clustering, interval_cost


def schedule_snr(schedule: str = "linear", num_timesteps: int = 1000) -> np.ndarray:
    """Per-timestep SNR abar / (1 - abar), float64, of a named beta schedule."""
    alphas_cumprod = np.cumprod(1.0 - get_named_beta_schedule(schedule, num_timesteps))
    return snr(alphas_cumprod)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """CLI of `dtr-scale cluster`."""
    parser.add_argument(
        "--objective",
        choices=OBJECTIVES,
        default="snr",
        help="clustering cost: snr | log_snr | timestep (equal intervals) | affinity",
    )
    parser.add_argument("--k", type=int, required=True, help="number of clusters")
    parser.add_argument(
        "--diffusion", choices=("ddpm", "flow"), default="ddpm",
        help="the run's diffusion.objective: ddpm (timesteps of --schedule) or flow (T bins of t, SNR ((1-t)/t)^2)",
    )  # fmt: skip
    parser.add_argument(
        "--schedule", default=None, choices=("linear", "cosine", "squaredcos_cap_v2"),
        help="DDPM beta schedule for the SNR (linear, default; cosine = squaredcos_cap_v2)",
    )  # fmt: skip
    parser.add_argument(
        "--timesteps", type=int, default=1000, help="diffusion training timesteps T (default 1000)"
    )
    parser.add_argument(
        "--affinity",
        type=Path,
        help="task-affinity matrix .npy (T x T, or groups x groups from `dtr-scale affinity`) for --objective affinity",
    )
    parser.add_argument(
        "--out", type=Path, help="write the clusters as JSON here (for mtl.clusters_file in a config)"
    )


def _task_values(args: argparse.Namespace) -> tuple[np.ndarray, int]:
    """(what is clustered: a task-affinity matrix or the per-task SNR, tasks per group); UserError naming the
    flag."""
    T, group_size = args.timesteps, 1
    if T < 2:
        raise UserError(f"--timesteps must be >= 2 (the tasks clustered), got {T}")
    if args.out is not None and args.out.is_dir():
        raise UserError(f"--out {args.out} is a directory: expected the path of the JSON file to write")
    if args.objective == "affinity":
        if args.affinity is None:
            raise UserError("--objective affinity needs --affinity FILE.npy (see `dtr-scale affinity`)")
        try:
            values = np.load(args.affinity, allow_pickle=False)
        except (OSError, ValueError) as err:
            raise UserError(f"--affinity {args.affinity}: cannot read it as a .npy matrix ({err})") from None
        if not np.isfinite(values).all():
            raise UserError(f"--affinity {args.affinity}: the matrix holds NaN or infinity")
        n = values.shape[0] if values.ndim == 2 else 0
        if n == 0 or values.shape[1] != n or T % n != 0:
            raise UserError(
                f"{args.affinity}: expected a square matrix whose size divides --timesteps {T}, got shape {values.shape}"
            )
        group_size = T // n
    elif args.affinity is not None:
        raise UserError(f"--affinity is only used with --objective affinity, not {args.objective!r}")
    elif args.diffusion == "flow":
        if args.schedule is not None:
            raise UserError(f"--schedule {args.schedule} is a DDPM beta schedule: flow matching has none")
        values = FlowMatching(T).snr_grid()  # ((1 - t) / t)^2 at the bin centres (i + 1/2) / T
    else:
        args.schedule = args.schedule or "linear"
        values = schedule_snr(args.schedule, T)
    return values, group_size


def run(args: argparse.Namespace) -> int:
    """`dtr-scale cluster`: print (and with --out write) ANT's interval clusters; returns 0."""
    T = args.timesteps
    values, group_size = _task_values(args)
    intervals = interval_clustering(values, args.k, args.objective)
    costs = [interval_cost(values, left, right, args.objective) for left, right in intervals]
    intervals = expand_group_intervals(intervals, group_size)

    source = {"affinity": f"affinity {args.affinity}"}.get(
        args.objective,
        "flow, bins [i/T, (i+1)/T) of t" if args.diffusion == "flow" else f"{args.schedule} schedule",
    )
    print(
        f"objective {args.objective}, k={args.k}, T={T} ({source}"
        + (f", groups of {group_size})" if group_size > 1 else ")")
    )
    print(f"{'cluster':>7}  {'interval':>13}  {'size':>5}  {'share':>7}  {'cost':>12}")
    for j, ((left, right), cost) in enumerate(zip(intervals, costs)):
        size = right - left + 1
        t_range = f"  t in [{left / T:.3f}, {(right + 1) / T:.3f})" if args.diffusion == "flow" else ""
        print(
            f"{j:>7}  {f'[{left}, {right}]':>13}  {size:>5}  {100 * size / T:>6.2f}%  {cost:>12.6g}{t_range}"
        )
    total = float(sum(costs))
    print(f"total cost {total:.6g}")
    if args.out is not None:
        record = {
            "objective": args.objective,
            "k": args.k,
            "num_timesteps": T,
            # The runs the file fits: `mtl.clusters_file` refuses it under the other diffusion.objective.
            "diffusion_objective": args.diffusion,
            "schedule": args.schedule if args.objective != "affinity" else None,
            "affinity": str(args.affinity) if args.affinity is not None else None,
            "intervals": [list(pair) for pair in intervals],
            "costs": costs,
            "total_cost": total,
        }
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(record, indent=2) + "\n")
        print(f"wrote {args.out}")
    return 0
