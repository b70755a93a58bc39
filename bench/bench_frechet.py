"""Time of the Frechet distance on Inception-sized statistics: the eigendecomposition route this
project uses against scipy.linalg.sqrtm (ADM's evaluator), and how far apart their values are.

Covariances of `--samples` random rows in `--dim` dimensions (an evaluation of 500 or 1000 images
gives rank-deficient 2048-d covariances, as here). Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import scipy.linalg

from pipeline.metrics.frechet import feature_statistics, frechet_distance


def sqrtm_frechet(mu1, s1, mu2, s2) -> float:
    covmean = scipy.linalg.sqrtm(s1 @ s2)
    if not np.isfinite(covmean).all():
        offset = 1e-6 * np.eye(s1.shape[0])
        covmean = scipy.linalg.sqrtm((s1 + offset) @ (s2 + offset))
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean.real))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dim", type=int, default=2048)
    ap.add_argument("--samples", type=int, default=1000)
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    mix = rng.standard_normal((args.dim, args.dim)) / np.sqrt(args.dim)  # correlated features
    a = np.maximum(rng.standard_normal((args.samples, args.dim)) @ mix, 0)  # ReLU-like, as pool_3
    b = np.maximum(rng.standard_normal((args.samples, args.dim)) @ mix + 0.1, 0)
    (mu1, s1), (mu2, s2) = feature_statistics(a), feature_statistics(b)
    start = time.perf_counter()
    ours = frechet_distance(mu1, s1, mu2, s2)
    t_ours = time.perf_counter() - start
    start = time.perf_counter()
    theirs = sqrtm_frechet(mu1, s1, mu2, s2)
    t_sqrtm = time.perf_counter() - start
    print(json.dumps({"bench": "frechet", "dim": args.dim, "samples": args.samples, "eigh_s": round(t_ours, 2),
                      "sqrtm_s": round(t_sqrtm, 2), "speedup": round(t_sqrtm / t_ours, 1),
                      "fid_eigh": ours, "fid_sqrtm": theirs, "rel_diff": abs(ours - theirs) / abs(theirs)}))


if __name__ == "__main__":
    main()
