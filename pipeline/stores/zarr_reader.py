"""StoreReader: random batches from a store, through the direct shard reader or tensorstore (the layout:
pipeline/stores/zarr_layout.py)."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import zarr
import zarr.codecs

from pipeline.stores.atomic import PathLike, atomic_write_json
from pipeline.stores.checksum import combined_digest, sha256_file
from pipeline.stores.mirror import remote_dir
from pipeline.stores.zarr_layout import (
    ENGINES,
    LAYOUT_KEY,
    RANGES_DIR,
    ArraySpec,
    is_numeric,
    open_tensorstore,
    quiet_zarr,
    shard_ranges,
)
from pipeline.stores.zarr_verify import verify_ranges

_EMPTY = np.uint64(2**64 - 1)  # shard index entry of a chunk that is not stored
_INDEX_CRC_BYTES = 4

_POOL: tuple[int, ThreadPoolExecutor] | None = None


def _read_pool() -> ThreadPoolExecutor:
    """This process's threads for StoreReader.read_async on the shard reader (pread and Blosc release
    the GIL); rebuilt after a fork."""
    global _POOL
    if _POOL is None or _POOL[0] != os.getpid():
        _POOL = (os.getpid(), ThreadPoolExecutor(min(8, os.cpu_count() or 1), thread_name_prefix="store-read"))
    return _POOL[1]


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

    def __init__(self, future: Any, inverse: np.ndarray | None):
        self._future, self._inverse = future, inverse  # inverse None: the indices were sorted and unique

    def result(self) -> np.ndarray:
        data = np.asarray(self._future.result() if hasattr(self._future, "result") else self._future)
        return data if self._inverse is None else data[self._inverse]


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
        with quiet_zarr():
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
        self.remote = remote_dir(self.path)  # its URL, when pulled without its shard files (pipeline.stores.mirror)
        self._local: dict[str, bool] = {}  # array name -> all its shard files are here

    def verify(self, deep: bool = False) -> str | None:
        """None when every range is published with its shard files at their recorded sizes (and, when
        `deep`, their recorded sha256, reading every byte); else a message naming what is wrong."""
        ranges = shard_ranges(self.num_samples, self.samples_per_shard)
        return verify_ranges(self.path, list(self.specs.values()), ranges, deep)

    # -- checksums ---------------------------------------------------------------------------

    def _published_markers(self) -> list[Path]:
        """The marker files of this store's ranges that exist, in range order (stray markers of
        ranges the layout does not have are ignored, as `verify` ignores them)."""
        found = [self.path / RANGES_DIR / f"{a}-{b}" for a, b in shard_ranges(self.num_samples, self.samples_per_shard)]
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
        """(engine, opened array) that reads `name`: engine "auto" picks the shard reader for raw numeric
        arrays in the layout it knows, tensorstore for compressed ones (its C++ threads decode Blosc
        1.2-1.3x faster than the shard reader here: docs/stores.md) and for other layouts, zarr for strings."""
        if name not in self.specs:
            raise KeyError(f"feature store {self.path} has no array {name!r}; it holds {self.names}")
        if engine not in ENGINES:
            raise ValueError(f"engine {engine!r} is not one of {ENGINES}")
        if self._pid != os.getpid():  # forked: do not share file state or thread pools with the parent
            self._open, self._pid = {}, os.getpid()
        numeric = is_numeric(self.specs[name].dtype)
        in_place = numeric and self.remote is not None and not self._all_local(name)
        if engine == "auto":
            shard = None if not numeric or in_place else self._get(name, "shard")[1]
            engine = "zarr" if not numeric else "shard" if shard is not None and not shard.compressed else "tensorstore"
        if engine == "zarr" and in_place:
            engine = "tensorstore"  # zarr would read the absent chunks as fill values; tensorstore reads the objects
        if engine != "zarr" and not numeric:
            raise ValueError(f"array {name!r} holds strings, which only the zarr engine reads")
        key = f"{engine}:{name}"
        if key not in self._open:
            if engine == "tensorstore":
                self._open[key] = open_tensorstore(f"{self.remote}/{name}" if in_place else self.path / name)
            elif engine == "shard" and in_place:
                self._open[key] = None  # its shard files are not on this machine
            else:
                with quiet_zarr():
                    arr = zarr.open_array(str(self.path / name), mode="r")
                self._open[key] = _fast_reader(self.path / name, arr) if engine == "shard" else arr
        return engine, self._open[key]

    def _all_local(self, name: str) -> bool:
        """Whether every published shard file of array `name` is on this machine at its recorded size (a
        store pulled without its shard files may hold some: those its machine wrote)."""
        if name not in self._local:
            files = self.published_files().get(name, [])
            self._local[name] = all((f := self.path / name / e["key"]).is_file() and f.stat().st_size == e["bytes"]
                                    for e in files)
        return self._local[name]

    def array(self, name: str) -> zarr.Array:
        """The zarr array [N, *shape] (read-only), for slicing with zarr's own indexing (a tensorstore array
        for a numeric array whose shard files are on object storage: `np.asarray(store.array(n)[:])`)."""
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
        if idx.size and (np.diff(idx) > 0).all():  # training's reads: sorted and unique, returned as read
            uniq, inverse = idx, None
        else:
            uniq, inverse = np.unique(idx, return_inverse=True)
            inverse = inverse.reshape(-1)
        spec = self.specs[name]
        if not uniq.size:
            return PendingRead(np.empty((0, *spec.shape), dtype=np.dtype(spec.dtype)), inverse)
        if engine == "tensorstore":
            return PendingRead(arr[uniq].read(), inverse)
        if engine == "zarr":
            with quiet_zarr():
                return PendingRead(np.asarray(arr.oindex[uniq]), inverse)

        def shard_read() -> np.ndarray:
            out = np.empty((len(uniq), *spec.shape), dtype=np.dtype(spec.dtype))
            arr.read_sorted(uniq, out)
            return out

        return PendingRead(shard_read() if wait else _read_pool().submit(shard_read), inverse)
