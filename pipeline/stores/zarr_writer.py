"""StoreWriter: creates a store and publishes it range by range (the scheme: pipeline/stores/zarr_layout.py)."""

from __future__ import annotations

import json
import os
import shutil
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import zarr
import zarr.codecs

from pipeline import faults
from pipeline.stores.atomic import PathLike, atomic_write_json, fsync_dir
from pipeline.stores.checksum import sha256_file
from pipeline.stores.zarr_layout import (
    BLOSC_LEVEL,
    COMPRESSIONS,
    LAYOUT_KEY,
    RANGES_DIR,
    SCRATCH_DIR,
    ArraySpec,
    fill_value,
    fsync_file,
    is_numeric,
    json_normal,
    layout_attrs,
    open_tensorstore,
    quiet_zarr,
    range_markers,
    shard_ranges,
)
from pipeline.stores.zarr_verify import verify_ranges

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
        attrs = {**self.attrs, LAYOUT_KEY: layout_attrs(self.num_samples, self.specs, self.samples_per_shard)}
        with quiet_zarr():
            group = zarr.open_group(str(root), mode="w", zarr_format=3, attributes=attrs)
            for spec in self.specs:
                dtype = np.dtype(spec.dtype)
                if not is_numeric(dtype):  # keys: small, compress well, written and read by zarr
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
                    fill_value=fill_value(dtype),
                )
        (root / RANGES_DIR).mkdir()

    def _check_existing(self) -> None:
        try:
            with quiet_zarr():
                stored = dict(zarr.open_group(str(self.path), mode="r").attrs)
        except Exception as err:  # noqa: BLE001 - any unreadable group is the same user error
            raise ValueError(f"{self.path} is not a readable Zarr v3 group ({err}); remove it and rerun") from err
        layout = stored.pop(LAYOUT_KEY, None)
        want = json_normal(layout_attrs(self.num_samples, self.specs, self.samples_per_shard))
        problems = []
        if layout is None:
            problems.append(f"no {LAYOUT_KEY!r} attribute (not written by StoreWriter)")
        else:
            for key in ("format", "num_samples", "samples_per_shard", "arrays"):
                if layout.get(key) != want[key]:
                    problems.append(f"{key}: stored {layout.get(key)!r}, requested {want[key]!r}")
        if stored != json_normal(self.attrs):
            keys = sorted(k for k in set(stored) | set(self.attrs) if stored.get(k) != json_normal(self.attrs.get(k)))
            problems.append(f"attrs differ in {keys}")
        if problems:
            raise ValueError(
                f"existing store {self.path} does not match the requested one: {'; '.join(problems)}. "
                f"Delete {self.path} (or create(overwrite=True)) to rebuild it"
            )

    # -- ranges ------------------------------------------------------------------------------

    def ranges(self) -> list[tuple[int, int]]:
        """Shard-aligned ranges [start, stop) covering [0, N): one per shard file, the last one short."""
        return shard_ranges(self.num_samples, self.samples_per_shard)

    def done(self) -> set[int]:
        """Starts of the ranges already published (their markers exist)."""
        valid = set(self.ranges())
        found = set()
        for start, stop in range_markers(self.path):
            if (start, stop) in valid:
                found.add(start)
        return found

    def write_range(self, start: int, stop: int, arrays: Mapping[str, np.ndarray]) -> dict[str, Any]:
        """Publish samples [start, stop) of every array atomically (scratch, os.replace, marker); returns
        the range's marker {start, stop, files: {array: [{key, bytes, sha256}]}}.

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
                fsync_file(move.src)
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
            return marker
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
        if is_numeric(spec.dtype):
            open_tensorstore(tmp_dir, write=True)[start:stop].write(value).result()
        else:
            with quiet_zarr():
                zarr.open_array(str(tmp_dir), mode="r+").with_config({"write_empty_chunks": True})[start:stop] = value
        with quiet_zarr():
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
        return verify_ranges(self.path, self.specs, self.ranges(), deep)

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
