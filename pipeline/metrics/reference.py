"""Reference batches for evaluation, in ADM's .npz layout.

ADM's reference files (e.g. VIRTUAL_imagenet256_labeled.npz from
https://openaipublic.blob.core.windows.net/diffusion/jul-2021/ref_batches/imagenet/256/) hold
  arr_0    uint8 [N, H, W, 3]  the reference images (10K for ImageNet)
  mu       float64 [2048]       mean of the Inception pool_3 features
  sigma    float64 [2048, 2048] their covariance
  mu_s     float64 [2023]       mean of the spatial features (mixed_6/conv, 7 channels, (h, w, c))
  sigma_s  float64 [2023, 2023] their covariance
A file may lack the statistics (then they are computed from arr_0, as ADM's evaluator does) or
lack the images (statistics only). Files are written without compression, like np.savez, and
published atomically (temporary sibling, fsync, rename).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import NamedTuple

import numpy as np

from pipeline.stores.atomic import atomic_write_npz
from pipeline.stores.npz import open_npz_array

ADM_REFERENCE_URL = "https://openaipublic.blob.core.windows.net/diffusion/jul-2021/ref_batches/"
STAT_KEYS = ("mu", "sigma", "mu_s", "sigma_s")
IMAGES_KEY = "arr_0"


class Reference(NamedTuple):
    """Reference statistics (float64; None when the file has none) and images uint8 [N, H, W, 3] or None."""

    mu: np.ndarray | None
    sigma: np.ndarray | None
    mu_s: np.ndarray | None
    sigma_s: np.ndarray | None
    images: np.ndarray | None = None

    @property
    def has_statistics(self) -> bool:
        return self.mu is not None


# ----------------------------------------------------------------------------------------------
#                                           Checks
# ----------------------------------------------------------------------------------------------


def _check_pair(name: str, mu: np.ndarray, sigma: np.ndarray) -> None:
    d = mu.shape[0] if mu.ndim == 1 else -1
    if d < 1 or sigma.shape != (d, d):
        raise ValueError(
            f"reference statistics {name}: expected a mean [D] and a covariance [D, D], got "
            f"{list(mu.shape)} and {list(sigma.shape)}"
        )


def _check_images(images: np.ndarray, where: str) -> None:
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(
            f"{where}: reference images must be uint8 [N, H, W, 3] (NHWC, ADM's layout), got "
            f"dtype={images.dtype} shape={list(images.shape)}"
        )


# ----------------------------------------------------------------------------------------------
#                                        Save and load
# ----------------------------------------------------------------------------------------------


def save_reference(
    path: str | os.PathLike,
    *,
    images: np.ndarray | None,
    mu: np.ndarray,
    sigma: np.ndarray,
    mu_s: np.ndarray,
    sigma_s: np.ndarray,
) -> None:
    """Write an ADM-layout reference .npz at path atomically (statistics stored as float64)."""
    values = (mu, sigma, mu_s, sigma_s)
    arrays = {key: np.asarray(value, dtype=np.float64) for key, value in zip(STAT_KEYS, values, strict=True)}
    _check_pair("mu/sigma", arrays["mu"], arrays["sigma"])
    _check_pair("mu_s/sigma_s", arrays["mu_s"], arrays["sigma_s"])
    if images is not None:
        _check_images(images, str(path))
        arrays[IMAGES_KEY] = images
    atomic_write_npz(path, **arrays)  # streamed: no in-memory copy of the images


def load_reference(path: str | os.PathLike, *, images: bool = True) -> Reference:
    """Read an ADM-layout reference .npz (ADM's own files included); images=False skips arr_0."""
    file = Path(path).expanduser()
    if not file.is_file():
        raise FileNotFoundError(
            f"reference batch {str(file)!r} not found. Download ADM's reference batch for your dataset "
            f"(e.g. {ADM_REFERENCE_URL}imagenet/256/VIRTUAL_imagenet256_labeled.npz) and set "
            "eval.reference to its path, or use eval.reference = 'ingest' / 'holdout'"
        )
    try:
        npz = np.load(file, allow_pickle=False)
    except (OSError, ValueError) as err:
        raise ValueError(f"{str(file)!r} is not a readable .npz file: {err}") from err
    with npz:
        keys = set(npz.files)
        present = [k for k in STAT_KEYS if k in keys]
        if present and len(present) != len(STAT_KEYS):
            missing = sorted(set(STAT_KEYS) - set(present))
            raise ValueError(f"{str(file)!r} has only some of the statistics: missing {missing}")
        if not present and IMAGES_KEY not in keys:
            raise ValueError(
                f"{str(file)!r} holds neither statistics ({', '.join(STAT_KEYS)}) nor images ({IMAGES_KEY}); "
                f"found keys {sorted(keys)}"
            )
        stats = [npz[k].astype(np.float64) for k in STAT_KEYS] if present else [None] * 4
        if present:
            _check_pair("mu/sigma", stats[0], stats[1])
            _check_pair("mu_s/sigma_s", stats[2], stats[3])
    pixels = open_npz_array(file, IMAGES_KEY) if images and IMAGES_KEY in keys else None  # mapped, not read
    if pixels is not None:
        _check_images(pixels, str(file))
    return Reference(*stats, images=pixels)
