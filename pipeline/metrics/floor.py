"""The real-vs-real floor of a reference: what two disjoint sets of real images score against each other.

A generator's FID at n samples is biased upwards by the sample size; the floor shows that bias (and
the reference's own spread) at the scale of an evaluation, so a table of FIDs can be read against it.
"""

from __future__ import annotations

import numpy as np

from pipeline.metrics.frechet import frechet_distance
from pipeline.metrics.kid import kernel_inception_distance


def floor_metrics(pool: np.ndarray) -> dict:
    """FID and KID of the first half of `pool` [n, 2048] against the second: what two disjoint sets
    of real images of this size score against each other. Halves of n // 2 (an odd last row is left
    out); FID from each half's mean and covariance, KID unbiased (kid.py)."""
    half = len(pool) // 2
    if half < 2:
        raise ValueError(f"the reference floor needs at least 4 reference images, got {len(pool)}")
    a, b = pool[:half].astype(np.float64), pool[half : 2 * half].astype(np.float64)
    kid, kid_std = kernel_inception_distance(a, b)
    fid = frechet_distance(a.mean(0), np.cov(a, rowvar=False), b.mean(0), np.cov(b, rowvar=False))
    return {"fid": float(fid), "kid": float(kid), "kid_std": float(kid_std), "images_per_half": half}
