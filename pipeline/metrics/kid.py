"""Kernel Inception Distance (Binkowski et al. 2018): the unbiased MMD^2 with a cubic polynomial kernel.

    k(x, y) = (x . y / d + 1)^3                                  d = feature width (2048 for pool)
    MMD^2_u = 1/(m(m-1)) sum_{i!=j} k(r_i, r_j) + 1/(n(n-1)) sum_{i!=j} k(f_i, f_j) - 2/(mn) sum_{i,j} k(r_i, f_j)

As clean-fid and torch-fidelity report it: the estimate is averaged over `subsets` random subsets of
`subset_size` rows drawn without replacement from each set (seeded), and its standard deviation over
the subsets is returned too. When both sets have at most `subset_size` rows every subset would be
the whole set, so one exact estimate over all rows is returned (std 0). Unlike FID, the estimator is
unbiased, which makes it the metric to compare at small sample sizes (hundreds to a few thousand).
"""

from __future__ import annotations

import numpy as np
import torch

from pipeline.metrics.scores import ArrayLike, _as_tensor


def mmd2_unbiased(real: torch.Tensor, fake: torch.Tensor) -> float:
    """Unbiased MMD^2 of the cubic polynomial kernel between real [m, d] and fake [n, d] (m, n >= 2)."""
    d = real.shape[1]
    m, n = real.shape[0], fake.shape[0]
    if m < 2 or n < 2:
        raise ValueError(f"KID needs at least 2 rows in each set, got {m} real and {n} fake")
    k_rr = (real @ real.T / d + 1) ** 3
    k_ff = (fake @ fake.T / d + 1) ** 3
    k_rf = (real @ fake.T / d + 1) ** 3
    rr = (k_rr.sum() - k_rr.diagonal().sum()) / (m * (m - 1))
    ff = (k_ff.sum() - k_ff.diagonal().sum()) / (n * (n - 1))
    return float(rr + ff - 2 * k_rf.mean())


def kernel_inception_distance(
    real: ArrayLike,
    fake: ArrayLike,
    subsets: int = 100,
    subset_size: int = 1000,
    seed: int = 0,
    device: torch.device | str | None = None,
) -> tuple[float, float]:
    """KID (mean, std over subsets) of fake [n, d] against real [m, d] features, in float64."""
    r = _as_tensor(real, torch.float64, device)
    f = _as_tensor(fake, torch.float64, r.device)
    if r.ndim != 2 or f.ndim != 2 or r.shape[1] != f.shape[1]:
        raise ValueError(f"real and fake must be [m, d] and [n, d] with the same d, got {list(r.shape)} and {list(f.shape)}")
    if subsets < 1 or subset_size < 2:
        raise ValueError(f"subsets={subsets} must be >= 1 and subset_size={subset_size} >= 2")
    if r.shape[0] <= subset_size and f.shape[0] <= subset_size:
        return mmd2_unbiased(r, f), 0.0
    size = min(subset_size, r.shape[0], f.shape[0])
    rng = np.random.default_rng(seed)
    values = []
    for _ in range(subsets):
        ri = torch.from_numpy(rng.choice(r.shape[0], size, replace=False)).to(r.device)
        fi = torch.from_numpy(rng.choice(f.shape[0], size, replace=False)).to(r.device)
        values.append(mmd2_unbiased(r[ri], f[fi]))
    return float(np.mean(values)), float(np.std(values))
