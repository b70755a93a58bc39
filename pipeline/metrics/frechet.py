"""Frechet distance between Gaussians fitted to feature sets (FID on Inception pool features, sFID
on the spatial features), computed like ADM's evaluator.

    d^2 = |mu1 - mu2|^2 + tr(S1) + tr(S2) - 2 tr((S1 S2)^{1/2})

The matrix square root comes from scipy.linalg.sqrtm in float64. When it is not finite (S1 S2 close
to singular, e.g. fewer samples than dimensions) both covariances get `eps * I` added and the root is
taken again. Round-off can leave a small imaginary part, which is dropped; an imaginary part on the
diagonal larger than `imag_atol` means the inputs are not valid covariances and raises.
"""

from __future__ import annotations

import warnings

import numpy as np
import scipy.linalg
import torch

ArrayLike = np.ndarray | torch.Tensor

STATS_CHUNK = 8192  # rows per block when accumulating the covariance


# ----------------------------------------------------------------------------------------------
#                                     Feature statistics
# ----------------------------------------------------------------------------------------------


def _as_numpy(a: ArrayLike) -> np.ndarray:
    if isinstance(a, torch.Tensor):
        return a.detach().cpu().numpy()
    return np.asarray(a)


def feature_statistics(features: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    """Mean [D] and unbiased covariance [D, D] (divisor N - 1, like np.cov) of features [N, D], float64.

    Two passes (mean, then centred blocks of rows cast to float64), so a large float32 feature
    matrix is never copied whole to float64.
    """
    x = _as_numpy(features)
    if x.ndim != 2:
        raise ValueError(f"features must have shape [N, D], got {list(x.shape)}")
    n, d = x.shape
    if n < 2:
        raise ValueError(f"feature_statistics needs at least 2 rows to estimate a covariance, got N={n}")
    mu = np.zeros(d, dtype=np.float64)
    for start in range(0, n, STATS_CHUNK):
        mu += x[start:start + STATS_CHUNK].sum(axis=0, dtype=np.float64)
    mu /= n
    sigma = np.zeros((d, d), dtype=np.float64)
    for start in range(0, n, STATS_CHUNK):
        block = x[start:start + STATS_CHUNK].astype(np.float64) - mu
        sigma += block.T @ block
    sigma /= n - 1
    return mu, sigma


# ----------------------------------------------------------------------------------------------
#                                      Frechet distance
# ----------------------------------------------------------------------------------------------


def _check_stats(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> None:
    if mu1.ndim != 1 or mu1.shape != mu2.shape:
        raise ValueError(
            f"mean vectors must be 1-D with the same length, got {list(mu1.shape)} and {list(mu2.shape)}"
        )
    d = mu1.shape[0]
    for name, s in (("sigma1", sigma1), ("sigma2", sigma2)):
        if s.shape != (d, d):
            raise ValueError(f"{name} must have shape [{d}, {d}] to match the means, got {list(s.shape)}")


def frechet_distance(
    mu1: ArrayLike,
    sigma1: ArrayLike,
    mu2: ArrayLike,
    sigma2: ArrayLike,
    *,
    eps: float = 1e-6,
    imag_atol: float = 1e-3,
) -> float:
    """Squared Frechet distance between N(mu1 [D], sigma1 [D, D]) and N(mu2, sigma2), as a float."""
    mu1, mu2 = (np.atleast_1d(_as_numpy(m)).astype(np.float64) for m in (mu1, mu2))
    sigma1, sigma2 = (np.atleast_2d(_as_numpy(s)).astype(np.float64) for s in (sigma1, sigma2))
    _check_stats(mu1, sigma1, mu2, sigma2)

    covmean = scipy.linalg.sqrtm(sigma1 @ sigma2)
    if not np.isfinite(covmean).all():
        warnings.warn(
            f"frechet_distance: sqrtm(sigma1 @ sigma2) is not finite (near-singular product); "
            f"adding {eps} * I to both covariances",
            RuntimeWarning,
            stacklevel=2,
        )
        offset = eps * np.eye(sigma1.shape[0])
        covmean = scipy.linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
    if np.iscomplexobj(covmean):
        largest = float(np.max(np.abs(np.diagonal(covmean).imag)))
        if largest > imag_atol:
            raise ValueError(
                f"frechet_distance: sqrtm(sigma1 @ sigma2) has an imaginary diagonal part of {largest:.3g} "
                f"(> {imag_atol}); the covariances are not positive semi-definite or are badly "
                "conditioned (use more samples than feature dimensions)"
            )
        covmean = covmean.real
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * np.trace(covmean))
