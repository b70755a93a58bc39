"""Atomic publication of files and directories.

A reader sees either the old content or the complete new content, never a partial write: data goes
to a temporary sibling (same directory, so the same file system), is flushed and fsynced, and is then
renamed into place with `os.replace`, which POSIX makes atomic. After the rename the parent directory
is fsynced so the new name itself survives a power loss.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

PathLike = str | os.PathLike

FILE_MODE = 0o644  # mkstemp creates 0o600; published files are world-readable like ordinary ones


# ----------------------------------------------------------------------------------------------
#                                           Files
# ----------------------------------------------------------------------------------------------


def fsync_dir(path: PathLike) -> None:
    """fsync a directory so renames inside it are durable (a no-op where directories can't be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_with(path: PathLike, write: Callable[[BinaryIO], object]) -> None:
    """Stream `write(file)` into a temporary sibling of `path`, fsync it, then os.replace it into place.

    Nothing is held in memory beyond what `write` holds (torch.save, np.savez and the like write
    straight to the file); on any exception the temporary file is removed and `path` is untouched.
    """
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, FILE_MODE)
        os.replace(tmp, final)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    fsync_dir(final.parent)


def atomic_write_bytes(path: PathLike, data: bytes) -> None:
    """Write `data` to `path` atomically (temporary sibling + fsync + os.replace)."""
    atomic_write_with(path, lambda f: f.write(data))


def atomic_write_text(path: PathLike, text: str, encoding: str = "utf-8") -> None:
    """Write `text` to `path` atomically."""
    atomic_write_bytes(path, text.encode(encoding))


def atomic_write_json(path: PathLike, obj: Any, *, indent: int | None = 2, sort_keys: bool = False) -> None:
    """Serialise `obj` as JSON (trailing newline) and write it to `path` atomically.

    The object is fully serialised before anything touches the disk, so an unserialisable value
    raises without creating any file.
    """
    text = json.dumps(obj, indent=indent, sort_keys=sort_keys) + "\n"
    atomic_write_text(path, text)


# ----------------------------------------------------------------------------------------------
#                                        Directories
# ----------------------------------------------------------------------------------------------


@contextlib.contextmanager
def atomic_dir(final_path: PathLike) -> Iterator[Path]:
    """Yield a temporary sibling directory that becomes `final_path` when the block succeeds.

    On success an existing `final_path` directory is renamed aside, the new directory is renamed
    into place, and the old one is deleted (between the two renames `final_path` briefly does not
    exist; it never holds a mix of old and new files). On an exception the temporary directory is
    removed and `final_path` is left untouched.
    """
    final = Path(final_path)
    if final.exists() and not final.is_dir():
        raise ValueError(
            f"final_path={str(final)!r} exists and is not a directory (atomic_dir replaces directories only)"
        )
    final.parent.mkdir(parents=True, exist_ok=True)
    tag = uuid.uuid4().hex[:12]
    tmp = final.parent / f".{final.name}.tmp-{tag}"
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = final.parent / f".{final.name}.old-{tag}"
    moved_aside = False
    try:
        if final.exists():
            os.replace(final, old)
            moved_aside = True
        os.replace(tmp, final)
    except BaseException:
        if moved_aside and not final.exists():
            os.replace(old, final)  # put the previous version back
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    fsync_dir(final.parent)
    if moved_aside:
        shutil.rmtree(old, ignore_errors=True)


def atomic_write_npz(path: PathLike, **arrays: np.ndarray) -> None:
    """Atomically write an uncompressed .npz of named arrays (np.load reads it back)."""
    atomic_write_with(path, lambda f: np.savez(f, **arrays))
