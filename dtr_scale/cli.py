"""One entry point, `dtr-scale SUBCOMMAND ...` (also `python -m dtr_scale ...`).

Thin by design: each subcommand lives in the library module that does the work, which exposes
`add_arguments(parser)` and `run(args) -> int`. This file only maps names to modules, so that
`--help` stays fast (modules are imported lazily) and the library stays importable without argparse.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from dtr_scale.errors import UserError

# subcommand -> (module, one-line help)
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "prepare-builtin": ("dtr_scale.data.builtin", "write the bundled MNIST latents as shards"),
    "preprocess": ("dtr_scale.data.preprocess", "encode an image folder to WebDataset latent shards"),
    "train": ("dtr_scale.train.cli", "train a DiT (DTR + ANT) with DeepSpeed"),
    "cluster": ("dtr_scale.train.cluster", "ANT interval clustering of the timesteps"),
    "affinity": ("dtr_scale.train.affinity", "task-affinity matrix of timestep groups from a checkpoint"),
    "convert": ("dtr_scale.sample.convert", "DeepSpeed checkpoint -> safetensors model dir"),
    "sample": ("dtr_scale.sample.sampler", "sample images (multi-process) -> PNGs + npz"),
    "evaluate": ("dtr_scale.sample.evaluate", "FID / KID / precision / recall of a sample npz"),
    "demo": ("dtr_scale.demo", "the whole chain on the built-in dataset, on CPU"),
}


def _build_parser(argv: list[str]) -> tuple[argparse.ArgumentParser, object | None]:
    parser = argparse.ArgumentParser(prog="dtr-scale", description=__doc__.splitlines()[0])
    # The deepspeed launcher inserts --local_rank before the subcommand; ranks come from the environment.
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    sub = parser.add_subparsers(dest="command", metavar="SUBCOMMAND")
    chosen = next((a for a in argv if a in SUBCOMMANDS), None)  # not a flag's value (--local_rank 0)
    module = None
    for name, (module_name, help_text) in SUBCOMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if name == chosen:
            module = importlib.import_module(module_name)
            module.add_arguments(p)
    return parser, module


def main(argv: list[str] | None = None) -> int:
    """Run `dtr-scale ARGV` (default: sys.argv[1:]); returns the exit status (2 for a usage or user error)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser, module = _build_parser(argv)
    args, unknown = parser.parse_known_args(argv)
    args.argv = ["dtr-scale", *argv]  # the command line, for files that record what made them
    if args.command is None or module is None:
        parser.print_help()
        return 2
    # Subcommands that take free `key.sub=value` overrides declare `accepts_overrides = True`.
    if unknown:
        if getattr(module, "accepts_overrides", False):
            args.overrides = list(getattr(args, "overrides", []) or []) + unknown
        else:
            parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    # Name DeepSpeed's accelerator up front (as the Makefile does), so it does not warn on every run.
    if "DS_ACCELERATOR" not in os.environ:
        import torch

        os.environ["DS_ACCELERATOR"] = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        return int(module.run(args) or 0)
    # OSError: a path the user gave that is missing, a directory or unreadable.
    except (UserError, ValueError, OSError) as err:
        if os.environ.get("DTR_SCALE_DEBUG"):
            raise
        # One line on rank 0 (every rank usually meets the same error; an error with `every_rank` set is
        # printed by the rank that met it too); exit 2 everywhere.
        from dtr_scale.distributed import launcher_ranks

        try:
            rank = launcher_ranks()[0]
        except ValueError:  # a malformed RANK: still say what went wrong
            rank = 0
        if rank == 0 or getattr(err, "every_rank", False):  # e.g. a disk full on one node: that rank says so
            print(f"dtr-scale {args.command}: error: {err}", file=sys.stderr, flush=True)
        return 2


if __name__ == "__main__":
    sys.exit(main())
