"""`dtr-scale train`: train a DiT (DTR + ANT) with DeepSpeed, or plan the run with --dry-run.

dtr-scale train --config configs/dit-xl2-dtr-ant.yaml [key.sub=value ...] [--dry-run --device cuda
    --world-size 32] [--resume TAG] [--deepspeed-config my.json]
"""

from __future__ import annotations

import argparse
import os

import torch.distributed as dist

from dtr_scale.config import ConfigError, load_config
from dtr_scale.config.loading import explain
from dtr_scale.errors import UserError

accepts_overrides = True


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """CLI of `dtr-scale train`."""
    parser.add_argument("--config", required=True, help="YAML run config (configs/*.yaml)")
    parser.add_argument("overrides", nargs="*", help="key.sub=value overrides, e.g. train.max_steps=1000")
    parser.add_argument(
        "--deepspeed-config", default=None, help="your DeepSpeed JSON, checked against the YAML"
    )
    parser.add_argument("--resume", default=None, help="checkpoint tag to resume from (default: latest)")
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="print resolved config, DeepSpeed JSON and memory estimate, then exit",
    )
    parser.add_argument(
        "--world-size", type=int, default=None, help="world size for --dry-run (default: WORLD_SIZE or 1)"
    )
    parser.add_argument(
        "--device",
        choices=("cuda", "cpu"),
        default=None,
        help="target device for --dry-run (default: this machine's): plan a GPU run from a login node",
    )
    parser.add_argument("--gpus-per-node", type=int, default=None, help="for --dry-run's memory estimate")


def run(args: argparse.Namespace) -> int:
    """`dtr-scale train`: train (or with --dry-run print the plan); returns 0. Config, data and checkpoint errors
    reach cli.py, which prints them as one line on rank 0 (errors.py)."""
    cfg = load_config(args.config, args.overrides or [])
    try:
        return _run(args, cfg)
    except ConfigError as err:  # a rule met only now (the batch layout for this world size): say where from
        raise explain(err, cfg, args.config, args.overrides or []) from None


def _run(args: argparse.Namespace, cfg) -> int:
    if args.dry_run:
        world = args.world_size if args.world_size is not None else int(os.environ.get("WORLD_SIZE", "1"))
        if world < 1:
            raise UserError(f"--world-size must be >= 1, got {world}")
        if args.gpus_per_node is not None and args.gpus_per_node < 1:
            raise UserError(f"--gpus-per-node must be >= 1, got {args.gpus_per_node}")
        from dtr_scale.train.dryrun import dry_run

        print(dry_run(cfg, world, args.deepspeed_config, args.device, args.gpus_per_node))
        return 0
    from dtr_scale.train.engine import Trainer

    trainer = Trainer(cfg, user_ds_config=args.deepspeed_config, resume_tag=args.resume)
    trainer.fit()
    if trainer.rank == 0:
        print(
            f"done: step {trainer.step}; run dir {trainer.run_dir} (checkpoints/, tensorboard/, samples/)",
            flush=True,
        )
    if dist.is_initialized():
        dist.barrier()
        world = dist.get_world_size()
        dist.destroy_process_group()
        if world > 1:
            _exit_without_finalizing()
    return 0


def _exit_without_finalizing() -> None:
    """End a finished rank with status 0 without finalizing the interpreter.

    DeepSpeed keeps its process groups referenced (engine, ZeRO state), so destroy_process_group() cannot join
    their gloo worker threads; a worker that drops a tensor while the interpreter finalizes takes the GIL, is
    ended by CPython, and the unwind through torch's noexcept code aborts the process ("terminate called
    without an active exception", status 134) after the run succeeded, which a launcher or SLURM reads as a
    failed job. Everything is written by now (checkpoints, metrics, TensorBoard closed by fit()); loader
    worker processes exit on their own when they see their parent gone (torch's ManagerWatchdog).
    """
    import sys

    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
