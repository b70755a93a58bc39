"""The on-disk layout of a per-sample feature store, and what its writer and reader share.

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
"none"`, the default) or Blosc-zstd compressed (`"zstd"`); docs/stores.md has the
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

I/O, chosen by measurement (docs/stores.md, "Store I/O, measured"). Numeric arrays are written through tensorstore
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
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import tensorstore as ts

from pipeline.stores.objects import ObjectURL, is_url, tensorstore_kvstore

LAYOUT_KEY = "store_layout"  # reserved group attribute holding the store's own bookkeeping
FORMAT_VERSION = 1
RANGES_DIR = ".ranges"
SCRATCH_DIR = ".scratch"
COMPRESSIONS = ("none", "zstd")  # inner-chunk codec: raw bytes, or Blosc-zstd level 3 with byte shuffle
BLOSC_LEVEL = 3
ENGINES = ("auto", "shard", "tensorstore", "zarr")  # StoreReader read paths (see StoreReader.read_async)
_STRING_DTYPE_WARNING = (
    r"The data type \((FixedLengthUTF32|NullTerminatedBytes)\(.*does not have a Zarr V3 specification"
)
# Reading a keys array with zarr's own indexing (StoreReader.array("keys")[:]) repeats the warning.
warnings.filterwarnings("ignore", message=_STRING_DTYPE_WARNING)


@contextlib.contextmanager
def quiet_zarr() -> Iterator[None]:
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


def open_tensorstore(path: Path | str, write: bool = False) -> ts.TensorStore:
    """The Zarr v3 array at `path` through tensorstore (metadata read from its zarr.json); an s3:// URL
    is read through tensorstore's own `s3` driver."""
    kvstore = (tensorstore_kvstore(ObjectURL.parse(path)) if is_url(path)
               else {"driver": "file", "path": str(path)})
    spec = {"driver": "zarr3", "kvstore": kvstore}
    if write:
        spec["store_data_equal_to_fill_value"] = True  # every sample is stored, as zarr's writes do
    return ts.open(spec, open=True, read=not write, write=write, context=_context()).result()


def is_numeric(dtype: str | np.dtype) -> bool:
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


def fill_value(dtype: np.dtype) -> Any:
    return {"U": "", "S": b"", "b": False}.get(dtype.kind, 0)


def layout_attrs(num_samples: int, specs: Sequence[ArraySpec], samples_per_shard: int) -> dict[str, Any]:
    return {
        "format": FORMAT_VERSION,
        "num_samples": int(num_samples),
        "samples_per_shard": int(samples_per_shard),
        "arrays": [s.to_json() for s in specs],
    }


def json_normal(obj: Any) -> Any:
    """What `obj` becomes after a JSON round trip (tuples -> lists), for comparisons with stored attrs."""
    return json.loads(json.dumps(obj))


def shard_ranges(num_samples: int, samples_per_shard: int) -> list[tuple[int, int]]:
    s = samples_per_shard
    return [(a, min(a + s, num_samples)) for a in range(0, num_samples, s)]


def range_markers(path: Path) -> list[tuple[int, int]]:
    out = []
    ranges_dir = path / RANGES_DIR
    if not ranges_dir.is_dir():
        return out
    for entry in ranges_dir.iterdir():
        a, sep, b = entry.name.partition("-")
        if sep and a.isdigit() and b.isdigit():
            out.append((int(a), int(b)))
    return sorted(out)


def fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
