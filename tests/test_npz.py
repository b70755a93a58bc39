"""Streamed .npz writing and memory-mapped reading, checked against numpy's own np.load / np.savez."""

from __future__ import annotations

import zipfile

import numpy as np
import pytest

from pipeline.stores.npz import open_npz_array, write_npz_streamed


def images(n: int = 11) -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, (n, 5, 4, 3), dtype=np.uint8)


def test_streamed_npz_is_what_np_load_reads_and_maps_in_place(tmp_path):
    x, labels = images(), np.arange(11, dtype=np.int64) * 7
    path = tmp_path / "samples.npz"
    chunks = [x[0:4], x[4:5], x[5:5], x[5:11]]  # uneven, one empty
    write_npz_streamed(path, {"arr_0": (x.shape, np.uint8, iter(chunks)), "arr_1": (labels.shape, "int64", [labels])})
    with np.load(path) as z:  # numpy's reader, independent of ours
        assert sorted(z.files) == ["arr_0", "arr_1"]
        np.testing.assert_array_equal(z["arr_0"], x)
        np.testing.assert_array_equal(z["arr_1"], labels)
    with zipfile.ZipFile(path) as zf:
        assert {i.compress_type for i in zf.infolist()} == {zipfile.ZIP_STORED}
    mapped = open_npz_array(path, "arr_0")
    assert isinstance(mapped, np.memmap) and not mapped.flags.writeable
    np.testing.assert_array_equal(mapped[3:9], x[3:9])
    np.testing.assert_array_equal(open_npz_array(path, "arr_1"), labels)


def test_open_npz_array_reads_numpys_own_files(tmp_path):
    x = images()
    np.savez(tmp_path / "plain.npz", arr_0=x, empty=np.zeros((0, 3), np.float32))
    np.savez_compressed(tmp_path / "packed.npz", arr_0=x)
    plain = open_npz_array(tmp_path / "plain.npz", "arr_0")
    assert isinstance(plain, np.memmap)
    np.testing.assert_array_equal(plain, x)
    assert open_npz_array(tmp_path / "plain.npz", "empty").shape == (0, 3)
    packed = open_npz_array(tmp_path / "packed.npz", "arr_0")  # compressed: loaded, not mapped
    assert not isinstance(packed, np.memmap)
    np.testing.assert_array_equal(packed, x)
    with pytest.raises(KeyError, match=r"no array 'arr_1' \(it has \['arr_0', 'empty'\]\)"):
        open_npz_array(tmp_path / "plain.npz", "arr_1")


@pytest.mark.parametrize("chunks, message", [
    ([images(5), images(5)], "10 rows, 11 declared"),
    ([images(11), images(1)], "more than the 11 rows"),
    ([images(11).astype(np.int16)], "does not fit"),
    ([images(11)[:, :4]], "does not fit"),
])
def test_chunks_that_do_not_tile_the_array_publish_nothing(tmp_path, chunks, message):
    path = tmp_path / "bad.npz"
    with pytest.raises(ValueError, match=message):
        write_npz_streamed(path, {"arr_0": ((11, 5, 4, 3), np.uint8, chunks)})
    assert list(tmp_path.iterdir()) == []
