"""Errors that are the user's to fix, not the program's: the CLI prints them as one line and exits 2.

`dtr-scale SUBCOMMAND` turns a `UserError` (and the standard ValueError / OSError that library code raises for
bad values and for paths that are missing, directories or unreadable) into `dtr-scale SUBCOMMAND: error: MESSAGE` on rank 0 only,
with exit status 2 on every rank: a config typo on 32 GPUs is one line, not 32 tracebacks. Set
DTR_SCALE_DEBUG=1 to get the traceback instead.
"""

from __future__ import annotations


class UserError(Exception):
    """An expected failure caused by the run's inputs (config, files, data, checkpoints); the message names
    the key, file or value and says what was expected."""


class CheckpointError(UserError, RuntimeError):
    """A checkpoint that cannot be resumed as asked (incomplete, unsafe, other world size or clusters)."""


class NonFiniteLossError(UserError, FloatingPointError):
    """Training stopped on non-finite losses (train.max_nonfinite_steps in a row, or one that DeepSpeed applied);
    the message names the step and the last complete checkpoint to resume from."""


def finite_float(text: str) -> float:
    """argparse `type=` for a float flag: a finite number ("nan" and "inf" parse as floats and would pass every
    range check, e.g. a NaN guidance scale draws NaN images); argparse prints the error and exits 2."""
    import argparse
    import math

    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


def positive_int(text: str) -> int:
    """argparse `type=` for a count flag (samples, steps, threads): an integer >= 1."""
    import argparse

    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def fraction(text: str) -> float:
    """argparse `type=` for a share or probability flag: a number in [0, 1]."""
    import argparse

    value = finite_float(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1], got {text!r}")
    return value
