"""ADM-style center crop, the preprocessing of REPA's and ADM's ImageNet pipelines."""

from __future__ import annotations

import numpy as np
from PIL import Image


def adm_center_crop(image: Image.Image, size: int) -> np.ndarray:
    """Square `size` x `size` uint8 [size, size, 3] crop of an RGB PIL image.

    Halve the image with a BOX filter while its short side is at least 2 * size (cheap
    anti-aliasing), resize with BICUBIC so the short side equals `size` (long side rounded), then
    take the central `size` x `size` window (offsets rounded down).
    """
    if size <= 0:
        raise ValueError(f"crop size must be positive, got {size}")
    while min(image.size) >= 2 * size:
        image = image.resize((image.width // 2, image.height // 2), resample=Image.BOX)
    scale = size / min(image.size)
    image = image.resize((round(image.width * scale), round(image.height * scale)), resample=Image.BICUBIC)
    arr = np.asarray(image)
    top = (arr.shape[0] - size) // 2
    left = (arr.shape[1] - size) // 2
    return np.ascontiguousarray(arr[top : top + size, left : left + size])
