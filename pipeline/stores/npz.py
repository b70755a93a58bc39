""".npz files too large to hold in memory: written member by member from chunks, read memory-mapped.

A 50K-sample ImageNet 256 evaluation batch (`samples.npz`, ADM layout) is 9.8 GB of uint8. Its
members are written as uncompressed (ZIP_STORED, zip64) `.npy` entries, chunk by chunk, so the
writer holds one chunk at a time; np.load reads the file as usual. Because a stored member's bytes
lie contiguously in the zip file, `open_npz_array` maps it with np.memmap instead of reading it, and
falls back to np.load for compressed members (np.savez_compressed).
"""

from __future__ import annotations

import struct
import zipfile
from collections.abc import Iterable, Mapping
from typing import BinaryIO

import numpy as np

from pipeline.stores.atomic import PathLike, atomic_write_with

_LOCAL_HEADER = struct.Struct("<4s5H3I2H")  # zip local file header, 30 bytes
_LOCAL_MAGIC = b"PK\x03\x04"
_HEADER_READERS = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}


def write_npz_streamed(
    path: PathLike,
    members: Mapping[str, tuple[tuple[int, ...], np.dtype | str, Iterable[np.ndarray]]],
) -> None:
    """Atomically write an uncompressed .npz whose arrays arrive in chunks along axis 0.

    members: {name: (full shape, dtype, chunks)}; the chunks' shapes must tile `shape` along axis 0
    and have its trailing dimensions and dtype (ValueError otherwise; nothing is published).
    """

    def write(f: BinaryIO) -> None:
        with zipfile.ZipFile(f, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
            for name, (shape, dtype, chunks) in members.items():
                _write_member(zf, name, tuple(int(s) for s in shape), np.dtype(dtype), chunks)

    atomic_write_with(path, write)


def _write_member(zf: zipfile.ZipFile, name: str, shape: tuple[int, ...], dtype: np.dtype,
                  chunks: Iterable[np.ndarray]) -> None:
    rows = 0
    with zf.open(f"{name}.npy", "w", force_zip64=True) as out:
        header = {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False, "shape": shape}
        np.lib.format.write_array_header_2_0(out, header)
        for chunk in chunks:
            chunk = np.asarray(chunk)
            if chunk.dtype != dtype or chunk.shape[1:] != shape[1:]:
                raise ValueError(f"npz member {name!r}: chunk {chunk.dtype} {list(chunk.shape)} does not fit "
                                 f"{dtype} {list(shape)}")
            rows += len(chunk)
            if rows > shape[0]:
                raise ValueError(f"npz member {name!r}: chunks hold more than the {shape[0]} rows declared")
            out.write(np.ascontiguousarray(chunk).tobytes())
    if rows != shape[0]:
        raise ValueError(f"npz member {name!r}: chunks hold {rows} rows, {shape[0]} declared")


def open_npz_array(path: PathLike, name: str) -> np.ndarray:
    """Array `name` of the .npz at `path`: a read-only np.memmap when the member is stored
    uncompressed (np.savez, write_npz_streamed), else loaded by np.load. KeyError if absent."""
    with zipfile.ZipFile(path) as zf:
        try:
            info = zf.getinfo(f"{name}.npy")
        except KeyError:
            raise KeyError(f"{path} has no array {name!r} (it has {sorted(n[:-4] for n in zf.namelist())})") from None
        if info.compress_type != zipfile.ZIP_STORED:
            with np.load(path) as z:
                return z[name]
    with open(path, "rb") as f:
        f.seek(info.header_offset)
        fields = _LOCAL_HEADER.unpack(f.read(_LOCAL_HEADER.size))
        if fields[0] != _LOCAL_MAGIC:
            raise ValueError(f"{path}: member {name!r} has no zip local header at offset {info.header_offset}")
        name_len, extra_len = fields[-2], fields[-1]
        start = info.header_offset + _LOCAL_HEADER.size + name_len + extra_len
        f.seek(start)
        version = np.lib.format.read_magic(f)
        read_header = _HEADER_READERS.get(version)
        if read_header is not None:
            shape, fortran, dtype = read_header(f)
            offset = f.tell()
    if read_header is None or dtype.hasobject or 0 in shape:  # nothing a memmap can (or needs to) map
        with np.load(path) as z:
            return z[name]
    return np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=shape, order="F" if fortran else "C")
