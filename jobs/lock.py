"""One writer per stage output: an advisory lock per output directory, held while the stage runs.

    {workdir}/.locks/{output directory relative to the workdir, "/" -> "--"}.lock

The lock is `flock(2)` on that file, so the operating system releases it when its holder dies: a
lock of a dead process never blocks. The holder writes who it is into the file (pid, host, start
time, command), which is what a second invocation prints. Lock files live outside the output
directories, so `--force` (which may delete an output directory) never unlinks a held lock.

Only the stage functions take it (`with jobs.run.stage(...)`); read-only commands (`status`, `report`) never do.
Under torchrun only rank 0 takes it (every rank runs the stage function; rank 0 is the writer of
record); under Ray the driver, which runs the stage function, holds it.
"""

from __future__ import annotations

import datetime as _dt
import fcntl
import json
import os
import socket
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from jobs.stage import UsageError
from schemas.config import ExperimentConfig

LOCK_DIR = ".locks"


class StageBusy(UsageError):
    """Another process is writing this stage's output (exit 2, unless --wait)."""


def lock_path(cfg: ExperimentConfig, directory: Path) -> Path:
    """The lock file of the output directory `directory` of a stage of `cfg`."""
    workdir = Path(cfg.workdir).resolve()
    directory = Path(directory).resolve()
    try:
        name = directory.relative_to(workdir).as_posix()
    except ValueError:  # an output outside the workdir: name it by its absolute path
        name = directory.as_posix().lstrip("/")
    return workdir / LOCK_DIR / (name.replace("/", "--") + ".lock")


def describe(holder: dict[str, Any] | None) -> str:
    """One phrase naming a lock's holder."""
    if not holder:
        return "another process (it has not recorded itself yet)"
    return (f"pid {holder.get('pid')} on {holder.get('host')} since {holder.get('started')} "
            f"(`{holder.get('command')}`)")


def _read_holder(fd: int) -> dict[str, Any] | None:
    try:
        raw = os.pread(fd, 1 << 16, 0)
        return json.loads(raw) if raw.strip() else None
    except (OSError, ValueError):
        return None


@contextmanager
def hold(path: Path, what: str, *, wait: bool = False, say: Callable[[str], None] | None = None) -> Iterator[None]:
    """Hold the exclusive lock `path` for the block. Busy: StageBusy naming the holder, or (wait)
    a message and a blocking wait until the holder finishes or dies."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = describe(_read_holder(fd))
            if not wait:
                raise StageBusy(f"{what} is being written by {holder}; wait for it to finish, or rerun with "
                                "--wait to wait for it") from None
            if say is not None:
                say(f"waiting for {holder}, which is writing {what}")
            fcntl.flock(fd, fcntl.LOCK_EX)
        record = {"pid": os.getpid(), "host": socket.gethostname(),
                  "started": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                  "command": " ".join(os.path.basename(a) if i == 0 else a for i, a in enumerate(sys.argv))}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(record).encode(), 0)
        try:
            yield
        finally:
            os.ftruncate(fd, 0)
    finally:
        os.close(fd)  # releases the flock
