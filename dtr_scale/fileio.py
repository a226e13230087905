"""Files that are complete or absent: one atomic-write helper and fsync, used by every writer in dtr-scale.

A writer gets a temporary path beside the target (hidden, unique to the process), writes it, and only a
finished file is renamed over the target (`os.replace`: atomic on POSIX file systems). A crash or an
exception leaves the old file (or none) and removes the temporary one.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, *, durable: bool = False) -> Iterator[Path]:
    """Yield a temporary path to write `path`'s new content to; on success it is renamed to `path`.

    durable=True also fsyncs the file before the rename and the directory after it (checkpoints), so the
    new content survives a power loss, not only a crash of the process.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        yield tmp
        if durable:
            fsync_path(tmp)
        os.replace(tmp, path)
        if durable:
            fsync_path(path.parent)
    finally:
        if tmp.exists():
            tmp.unlink()


def atomic_write_text(path: str | os.PathLike, text: str, *, durable: bool = False) -> None:
    """Write `text` (UTF-8) to `path` atomically (see `atomic_path`)."""
    with atomic_path(path, durable=durable) as tmp:
        tmp.write_text(text, encoding="utf-8")


def fsync_path(path: str | os.PathLike) -> None:
    """fsync a file or a directory (a directory's fsync makes the names it holds durable; POSIX)."""
    path = Path(path)
    flags = os.O_RDONLY | (os.O_DIRECTORY if path.is_dir() else 0)
    fd = os.open(path, flags)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def sha256_file(path: str | os.PathLike) -> str:
    """Hex sha256 of a file's content, read in 1 MiB blocks (shard, weights and sample-file identities)."""
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@contextlib.contextmanager
def atomic_directory(out_dir: str | os.PathLike, marker: str) -> Iterator[Path]:
    """Yield a temporary directory beside `out_dir` to fill; on success it replaces `out_dir` by renames.

    A reader sees the old directory or the complete new one, never a half-written one. An existing `out_dir`
    is replaced only if it holds the file `marker` (i.e. it is a directory of the same kind, written before);
    any other non-empty path is left alone (FileExistsError naming it). On an exception the temporary
    directory is removed and `out_dir` is untouched.
    """
    out_dir = Path(out_dir).resolve()  # "." or "x/.." have no name to put a temporary sibling beside
    if out_dir.exists() and (
        not out_dir.is_dir() or (any(out_dir.iterdir()) and not (out_dir / marker).is_file())
    ):
        raise FileExistsError(
            f"{out_dir} exists and is not a directory this command wrote (it has no {marker}); refusing to replace it"
        )
    tmp = out_dir.with_name(f".{out_dir.name}.tmp-{uuid.uuid4().hex[:8]}")
    tmp.mkdir(parents=True)
    try:
        yield tmp
        if out_dir.exists():
            old = out_dir.with_name(f".{out_dir.name}.old-{uuid.uuid4().hex[:8]}")
            os.replace(out_dir, old)
            os.replace(tmp, out_dir)
            shutil.rmtree(old)
        else:
            os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
