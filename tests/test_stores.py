"""Zarr feature stores: layout, round trips, shuffled reads, keys, atomic ranges and resume after a kill."""

from __future__ import annotations

import hashlib
import json
import multiprocessing as mp
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import zarr

from pipeline.stores.zarr_store import ArraySpec, StoreReader, StoreWriter

# zarr flags fixed-width strings as not yet in the v3 spec whenever a test reads keys through zarr
pytestmark = pytest.mark.filterwarnings("ignore:The data type .* does not have a Zarr V3 specification")
ROOT = Path(__file__).resolve().parents[1]
N, S = 37, 8  # 5 ranges, the last one 5 samples long
SPECS = [
    ArraySpec("tokens", (6, 5), "float16"),
    ArraySpec("tokens_q", (6, 5), "int8"),
    ArraySpec("moments", (2, 3, 3), "float32"),
    ArraySpec("labels", (), "int64"),
    ArraySpec("keys", (), "<U64"),
]
ATTRS = {"teacher": "dinov2_vits14", "grid": [2, 3], "scale": 0.18215}


def make_data(n: int = N) -> dict[str, np.ndarray]:
    """Per-sample arrays whose values are a closed-form function of the sample index."""
    rng = np.random.default_rng(0)
    i = np.arange(n)
    return {
        "tokens": (rng.standard_normal((n, 6, 5)) * 3).astype(np.float16),
        "tokens_q": rng.integers(-127, 128, (n, 6, 5)).astype(np.int8),
        "moments": rng.standard_normal((n, 2, 3, 3)).astype(np.float32),
        "labels": (i * 7 % 10).astype(np.int64),
        "keys": np.array([f"n{j:08d}_ä{'x' * (j % 50)}" for j in i], dtype="<U64"),
    }


def write_all(path: Path, data: dict[str, np.ndarray], ranges: list[tuple[int, int]] | None = None,
              compression: str = "none") -> StoreWriter:
    writer = StoreWriter(path, N, SPECS, S, ATTRS, compression=compression)
    writer.create()
    for a, b in ranges if ranges is not None else writer.ranges():
        writer.write_range(a, b, {k: v[a:b] for k, v in data.items()})
    return writer


def shard_files(path: Path) -> dict[str, bytes]:
    """Every published file under the arrays (metadata and shards), by relative path."""
    out = {}
    for spec in SPECS:
        for f in sorted((path / spec.name).rglob("*")):
            if f.is_file():
                out[str(f.relative_to(path))] = f.read_bytes()
    return out


# ----------------------------------------------------------------------------------------------
#                                         Layout
# ----------------------------------------------------------------------------------------------


def test_ranges_are_shard_aligned(tmp_path):
    writer = StoreWriter(tmp_path / "s.zarr", N, SPECS, S)
    assert writer.ranges() == [(0, 8), (8, 16), (16, 24), (24, 32), (32, 37)]
    assert StoreWriter(tmp_path / "t.zarr", 16, SPECS, 8).ranges() == [(0, 8), (8, 16)]
    assert StoreWriter(tmp_path / "u.zarr", 3, SPECS, 1024).ranges() == [(0, 3)]


@pytest.mark.parametrize("compression", ["none", "zstd"])
def test_zarr_layout_one_sample_chunks_in_shards(tmp_path, compression):
    path = tmp_path / "s.zarr"
    write_all(path, make_data(), compression=compression)
    meta = json.loads((path / "tokens" / "zarr.json").read_text())
    assert meta["zarr_format"] == 3 and meta["shape"] == [N, 6, 5]
    assert meta["chunk_grid"]["configuration"]["chunk_shape"] == [S, 6, 5]  # the shard
    (codec,) = meta["codecs"]
    assert codec["name"] == "sharding_indexed"
    assert codec["configuration"]["chunk_shape"] == [1, 6, 5]  # the inner chunk: one sample
    inner = [c["name"] for c in codec["configuration"]["codecs"]]
    if compression == "none":  # raw samples: a shard is S samples' bytes plus its index
        assert inner == ["bytes"]
        index_bytes = S * 16 + 4
        assert (path / "tokens" / "c" / "0" / "0" / "0").stat().st_size == S * 6 * 5 * 2 + index_bytes
    else:
        assert inner == ["bytes", "blosc"] and codec["configuration"]["codecs"][1]["configuration"]["cname"] == "zstd"
    keys_codecs = json.loads((path / "keys" / "zarr.json").read_text())["codecs"][0]["configuration"]["codecs"]
    assert [c["name"] for c in keys_codecs] == ["bytes", "blosc"]  # strings are always compressed
    # One shard file per range, at the default chunk key c/<shard>/0/0 (c/<shard> for scalars).
    assert sorted(p.relative_to(path / "tokens").as_posix() for p in (path / "tokens" / "c").rglob("*") if p.is_file()) \
        == [f"c/{s}/0/0" for s in range(5)]
    assert sorted(p.name for p in (path / "labels" / "c").iterdir()) == ["0", "1", "2", "3", "4"]
    assert sorted(p.name for p in (path / ".ranges").iterdir()) == ["0-8", "16-24", "24-32", "32-37", "8-16"]
    group = zarr.open_group(str(path), mode="r")  # the bookkeeping folders do not confuse zarr
    with pytest.warns(UserWarning, match="not recognized as a component"):
        assert sorted(group.array_keys()) == sorted(s.name for s in SPECS)


# ----------------------------------------------------------------------------------------------
#                                       Round trips
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("compression", ["none", "zstd"])
def test_round_trip_with_shuffled_batches(tmp_path, compression):
    data = make_data()
    path = tmp_path / "s.zarr"
    write_all(path, data, compression=compression).finish()
    reader = StoreReader(path)
    assert reader.num_samples == N == len(reader)
    assert reader.names == [s.name for s in SPECS]
    assert reader.attrs == ATTRS
    perm = np.random.default_rng(1).permutation(N)
    for batch in np.array_split(perm, 4):
        for name, ref in data.items():
            got = reader.read(name, batch)
            assert got.dtype == ref.dtype and got.shape == (len(batch), *ref.shape[1:])
            assert got.tobytes() == ref[batch].tobytes(), name
    # repeats, lists, a single index and an empty batch
    idx = [5, 36, 5, 0, 36]
    for name, ref in data.items():
        np.testing.assert_array_equal(reader.read(name, idx), ref[idx])
        assert reader.read(name, np.array([], dtype=np.int64)).shape == (0, *ref.shape[1:])
    # zarr's own view of the arrays agrees
    for name, ref in data.items():
        np.testing.assert_array_equal(np.asarray(reader.array(name)[:]), ref)


@pytest.mark.parametrize("compression", ["none", "zstd"])
def test_every_read_engine_agrees_with_zarr(tmp_path, compression):
    data = make_data()
    path = tmp_path / "s.zarr"
    write_all(path, data, compression=compression)
    reader = StoreReader(path)
    idx = np.array([36, 0, 17, 9, 8, 31, 0])
    for name in ("tokens", "tokens_q", "moments", "labels"):
        want = "shard" if compression == "none" else "tensorstore"  # compressed: tensorstore decodes faster
        assert reader._get(name)[0] == want, f"{name} ({compression}) should be read by {want}"
        ref = np.asarray(reader.array(name).oindex[np.unique(idx)])[np.unique(idx, return_inverse=True)[1]]
        np.testing.assert_array_equal(ref, data[name][idx])
        for engine in ("auto", "shard", "tensorstore", "zarr"):
            got = reader.read(name, idx, engine=engine)
            assert got.dtype == ref.dtype and got.tobytes() == ref.tobytes(), (name, engine)
    assert reader._get("keys")[0] == "zarr"  # strings go through zarr
    with pytest.raises(ValueError, match="strings"):
        reader.read("keys", [0], engine="tensorstore")
    # several reads in flight on every engine, waited for in any order
    for engine in ("shard", "tensorstore"):
        pending = [reader.read_async("tokens", idx[:k], engine=engine) for k in (6, 2, 4)]
        for k, p in zip((4, 2, 6), pending[::-1], strict=True):
            np.testing.assert_array_equal(p.result(), data["tokens"][idx[:k]])


def test_arrays_in_another_layout_are_read_through_tensorstore(tmp_path):
    """A numeric array in a layout the shard reader does not know (its shard index at the start of the
    file, as another Zarr writer may put it) is read through tensorstore, with the same values."""
    path = tmp_path / "s.zarr"
    data = make_data()
    write_all(path, data)
    shutil.rmtree(path / "moments")
    arr = zarr.create_array(str(path / "moments"), shape=(N, 2, 3, 3), dtype="float32", chunks=(1, 2, 3, 3),
                            shards={"shape": (S, 2, 3, 3), "index_location": "start"}, compressors=None, fill_value=0)
    arr[:] = data["moments"]
    reader = StoreReader(path, allow_incomplete=True)  # the rewritten shard files no longer match the markers
    assert reader._get("moments")[0] == "tensorstore"
    idx = [36, 3, 3, 20]
    np.testing.assert_array_equal(reader.read("moments", idx), data["moments"][idx])
    with pytest.raises(ValueError, match="shard reader"):
        reader.read("moments", idx, engine="shard")


def test_stores_written_before_tensorstore_are_read_unchanged():
    """A store written by the previous writer (zarr-python writes, Blosc-zstd) is a committed
    fixture: the reader gives back make_data() from it, and a writer of the same layout keeps it."""
    fixture = ROOT / "tests" / "data" / "store-before-tensorstore.zarr"
    data = make_data()
    reader = StoreReader(fixture)
    assert reader.verify(deep=True) is None
    perm = np.random.default_rng(2).permutation(N)
    for name, ref in data.items():
        assert reader.read(name, perm).tobytes() == ref[perm].tobytes(), name
    writer = StoreWriter(fixture, N, SPECS, S, ATTRS)  # the default compression differs: still the same store
    writer.create()
    assert writer.done() == {a for a, _ in writer.ranges()}


def test_keys_round_trip(tmp_path):
    keys = np.array(["a", "ß-ünïcode", "x" * 64, "", "n01440764_10026"], dtype="<U64")
    path = tmp_path / "k.zarr"
    writer = StoreWriter(path, len(keys), [ArraySpec("keys", (), "<U64")], 2)
    writer.create()
    for a, b in writer.ranges():
        writer.write_range(a, b, {"keys": keys[a:b].tolist()})  # plain Python strings work too
    reader = StoreReader(path)
    assert list(reader.read("keys", [4, 0, 2])) == ["n01440764_10026", "a", "x" * 64]
    assert list(map(str, reader.array("keys")[:])) == list(keys)


def test_reader_pickles_and_reads_in_worker_processes(tmp_path):
    data = make_data()
    path = tmp_path / "s.zarr"
    write_all(path, data)
    reader = StoreReader(path)
    reader.read("tokens", [0, 1])  # open arrays (and tensorstore's thread pools) in the parent first
    clone = pickle.loads(pickle.dumps(reader))
    assert clone._open == {}
    np.testing.assert_array_equal(clone.read("tokens", [3, 2]), data["tokens"][[3, 2]])
    with mp.get_context("forkserver").Pool(1) as pool:
        got = pool.apply(_read_in_child, (reader, "moments", [30, 4]))
    np.testing.assert_array_equal(got, data["moments"][[30, 4]])
    with mp.get_context("forkserver").Pool(1) as pool:
        got = pool.apply(_read_keys_in_child, (reader,))
    assert got == list(data["keys"][:3])


def _read_in_child(reader: StoreReader, name: str, idx: list[int]) -> np.ndarray:
    return reader.read(name, idx)


def _read_keys_in_child(reader: StoreReader) -> list[str]:
    return list(reader.array("keys")[:3])


# ----------------------------------------------------------------------------------------------
#                                     Checks and errors
# ----------------------------------------------------------------------------------------------


def test_create_is_idempotent_and_rejects_mismatches(tmp_path):
    path = tmp_path / "s.zarr"
    data = make_data()
    write_all(path, data, ranges=[(0, 8)])
    before = shard_files(path)
    StoreWriter(path, N, SPECS, S, ATTRS).create()  # same layout: kept as is
    assert shard_files(path) == before
    assert StoreWriter(path, N, SPECS, S, ATTRS).done() == {0}
    bad = [
        (N + 1, SPECS, S, ATTRS, "num_samples"),
        (N, SPECS[:-1], S, ATTRS, "arrays"),
        (N, [ArraySpec("tokens", (6, 5), "float32"), *SPECS[1:]], S, ATTRS, "arrays"),
        (N, SPECS, 4, ATTRS, "samples_per_shard"),
        (N, SPECS, S, {**ATTRS, "scale": 1.0}, "attrs differ in ['scale']"),
    ]
    for n, specs, s, attrs, words in bad:
        with pytest.raises(ValueError, match=r"does not match") as err:
            StoreWriter(path, n, specs, s, attrs).create()
        assert words in str(err.value)
    StoreWriter(path, N + 1, SPECS, S, ATTRS).create(overwrite=True)
    assert StoreWriter(path, N + 1, SPECS, S, ATTRS).done() == set()
    junk = tmp_path / "junk"
    junk.mkdir()
    (junk / "file.txt").write_text("x")
    with pytest.raises(ValueError, match="not a feature store"):
        StoreWriter(junk, N, SPECS, S).create()


def test_write_range_validates_its_input(tmp_path):
    writer = StoreWriter(tmp_path / "s.zarr", N, SPECS, S, ATTRS)
    data = make_data()
    with pytest.raises(ValueError, match="create"):
        writer.write_range(0, 8, {k: v[:8] for k, v in data.items()})
    writer.create()
    part = {k: v[:8] for k, v in data.items()}
    with pytest.raises(ValueError, match="shard-aligned"):
        writer.write_range(0, 7, {k: v[:7] for k, v in data.items()})
    with pytest.raises(ValueError, match=r"missing \['labels'\]"):
        writer.write_range(0, 8, {k: v for k, v in part.items() if k != "labels"})
    with pytest.raises(ValueError, match="shape"):
        writer.write_range(0, 8, {**part, "tokens": part["tokens"][:, :5]})
    with pytest.raises(ValueError, match="cannot be stored as int64"):
        writer.write_range(0, 8, {**part, "labels": part["labels"].astype(np.float32)})
    with pytest.raises(ValueError, match="longer than its fixed width 64"):
        writer.write_range(0, 8, {**part, "keys": np.array(["y" * 65] * 8)})
    assert writer.done() == set()
    with pytest.raises(ValueError, match="reserved"):
        StoreWriter(tmp_path / "x.zarr", N, SPECS, S, {"store_layout": 1})
    with pytest.raises(ValueError, match="unique"):
        StoreWriter(tmp_path / "x.zarr", N, SPECS + SPECS[:1], S)
    with pytest.raises(ValueError, match="not supported"):
        ArraySpec("x", (), "object")


def test_incomplete_store_is_refused_by_reader(tmp_path):
    path = tmp_path / "s.zarr"
    data = make_data()
    writer = write_all(path, data, ranges=[(0, 8), (32, 37)])
    assert "3 of 5 ranges not written" in writer.verify()
    with pytest.raises(RuntimeError, match="incomplete"):
        writer.finish()
    with pytest.raises(ValueError, match="incomplete"):
        StoreReader(path)
    reader = StoreReader(path, allow_incomplete=True)
    np.testing.assert_array_equal(reader.read("moments", [33, 9]), np.stack([data["moments"][33], np.zeros((2, 3, 3))]))
    with pytest.raises(IndexError):
        reader.read("labels", [N])
    with pytest.raises(KeyError, match="no array 'hidden'"):
        reader.read("hidden", [0])
    with pytest.raises(FileNotFoundError, match="no feature store"):
        StoreReader(tmp_path / "nothing.zarr")
    # a published shard that disappears is caught by verify
    writer.write_range(8, 16, {k: v[8:16] for k, v in data.items()})
    (path / "labels" / "c" / "1").unlink()
    problem = writer.verify()
    assert problem and "2 of 5" in problem
    for a, b in [(16, 24), (24, 32)]:
        writer.write_range(a, b, {k: v[a:b] for k, v in data.items()})
    assert "labels/c/1" in writer.verify()


def test_markers_record_shard_checksums_and_deep_verify_rereads_them(tmp_path):
    data = make_data()
    path = tmp_path / "s.zarr"
    writer = write_all(path, data)
    writer.finish()
    reader = StoreReader(path)
    files = reader.published_files()
    assert sorted(files) == sorted(s.name for s in SPECS)
    for name, entries in files.items():
        assert len(entries) == 5  # one shard file per range
        for e in entries:  # the recorded digest is the file's, computed independently here
            assert e["sha256"] == hashlib.sha256((path / name / e["key"]).read_bytes()).hexdigest()
    digests = reader.array_digests()
    expected = hashlib.sha256("".join(f"{e['key']} {e['sha256']}\n" for e in files["tokens"]).encode()).hexdigest()
    assert digests["tokens"] == expected
    assert StoreReader(write_all(tmp_path / "again.zarr", data).path).array_digests() == digests  # same data
    assert writer.verify(deep=True) is None and reader.verify(deep=True) is None

    # a stray marker of a range this layout does not have is ignored, as verify ignores it
    (path / ".ranges" / "40-48").write_text(json.dumps({"start": 40, "stop": 48, "files": {"tokens": [
        {"key": "c/5/0/0", "bytes": 1, "sha256": "0" * 64}]}}))
    assert reader.array_digests() == digests

    # one flipped byte keeps the size: only the deep check sees it
    victim = path / "moments" / files["moments"][2]["key"]
    raw = bytearray(victim.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    victim.write_bytes(bytes(raw))
    assert writer.verify() is None
    problem = writer.verify(deep=True)
    assert problem and str(victim) in problem and "sha256" in problem


def test_markers_without_checksums_are_backfilled_and_bad_markers_named(tmp_path):
    data = make_data()
    path = tmp_path / "s.zarr"
    write_all(path, data).finish()
    reader = StoreReader(path)
    digests = reader.array_digests()
    for marker in (path / ".ranges").iterdir():  # as written before checksums existed
        old = json.loads(marker.read_text())
        for entries in old["files"].values():
            for e in entries:
                e.pop("sha256")
        marker.write_text(json.dumps(old))
    assert reader.array_digests() == {}
    assert "without a checksum" in reader.verify(deep=True)
    assert reader.add_missing_checksums() == 5 * len(SPECS)
    assert reader.array_digests() == digests and reader.verify(deep=True) is None
    assert reader.add_missing_checksums() == 0

    (path / ".ranges" / "8-16").write_text("{not json")
    with pytest.raises(ValueError, match=r"range marker .*8-16 is unreadable"):
        reader.array_digests()


# ----------------------------------------------------------------------------------------------
#                                  Crash, resume, concurrency
# ----------------------------------------------------------------------------------------------

KILL_SCRIPT = """
import os, signal, sys
import numpy as np
sys.path.insert(0, {root!r}); sys.path.insert(0, {tests!r})
from test_stores import N, S, SPECS, ATTRS, make_data
from pipeline.stores.zarr_store import StoreWriter
import pipeline.stores.zarr_writer as zw
real_replace, moved = os.replace, []
def replace_then_die(src, dst):
    real_replace(src, dst)
    if "/.scratch/" in str(src):
        moved.append(dst)
        if len(moved) == 2:  # two arrays' shards of the range are in place, the rest and the marker are not
            os.kill(os.getpid(), signal.SIGKILL)
zw.os.replace = replace_then_die
data = make_data()
w = StoreWriter({path!r}, N, SPECS, S, ATTRS)
w.write_range(8, 16, {{k: v[8:16] for k, v in data.items()}})
"""


def test_killed_writer_leaves_no_visible_range_and_resume_is_exact(tmp_path):
    data = make_data()
    clean = tmp_path / "clean.zarr"
    write_all(clean, data).finish()

    path = tmp_path / "crash.zarr"
    write_all(path, data, ranges=[(0, 8), (24, 32)])
    script = KILL_SCRIPT.format(root=str(ROOT), tests=str(ROOT / "tests"), path=str(path))
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == -9, proc.stderr
    junk = list((path / ".scratch").iterdir())
    assert junk and junk[0].name.startswith("8-16-")  # the killed writer's scratch is still there
    (path / ".scratch" / "16-24-deadbeef").mkdir()  # and a scratch dir of another killed range

    writer = StoreWriter(path, N, SPECS, S, ATTRS)
    writer.create()
    assert writer.done() == {0, 24}  # the killed range is not visible
    assert "[8, 16)" in writer.verify()
    for a, b in writer.ranges():
        if a not in writer.done():
            writer.write_range(a, b, {k: v[a:b] for k, v in data.items()})
    writer.finish()
    assert not (path / ".scratch").exists()
    assert writer.verify() is None

    assert shard_files(path) == shard_files(clean)  # byte-identical shard files and metadata
    a, b = StoreReader(path), StoreReader(clean)
    for name in a.names:
        assert np.asarray(a.array(name)[:]).tobytes() == np.asarray(b.array(name)[:]).tobytes()


def test_rewriting_a_published_range_replaces_it(tmp_path):
    data = make_data()
    path = tmp_path / "s.zarr"
    writer = write_all(path, data)
    new = {k: v[8:16].copy() for k, v in data.items()}
    new["labels"][:] = 99
    writer.write_range(8, 16, new)
    assert writer.verify() is None
    np.testing.assert_array_equal(StoreReader(path).read("labels", [7, 8, 15, 16]), [data["labels"][7], 99, 99, data["labels"][16]])


def test_parallel_writers_on_different_ranges(tmp_path):
    data = make_data()
    path = tmp_path / "par.zarr"
    writer = StoreWriter(path, N, SPECS, S, ATTRS)
    writer.create()
    ranges = writer.ranges()
    with mp.get_context("forkserver").Pool(2) as pool:
        pool.starmap(_write_one, [(writer, a, b) for a, b in ranges])
    writer.finish()
    clean = tmp_path / "clean.zarr"
    write_all(clean, data)
    assert shard_files(path) == shard_files(clean)


def _write_one(writer: StoreWriter, a: int, b: int) -> None:
    data = make_data()
    writer.write_range(a, b, {k: v[a:b] for k, v in data.items()})
