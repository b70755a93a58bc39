"""Per-sample feature stores: one Zarr v3 group of arrays that share the sample axis.

Layout on disk (`path` is the group directory):

    {path}/zarr.json                    group metadata; attributes = user attrs + "store_layout"
    {path}/{name}/zarr.json             one array per ArraySpec, shape [N, *spec.shape]
    {path}/{name}/c/<s>/0/.../0         shard file s: samples [s * S, (s + 1) * S), S = samples_per_shard
    {path}/.ranges/{start}-{stop}       marker: the range [start, stop) is published (JSON: its shard
                                        files' sizes and sha256)
    {path}/.scratch/{start}-{stop}-*    a range being written (removed when it is published)

Every array is chunked one sample per chunk along axis 0 (a chunk is the whole per-sample array) and
the sharding codec groups S chunks into one shard file, so a shuffled batch reads exactly the
samples it needs from a few large files. Inside a shard each chunk is stored raw (`compression =
"none"`, the default) or Blosc-zstd compressed (`"zstd"`); README "Store compression" has the
measurements behind the default. Either is read the same way, so stores of both kinds coexist.
The shard file of shard s is at the array's default chunk key `c/<s>/0/.../0` (one `0` per
per-sample dimension; `c/<s>` for scalars such as labels).

Publish scheme (what makes a range all-or-nothing):
  1. `write_range(start, stop, arrays)` builds a scratch array for every name in
     `{path}/.scratch/{start}-{stop}-{random}/{name}` by copying the real array's `zarr.json`, so its
     metadata (shape, codecs, chunk key encoding) is byte-identical, and writes samples
     [start, stop) there with zarr. Only the shard file(s) of the range appear in the scratch array.
  2. Each scratch shard file is fsynced and moved into the real array with `os.replace` (atomic on
     POSIX, same file system), then the array's shard directory is fsynced.
  3. Only after every array's shard is in place is the marker `{path}/.ranges/{start}-{stop}` written
     (atomically). A range counts as written if and only if its marker exists.
A process killed at any point leaves either a marked range whose shard files are complete, or an
unmarked range: its scratch junk and possibly some already-replaced (complete, but unannounced)
shard files, which the next `write_range` of that range overwrites. Readers never see a partially
written shard file. Different ranges touch disjoint files, so several processes may write
different ranges concurrently; one range must have one writer at a time.

I/O, chosen by measurement (README "Store I/O"). Numeric arrays are written through tensorstore
(its `zarr3` driver, C++: 1.5-3x zarr-python's write speed). Reads for training take the direct
shard reader below: the shard index once per file, then one positioned read per sample (plus Blosc
when compressed); on uncompressed shards it read random batches 3x faster than tensorstore here, and
as fast on compressed ones. `StoreReader.read_async` returns one future per array and batch, so
several reads can be in flight. tensorstore reads any other layout; zarr-python creates the arrays
(it is the format's reference: the tests open every store with it) and reads and writes the
fixed-width string arrays, a data type tensorstore does not have.

zarr itself ignores the two bookkeeping folders (listing the group's members warns that they are not
Zarr nodes). String keys are stored as fixed-width unicode (numpy `<U{width}`, Zarr's
`fixed_length_utf32` data type, which zarr-python 3 reads and writes reliably but flags as not yet in
the v3 spec; that warning is silenced).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import uuid
import warnings
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import tensorstore as ts
import zarr
import zarr.codecs

from pipeline import faults
from pipeline.progress import progress_bar
from pipeline.stores.atomic import PathLike, atomic_write_json, fsync_dir
from pipeline.stores.checksum import combined_digest, sha256_file

LAYOUT_KEY = "store_layout"  # reserved group attribute holding the store's own bookkeeping
FORMAT_VERSION = 1
RANGES_DIR = ".ranges"
SCRATCH_DIR = ".scratch"
COMPRESSIONS = ("none", "zstd")  # inner-chunk codec: raw bytes, or Blosc-zstd level 3 with byte shuffle
BLOSC_LEVEL = 3
ENGINES = ("auto", "shard", "tensorstore", "zarr")  # StoreReader read paths (see StoreReader.read_async)
_EMPTY = np.uint64(2**64 - 1)  # shard index entry of a chunk that is not stored
_INDEX_CRC_BYTES = 4
_STRING_DTYPE_WARNING = (
    r"The data type \((FixedLengthUTF32|NullTerminatedBytes)\(.*does not have a Zarr V3 specification"
)
# Reading a keys array with zarr's own indexing (StoreReader.array("keys")[:]) repeats the warning.
warnings.filterwarnings("ignore", message=_STRING_DTYPE_WARNING)


@contextlib.contextmanager
def _quiet_zarr() -> Iterator[None]:
    """Silence zarr's warning that fixed-width string dtypes are not in the v3 spec yet."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=_STRING_DTYPE_WARNING)
        yield


# ----------------------------------------------------------------------------------------------
#                                         tensorstore
# ----------------------------------------------------------------------------------------------

_CONTEXT: tuple[int, ts.Context] | None = None
# Decoded-chunk cache per process. Training reads each sample about once per epoch, so caching data
# buys nothing; the shard indexes are small and re-read from the page cache.
_CACHE_BYTES = 0


def _context() -> ts.Context:
    """This process's tensorstore context (thread pools and cache); rebuilt after a fork, since a
    child must not use the thread pools of its parent."""
    global _CONTEXT
    if _CONTEXT is None or _CONTEXT[0] != os.getpid():
        _CONTEXT = (os.getpid(), ts.Context({"cache_pool": {"total_bytes_limit": _CACHE_BYTES}}))
    return _CONTEXT[1]


def _open_ts(path: Path, write: bool = False) -> ts.TensorStore:
    """The Zarr v3 array at `path` through tensorstore (metadata read from its zarr.json)."""
    spec = {"driver": "zarr3", "kvstore": {"driver": "file", "path": str(path)}}
    if write:
        spec["store_data_equal_to_fill_value"] = True  # every sample is stored, as zarr's writes do
    return ts.open(spec, open=True, read=not write, write=write, context=_context()).result()


_POOL: tuple[int, ThreadPoolExecutor] | None = None


def _read_pool() -> ThreadPoolExecutor:
    """This process's threads for StoreReader.read_async on the shard reader (pread and Blosc release
    the GIL); rebuilt after a fork."""
    global _POOL
    if _POOL is None or _POOL[0] != os.getpid():
        _POOL = (os.getpid(), ThreadPoolExecutor(min(8, os.cpu_count() or 1), thread_name_prefix="store-read"))
    return _POOL[1]


def _numeric(dtype: str | np.dtype) -> bool:
    return np.dtype(dtype).kind in "biuf"


# ----------------------------------------------------------------------------------------------
#                                         Array specs
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ArraySpec:
    """One per-sample array of a store.

    name:  array name inside the group (no '/', not starting with '.').
    shape: per-sample shape, without the sample axis: () for labels, (T, D) for tokens.
    dtype: numpy dtype string: "float16", "float32", "int8", "int64", "<U64" (fixed-width keys) ...
    """

    name: str
    shape: tuple[int, ...]
    dtype: str

    def __post_init__(self) -> None:
        if not self.name or "/" in self.name or self.name.startswith("."):
            raise ValueError(f"array name {self.name!r} must be non-empty, without '/', not starting with '.'")
        shape = tuple(int(s) for s in self.shape)
        if any(s <= 0 for s in shape):
            raise ValueError(f"array {self.name!r}: per-sample shape {shape} must have positive sizes")
        try:
            dtype = np.dtype(self.dtype)
        except TypeError as err:
            raise ValueError(f"array {self.name!r}: dtype {self.dtype!r} is not a numpy dtype") from err
        if dtype.kind not in "biufUS" or (dtype.kind in "US" and dtype.itemsize == 0):
            raise ValueError(
                f"array {self.name!r}: dtype {self.dtype!r} is not supported; use a bool/int/float "
                f"dtype or a fixed-width string such as '<U64'"
            )
        object.__setattr__(self, "shape", shape)
        object.__setattr__(self, "dtype", dtype.str if dtype.kind in "US" else dtype.name)

    @property
    def nbytes(self) -> int:
        """Uncompressed bytes of one sample of this array."""
        return int(np.prod(self.shape, dtype=np.int64)) * np.dtype(self.dtype).itemsize

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "shape": list(self.shape), "dtype": self.dtype}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> ArraySpec:
        return cls(data["name"], tuple(data["shape"]), data["dtype"])


def _fill_value(dtype: np.dtype) -> Any:
    return {"U": "", "S": b"", "b": False}.get(dtype.kind, 0)


def _layout(num_samples: int, specs: Sequence[ArraySpec], samples_per_shard: int) -> dict[str, Any]:
    return {
        "format": FORMAT_VERSION,
        "num_samples": int(num_samples),
        "samples_per_shard": int(samples_per_shard),
        "arrays": [s.to_json() for s in specs],
    }


def _json_normal(obj: Any) -> Any:
    """What `obj` becomes after a JSON round trip (tuples -> lists), for comparisons with stored attrs."""
    return json.loads(json.dumps(obj))


# ----------------------------------------------------------------------------------------------
#                                           Writer
# ----------------------------------------------------------------------------------------------


class StoreWriter:
    """Creates a store and publishes it range by range (see the module docstring for the scheme).

    path:              directory of the Zarr group (created by `create`).
    num_samples:       N, the length of every array's sample axis.
    specs:             the per-sample arrays.
    samples_per_shard: S, samples per shard file and per range.
    attrs:             JSON-serialisable user attributes stored on the group (`StoreReader.attrs`).
    compression:       "none" or "zstd" (Blosc-zstd) inside the shards of numeric arrays. It is not
                       part of the layout: an existing store is kept (and read) whichever it used.

    Typical use: `w.create()` once, then `w.write_range(a, b, arrays)` for every (a, b) in
    `w.ranges()` whose `a` is not in `w.done()` (in any processes), then `w.finish()`.
    The object is small and picklable: worker processes can rebuild or receive it.
    """

    def __init__(self, path: PathLike, num_samples: int, specs: Sequence[ArraySpec], samples_per_shard: int,
                 attrs: Mapping[str, Any] | None = None, compression: str = "none"):
        self.path = Path(path)
        self.num_samples = int(num_samples)
        self.specs = list(specs)
        self.samples_per_shard = int(samples_per_shard)
        self.attrs = dict(attrs or {})
        self.compression = compression
        if compression not in COMPRESSIONS:
            raise ValueError(f"store {self.path}: compression {compression!r} is not one of {COMPRESSIONS}")
        if self.num_samples <= 0:
            raise ValueError(f"store {self.path}: num_samples must be positive, got {num_samples}")
        if self.samples_per_shard <= 0:
            raise ValueError(f"store {self.path}: samples_per_shard must be positive, got {samples_per_shard}")
        if not self.specs:
            raise ValueError(f"store {self.path}: at least one ArraySpec is needed")
        names = [s.name for s in self.specs]
        if len(set(names)) != len(names):
            raise ValueError(f"store {self.path}: array names must be unique, got {names}")
        if LAYOUT_KEY in self.attrs:
            raise ValueError(f"store {self.path}: attribute {LAYOUT_KEY!r} is reserved for the store layout")
        try:
            json.dumps(self.attrs)
        except TypeError as err:
            raise ValueError(f"store {self.path}: attrs must be JSON-serialisable ({err})") from err

    # -- creation ----------------------------------------------------------------------------

    def create(self, overwrite: bool = False) -> None:
        """Create the group and its empty arrays if absent; otherwise check the existing store.

        An existing store must have the same specs, num_samples, samples_per_shard and attrs, else
        ValueError (nothing is modified). overwrite=True deletes whatever is at `path` first.
        The group is built in a temporary sibling directory and renamed into place, so concurrent
        `create` calls are safe and a half-created store is never visible.
        """
        if overwrite and self.path.exists():
            shutil.rmtree(self.path)
        if (self.path / "zarr.json").is_file():
            self._check_existing()
            return
        if self.path.exists() and (not self.path.is_dir() or any(self.path.iterdir())):
            raise ValueError(
                f"{self.path} exists but is not a feature store (no zarr.json); remove it or choose "
                f"another path"
            )
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.parent / f".{self.path.name}.tmp-{uuid.uuid4().hex[:12]}"
        try:
            self._build(tmp)
            try:
                os.rename(tmp, self.path)  # fails if another process published a non-empty store first
            except OSError:
                if not (self.path / "zarr.json").is_file():
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        fsync_dir(self.path.parent)
        self._check_existing()

    def _build(self, root: Path) -> None:
        attrs = {**self.attrs, LAYOUT_KEY: _layout(self.num_samples, self.specs, self.samples_per_shard)}
        with _quiet_zarr():
            group = zarr.open_group(str(root), mode="w", zarr_format=3, attributes=attrs)
            for spec in self.specs:
                dtype = np.dtype(spec.dtype)
                if not _numeric(dtype):  # keys: small, compress well, written and read by zarr
                    compressors = zarr.codecs.BloscCodec(cname="zstd", clevel=BLOSC_LEVEL, shuffle="noshuffle")
                elif self.compression == "zstd":
                    compressors = zarr.codecs.BloscCodec(cname="zstd", clevel=BLOSC_LEVEL, shuffle="shuffle")
                else:
                    compressors = None
                group.create_array(
                    spec.name,
                    shape=(self.num_samples, *spec.shape),
                    dtype=dtype,
                    chunks=(1, *spec.shape),
                    shards=(self.samples_per_shard, *spec.shape),
                    compressors=compressors,
                    fill_value=_fill_value(dtype),
                )
        (root / RANGES_DIR).mkdir()

    def _check_existing(self) -> None:
        try:
            with _quiet_zarr():
                stored = dict(zarr.open_group(str(self.path), mode="r").attrs)
        except Exception as err:  # noqa: BLE001 - any unreadable group is the same user error
            raise ValueError(f"{self.path} is not a readable Zarr v3 group ({err}); remove it and rerun") from err
        layout = stored.pop(LAYOUT_KEY, None)
        want = _json_normal(_layout(self.num_samples, self.specs, self.samples_per_shard))
        problems = []
        if layout is None:
            problems.append(f"no {LAYOUT_KEY!r} attribute (not written by StoreWriter)")
        else:
            for key in ("format", "num_samples", "samples_per_shard", "arrays"):
                if layout.get(key) != want[key]:
                    problems.append(f"{key}: stored {layout.get(key)!r}, requested {want[key]!r}")
        if stored != _json_normal(self.attrs):
            keys = sorted(k for k in set(stored) | set(self.attrs) if stored.get(k) != _json_normal(self.attrs.get(k)))
            problems.append(f"attrs differ in {keys}")
        if problems:
            raise ValueError(
                f"existing store {self.path} does not match the requested one: {'; '.join(problems)}. "
                f"Delete {self.path} (or create(overwrite=True)) to rebuild it"
            )

    # -- ranges ------------------------------------------------------------------------------

    def ranges(self) -> list[tuple[int, int]]:
        """Shard-aligned ranges [start, stop) covering [0, N): one per shard file, the last one short."""
        return _shard_ranges(self.num_samples, self.samples_per_shard)

    def done(self) -> set[int]:
        """Starts of the ranges already published (their markers exist)."""
        valid = set(self.ranges())
        found = set()
        for start, stop in _markers(self.path):
            if (start, stop) in valid:
                found.add(start)
        return found

    def write_range(self, start: int, stop: int, arrays: Mapping[str, np.ndarray]) -> None:
        """Publish samples [start, stop) of every array atomically (scratch, os.replace, marker).

        arrays: {spec name: array [stop - start, *spec.shape]} for every spec, cast to the spec's
                dtype with numpy's same-kind casting (float32 -> float16 is fine, float -> int is not);
                strings must fit the fixed width.
        (start, stop) must be one of `ranges()`. Rewriting a published range replaces it.
        """
        if (start, stop) not in set(self.ranges()):
            raise ValueError(
                f"store {self.path}: [{start}, {stop}) is not a shard-aligned range; use one of "
                f"StoreWriter.ranges() (samples_per_shard={self.samples_per_shard}, N={self.num_samples})"
            )
        data = self._check_arrays(start, stop, arrays)
        if not (self.path / "zarr.json").is_file():
            raise ValueError(f"store {self.path} does not exist; call StoreWriter.create() first")
        scratch_root = self.path / SCRATCH_DIR
        for stale in scratch_root.glob(f"{start}-{stop}-*"):
            shutil.rmtree(stale, ignore_errors=True)  # left by a killed writer of this range
        scratch = scratch_root / f"{start}-{stop}-{uuid.uuid4().hex[:12]}"
        (self.path / RANGES_DIR / f"{start}-{stop}").unlink(missing_ok=True)  # a rewrite is unpublished until done
        try:
            moves = []
            for spec in self.specs:
                moves += self._write_scratch(scratch, spec, start, stop, data[spec.name])
            for move in moves:
                _fsync_file(move.src)
            files: dict[str, list[dict[str, Any]]] = {}
            for move in moves:
                move.dst.parent.mkdir(parents=True, exist_ok=True)
                entry = {"key": move.key, "bytes": move.src.stat().st_size, "sha256": sha256_file(move.src)}
                os.replace(move.src, move.dst)
                files.setdefault(move.name, []).append(entry)
                faults.point("store.publish")
            for parent in {move.dst.parent for move in moves}:
                fsync_dir(parent)
            marker = {"start": start, "stop": stop, "files": files}
            atomic_write_json(self.path / RANGES_DIR / f"{start}-{stop}", marker)
            faults.point("store.range")
        finally:
            shutil.rmtree(scratch, ignore_errors=True)

    def _check_arrays(self, start: int, stop: int, arrays: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        names = {s.name for s in self.specs}
        missing, extra = sorted(names - set(arrays)), sorted(set(arrays) - names)
        if missing or extra:
            raise ValueError(
                f"store {self.path}: write_range needs exactly the arrays {sorted(names)}; "
                f"missing {missing}, unexpected {extra}"
            )
        out = {}
        for spec in self.specs:
            value = np.asarray(arrays[spec.name])
            want = (stop - start, *spec.shape)
            if value.shape != want:
                raise ValueError(f"store {self.path}: array {spec.name!r} for [{start}, {stop}) has shape "
                                 f"{value.shape}, expected {want}")
            dtype = np.dtype(spec.dtype)
            if dtype.kind in "US":
                if value.dtype.kind != dtype.kind:
                    raise ValueError(f"store {self.path}: array {spec.name!r} must hold {spec.dtype} strings, "
                                     f"got dtype {value.dtype}")
                width = dtype.itemsize // (4 if dtype.kind == "U" else 1)
                longest = int(np.char.str_len(value).max()) if value.size else 0
                if longest > width:
                    raise ValueError(f"store {self.path}: array {spec.name!r} has a string of length "
                                     f"{longest}, longer than its fixed width {width}")
            elif not np.can_cast(value.dtype, dtype, casting="same_kind"):
                raise ValueError(f"store {self.path}: array {spec.name!r} of dtype {value.dtype} cannot be "
                                 f"stored as {spec.dtype}")
            out[spec.name] = np.ascontiguousarray(value.astype(dtype, copy=False))
        return out

    def _write_scratch(self, scratch: Path, spec: ArraySpec, start: int, stop: int,
                       value: np.ndarray) -> list[_Move]:
        """Write one array's range into a scratch copy of it; returns the shard files to move."""
        real_dir = self.path / spec.name
        tmp_dir = scratch / spec.name
        tmp_dir.mkdir(parents=True)
        shutil.copyfile(real_dir / "zarr.json", tmp_dir / "zarr.json")
        if _numeric(spec.dtype):
            _open_ts(tmp_dir, write=True)[start:stop].write(value).result()
        else:
            with _quiet_zarr():
                zarr.open_array(str(tmp_dir), mode="r+").with_config({"write_empty_chunks": True})[start:stop] = value
        with _quiet_zarr():
            encode_key = zarr.open_array(str(tmp_dir), mode="r").metadata.encode_chunk_key
        moves = []
        s = self.samples_per_shard
        for shard in range(start // s, (stop - 1) // s + 1):
            key = encode_key((shard,) + (0,) * len(spec.shape))
            src = tmp_dir / key
            if not src.is_file():
                raise RuntimeError(f"no shard file {src} was written for range [{start}, {stop})")
            moves.append(_Move(spec.name, key, src, real_dir / key))
        return moves

    # -- completion --------------------------------------------------------------------------

    def verify(self, deep: bool = False) -> str | None:
        """None when every range is marked and its shard files exist with the recorded sizes (and,
        when `deep`, the recorded sha256: every byte is read); else a message naming what is wrong."""
        return _verify(self.path, self.specs, self.ranges(), deep)

    def finish(self) -> None:
        """Check that the store is complete (RuntimeError otherwise) and remove the scratch area."""
        problem = self.verify()
        if problem:
            raise RuntimeError(f"store {self.path} is incomplete: {problem}")
        shutil.rmtree(self.path / SCRATCH_DIR, ignore_errors=True)


class _Move(NamedTuple):
    """One shard file of a range: array name, chunk key, scratch location, final location."""

    name: str
    key: str
    src: Path
    dst: Path


def _shard_ranges(num_samples: int, samples_per_shard: int) -> list[tuple[int, int]]:
    s = samples_per_shard
    return [(a, min(a + s, num_samples)) for a in range(0, num_samples, s)]


def _markers(path: Path) -> list[tuple[int, int]]:
    out = []
    ranges_dir = path / RANGES_DIR
    if not ranges_dir.is_dir():
        return out
    for entry in ranges_dir.iterdir():
        a, sep, b = entry.name.partition("-")
        if sep and a.isdigit() and b.isdigit():
            out.append((int(a), int(b)))
    return sorted(out)


def _verify(path: Path, specs: Sequence[ArraySpec], ranges: list[tuple[int, int]], deep: bool = False) -> str | None:
    if not (path / "zarr.json").is_file():
        return f"store {path} does not exist"
    marked = set(_markers(path))
    missing = [r for r in ranges if r not in marked]
    if missing:
        shown = ", ".join(f"[{a}, {b})" for a, b in missing[:5])
        more = ", ..." if len(missing) > 5 else ""
        return f"{len(missing)} of {len(ranges)} ranges not written ({shown}{more})"
    to_hash: list[tuple[Path, dict[str, Any]]] = []
    for start, stop in ranges:
        marker = json.loads((path / RANGES_DIR / f"{start}-{stop}").read_text())
        for spec in specs:
            entries = marker.get("files", {}).get(spec.name)
            if not entries:
                return f"range [{start}, {stop}) records no shard file for array {spec.name!r}"
            for entry in entries:
                f = path / spec.name / entry["key"]
                if not f.is_file() or f.stat().st_size != entry["bytes"]:
                    return f"shard file {f} is missing or does not have the {entry['bytes']} bytes its marker records"
                if deep and "sha256" not in entry:
                    return f"shard file {f} was published without a checksum; rerun its stage with --force to add checksums"
                to_hash.append((f, entry))
    if not deep:
        return None
    with progress_bar(total=sum(e["bytes"] for _, e in to_hash), unit="B", unit_scale=True, desc=f"sha256 {path.name}",
              dynamic_ncols=True, leave=False, disable=None) as bar:  # disable=None: only on a terminal
        for f, entry in to_hash:
            if sha256_file(f) != entry["sha256"]:
                return f"shard file {f} does not have the sha256 its marker records (its bytes changed)"
            bar.update(entry["bytes"])
    return None


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# ----------------------------------------------------------------------------------------------
#                                           Reader
# ----------------------------------------------------------------------------------------------


class _ShardReader:
    """Direct reads of single samples from one array's shard files: one positioned read per sample.

    Valid only for the layout StoreWriter writes (shard index at the end with a crc32c, inner codecs
    `bytes` little-endian + optional Blosc, numeric dtype); `StoreReader` checks that and otherwise
    reads through tensorstore. Shard indexes are cached per file identity (inode, size, mtime), so a shard
    replaced by a later publish is re-indexed.
    """

    def __init__(self, root: Path, arr: zarr.Array, compressed: bool):
        self.root = root
        self.compressed = compressed
        self.sample_shape = tuple(arr.shape[1:])
        self.per_shard = int(arr.shards[0])
        self.dtype = np.dtype(arr.dtype).newbyteorder("<")
        self.fill = np.asarray(arr.fill_value, dtype=self.dtype)
        self.ndim = arr.ndim
        self.encode_key = arr.metadata.encode_chunk_key
        self.index_bytes = self.per_shard * 16 + _INDEX_CRC_BYTES
        self._index: dict[int, tuple[tuple[int, int, int], np.ndarray]] = {}

    def read_sorted(self, indices: np.ndarray, out: np.ndarray) -> None:
        """Fill out[j] with sample indices[j]; indices sorted ascending."""
        import google_crc32c
        from numcodecs import blosc

        if not len(indices):
            return
        shards = indices // self.per_shard
        bounds = np.flatnonzero(np.diff(shards)) + 1
        for group in np.split(np.arange(len(indices)), bounds):
            shard = int(shards[group[0]])
            path = self.root / self.encode_key((shard,) + (0,) * (self.ndim - 1))
            try:
                fd = os.open(path, os.O_RDONLY)
            except FileNotFoundError:
                out[group] = self.fill
                continue
            try:
                st = os.fstat(fd)
                ident = (st.st_ino, st.st_size, st.st_mtime_ns)
                cached = self._index.get(shard)
                if cached is None or cached[0] != ident:
                    raw = os.pread(fd, self.index_bytes, st.st_size - self.index_bytes)
                    body, crc = raw[:-_INDEX_CRC_BYTES], raw[-_INDEX_CRC_BYTES:]
                    if np.uint32(google_crc32c.value(body)).tobytes() != crc:
                        raise ValueError(f"shard index checksum mismatch in {path}: the file is corrupt")
                    cached = (ident, np.frombuffer(body, "<u8").reshape(self.per_shard, 2))
                    self._index[shard] = cached
                index = cached[1]
                for j in group:
                    offset, nbytes = index[int(indices[j]) - shard * self.per_shard]
                    if offset == _EMPTY:
                        out[j] = self.fill
                        continue
                    buf = os.pread(fd, int(nbytes), int(offset))
                    if self.compressed:
                        buf = blosc.decompress(buf)
                    out[j] = np.frombuffer(buf, self.dtype).reshape(self.sample_shape)
            finally:
                os.close(fd)


def _fast_reader(root: Path, arr: zarr.Array) -> _ShardReader | None:
    """A _ShardReader when the array has exactly the layout it understands, else None."""
    meta = arr.metadata.to_dict()
    dtype = np.dtype(arr.dtype)
    codecs = meta.get("codecs", [])
    if dtype.kind not in "biuf" or len(codecs) != 1 or codecs[0].get("name") != "sharding_indexed":
        return None
    conf = codecs[0]["configuration"]
    inner = [c["name"] for c in conf["codecs"]]
    index = [c["name"] for c in conf["index_codecs"]]
    if (
        conf.get("index_location", "end") != "end"
        or index != ["bytes", "crc32c"]
        or conf["index_codecs"][0].get("configuration", {}).get("endian", "little") != "little"
        or inner not in (["bytes"], ["bytes", "blosc"])
        or conf["codecs"][0].get("configuration", {}).get("endian", "little") != "little"
        or tuple(conf["chunk_shape"]) != (1, *arr.shape[1:])
        or meta["chunk_key_encoding"]["name"] != "default"
    ):
        return None
    return _ShardReader(root, arr, compressed=inner == ["bytes", "blosc"])


class PendingRead:
    """One array's batch read in flight; `result()` waits for it and returns [len(indices), *shape]
    in the requested order (each distinct sample was read once)."""

    def __init__(self, future: Any, inverse: np.ndarray):
        self._future, self._inverse = future, inverse

    def result(self) -> np.ndarray:
        data = self._future.result() if hasattr(self._future, "result") else self._future
        return np.asarray(data)[self._inverse]


class StoreReader:
    """Random access to a store written by StoreWriter.

    path:             the store's group directory.
    allow_incomplete: open a store whose ranges are not all published (unwritten samples read as
                      the fill value); by default that is a ValueError.

    Picklable: only the path is pickled and every process (DataLoader worker, Ray task) reopens the
    arrays lazily on first use. Numeric arrays are read by the direct shard reader (tensorstore for
    a layout it does not know), strings through zarr.
    """

    def __init__(self, path: PathLike, allow_incomplete: bool = False):
        self.path = Path(path)
        if not (self.path / "zarr.json").is_file():
            raise FileNotFoundError(f"no feature store at {self.path} (missing zarr.json); run the stage that writes it")
        with _quiet_zarr():
            attrs = dict(zarr.open_group(str(self.path), mode="r").attrs)
        layout = attrs.pop(LAYOUT_KEY, None)
        if layout is None:
            raise ValueError(f"{self.path} is a Zarr group but not a feature store (no {LAYOUT_KEY!r} attribute)")
        self.attrs: dict[str, Any] = attrs
        self.num_samples: int = int(layout["num_samples"])
        self.samples_per_shard: int = int(layout["samples_per_shard"])
        self.specs: dict[str, ArraySpec] = {a["name"]: ArraySpec.from_json(a) for a in layout["arrays"]}
        if not allow_incomplete:
            problem = self.verify()
            if problem:
                raise ValueError(f"feature store {self.path} is incomplete: {problem}; rerun the stage that writes it")
        self._open: dict[str, Any] = {}  # "engine:name" -> shard reader, tensorstore or zarr array
        self._pid = os.getpid()

    def verify(self, deep: bool = False) -> str | None:
        """None when every range is published with its shard files at their recorded sizes (and, when
        `deep`, their recorded sha256, reading every byte); else a message naming what is wrong."""
        ranges = _shard_ranges(self.num_samples, self.samples_per_shard)
        return _verify(self.path, list(self.specs.values()), ranges, deep)

    # -- checksums ---------------------------------------------------------------------------

    def _published_markers(self) -> list[Path]:
        """The marker files of this store's ranges that exist, in range order (stray markers of
        ranges the layout does not have are ignored, as `verify` ignores them)."""
        found = [self.path / RANGES_DIR / f"{a}-{b}" for a, b in _shard_ranges(self.num_samples, self.samples_per_shard)]
        return [m for m in found if m.is_file()]

    def published_files(self) -> dict[str, list[dict[str, Any]]]:
        """{array name: its shard files in range order, each {"key", "bytes"[, "sha256"]}}, read from
        the range markers (no data is read). ValueError names an unreadable marker."""
        out: dict[str, list[dict[str, Any]]] = {}
        for marker in self._published_markers():
            try:
                files = json.loads(marker.read_text())["files"]
            except (OSError, ValueError, KeyError, TypeError) as err:
                raise ValueError(f"range marker {marker} is unreadable ({type(err).__name__}: {err})") from None
            for name, entries in files.items():
                out.setdefault(name, []).extend(entries)
        return out

    def array_digests(self) -> dict[str, str]:
        """{array name: one sha256 over its shard files' recorded sha256, in range order}; arrays with
        a file published without a checksum are left out."""
        return {name: combined_digest((e["key"], e["sha256"]) for e in entries)
                for name, entries in self.published_files().items() if all("sha256" in e for e in entries)}

    def add_missing_checksums(self) -> int:
        """Hash the shard files whose markers predate checksums and rewrite those markers (atomically).
        Returns the number of files hashed. Trusts the bytes on disk: call it on a store that verifies."""
        hashed = 0
        for marker in self._published_markers():
            data = json.loads(marker.read_text())
            missing = [(name, e) for name, entries in data["files"].items() for e in entries if "sha256" not in e]
            for name, entry in missing:
                entry["sha256"] = sha256_file(self.path / name / entry["key"])
            if missing:
                atomic_write_json(marker, data)
                hashed += len(missing)
        return hashed

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_open"] = {}
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._pid = os.getpid()

    def __len__(self) -> int:
        return self.num_samples

    @property
    def names(self) -> list[str]:
        """Array names in the order they were declared."""
        return list(self.specs)

    def _get(self, name: str, engine: str = "auto") -> tuple[str, Any]:
        """(engine, opened array) that reads `name`: engine "auto" picks the shard reader for numeric
        arrays in the layout it knows, else tensorstore, and zarr for strings."""
        if name not in self.specs:
            raise KeyError(f"feature store {self.path} has no array {name!r}; it holds {self.names}")
        if engine not in ENGINES:
            raise ValueError(f"engine {engine!r} is not one of {ENGINES}")
        if self._pid != os.getpid():  # forked: do not share file state or thread pools with the parent
            self._open, self._pid = {}, os.getpid()
        numeric = _numeric(self.specs[name].dtype)
        if engine == "auto":
            engine = "zarr" if not numeric else "shard" if self._get(name, "shard")[1] is not None else "tensorstore"
        if engine != "zarr" and not numeric:
            raise ValueError(f"array {name!r} holds strings, which only the zarr engine reads")
        key = f"{engine}:{name}"
        if key not in self._open:
            if engine == "tensorstore":
                self._open[key] = _open_ts(self.path / name)
            else:
                with _quiet_zarr():
                    arr = zarr.open_array(str(self.path / name), mode="r")
                self._open[key] = _fast_reader(self.path / name, arr) if engine == "shard" else arr
        return engine, self._open[key]

    def array(self, name: str) -> zarr.Array:
        """The zarr array [N, *shape] (read-only), for slicing with zarr's own indexing."""
        return self._get(name, "zarr")[1]

    def read(self, name: str, indices: np.ndarray | Sequence[int], engine: str = "auto") -> np.ndarray:
        """Samples `indices` (any order, repeats allowed) of one array: [len(indices), *shape]."""
        return self.read_async(name, indices, engine, wait=True).result()

    def read_async(self, name: str, indices: np.ndarray | Sequence[int], engine: str = "auto",
                   wait: bool = False) -> PendingRead:
        """Start reading samples `indices` of one array; `.result()` returns what `read` returns.

        Each distinct sample is read once, in ascending order. engine: "auto" (what training uses),
        or one path forced, for comparisons: "shard" (the direct shard reader, run on this process's
        read threads), "tensorstore" (its own thread pool and futures), "zarr" (zarr-python's
        `oindex`, synchronous). Issue several reads before waiting to keep them in flight;
        `wait` reads in this thread instead.
        """
        engine, arr = self._get(name, engine)
        if arr is None:
            raise ValueError(f"array {name!r} of {self.path} is not in the layout the shard reader knows")
        idx = np.asarray(indices)
        if idx.ndim != 1 or (idx.size and idx.dtype.kind not in "iu"):
            raise ValueError(f"indices must be a 1-d integer sequence, got shape {idx.shape} dtype {idx.dtype}")
        idx = idx.astype(np.int64)
        if idx.size and (idx.min() < 0 or idx.max() >= self.num_samples):
            raise IndexError(f"indices must lie in [0, {self.num_samples}) for store {self.path}; "
                             f"got min {idx.min()}, max {idx.max()}")
        uniq, inverse = np.unique(idx, return_inverse=True)
        inverse = inverse.reshape(-1)
        spec = self.specs[name]
        if not uniq.size:
            return PendingRead(np.empty((0, *spec.shape), dtype=np.dtype(spec.dtype)), inverse)
        if engine == "tensorstore":
            return PendingRead(arr[uniq].read(), inverse)
        if engine == "zarr":
            with _quiet_zarr():
                return PendingRead(np.asarray(arr.oindex[uniq]), inverse)

        def shard_read() -> np.ndarray:
            out = np.empty((len(uniq), *spec.shape), dtype=np.dtype(spec.dtype))
            arr.read_sorted(uniq, out)
            return out

        return PendingRead(shard_read() if wait else _read_pool().submit(shard_read), inverse)
