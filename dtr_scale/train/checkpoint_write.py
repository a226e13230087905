"""Checkpoint writes that fail plainly: a full disk (ENOSPC), an I/O error (EIO) or a vanished mount while a
checkpoint is written becomes one line naming the path, the OS error and what is still safe, on every rank
that met it, and no rank moves `latest` or leaves the half-written tag behind.

Two things stand in the way, and this module handles both:
- torch.save to a path writes through its C++ file writer, which turns ENOSPC into "basic_ios::clear" or
  "inline_container.cc ... unexpected pos" with no errno and no path. Writing through a Python file object
  that remembers its first OSError keeps it (errno and all).
- A rank that raised mid-save would leave the others waiting in DeepSpeed's barriers (or in ours). So a write
  error is recorded, not raised: the rank goes on through the same collectives as the others, skipping its
  remaining writes, and the ranks then agree (`agree`, one all_gather of the messages) before `latest` moves.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch.distributed as dist

from dtr_scale.errors import CheckpointError


class CheckpointWriteError(CheckpointError):
    """A checkpoint could not be written (ENOSPC, EIO, ...); the message names the path, the OS error and the
    checkpoint `latest` still names. `every_rank`: the CLI prints it on this rank too, not only on rank 0."""

    def __init__(self, message: str, every_rank: bool = False) -> None:
        super().__init__(message)
        self.every_rank = every_rank


class WriteFailures:
    """The first OSError this rank met while writing the current checkpoint, and where."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        """Forget the previous checkpoint's failure (called when a new checkpoint starts)."""
        self.path: str | None = None
        self.error: OSError | None = None

    def run(self, path: str | os.PathLike, write: Callable[..., Any], *args: Any) -> Any:
        """`write(*args)`, unless this checkpoint already failed on this rank; an OSError is recorded, not raised."""
        if self.error is not None:
            return None
        try:
            return write(*args)
        except OSError as err:
            self.path, self.error = str(err.filename or path), err
            return None

    def message(self) -> str | None:
        """'PATH: [Errno 28] No space left on device (ENOSPC)', or None when nothing failed."""
        if self.error is None:
            return None
        err = self.error
        code = errno.errorcode.get(err.errno, "") if err.errno is not None else ""
        text = f"[Errno {err.errno}] {err.strerror}" if err.strerror else str(err)
        return f"{self.path}: {text}" + (f" ({code})" if code else "")


class _FirstWriteError:
    """A binary file that remembers the first OSError of its `write`. torch's zip writer calls `write` from C++;
    an OSError there (a disk that fills up partway) is followed by torch's own "unexpected pos" RuntimeError
    when it closes the archive, which is what reaches the caller."""

    def __init__(self, fh) -> None:
        self.fh, self.error = fh, None

    def write(self, data) -> int:
        try:
            return self.fh.write(data)
        except OSError as err:
            self.error = self.error or err
            raise

    def flush(self) -> None:
        try:
            self.fh.flush()
        except OSError as err:
            self.error = self.error or err
            raise


class _GuardedCheckpointEngine:
    """DeepSpeed's checkpoint engine with its writes (`save`, `makedirs`) recorded by `WriteFailures`; the rest
    (load, commit, ...) is the engine's own. torch.save writes through a Python file object (see the module)."""

    def __init__(self, inner, failures: WriteFailures) -> None:
        self._inner, self._failures = inner, failures

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def save(self, state_dict, path: str) -> None:
        """Write `state_dict` to `path` (DeepSpeed's serialization setting kept), recording an OSError."""
        from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

        def write() -> None:
            if not isinstance(self._inner, TorchCheckpointEngine):
                self._inner.save(state_dict, path)
                return
            with open(path, "wb") as fh:
                recorder = _FirstWriteError(fh)
                try:  # torch.save(state_dict, recorder, <DeepSpeed's serialization setting>)
                    self._inner.save(state_dict, recorder)
                except Exception:
                    if recorder.error is not None:  # not the "unexpected pos" that followed it
                        raise recorder.error from None
                    raise

        self._failures.run(path, write)

    def makedirs(self, path, exist_ok: bool = False) -> None:
        """os.makedirs, recording an OSError."""
        self._failures.run(path, self._inner.makedirs, path, exist_ok)


def guard_engine_writes(engine, failures: WriteFailures) -> None:
    """Route a DeepSpeed engine's checkpoint writes through `failures`: its checkpoint engine, and the copy of
    `zero_to_fp32.py` into the checkpoint (a plain shutil copy on rank 0). An engine without a checkpoint engine
    (a test double) is left as it is."""
    inner = getattr(engine, "checkpoint_engine", None)
    if inner is None or isinstance(inner, _GuardedCheckpointEngine):
        return
    engine.checkpoint_engine = _GuardedCheckpointEngine(inner, failures)
    copy_script = getattr(engine, "_copy_recovery_script", None)
    if copy_script is not None:
        engine._copy_recovery_script = lambda save_path: failures.run(save_path, copy_script, save_path)


def gather_messages(message: str | None) -> list[str | None]:
    """Every rank's failure message (None: wrote everything), in rank order. A collective when a group of more
    than one rank is up."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() <= 1:
        return [message]
    messages: list[str | None] = [None] * dist.get_world_size()
    dist.all_gather_object(messages, message)
    return messages


def failure_error(messages: list[str | None], rank: int, tag: str, still_safe: str) -> CheckpointWriteError:
    """The error this rank raises when some rank failed to write checkpoint `tag`: a rank that failed names its
    own path and error (printed on that rank); rank 0 names the first failing rank's otherwise; the other ranks
    stay quiet (their error is not printed)."""
    own = messages[rank]
    if own is not None:
        return CheckpointWriteError(
            f"rank {rank}: checkpoint {tag} not written: {own}; {still_safe}", every_rank=True
        )
    first = next(r for r, m in enumerate(messages) if m is not None)
    return CheckpointWriteError(
        f"checkpoint {tag} not written: rank {first} could not write {messages[first]}; {still_safe}"
    )


def latest_now(checkpoints_dir: Path) -> tuple[str | None, str]:
    """(the tag `latest` names now or None, what that leaves safe: 'latest stays at step N (DIR), ...')."""
    from dtr_scale.checkpoint_format import TAG_RE, read_latest

    try:
        tag = read_latest(checkpoints_dir)
    except (OSError, CheckpointError) as err:
        return None, f"latest could not be read ({err})"
    if tag is None:
        return None, "no checkpoint has been written yet (a rerun starts from step 0)"
    match = TAG_RE.match(tag)
    step = int(match.group(1)) if match else tag
    return tag, f"latest stays at step {step} ({checkpoints_dir / tag}), which a rerun resumes from"
