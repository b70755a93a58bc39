"""WebDataset image shards: uncompressed tar files of samples `key.cls` + `key.png`.

Layout of one sample (this order, always): `{key}.cls` holds the class index as ASCII decimal text,
`{key}.png` the PNG-encoded RGB image. WebDataset groups consecutive members by the part of the
file name before the first dot, so any WebDataset reader sees samples with fields "cls" and "png".

Shards are byte-for-byte deterministic: every tar header carries mtime 0, uid/gid 0, empty
user/group names and mode 0o644, in the POSIX ustar format, so the same samples always give the same
file and the same sha256.

`ShardIndex` gives random access to the samples of a list of shards without unpacking them: it
scans the tar headers once (tarfile seeks over image payloads; only the few bytes of each .cls are
read) and then serves sample i with one positioned read.
"""

from __future__ import annotations

import hashlib
import io
import os
import re
import tarfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from pipeline.stores.atomic import FILE_MODE, PathLike, fsync_dir

IMAGE_FIELD = "png"
LABEL_FIELD = "cls"
KEY_PATTERN = re.compile(r"^[A-Za-z0-9_\-]+(?:/[A-Za-z0-9_\-]+)*$")  # no dots: WebDataset splits at the first


@dataclass(frozen=True)
class ShardInfo:
    """What write_shard published: file name, number of samples, sha256 hex digest, size in bytes."""

    name: str
    count: int
    sha256: str
    bytes: int


# ----------------------------------------------------------------------------------------------
#                                          Hashing
# ----------------------------------------------------------------------------------------------


class _HashingWriter:
    """A write-only file wrapper that hashes and counts everything written through it (for tarfile)."""

    def __init__(self, raw: io.BufferedWriter):
        self.raw = raw
        self.digest = hashlib.sha256()
        self.size = 0

    def write(self, data: bytes) -> int:
        self.digest.update(data)
        self.size += len(data)
        return self.raw.write(data)

    def tell(self) -> int:
        return self.size

    def flush(self) -> None:
        self.raw.flush()


# ----------------------------------------------------------------------------------------------
#                                          Writing
# ----------------------------------------------------------------------------------------------


def check_key(key: str) -> None:
    """Raise ValueError unless `key` is a WebDataset-safe sample key (letters, digits, _ - and / only)."""
    if not isinstance(key, str) or not KEY_PATTERN.match(key):
        raise ValueError(
            f"key={key!r} is not a valid sample key: use letters, digits, '_', '-' and '/' separators "
            "(no dots, no spaces, not empty)"
        )


def _member(name: str, size: int) -> tarfile.TarInfo:
    """A tar header with every field that could vary between runs pinned."""
    info = tarfile.TarInfo(name)
    info.size = size
    info.mtime = 0
    info.mode = FILE_MODE
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    info.type = tarfile.REGTYPE
    return info


def write_shard(path: PathLike, samples: Iterable[tuple[str, bytes, int]]) -> ShardInfo:
    """Write samples (key, png_bytes, label) to the tar shard `path`, atomically.

    The tar is written to `path + ".tmp"`, fsynced, hashed while written, then renamed to `path`.
    Keys must be unique within the shard. Returns the published file's ShardInfo.
    """
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(final.name + ".tmp")
    seen: set[str] = set()
    try:
        with open(tmp, "wb") as raw:
            writer = _HashingWriter(raw)
            with tarfile.open(fileobj=writer, mode="w", format=tarfile.USTAR_FORMAT) as tar:
                for key, png, label in samples:
                    check_key(key)
                    if key in seen:
                        raise ValueError(f"key={key!r} appears twice in shard {final.name}")
                    seen.add(key)
                    if isinstance(label, bool) or not isinstance(label, int | np.integer) or label < 0:
                        raise ValueError(f"label={label!r} for key={key!r} must be a non-negative int")
                    text = str(int(label)).encode("ascii")
                    tar.addfile(_member(f"{key}.{LABEL_FIELD}", len(text)), io.BytesIO(text))
                    tar.addfile(_member(f"{key}.{IMAGE_FIELD}", len(png)), io.BytesIO(png))
            raw.flush()
            os.fsync(raw.fileno())
        os.chmod(tmp, FILE_MODE)
        os.replace(tmp, final)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(final.parent)
    return ShardInfo(name=final.name, count=len(seen), sha256=writer.digest.hexdigest(), bytes=writer.size)


# ----------------------------------------------------------------------------------------------
#                                     Sequential reading
# ----------------------------------------------------------------------------------------------


def _split_name(name: str) -> tuple[str, str] | None:
    """'dir/key.ext.more' -> ('dir/key', 'ext.more') as WebDataset splits it; None without an extension."""
    head, _, base = name.rpartition("/")
    stem, dot, ext = base.partition(".")
    if not dot or not stem:
        return None
    return (f"{head}/{stem}" if head else stem), ext


def _parse_label(data: bytes, key: str, shard: PathLike) -> int:
    try:
        return int(data.decode("ascii").strip())
    except (UnicodeDecodeError, ValueError):
        raise ValueError(f"{shard}: {key}.{LABEL_FIELD} holds {data[:32]!r}, not a class index") from None


def _grouped_members(tar: tarfile.TarFile, shard: PathLike) -> Iterator[tuple[str, dict[str, tarfile.TarInfo]]]:
    """(key, {field: member}) for each run of consecutive regular members sharing a key."""
    key: str | None = None
    fields: dict[str, tarfile.TarInfo] = {}
    for member in tar:
        if not member.isfile():
            continue
        split = _split_name(member.name)
        if split is None:
            continue
        k, ext = split
        if k != key:
            if key is not None:
                yield key, fields
            key, fields = k, {}
        fields[ext] = member
    if key is not None:
        yield key, fields


def _require_fields(key: str, fields: dict, shard: PathLike) -> None:
    missing = [f for f in (LABEL_FIELD, IMAGE_FIELD) if f not in fields]
    if missing:
        raise ValueError(f"{shard}: sample {key!r} has no {' or '.join('.' + m for m in missing)} member")


def iter_shard(path: PathLike) -> Iterator[tuple[str, bytes, int]]:
    """Yield (key, png_bytes, label) for every sample of a shard, in file order."""
    with tarfile.open(path, mode="r:") as tar:
        for key, fields in _grouped_members(tar, path):
            _require_fields(key, fields, path)
            label = _parse_label(tar.extractfile(fields[LABEL_FIELD]).read(), key, path)
            png = tar.extractfile(fields[IMAGE_FIELD]).read()
            yield key, png, label


def decode_png(data: bytes) -> np.ndarray:
    """PNG bytes -> uint8 array [H, W, 3] (RGB; grey or palette images are converted)."""
    with Image.open(io.BytesIO(data)) as image:
        if image.format != "PNG":
            raise ValueError(f"data is a {image.format} image, expected PNG")
        rgb = image.convert("RGB") if image.mode != "RGB" else image
        return np.array(rgb, dtype=np.uint8)


# ----------------------------------------------------------------------------------------------
#                                       Random access
# ----------------------------------------------------------------------------------------------


class ShardIndex:
    """Random access to the samples of several shards; sample i is the i-th across the shards in order.

    Built from the tar headers only (plus the tiny .cls payloads). Reads are positioned reads
    (`os.pread`) on file descriptors opened lazily per process, so an index built in a parent process
    is safe to use in forked or spawned DataLoader workers (it also pickles without descriptors).
    """

    def __init__(self, paths: list[PathLike]):
        if isinstance(paths, str | os.PathLike):
            raise ValueError(f"paths={paths!r} must be a list of shard paths, not a single path")
        self.paths: list[str] = [os.fspath(p) for p in paths]
        shard_ids: list[int] = []
        offsets: list[int] = []
        sizes: list[int] = []
        labels: list[int] = []
        self.keys: list[str] = []
        self.counts: list[int] = []
        for shard_id, path in enumerate(self.paths):
            before = len(self.keys)
            with tarfile.open(path, mode="r:") as tar:
                for key, fields in _grouped_members(tar, path):
                    _require_fields(key, fields, path)
                    png = fields[IMAGE_FIELD]
                    labels.append(_parse_label(tar.extractfile(fields[LABEL_FIELD]).read(), key, path))
                    self.keys.append(key)
                    shard_ids.append(shard_id)
                    offsets.append(png.offset_data)
                    sizes.append(png.size)
            self.counts.append(len(self.keys) - before)
        self.shard_ids = np.asarray(shard_ids, dtype=np.int32)  # [N]
        self.offsets = np.asarray(offsets, dtype=np.int64)  # [N] byte offset of the PNG payload
        self.sizes = np.asarray(sizes, dtype=np.int64)  # [N] PNG payload size in bytes
        self.labels = np.asarray(labels, dtype=np.int64)  # [N]
        self._positions = {key: i for i, key in enumerate(self.keys)}
        if len(self._positions) != len(self.keys):
            dup = next(k for i, k in enumerate(self.keys) if self._positions[k] != i)
            raise ValueError(f"key {dup!r} appears more than once across the shards {self.paths}")
        self._pid = -1
        self._fds: dict[int, int] = {}

    # ---- bookkeeping ------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self.keys)

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_pid"], state["_fds"] = -1, {}
        return state

    def __del__(self) -> None:
        self.close()

    def close(self) -> None:
        """Close this process's file descriptors (they reopen on the next read)."""
        if getattr(self, "_pid", -1) == os.getpid():
            for fd in self._fds.values():
                os.close(fd)
        self._fds = {}

    def _check(self, i: int) -> int:
        try:
            j = int(i)
        except (TypeError, ValueError):
            raise ValueError(f"i={i!r} must be an int in [0, {len(self)})") from None
        if not 0 <= j < len(self):
            raise ValueError(f"i={i} is out of range: the index has {len(self)} samples, allowed [0, {len(self)})")
        return j

    def _fd(self, shard_id: int) -> int:
        if self._pid != os.getpid():  # fresh process (fork/spawn): never share the parent's descriptors
            self._pid, self._fds = os.getpid(), {}
        fd = self._fds.get(shard_id)
        if fd is None:
            fd = self._fds[shard_id] = os.open(self.paths[shard_id], os.O_RDONLY)
        return fd

    # ---- access -----------------------------------------------------------------------------

    def index_of(self, key: str) -> int:
        """Position of `key` (ValueError if absent)."""
        try:
            return self._positions[key]
        except KeyError:
            raise ValueError(f"key={key!r} is not in the shards") from None

    def key(self, i: int) -> str:
        return self.keys[self._check(i)]

    def label(self, i: int) -> int:
        return int(self.labels[self._check(i)])

    def read_png(self, i: int) -> bytes:
        """The PNG bytes of sample i (one positioned read)."""
        j = self._check(i)
        shard_id, offset, size = int(self.shard_ids[j]), int(self.offsets[j]), int(self.sizes[j])
        data = os.pread(self._fd(shard_id), size, offset)
        if len(data) != size:
            raise OSError(f"{self.paths[shard_id]} is truncated: sample {self.keys[j]!r} wants {size} bytes "
                          f"at offset {offset}, got {len(data)}")
        return data

    def read_image(self, i: int) -> np.ndarray:
        """Sample i decoded to uint8 [H, W, 3]."""
        return decode_png(self.read_png(i))
