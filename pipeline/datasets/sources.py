"""Where images come from: an ImageNet-style folder (a directory or an archive), WebDataset tars,
Fashion-MNIST IDX files, or seeded synthetic shapes.

A source lists its items cheaply (`items()`: key, label, and a reference to the bytes) and loads
one item on demand (`load(item)` -> RGB PIL image), so shard writers in other processes load only
their own range. Keys are the item's position in the source ("%08d"), so they are stable across
reruns and identical in every downstream store.
"""

from __future__ import annotations

import glob
import gzip
import io
import os
import struct
import tarfile
import zipfile
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".jpe")
WDS_IMAGE_FIELDS = ("jpg", "jpeg", "png", "webp")
WDS_CLASS_FIELDS = ("cls", "cls.txt", "class", "label")


@dataclass(frozen=True)
class SourceItem:
    key: str  # "%08d" position in the source
    label: int
    ref: Any  # source-specific: a file path, (tar, offset, size), or an index
    origin: str = ""  # human-readable provenance (file name) for error reports


class SourceError(ValueError):
    """The source itself is unusable (missing folder, no images): a usage error."""


def _to_rgb(image: Image.Image) -> Image.Image:
    if image.mode == "RGB":
        return image
    if image.mode in ("RGBA", "LA", "P", "PA"):
        # Composite transparency on white, as viewers show it, instead of on undefined colour.
        rgba = image.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(canvas, rgba).convert("RGB")
    return image.convert("RGB")


def decode_image(data: bytes) -> Image.Image:
    """Decode and fully load encoded image bytes (raises on corrupt or truncated data)."""
    with Image.open(io.BytesIO(data)) as image:
        image.load()
        return _to_rgb(image)


# ----------------------------------------------------------------------------------------------
#                                        Image folder
# ----------------------------------------------------------------------------------------------


ARCHIVE_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tar.xz", ".zip")
_OPEN_ARCHIVES: dict[tuple[int, str], Any] = {}  # (pid, archive) -> open ZipFile / bytes of a compressed tar


def split_archive(path: str) -> tuple[Path, str] | None:
    """(archive file, folder inside it) when `path` is an archive or runs through one
    ("data/cifar10.tar.gz/cifar10/train"); None for a plain directory."""
    parts = Path(path).parts
    for i in range(len(parts), 0, -1):
        head = Path(*parts[:i])
        if head.name.lower().endswith(ARCHIVE_SUFFIXES) and head.is_file():
            return head, "/".join(parts[i:])
    return None


def _class_file(name: str, inner: str) -> tuple[str, str] | None:
    """(class, name) for an archive member `inner/<class>/.../<image>`, else None."""
    if inner:
        if not name.startswith(inner.rstrip("/") + "/"):
            return None
        name = name[len(inner.rstrip("/")) + 1 :]
    parts = name.split("/")
    if len(parts) < 2 or any(p.startswith(".") for p in parts) or not parts[-1].lower().endswith(IMAGE_EXTENSIONS):
        return None
    return parts[0], name


@dataclass(frozen=True)
class ImageFolderSource:
    """ImageNet train layout: one sub-folder per class, classes indexed in sorted name order.

    `path` is a directory, or an archive (.tar, .tar.gz/.tgz/.tar.bz2/.tar.xz, .zip) read in place,
    optionally followed by the folder inside it that holds the class folders
    ("cifar10-jpeg.tar.gz/cifar10/train"). Items come class by class in sorted file order; the ingest
    stage decides the order limit/offset apply to (data.order). An uncompressed .tar and a .zip are
    read by seeking to each image; a compressed tar has no random access, so each process that loads
    from it streams the archive once and keeps the selected folder's image bytes in memory (use .tar
    or .zip for datasets larger than memory).
    """

    path: str

    @cached_property
    def _listing(self) -> list[tuple[str, str, Any]]:
        """[(class, origin, ref)] of every image, sorted by (class, origin)."""
        split = split_archive(self.path)
        if split is None:
            root = Path(self.path)
            if not root.is_dir():
                raise SourceError(f"data.path {self.path} is neither a directory nor an archive "
                                  f"({', '.join(ARCHIVE_SUFFIXES)}) of class sub-folders")
            found = [(p.relative_to(root).parts[0], str(p.relative_to(root)), str(p)) for p in root.rglob("*")
                     if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS and len(p.relative_to(root).parts) > 1
                     and not any(q.startswith(".") for q in p.relative_to(root).parts)]
        else:
            archive, inner = split
            found = []
            if archive.name.lower().endswith(".zip"):
                with zipfile.ZipFile(archive) as zf:
                    for info in zf.infolist():
                        if not info.is_dir() and (cf := _class_file(info.filename, inner)):
                            found.append((cf[0], cf[1], ("zip", str(archive), info.filename)))
            else:
                plain = archive.name.lower().endswith(".tar")
                with tarfile.open(archive, "r:*") as tar:
                    for member in tar:
                        if member.isfile() and (cf := _class_file(member.name, inner)):
                            ref = (("tar", str(archive), member.offset_data, member.size) if plain
                                   else ("tar-stream", str(archive), member.name))
                            found.append((cf[0], cf[1], ref))
        found.sort(key=lambda f: (f[0], f[1]))
        return found

    def classes(self) -> list[str]:
        names = sorted({c for c, _, _ in self._listing})
        if not names:
            raise SourceError(f"data.path {self.path} has no class sub-folders holding images "
                              f"({', '.join(IMAGE_EXTENSIONS)})")
        return names

    def items(self) -> list[SourceItem]:
        index = {name: i for i, name in enumerate(self.classes())}
        return [SourceItem(f"{i:08d}", index[c], ref, origin=origin)
                for i, (c, origin, ref) in enumerate(self._listing)]

    def load(self, item: SourceItem) -> Image.Image:
        ref = item.ref
        if isinstance(ref, str):
            return decode_image(Path(ref).read_bytes())
        kind, archive = ref[0], ref[1]
        if kind == "tar":
            with open(archive, "rb") as f:
                f.seek(ref[2])
                return decode_image(f.read(ref[3]))
        key = (os.getpid(), archive)
        if kind == "zip":
            if key not in _OPEN_ARCHIVES:
                _OPEN_ARCHIVES[key] = zipfile.ZipFile(archive)
            return decode_image(_OPEN_ARCHIVES[key].read(ref[2]))
        if key not in _OPEN_ARCHIVES:  # a compressed tar: one streaming pass per process
            wanted = {r[2] for _, _, r in self._listing if r[0] == "tar-stream"}
            with tarfile.open(archive, "r:*") as tar:
                _OPEN_ARCHIVES[key] = {m.name: tar.extractfile(m).read() for m in tar
                                       if m.isfile() and m.name in wanted}
        return decode_image(_OPEN_ARCHIVES[key][ref[2]])


# ----------------------------------------------------------------------------------------------
#                                         WebDataset
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class WebDatasetSource:
    """Existing tar shards holding an image field (jpg/png/webp) and a class field per sample."""

    path: str  # a tar file, a directory of tars, or a glob

    def tars(self) -> list[Path]:
        p = Path(self.path)
        if p.is_dir():
            found = sorted(p.glob("*.tar"))
        else:
            found = sorted(Path(m) for m in glob.glob(self.path))
        if not found:
            raise SourceError(f"data.path {self.path} matches no .tar shards")
        return found

    def items(self) -> list[SourceItem]:
        out: list[SourceItem] = []
        for tar_path in self.tars():
            groups: dict[str, dict[str, tarfile.TarInfo]] = {}
            order: list[str] = []
            with tarfile.open(tar_path, "r") as tar:
                for member in tar:
                    if not member.isfile():
                        continue
                    base = member.name.rsplit("/", 1)[-1]
                    prefix = member.name[: len(member.name) - len(base)]
                    stem, _, ext = base.partition(".")
                    key = prefix + stem
                    if key not in groups:
                        groups[key] = {}
                        order.append(key)
                    groups[key][ext.lower()] = member
                for key in order:
                    fields = groups[key]
                    image = next((fields[f] for f in WDS_IMAGE_FIELDS if f in fields), None)
                    cls = next((fields[f] for f in WDS_CLASS_FIELDS if f in fields), None)
                    if image is None or cls is None:
                        continue
                    tar.fileobj.seek(cls.offset_data)
                    label = int(tar.fileobj.read(cls.size).decode().strip())
                    ref = (str(tar_path), image.offset_data, image.size)
                    out.append(SourceItem(f"{len(out):08d}", label, ref, origin=f"{tar_path.name}:{key}"))
        if not out:
            raise SourceError(f"data.path {self.path}: no sample has both an image and a class field")
        return out

    def load(self, item: SourceItem) -> Image.Image:
        tar_path, offset, size = item.ref
        with open(tar_path, "rb") as f:
            f.seek(offset)
            return decode_image(f.read(size))


# ----------------------------------------------------------------------------------------------
#                                        Fashion-MNIST
# ----------------------------------------------------------------------------------------------


def read_idx(path: Path) -> np.ndarray:
    """An IDX file (optionally gzipped) as a numpy array."""
    raw = path.read_bytes()
    if raw[:2] == b"\x1f\x8b":
        raw = gzip.decompress(raw)
    zero, dtype_code, ndim = struct.unpack(">HBB", raw[:4])
    if zero != 0 or dtype_code != 0x08:
        raise SourceError(f"{path} is not an unsigned-byte IDX file")
    dims = struct.unpack(f">{ndim}I", raw[4 : 4 + 4 * ndim])
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(dims)):
        raise SourceError(f"{path}: truncated IDX file ({data.size} of {int(np.prod(dims))} values)")
    return data.reshape(dims)


@dataclass(frozen=True)
class FashionMnistSource:
    """IDX files `*-images-idx3-ubyte[.gz]` + matching labels; t10k before train when both exist.

    Grey images become RGB by repetition; `grow` below says how 28x28 meets the target size.
    """

    path: str

    def _pairs(self) -> list[tuple[Path, Path]]:
        root = Path(self.path)
        if not root.is_dir():
            raise SourceError(f"data.path {self.path} is not a directory of Fashion-MNIST IDX files")
        pairs = []
        for images in sorted(root.glob("*-images-idx3-ubyte*")):
            labels = images.with_name(images.name.replace("-images-idx3-", "-labels-idx1-"))
            if not labels.exists():
                raise SourceError(f"{images} has no labels file {labels.name} beside it")
            pairs.append((images, labels))
        if not pairs:
            raise SourceError(f"data.path {self.path} holds no *-images-idx3-ubyte[.gz] file")
        return pairs

    @cached_property
    def arrays(self) -> tuple[np.ndarray, np.ndarray]:
        images, labels = zip(*[(read_idx(i), read_idx(lab)) for i, lab in self._pairs()], strict=True)
        return np.concatenate(images), np.concatenate(labels).astype(np.int64)

    def items(self) -> list[SourceItem]:
        _, labels = self.arrays
        return [SourceItem(f"{i:08d}", int(labels[i]), i, origin=f"index {i}") for i in range(len(labels))]

    def load(self, item: SourceItem) -> Image.Image:
        images, _ = self.arrays
        return Image.fromarray(images[item.ref], mode="L").convert("RGB")


def fit_small(image: Image.Image, size: int) -> np.ndarray | None:
    """Zero-pad a small image centred to `size` when it is at most 2x smaller (28 -> 32 keeps every
    pixel exact); None means: use the ADM center crop instead."""
    w, h = image.size
    if max(w, h) <= size < 2 * min(w, h):
        canvas = np.zeros((size, size, 3), dtype=np.uint8)
        top, left = (size - h) // 2, (size - w) // 2
        canvas[top : top + h, left : left + w] = np.asarray(image)
        return canvas
    return None


# ----------------------------------------------------------------------------------------------
#                                          Synthetic
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SyntheticSource:
    """Seeded random coloured shapes; the class picks shape and hue, so it is learnable."""

    count: int
    classes: int
    seed: int
    size: int = 64
    shapes: tuple[str, ...] = field(default=("ellipse", "rectangle", "triangle", "cross"))

    def items(self) -> list[SourceItem]:
        labels = np.random.default_rng(self.seed).integers(0, self.classes, size=self.count)
        return [SourceItem(f"{i:08d}", int(labels[i]), i, origin=f"synthetic {i}") for i in range(self.count)]

    def load(self, item: SourceItem) -> Image.Image:
        rng = np.random.default_rng([self.seed, item.ref])
        s = self.size
        background = tuple(int(v) for v in rng.integers(0, 80, size=3))
        image = Image.new("RGB", (s, s), background)
        draw = ImageDraw.Draw(image)
        shape = self.shapes[item.label % len(self.shapes)]
        hue = (item.label * 97) % 256
        colour = (hue, 255 - hue, int(rng.integers(128, 256)))
        cx, cy = rng.uniform(0.3 * s, 0.7 * s, size=2)
        r = rng.uniform(0.15 * s, 0.3 * s)
        box = (cx - r, cy - r, cx + r, cy + r)
        if shape == "ellipse":
            draw.ellipse(box, fill=colour)
        elif shape == "rectangle":
            draw.rectangle(box, fill=colour)
        elif shape == "triangle":
            draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=colour)
        else:
            w = r / 3
            draw.rectangle((cx - r, cy - w, cx + r, cy + w), fill=colour)
            draw.rectangle((cx - w, cy - r, cx + w, cy + r), fill=colour)
        return image


# ----------------------------------------------------------------------------------------------
#                                          Factory
# ----------------------------------------------------------------------------------------------


def open_source(source: str, path: str, *, count: int = 0, classes: int = 10, seed: int = 0, size: int = 64):
    """The source object for `data.source`."""
    if source == "imagefolder":
        return ImageFolderSource(path)
    if source == "webdataset":
        return WebDatasetSource(path)
    if source == "fashion-mnist":
        return FashionMnistSource(path)
    if source == "synthetic":
        return SyntheticSource(count=count, classes=classes, seed=seed, size=size)
    raise SourceError(f"data.source {source!r} is not one of imagefolder, webdataset, fashion-mnist, synthetic")
