"""Where an image's captions come from, at ingest.

    data.captions = "coco"       MS-COCO's annotations/captions_{train,val}2014.json (data.captions_path):
                                 every caption of the image whose file name the source item carries
    data.captions = "templates"  made from the class name with `data.caption_templates` of the
                                 TEMPLATES below per image, chosen by a generator seeded with
                                 (data.seed, the image's key): an offline stand-in for real captions
                                 (close to class conditioning: each caption names the class and
                                 nothing else about the image)

`image_captions(cfg.data, source, items)` -> {key: [caption, ...]} for the selected items.
"""

from __future__ import annotations

import json
import zlib
from pathlib import Path, PurePosixPath

import numpy as np

# Class names of the sources that do not list their classes as folders.
FASHION_MNIST_CLASSES = ("T-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag",
                         "ankle boot")

# CLIP's ImageNet prompt style (Radford et al. 2021), a short selection.
TEMPLATES = (
    "a photo of a {}.",
    "a blurry photo of a {}.",
    "a close-up photo of a {}.",
    "a bright photo of a {}.",
    "a dark photo of a {}.",
    "a photo of the small {}.",
    "a photo of the large {}.",
    "a low resolution photo of a {}.",
    "a cropped photo of the {}.",
    "a good photo of a {}.",
)


class CaptionError(ValueError):
    """The captions cannot be made (no annotations file, an image without captions): a usage error."""


def class_names(source_name: str, source) -> list[str]:
    """The readable class names of a source: its folders (underscores as spaces), Fashion-MNIST's ten,
    or "class {i}" for the synthetic source."""
    if source_name == "fashion-mnist":
        return list(FASHION_MNIST_CLASSES)
    classes = getattr(source, "classes", None)
    if callable(classes):
        return [c.replace("_", " ") for c in classes()]
    return [f"class {i}" for i in range(int(classes or 0))]


def templated(name: str, key: str, seed: int, count: int) -> list[str]:
    """`count` distinct templates filled with the class name, chosen by (seed, key)."""
    rng = np.random.default_rng([seed, zlib.crc32(key.encode())])
    picks = rng.choice(len(TEMPLATES), size=min(count, len(TEMPLATES)), replace=False)
    return [TEMPLATES[i].format(name) for i in picks]


def coco_index(annotations: str | Path) -> dict[str, list[str]]:
    """{image file name: its captions in annotation order} from a COCO captions JSON."""
    path = Path(annotations).expanduser()
    if not path.is_file():
        raise CaptionError(f"data.captions_path {str(path)!r} is not a file: give MS-COCO's "
                           "annotations/captions_train2014.json (or captions_val2014.json)")
    try:
        data = json.loads(path.read_text())
        names = {img["id"]: img["file_name"] for img in data["images"]}
        out: dict[str, list[str]] = {}
        for ann in data["annotations"]:
            out.setdefault(names[ann["image_id"]], []).append(" ".join(str(ann["caption"]).split()))
    except (ValueError, KeyError, TypeError) as exc:
        raise CaptionError(f"{path} is not a COCO captions file ({type(exc).__name__}: {exc})") from None
    return out


def image_captions(data, source, items) -> dict[str, list[str]]:
    """{item key: captions} for `items` under the data config `data` (module docstring)."""
    if data.captions == "templates":
        names = class_names(data.source, source)
        return {it.key: templated(names[it.label], it.key, data.seed, data.caption_templates) for it in items}
    if data.captions == "coco":
        index = coco_index(data.captions_path)
        out = {}
        for it in items:
            name = PurePosixPath(it.origin).name
            if name not in index:
                raise CaptionError(f"image {it.origin} has no caption in {data.captions_path} (is it the "
                                   "annotations file of this split?)")
            out[it.key] = index[name]
        return out
    raise CaptionError(f"data.captions = {data.captions!r} gives no captions")
