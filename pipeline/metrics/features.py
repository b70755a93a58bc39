"""Inception features of an image set, streamed batch by batch into running moments."""

from __future__ import annotations

import numpy as np
import torch

from pipeline import faults
from pipeline.metrics.frechet import RunningStatistics
from pipeline.progress import progress_bar
from pipeline.stores.tar_shards import ShardIndex


def inception_features(net, images, batch_size: int, device: torch.device, desc: str, *,
                       keep_pool: int | None = None, logits: bool = True, stats: bool = True) -> dict:
    """uint8 [N,H,W,3] -> Inception statistics and the features later steps need, streamed.

    Returns {"pool": the first `keep_pool` rows of the pool features [N,2048] (all when None),
    "logits": [N,K] when `logits` and the network has them, else None} and, when `stats`,
    "mu" [2048], "sigma" [2048,2048] (pool) and "mu_s", "sigma_s" (spatial). `images` is an array or
    anything with len() and slicing that returns uint8 [n,H,W,3] (e.g. `ShardImages`); only one batch
    of images and the running moments are in memory, so a full-ImageNet reference costs O(D^2), not
    O(N D).
    """
    if stats and len(images) < 2:
        raise ValueError(f"{desc}: {len(images)} image(s); FID statistics need at least 2 (use thousands)")
    running: dict[str, RunningStatistics] = {}
    pool: list[np.ndarray] = []
    kept_logits: list[np.ndarray] = []
    kept = 0
    for lo in progress_bar(range(0, len(images), batch_size), desc=desc, unit="batch"):
        # a writable, contiguous batch: a memory-mapped samples.npz is read-only, which torch warns about
        x = torch.from_numpy(np.require(images[lo:lo + batch_size], requirements=["C", "W"])).permute(0, 3, 1, 2).to(device)
        with torch.inference_mode():
            out = net.features(x)
        batch = {name: out[name].float().cpu().numpy() for name in ("pool", "spatial")}
        faults.point("evaluate.batch")
        if stats:
            for name, rows in batch.items():
                running.setdefault(name, RunningStatistics(rows.shape[1])).update(rows)
        take = len(batch["pool"]) if keep_pool is None else max(0, min(len(batch["pool"]), keep_pool - kept))
        pool.append(batch["pool"][:take])
        kept += take
        if logits and out.get("logits") is not None:
            kept_logits.append(out["logits"].float().cpu().numpy())
    feats = {"pool": np.concatenate(pool) if pool else np.zeros((0, 2048), np.float32),
             "logits": np.concatenate(kept_logits) if kept_logits else None}
    if stats:
        (feats["mu"], feats["sigma"]), (feats["mu_s"], feats["sigma_s"]) = (
            running["pool"].result(), running["spatial"].result())
    return feats


class ShardImages:
    """The first `n` images of ingest shards as a lazily read uint8 [n,H,W,3] sequence."""

    def __init__(self, index: ShardIndex, n: int):
        self.index, self.n = index, n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, sl: slice) -> np.ndarray:
        return np.stack([self.index.read_image(i) for i in range(*sl.indices(self.n))])
