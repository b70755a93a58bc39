"""Ingest: ADM center crop, sources, shards, resume after a kill, skipping unreadable files."""

from __future__ import annotations

import io
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from jobs.ingest import ingest
from jobs.layout import states
from pipeline.datasets.center_crop import adm_center_crop
from pipeline.datasets.sources import FashionMnistSource, ImageFolderSource, fit_small
from pipeline.stores.tar_shards import iter_shard
from schemas.loading import load_config
from tests.conftest import ROOT, repa

# ----------------------------------------------------------------------------------------------
#                                      ADM center crop
# ----------------------------------------------------------------------------------------------


def test_adm_crop_box_halving_then_center_window_by_hand():
    # 10 wide x 6 high, constant on 2x2 blocks: a BOX halving gives the block values exactly.
    blocks = np.array([[10 * r + c for c in range(5)] for r in range(3)], dtype=np.uint8)  # 3 x 5
    arr = np.repeat(np.repeat(blocks, 2, axis=0), 2, axis=1)  # 6 x 10
    image = Image.fromarray(np.stack([arr] * 3, axis=-1))
    out = adm_center_crop(image, 3)
    # short side 6 >= 2*3 -> halve to 5x3; 3 < 6 stops; scale 1; crop cols (5-3)//2 = 1 .. 3.
    expected = blocks[:, 1:4]
    assert out.shape == (3, 3, 3)
    np.testing.assert_array_equal(out[..., 0], expected)


def test_adm_crop_bicubic_rescale_of_constant_image_and_offsets():
    image = Image.new("RGB", (7, 5), (40, 80, 120))
    out = adm_center_crop(image, 4)  # 5 < 8: no halving; scale 4/5 -> (round(5.6)=6, 4); crop left 1
    assert out.shape == (4, 4, 3)
    assert (out == np.array([40, 80, 120], dtype=np.uint8)).all()
    # A gradient shows which window was kept: columns 1..4 of a 6-wide image after resize.
    grad = np.tile(np.arange(0, 240, 40, dtype=np.uint8), (4, 1))  # 4 high, 6 wide, already at scale
    out = adm_center_crop(Image.fromarray(np.stack([grad] * 3, -1)), 4)
    np.testing.assert_array_equal(out[0, :, 0], grad[0, 1:5])


def test_fit_small_pads_28_to_32_exactly():
    img = Image.fromarray(np.full((28, 28, 3), 200, np.uint8))
    out = fit_small(img, 32)
    assert out.shape == (32, 32, 3)
    assert (out[2:30, 2:30] == 200).all() and out[:2].sum() == 0 and out[:, :2].sum() == 0
    assert fit_small(img, 64) is None  # too small to pad: resized instead


def test_fashion_mnist_reads_embedded_idx():
    src = FashionMnistSource(str(ROOT / "data/fashion-mnist"))
    items = src.items()
    assert len(items) == 10_000
    assert {it.label for it in items} == set(range(10))
    assert src.load(items[0]).size == (28, 28)


# ----------------------------------------------------------------------------------------------
#                                     The ingest stage
# ----------------------------------------------------------------------------------------------


def _cfg(tmp_path, *extra):
    return load_config(None, [f"workdir={tmp_path}", "data.source=synthetic", "data.synthetic_count=40",
                              "data.resolution=16", "data.shard_size=8", "data.num_workers=1", *extra])


def _read_all(directory: Path):
    out = []
    for shard in sorted(directory.glob("shard-*.tar")):
        out += [(k, lab, np.asarray(Image.open(io.BytesIO(png)))) for k, png, lab in iter_shard(shard)]
    return out


def test_ingest_writes_shards_and_manifest_then_is_up_to_date(tmp_path):
    cfg = _cfg(tmp_path)
    ingest(cfg)
    out = tmp_path / "ingest"
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["stats"]["images"] == 40 and len(manifest["outputs"]) == 5
    samples = _read_all(out)
    assert [k for k, _, _ in samples] == [f"{i:08d}" for i in range(40)]
    assert all(img.shape == (16, 16, 3) for _, _, img in samples)
    assert states(cfg, "ingest")["ingest"].state == "up-to-date"
    stale = states(_cfg(tmp_path, "data.resolution=24"), "ingest")["ingest"]
    assert stale.state == "stale" and "data.resolution changed" in stale.reason


def test_parallel_ingest_equals_serial(tmp_path):
    ingest(_cfg(tmp_path / "a"))
    ingest(_cfg(tmp_path / "b", "data.num_workers=2"))
    for a, b in zip(sorted((tmp_path / "a/ingest").glob("*.tar")), sorted((tmp_path / "b/ingest").glob("*.tar")), strict=True):
        assert a.read_bytes() == b.read_bytes()


def test_killed_ingest_resumes_to_identical_shards(tmp_path):
    args = ["ingest", "--config", "configs/demo.toml", "--set", "data.source=synthetic",
            "--set", "data.synthetic_count=400", "--set", "data.resolution=48", "--set", "data.shard_size=20",
            "--set", "data.num_workers=1", "--set", "data.limit=0"]
    ref = repa(*args, "--set", f"workdir={tmp_path / 'ref'}")
    assert ref.returncode == 0, ref.stderr
    work = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "jobs.cli", *args, "--set", f"workdir={work}"], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and len(list((work / "ingest").glob("shard-*.json"))) < 2:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    written = len(list((work / "ingest").glob("shard-*.json")))
    assert 2 <= written < 20, "the kill should land mid-run"
    assert not (work / "ingest/manifest.json").exists()
    again = repa(*args, "--set", f"workdir={work}")
    assert again.returncode == 0, again.stderr
    assert "resuming" in again.stderr
    names = sorted(p.name for p in (tmp_path / "ref/ingest").glob("shard-*.tar"))
    assert names == sorted(p.name for p in (work / "ingest").glob("shard-*.tar"))
    for name in names:
        assert (tmp_path / "ref/ingest" / name).read_bytes() == (work / "ingest" / name).read_bytes()
    assert not list((work / "ingest").glob("*.tmp*"))


def test_rerun_is_up_to_date_fast_and_resolution_change_reruns(tmp_path):
    args = ["ingest", "--config", "configs/demo.toml", "--set", f"workdir={tmp_path}", "--set", "data.limit=300"]
    first = repa(*args)
    assert first.returncode == 0, first.stderr
    t0 = time.time()
    second = repa(*args)
    elapsed = time.time() - t0
    assert second.returncode == 0 and "up to date" in second.stderr
    assert elapsed < 3.0, f"up-to-date check took {elapsed:.2f}s"
    third = repa(*args, "--set", "data.resolution=64")
    assert third.returncode == 0 and "stale: data.resolution changed" in third.stderr
    assert _read_all(tmp_path / "ingest")[0][2].shape == (64, 64, 3)


# ----------------------------------------------------------------------------------------------
#                                 Image folders and bad files
# ----------------------------------------------------------------------------------------------


@pytest.fixture
def folder(tmp_path):
    root = tmp_path / "images"
    rng = np.random.default_rng(0)
    for cls in ("zebra", "apple", "mango"):  # sorted: apple=0, mango=1, zebra=2
        (root / cls).mkdir(parents=True)
        for i in range(3):
            arr = rng.integers(0, 255, size=(20 + i, 30, 3), dtype=np.uint8)
            mode = ["RGB", "L", "RGBA"][i]
            img = Image.fromarray(arr).convert(mode)
            img.save(root / cls / f"img{i}.{'png' if mode == 'RGBA' else 'jpg'}")
    (root / "apple" / "empty.jpg").write_bytes(b"")
    good = (root / "mango" / "img0.jpg").read_bytes()
    (root / "mango" / "broken.jpg").write_bytes(good[: len(good) // 2])
    return root


def test_imagefolder_classes_are_sorted_names(folder):
    src = ImageFolderSource(str(folder))
    assert src.classes() == ["apple", "mango", "zebra"]
    labels = {it.origin.split("/")[0]: it.label for it in src.items()}
    assert labels == {"apple": 0, "mango": 1, "zebra": 2}


def test_corrupt_and_empty_files_are_skipped_and_recorded(folder, tmp_path):
    cfg = load_config(None, [f"workdir={tmp_path}", "data.source=imagefolder", f"data.path={folder}",
                             "data.resolution=16", "data.num_workers=1"])
    ingest(cfg)
    manifest = json.loads((tmp_path / "ingest/manifest.json").read_text())
    skipped = {Path(s["origin"]).name: s["reason"] for s in manifest["extra"]["skipped"]}
    assert set(skipped) == {"empty.jpg", "broken.jpg"}
    assert manifest["stats"]["images"] == 9 and manifest["stats"]["skipped"] == 2
    labels = [lab for _, lab, _ in _read_all(tmp_path / "ingest")]
    assert sorted(labels) == [0, 0, 0, 1, 1, 1, 2, 2, 2]  # in the seeded order (data.order = auto)


def test_on_error_fail_exits_1_naming_the_file(folder, tmp_path):
    proc = repa("ingest", "--config", "configs/demo.toml", "--set", f"workdir={tmp_path}",
                "--set", "data.source=imagefolder", "--set", f"data.path={folder}", "--set", "data.resolution=16",
                "--set", "data.on_error=fail", "--set", "data.limit=0")
    assert proc.returncode == 1
    assert "broken.jpg" in proc.stderr or "empty.jpg" in proc.stderr
    assert "data.on_error=skip" in proc.stderr


def test_missing_source_folder_exits_2(tmp_path):
    proc = repa("ingest", "--set", f"workdir={tmp_path}", "--set", "data.source=imagefolder",
                "--set", f"data.path={tmp_path / 'nope'}")
    assert proc.returncode == 2 and "is neither a directory nor an archive" in proc.stderr


# ----------------------------------------------------------------------------------------------
#                           Image folders in archives, and their order
# ----------------------------------------------------------------------------------------------


def _class_folder(root: Path, classes: int = 4, per_class: int = 5) -> Path:
    """root/split/<class>/<i>.png with distinct pixels per image (the layout CIFAR-10's archive has)."""
    rng = np.random.default_rng(1)
    for c in range(classes):
        (root / "split" / f"class{c}").mkdir(parents=True)
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)).save(root / "split" / f"class{c}" / f"{i}.png")
    return root / "split"


def _pixels(source) -> list[tuple[int, str, bytes]]:
    return [(it.label, it.origin, source.load(it).tobytes()) for it in source.items()]


@pytest.mark.parametrize("kind", ["tar", "tar.gz", "zip"])
def test_imagefolder_reads_an_archive_in_place_as_the_extracted_folder(tmp_path, kind):
    import shutil
    import tarfile
    import zipfile

    folder = _class_folder(tmp_path / "extracted")
    archive = tmp_path / f"images.{kind}"
    if kind == "zip":
        with zipfile.ZipFile(archive, "w") as zf:
            for p in sorted(folder.rglob("*.png")):
                zf.write(p, str(p.relative_to(folder.parent)))
    else:
        with tarfile.open(archive, "w:gz" if kind == "tar.gz" else "w") as tar:
            tar.add(folder, arcname="split")
    expected = _pixels(ImageFolderSource(str(folder)))
    assert len(expected) == 20 and {lab for lab, _, _ in expected} == {0, 1, 2, 3}
    inside = ImageFolderSource(str(archive / "split"))
    assert inside.classes() == ["class0", "class1", "class2", "class3"]
    assert _pixels(inside) == expected
    # the same through ingest, in worker processes (each opens the archive itself)
    cfg = load_config(None, [f"workdir={tmp_path / 'w'}", "data.source=imagefolder", f"data.path={archive}/split",
                             "data.resolution=8", "data.num_workers=2", "data.shard_size=7"])
    ingest(cfg)
    ref = load_config(None, [f"workdir={tmp_path / 'w2'}", "data.source=imagefolder", f"data.path={folder}",
                             "data.resolution=8", "data.num_workers=1", "data.shard_size=7"])
    ingest(ref)
    got, want = _read_all(tmp_path / "w" / "ingest"), _read_all(tmp_path / "w2" / "ingest")
    assert [(k, lab, a.tobytes()) for k, lab, a in got] == [(k, lab, a.tobytes()) for k, lab, a in want]
    shutil.rmtree(folder)  # nothing was extracted next to the archive
    assert _pixels(ImageFolderSource(str(archive / "split"))) == expected


def test_missing_folder_inside_an_archive_exits_2(tmp_path):
    import tarfile

    folder = _class_folder(tmp_path / "x")
    with tarfile.open(tmp_path / "a.tar", "w") as tar:
        tar.add(folder, arcname="split")
    proc = repa("ingest", "--set", f"workdir={tmp_path}", "--set", "data.source=imagefolder",
                "--set", f"data.path={tmp_path / 'a.tar' / 'nope'}")
    assert proc.returncode == 2 and "has no class sub-folders" in proc.stderr


def test_seeded_limit_holds_every_class_and_is_stable(tmp_path):
    """10 classes listed class by class: a 1,000-image limit in source order would be 2 classes; the
    seeded permutation (data.order = auto for an image folder) draws all 10, the same on every run."""
    from jobs.ingest import select
    from pipeline.datasets.sources import SourceItem

    items = [SourceItem(f"{i:08d}", i // 500, i) for i in range(5000)]
    assert len({it.label for it in select(items, 0, 1000)}) == 2
    first = select(items, 0, 1000, order_seed=0)
    counts = np.bincount([it.label for it in first], minlength=10)
    assert (counts > 50).all(), counts
    assert [it.key for it in select(items, 0, 1000, order_seed=0)] == [it.key for it in first]
    assert [it.key for it in select(items, 0, 1000, order_seed=1)] != [it.key for it in first]
    held = select(items, 1000, 500, order_seed=0)  # an offset split is disjoint from the limit's images
    assert not {it.key for it in held} & {it.key for it in first}
    # the permutation is numpy's default_rng(seed).permutation, recorded in the manifest
    perm = np.random.default_rng(0).permutation(5000)
    assert [it.ref for it in first] == perm[:1000].tolist()

    folder = _class_folder(tmp_path / "f", classes=4, per_class=10)
    cfg = load_config(None, [f"workdir={tmp_path / 'w'}", "data.source=imagefolder", f"data.path={folder}",
                             "data.resolution=8", "data.num_workers=1", "data.limit=8"])
    assert cfg.data.shuffled
    ingest(cfg)
    manifest = json.loads((tmp_path / "w" / "ingest" / "manifest.json").read_text())
    assert manifest["extra"]["order"] == "shuffled" and manifest["extra"]["order_seed"] == 0
    labels = [lab for _, lab, _ in _read_all(tmp_path / "w" / "ingest")]
    assert len(set(labels)) == 4 and len(labels) == 8
    source_order = load_config(None, [f"workdir={tmp_path / 'w3'}", "data.source=imagefolder",
                                      f"data.path={folder}", "data.resolution=8", "data.num_workers=1",
                                      "data.limit=8", "data.order=source"])
    ingest(source_order)
    assert [lab for _, lab, _ in _read_all(tmp_path / "w3" / "ingest")] == [0] * 8


CIFAR10 = ROOT.parent / "shared" / "data" / "cifar10-jpeg.tar.gz"


@pytest.mark.skipif(not CIFAR10.is_file(), reason=f"CIFAR-10 image-folder archive not found at {CIFAR10} "
                                                  "(experiment data beside the checkout; the product never needs it)")
def test_cifar10_archive_reads_in_place_with_balanced_seeded_splits():
    train = ImageFolderSource(f"{CIFAR10}/cifar10/train")
    assert train.classes() == ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship",
                               "truck"]
    from jobs.ingest import select

    items = train.items()
    assert len(items) == 50_000 and np.bincount([it.label for it in items]).tolist() == [5000] * 10
    first = select(items, 0, 1000, order_seed=0)
    counts = np.bincount([it.label for it in first], minlength=10)
    assert counts.min() >= 70, counts  # every class, near 100 each
    image = train.load(first[0])
    assert image.size == (32, 32) and image.mode == "RGB"
    test = ImageFolderSource(f"{CIFAR10}/cifar10/test")
    assert len(test.items()) == 10_000
