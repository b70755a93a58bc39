"""The local working copy of a workdir on object storage (`workdir = "s3://bucket/prefix"`).

Every stage computes on local files, as on a POSIX workdir; the object store is the workdir of
record between stages. A stage pulls what it reads (the manifests and metadata of its upstream
stages, the bulk files of the inputs it reads whole, and its own output for resume), runs, and
pushes its output: every file as one whole object, stale objects deleted, `manifest.json` last, so
a stage whose manifest is in the store has all its objects there. Progress inside a stage is pushed
as it becomes durable (each published store range, each checkpoint), so a rerun on another node
resumes from the object store.

Bulk files stay in the object store unless a stage reads them whole: the ingest tar shards (read by
the encoders), checkpoints (read by sampling) and the shard files of numeric store arrays (training
reads them through tensorstore's own `s3` driver). A directory pulled without its bulk files holds a
`.remote` file naming its URL and the sizes of the files left there, which the verifications and the
store reader consult for a file that is not local. A local file is in sync with its
object when the sizes agree and its MD5 equals the object's etag (objects are written by single PUTs).

    {staging}/{bucket}/{prefix}/...      the working copy (staging: REPA_STAGING, default
                                         ~/.cache/repa-pipeline/objects)
"""

from __future__ import annotations

import json
import os
import socket
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from pipeline.stores.atomic import atomic_write_json
from pipeline.stores.checksum import file_digest
from pipeline.stores.objects import (
    ObjectInfo,
    ObjectURL,
    delete,
    get_file,
    head,
    list_objects,
    put_file,
)
from schemas.manifest import MANIFEST_NAME

REMOTE_MARK = ".remote"  # in a directory pulled without its bulk files: {"url", "sizes": {relative path: bytes}}
PULLED = ".pulled.json"  # in a pulled source: the listing it was pulled from, so an unchanged source is not rehashed
THREADS = 16
_MD5: dict[tuple[str, int, int], str] = {}  # (path, size, mtime_ns) -> its md5 or the etag of its upload


def staging_root() -> Path:
    return Path(os.environ.get("REPA_STAGING") or Path.home() / ".cache" / "repa-pipeline" / "objects")


def transient(rel: str) -> bool:
    """Files that are never published: temporaries, scratch arrays, locks, the `.remote` mark."""
    parts = rel.split("/")
    name = parts[-1]
    return (any(p in (".scratch", ".locks") for p in parts) or name in (REMOTE_MARK, PULLED) or name.endswith(".tmp")
            or (name.startswith(".") and (".tmp" in name or ".old-" in name)))


def is_bulk(rel: str) -> bool:
    """Files a stage pulls only when it reads them whole: ingest tar shards, store shard files (`/c/`),
    training checkpoints."""
    return rel.endswith(".tar") or "/c/" in rel or "/checkpoints/" in rel


def store_of(rel: str) -> str:
    """The store directory of a store shard file `{store}/{array}/c/...`."""
    return rel.split("/c/")[0].rsplit("/", 1)[0]


def _array_of(rel: str) -> str:
    return rel.split("/c/")[0].rsplit("/", 1)[1]


def _below(rel: str, key: str) -> str:
    """`key` relative to the directory `rel` ("" = the root) that holds it."""
    return key[len(rel) + 1:] if rel else key


def _excluded(rel: str, exclude: Sequence[str]) -> Callable[[str], bool]:
    """Whether a key lies in a first-level subdirectory of `rel` whose name starts with one of `exclude`."""
    def skip(key: str) -> bool:
        sub = _below(rel, key).split("/", 1)
        return len(sub) == 2 and sub[0].startswith(tuple(exclude)) if exclude else False
    return skip


def _files(directory: Path) -> list[Path]:
    """The files under `directory`, sorted, without descending into scratch or lock folders, which other
    processes on this machine (store tasks, stages) create and remove while it is walked."""
    out: list[Path] = []
    for root, dirs, names in os.walk(directory):  # a folder removed while walked is skipped, not an error
        dirs[:] = [d for d in dirs if d not in (".scratch", ".locks")]
        out += [Path(root) / n for n in names]
    return sorted(out)


def _bytes(path: Path) -> bytes | None:
    try:
        return path.read_bytes()
    except OSError:
        return None


def _md5(path: Path) -> str:
    st = path.stat()
    key = (str(path), st.st_size, st.st_mtime_ns)
    if key not in _MD5:
        _MD5[key] = file_digest(path, "md5")
    return _MD5[key]


def in_sync(path: Path, obj: ObjectInfo) -> bool:
    return path.is_file() and path.stat().st_size == obj.size and _md5(path) == obj.etag


def _numeric_arrays(store: Path) -> set[str]:
    """Names of the numeric arrays of the store at `store` (from its group attributes)."""
    from pipeline.stores.zarr_layout import LAYOUT_KEY, is_numeric

    try:
        attrs = json.loads((store / "zarr.json").read_text())["attributes"][LAYOUT_KEY]
    except (OSError, KeyError, ValueError):
        return set()
    return {a["name"] for a in attrs["arrays"] if is_numeric(a["dtype"])}


@dataclass(frozen=True)
class WorkingCopy:
    """`url` (the workdir on object storage) mirrored at `root` (a local directory)."""

    url: str
    root: Path

    @classmethod
    def of(cls, url: str) -> WorkingCopy:
        u = ObjectURL.parse(url)
        return cls(str(u), staging_root() / u.bucket / u.prefix)

    @property
    def objects(self) -> ObjectURL:
        return ObjectURL.parse(self.url)

    def rel(self, path: Path) -> str:
        rel = Path(path).resolve().relative_to(self.root.resolve()).as_posix()
        return "" if rel == "." else rel

    # ------------------------------------------------------------------------------------------
    #                                          Pull
    # ------------------------------------------------------------------------------------------

    def pull(self, directory: Path, *, bulk: bool = True, exclude: Sequence[str] = (), prune: bool = True) -> int:
        """Make `directory` (under the root) equal to its objects; returns the files downloaded.

        Local files without an object there are removed (a manifest that the store no longer has
        must not make a stage look up to date; with prune=False only manifests, and bulk files of a
        directory whose manifest changed: another build's). bulk=False leaves the bulk files (is_bulk) in the
        object store (the string arrays of a store are pulled: only zarr reads them) and lists them in
        the directory's `.remote` mark; a local copy of such a file is used where its size is right. `exclude`:
        first-level subdirectories that are other stages' outputs (a run's samples and eval). prune=False
        keeps other local files that have no object (a stage's output still being written here).
        """
        rel = self.rel(directory)
        skip = _excluded(rel, exclude)
        remote = {o.key: o for o in list_objects(self.objects, rel) if not transient(o.key) and not skip(o.key)}
        before = _bytes(directory / MANIFEST_NAME)
        n = self._download([o for k, o in remote.items() if not is_bulk(k)])
        numeric = {} if bulk else {store: _numeric_arrays(self.root / store)  # from their zarr.json, just pulled
                                   for store in {store_of(k) for k in remote if "/c/" in k}}
        needed = [o for k, o in remote.items() if is_bulk(k) and (
            bulk or ("/c/" in k and _array_of(k) not in numeric[store_of(k)]))]
        n += self._download(needed)
        got = {o.key for o in needed}
        left = {_below(rel, k): o.size for k, o in remote.items() if is_bulk(k) and k not in got}
        mark = directory / REMOTE_MARK
        if left:
            atomic_write_json(mark, {"url": "/".join(p for p in (self.url, rel) if p), "sizes": left}, indent=None)
        else:
            mark.unlink(missing_ok=True)
        # Local files with no object: a manifest always goes; the rest with `prune`; and bulk files left in
        # the store whose directory now has another manifest than before belong to another build.
        other_build = (directory / MANIFEST_NAME).is_file() and _bytes(directory / MANIFEST_NAME) != before
        for f in _files(directory):
            r = self.rel(f)
            if transient(r) or skip(r):
                continue
            if (not bulk and is_bulk(r) and other_build and r not in got) or (
                    r not in remote and (f.name == MANIFEST_NAME or (prune and (bulk or not is_bulk(r))))):
                f.unlink()
        return n

    def _download(self, objs: Iterable[ObjectInfo]) -> int:
        todo = [o for o in objs if not in_sync(self.root / o.key, o)]
        with ThreadPoolExecutor(THREADS) as pool:
            list(pool.map(lambda o: get_file(self.objects, o.key, self.root / o.key), todo))
        return len(todo)

    # ------------------------------------------------------------------------------------------
    #                                          Push
    # ------------------------------------------------------------------------------------------

    def push(self, directory: Path, *, prune: bool = True, exclude: Sequence[str] = ()) -> int:
        """Publish `directory`: changed files as whole objects, then (prune) the deletion of objects
        with no local file, then the manifests. Returns the files uploaded."""
        if not directory.is_dir():
            return 0
        rel = self.rel(directory)
        skip = _excluded(rel, exclude)
        files = [self.rel(f) for f in _files(directory)]
        files = [f for f in files if not transient(f) and not skip(f)]
        remote = {o.key: o for o in list_objects(self.objects, rel) if not skip(o.key)}
        changed = [f for f in files if f not in remote or not in_sync(self.root / f, remote[f])]
        manifests = [f for f in changed if f.rsplit("/", 1)[-1] == MANIFEST_NAME]
        n = self._upload([f for f in changed if f not in manifests])
        if prune:  # objects with no local file, except those a `.remote` mark says were left in the store
            local = set(files) | {"/".join(p for p in (self.rel(m.parent), k) if p) for m in _files(directory)
                                  if m.name == REMOTE_MARK for k in _mark(m.parent)["sizes"]}
            stale = [k for k in remote if k not in local and not transient(k)]
            with ThreadPoolExecutor(THREADS) as pool:
                list(pool.map(lambda k: delete(self.objects, k), stale))
        return n + self._upload(manifests)

    def pull_files(self, paths: list[Path]) -> int:
        """Download these files (each one whole object) unless they are here and in sync."""
        with ThreadPoolExecutor(THREADS) as pool:
            objs = list(pool.map(lambda p: head(self.objects, self.rel(p)), paths))
        missing = [p for p, o in zip(paths, objs, strict=True) if o is None]
        if missing:
            raise FileNotFoundError(f"{self.url}/{self.rel(missing[0])}: no such object")
        return self._download(objs)

    def push_files(self, paths: Iterable[Path]) -> int:
        """Publish these files (each a whole object), e.g. a range or a checkpoint just made durable."""
        return self._upload([self.rel(p) for p in paths if Path(p).is_file()])

    def _upload(self, rels: list[str]) -> int:
        def one(rel: str) -> None:
            path = self.root / rel
            st = path.stat()
            etag = put_file(self.objects, rel, path)
            _MD5[(str(path), st.st_size, st.st_mtime_ns)] = etag  # this content has this etag: not hashed again

        with ThreadPoolExecutor(THREADS) as pool:
            list(pool.map(one, rels))
        return len(rels)

    def forget(self, path: Path) -> None:
        """Delete the object of `path` (a manifest invalidated before its stage reruns)."""
        delete(self.objects, self.rel(path))


def machine_id() -> str:
    """This machine: host name and boot id (two nodes with one host name, or a rebooted one, differ)."""
    boot = Path("/proc/sys/kernel/random/boot_id")
    return f"{socket.gethostname()}/{boot.read_text().strip() if boot.is_file() else ''}"


@dataclass(frozen=True)
class CallerCopy:
    """The working copy whose paths a plan names (its caller's), sent with the plan to tasks and workers
    that may run on other machines."""

    url: str  # the workdir on object storage
    root: str  # the caller's working copy, as its paths spell it
    resolved: str  # the same, resolved
    machine: str  # machine_id() of the caller

    @classmethod
    def of(cls, copy: WorkingCopy) -> CallerCopy:
        return cls(copy.url, str(copy.root), str(copy.root.resolve()), machine_id())

    def elsewhere(self) -> WorkingCopy | None:
        """This machine's working copy when it is not the caller's (another machine, or another staging
        root on this one), else None: the plan's paths are valid here as they are."""
        here = WorkingCopy.of(self.url)
        return None if machine_id() == self.machine and str(here.root.resolve()) == self.resolved else here

    def move(self, path: str | Path, here: WorkingCopy) -> Path:
        """A path of the caller's working copy, in the working copy `here`."""
        for base in (self.root, self.resolved):
            try:
                return here.root / Path(path).relative_to(base)
            except ValueError:
                continue
        raise ValueError(f"{path} is not in the working copy {self.root} of {self.url}")


_MARKS: dict[tuple[str, int], dict] = {}


def _mark(directory: Path) -> dict | None:
    m = directory / REMOTE_MARK
    try:
        key = (str(m), m.stat().st_mtime_ns)
    except OSError:
        return None
    if key not in _MARKS:
        _MARKS[key] = json.loads(m.read_text())
    return _MARKS[key]


def _marks(path: Path) -> Iterator[tuple[str, dict]]:
    """(path relative to the directory, its `.remote` mark) for `path` and each directory above it that
    has one, nearest first."""
    for d in [path, *path.parents]:
        mark = _mark(d)
        if mark is not None:
            yield path.relative_to(d).as_posix(), mark


def remote_file(path: Path) -> tuple[str, int] | None:
    """(URL, bytes) of the object a missing local file stands for, when a directory above it was pulled
    without its bulk files; else None."""
    for rel, mark in _marks(Path(path)):
        if rel in mark["sizes"]:
            return f"{mark['url']}/{rel}", int(mark["sizes"][rel])
    return None


def remote_dir(path: Path) -> str | None:
    """The URL of directory `path` when it, or a directory above it, was pulled without its bulk files;
    else None."""
    for rel, mark in _marks(Path(path)):
        return mark["url"] if rel == "." else f"{mark['url']}/{rel}"
    return None


# ----------------------------------------------------------------------------------------------
#                                  Data sources on object storage
# ----------------------------------------------------------------------------------------------

def pull_source(url: str) -> Path:
    """The local copy of a data source on object storage (`data.path = "s3://bucket/prefix"`): one
    object (an archive) or every object under a prefix (a folder), pulled into the staging area.
    A source whose listing (keys, sizes, etags) is that of its last pull, with every file in place at
    its size, is not downloaded or hashed again."""
    u = ObjectURL.parse(url)
    parent, _, name = u.key().rpartition("/")
    folder = ObjectURL(u.bucket, parent)
    single = head(folder, name) if name else None
    copy = WorkingCopy.of(url if single is None else str(folder))
    listing = [single] if single is not None else list(list_objects(u))
    if single is None and not listing:
        raise FileNotFoundError(f"{url}: no object under this prefix")
    stamp = copy.root / PULLED
    here = copy.root / single.key if single is not None else copy.root
    record = {o.key: [o.size, o.etag] for o in listing}
    try:
        fresh = json.loads(stamp.read_text()) == record and all(
            (copy.root / k).is_file() and (copy.root / k).stat().st_size == v[0] for k, v in record.items())
    except (OSError, ValueError):
        fresh = False
    if not fresh:
        copy._download(listing)
        if single is None:  # images deleted from the source are not ingested again
            for f in [p for p in _files(copy.root) if p != stamp]:
                if copy.rel(f) not in record and not transient(copy.rel(f)):
                    f.unlink()
        atomic_write_json(stamp, record, indent=None)
    return here
