"""Inception Score and improved precision / recall (Kynkaanniemi et al. 2019), as ADM evaluates them.

Inception Score
    p(y|x) = softmax(logits) per image; over each of `splits` contiguous parts of the N images,
    IS_part = exp(mean_x KL(p(y|x) || p(y))) with p(y) the part's mean prediction; the result is
    the mean and the standard deviation of IS_part over the parts. Part i holds rows
    [i N / splits, (i + 1) N / splits) (integer division), so with N = 50000 and 10 splits the parts
    are ADM's 5000-image parts.

Precision / recall
    Each feature set estimates a manifold as the union of balls around its points, a ball's radius
    being the distance to the point's k-th nearest neighbour in its own set (the point itself
    excluded). precision = fraction of fake points inside some real ball; recall = fraction of real
    points inside some fake ball (a point on a ball's boundary is inside). Distances come from
    |a|^2 - 2 a.b + |b|^2 in float32 torch matmuls, blocks of at most `batch` x `batch` pairs at a
    time, on the given device (ADM's evaluator tries float16 first; float32 is used here throughout).
"""

from __future__ import annotations

import numpy as np
import torch

ArrayLike = np.ndarray | torch.Tensor


def _as_tensor(a: ArrayLike, dtype: torch.dtype, device: torch.device | str | None = None) -> torch.Tensor:
    t = a if isinstance(a, torch.Tensor) else torch.from_numpy(np.asarray(a))
    return t.detach().to(device=device if device is not None else t.device, dtype=dtype)


# ----------------------------------------------------------------------------------------------
#                                       Inception Score
# ----------------------------------------------------------------------------------------------


def inception_score(logits: ArrayLike, splits: int = 10) -> tuple[float, float]:
    """Inception Score (mean, std over splits) from classifier logits [N, K] (module docstring)."""
    log_p = torch.log_softmax(_as_tensor(logits, torch.float64, "cpu"), dim=1)
    if log_p.ndim != 2:
        raise ValueError(f"logits must have shape [N, K], got {list(log_p.shape)}")
    n = log_p.shape[0]
    if not 1 <= splits <= n:
        raise ValueError(f"splits={splits} must be between 1 and the number of images N={n}")
    scores = []
    for i in range(splits):
        part = log_p[i * n // splits:(i + 1) * n // splits]
        log_marginal = torch.logsumexp(part, dim=0) - np.log(part.shape[0])  # log mean_x p(y|x)
        kl = (part.exp() * (part - log_marginal)).sum(dim=1).mean()
        scores.append(float(torch.exp(kl)))
    return float(np.mean(scores)), float(np.std(scores))


# ----------------------------------------------------------------------------------------------
#                                     Precision and recall
# ----------------------------------------------------------------------------------------------


def _squared_distances(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """[n, D], [m, D] -> [n, m] squared Euclidean distances, clamped at 0."""
    d = (a * a).sum(1, keepdim=True) - 2.0 * (a @ b.t()) + (b * b).sum(1).unsqueeze(0)
    return d.clamp_min_(0.0)


def manifold_radii(features: torch.Tensor, k: int, batch: int) -> torch.Tensor:
    """Squared distance [N] from each row of features [N, D] to its k-th nearest other row."""
    n = features.shape[0]
    if not 1 <= k < n:
        raise ValueError(f"k={k} nearest neighbours need 1 <= k < N, got N={n} feature vectors")
    radii = torch.empty(n, dtype=features.dtype, device=features.device)
    for start in range(0, n, batch):
        rows = features[start:start + batch]
        # the k + 1 smallest of each row over all columns; the smallest is the point itself (0)
        best = None
        for col in range(0, n, batch):
            d = _squared_distances(rows, features[col:col + batch])
            best = d if best is None else torch.cat([best, d], dim=1)
            best = best.topk(min(k + 1, best.shape[1]), dim=1, largest=False).values
        radii[start:start + batch] = best[:, k]
    return radii


def precision_recall(
    real: ArrayLike,
    fake: ArrayLike,
    k: int = 3,
    batch: int = 10_000,
    device: torch.device | str | None = None,
) -> tuple[float, float]:
    """Improved precision and recall of fake [M, D] against real [N, D] features (module docstring).

    device: where the distances are computed (default: real's device if it is a tensor, else CPU).
    """
    real_t = _as_tensor(real, torch.float32, device)
    fake_t = _as_tensor(fake, torch.float32, real_t.device)
    if real_t.ndim != 2 or fake_t.ndim != 2 or real_t.shape[1] != fake_t.shape[1]:
        raise ValueError(
            f"real and fake must be [N, D] and [M, D] with the same D, got {list(real_t.shape)} and "
            f"{list(fake_t.shape)}"
        )
    if batch < 1:
        raise ValueError(f"batch={batch} must be >= 1")
    real_radii = manifold_radii(real_t, k, batch)
    fake_radii = manifold_radii(fake_t, k, batch)
    fake_in = torch.zeros(fake_t.shape[0], dtype=torch.bool, device=real_t.device)
    real_in = torch.zeros(real_t.shape[0], dtype=torch.bool, device=real_t.device)
    for fs in range(0, fake_t.shape[0], batch):
        for rs in range(0, real_t.shape[0], batch):
            d = _squared_distances(fake_t[fs:fs + batch], real_t[rs:rs + batch])  # [fake, real]
            fake_in[fs:fs + batch] |= (d <= real_radii[rs:rs + batch].unsqueeze(0)).any(dim=1)
            real_in[rs:rs + batch] |= (d <= fake_radii[fs:fs + batch].unsqueeze(1)).any(dim=0)
    return float(fake_in.double().mean()), float(real_in.double().mean())
