"""One writer per stage output: an advisory lock per output directory, held while the stage runs.

    {workdir}/.locks/{output directory relative to the workdir, "/" -> "--"}.lock

The lock is `flock(2)` on that file, so the operating system releases it when its holder dies: a
lock of a dead process never blocks. The holder writes who it is into the file (pid, host, start
time, command), which is what a second invocation prints. Lock files live outside the output
directories, so `--force` (which may delete an output directory) never unlinks a held lock.

On an object-store workdir (`workdir = "s3://..."`) there is no flock: the lock is the object
`{workdir}/.locks/....lock`, created with a conditional PUT (`If-None-Match: *`), so of two
processes on any machines exactly one creates it. Its holder renews a lease in it every LEASE_S / 4
seconds (a conditional PUT on the etag it holds) and deletes it at the end. A lock whose lease has
run out (its holder died, or lost the network for LEASE_S), or whose holder is a dead process on this
host, is taken over by a conditional PUT on the etag read, which again exactly one contender wins.
What this guarantees: one writer per output while holders renew in time and clocks agree within a
fraction of LEASE_S; a holder that cannot renew stops its stage rather than write beside a new holder.

Only the stage functions take it (`with jobs.run.stage(...)`); read-only commands (`status`, `report`) never do.
Under torchrun only rank 0 takes it (every rank runs the stage function; rank 0 is the writer of
record); under Ray the driver, which runs the stage function, holds it.
"""

from __future__ import annotations

import _thread
import datetime as _dt
import fcntl
import json
import os
import socket
import sys
import threading
import time
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
    from jobs.layout import workdir as local_workdir

    workdir = local_workdir(cfg).resolve()
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


def _record() -> dict[str, Any]:
    return {"pid": os.getpid(), "host": socket.gethostname(),
            "started": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "command": " ".join(os.path.basename(a) if i == 0 else a for i, a in enumerate(sys.argv))}


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
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(_record()).encode(), 0)
        try:
            yield
        finally:
            os.ftruncate(fd, 0)
    finally:
        os.close(fd)  # releases the flock


# ----------------------------------------------------------------------------------------------
#                                   On object storage
# ----------------------------------------------------------------------------------------------

LEASE_S = float(os.environ.get("REPA_LOCK_LEASE_S", "60"))  # a holder that has not renewed for this long is dead


def _dead(holder: dict[str, Any] | None) -> bool:
    """Whether a lock object's holder is gone: its lease ran out, or it is a dead process on this host."""
    if not holder or time.time() > float(holder.get("expires", 0)):
        return True
    if holder.get("host") == socket.gethostname():
        try:
            os.kill(int(holder["pid"]), 0)
        except ProcessLookupError:
            return True
        except (PermissionError, KeyError, ValueError):
            return False
    return False


@contextmanager
def hold_object(copy: Any, path: Path, what: str, *, wait: bool = False,
                say: Callable[[str], None] | None = None) -> Iterator[None]:
    """Hold the lock object of `path` (a lock file of the working copy `copy`) for the block."""
    from pipeline.stores.objects import PreconditionFailed, delete, get_bytes, put_bytes

    url, rel = copy.objects, copy.rel(path)
    record = _record()

    def body() -> bytes:
        return json.dumps(record | {"expires": time.time() + LEASE_S}).encode()

    told = False
    while True:
        try:
            etag = put_bytes(url, rel, body(), if_none_match=True)
            break
        except PreconditionFailed:
            pass
        try:
            raw, seen = get_bytes(url, rel)
        except FileNotFoundError:
            continue  # released between the two requests
        try:
            holder = json.loads(raw) if raw.strip() else None
        except ValueError:
            holder = None  # unreadable: treated as gone, taken over on its etag
        if _dead(holder):
            try:
                etag = put_bytes(url, rel, body(), if_match=seen)
                if say is not None:
                    say(f"took over the lock of {describe(holder)}, which is gone")
                break
            except (PreconditionFailed, FileNotFoundError):
                continue  # another contender took it, or it was released: look again
        if not wait:
            raise StageBusy(f"{what} is being written by {describe(holder)}; wait for it to finish, or rerun with "
                            "--wait to wait for it")
        if say is not None and not told:
            say(f"waiting for {describe(holder)}, which is writing {what}")
            told = True
        time.sleep(min(2.0, LEASE_S / 8))

    lost = threading.Event()
    stop = threading.Event()

    def renew() -> None:
        nonlocal etag
        renewed = time.time()
        while not stop.wait(LEASE_S / 4):
            try:
                etag = put_bytes(url, rel, body(), if_match=etag)
                renewed = time.time()
                continue
            except PreconditionFailed:
                pass  # another process holds it now
            except Exception:  # noqa: BLE001 - a network blip: the next renewal retries while the lease lasts
                if time.time() - renewed < LEASE_S / 2:
                    continue
            lost.set()  # taken over, or not renewed for half a lease: stop writing before another may start
            _thread.interrupt_main()
            return

    renewer = threading.Thread(target=renew, name="lock-lease", daemon=True)
    renewer.start()
    try:
        yield
    except KeyboardInterrupt:
        if lost.is_set():
            raise StageBusy(f"{what}: this process lost its lock (taken over, or not renewed for half its lease); "
                            "its output is left for a rerun to resume") from None
        raise
    finally:
        stop.set()
        renewer.join()
        try:
            delete(url, rel, if_match=etag)
        except PreconditionFailed:
            pass  # no longer ours
        except Exception:  # noqa: BLE001 - the store is unreachable now: the lease lapses on its own
            if say is not None:
                say(f"could not release the lock {url}/{rel}; it lapses in {LEASE_S:.0f} s")
