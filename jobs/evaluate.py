"""Stage `evaluate` (`repa evaluate`): FID, KID, sFID, IS, precision and recall of a run's samples.

Recipe:
  1. load the Inception network first (the bundled TF-compatible port, or a user's
     inception-2015-12-05.pt, which adds the logits for IS); a missing file is a usage error;
  2. reference statistics: from an ADM reference .npz (mu, sigma, mu_s, sigma_s [, arr_0]), or
     computed from ingest images (the training shards, or a held-out split ingested on the side)
     and cached under {workdir}/reference keyed by the images' fingerprint and the network;
  3. Inception features of samples.npz; FID on pool features (2048), sFID on the first 7 channels
     of mixed_6/conv, IS from the logits (10 splits) when they exist, precision/recall with k
     nearest neighbours on pool features, KID (unbiased, cubic kernel) on pool features;
  4. metrics.json (atomic), manifest last.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from jobs.ingest import ingest as run_ingest
from jobs.ingest import shard_paths
from jobs.run import begin, device_or_exit, say
from jobs.stage import UsageError, canonical_json
from pipeline.metrics import frechet_distance
from pipeline.metrics.frechet import RunningStatistics
from pipeline.metrics.inception import load_inception
from pipeline.metrics.kid import kernel_inception_distance
from pipeline.metrics.reference import load_reference
from pipeline.metrics.scores import inception_score, precision_recall
from pipeline.stores.atomic import atomic_write_json, atomic_write_npz
from pipeline.stores.npz import open_npz_array
from pipeline.stores.shards import ShardIndex
from schemas.config import ExperimentConfig
from schemas.manifest import Manifest, OutputEntry, read_manifest

MAX_PR_REFERENCE = 10_000  # reference images used for precision/recall (ADM's reference batch size)


# ----------------------------------------------------------------------------------------------
#                                      Inception features
# ----------------------------------------------------------------------------------------------


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
        raise UsageError(f"{desc}: {len(images)} image(s); FID statistics need at least 2 (use thousands)")
    running: dict[str, RunningStatistics] = {}
    pool: list[np.ndarray] = []
    kept_logits: list[np.ndarray] = []
    kept = 0
    for lo in tqdm(range(0, len(images), batch_size), desc=desc, unit="batch", dynamic_ncols=True):
        x = torch.from_numpy(np.ascontiguousarray(images[lo:lo + batch_size])).permute(0, 3, 1, 2).to(device)
        with torch.inference_mode():
            out = net.features(x)
        batch = {name: out[name].float().cpu().numpy() for name in ("pool", "spatial")}
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


# ----------------------------------------------------------------------------------------------
#                                          References
# ----------------------------------------------------------------------------------------------


def _ingest_reference_images(cfg: ExperimentConfig, run) -> tuple[Path, Manifest]:
    """The ingest output whose images are the reference: the training shards, or a held-out split."""
    e = cfg.eval
    if e.reference == "ingest":
        return run.upstream["ingest"].path, run.inputs["ingest"]
    held = cfg.model_copy(deep=True)
    held.workdir = str(Path(cfg.workdir) / "reference" / "holdout")
    held.data.offset, held.data.limit = e.reference_offset, e.reference_limit
    say("evaluate", f"reference: held-out images {e.reference_offset}..{e.reference_offset + e.reference_limit} "
                    f"of {cfg.data.source}:{cfg.data.path}")
    run_ingest(held)
    path = Path(held.workdir) / "ingest"
    return path, read_manifest(path)


def reference_statistics(cfg: ExperimentConfig, run, net, device) -> tuple[dict, np.ndarray | None, str]:
    """(mu/sigma/mu_s/sigma_s, pool features for precision/recall or None, a description)."""
    e = cfg.eval
    if e.reference not in ("ingest", "holdout"):
        path = Path(e.reference)
        if not path.is_file():
            raise UsageError(f"eval.reference = {e.reference}: no such file; give an ADM reference batch .npz "
                             "(e.g. VIRTUAL_imagenet256_labeled.npz) or 'ingest' / 'holdout'")
        ref = load_reference(path)
        pool = None
        if ref.images is not None:
            pool = inception_features(net, ref.images[:MAX_PR_REFERENCE], e.batch_size, device, "reference",
                                      logits=False, stats=False)["pool"]
        stats = {"mu": ref.mu, "sigma": ref.sigma, "mu_s": ref.mu_s, "sigma_s": ref.sigma_s}
        return stats, pool, str(path)

    shards_dir, manifest = _ingest_reference_images(cfg, run)
    key = hashlib.sha256(canonical_json({"images": manifest.fingerprint, "inception": e.inception,
                                         "limit": e.reference_limit if e.reference == "ingest" else 0})
                         .encode()).hexdigest()[:16]
    cache = Path(cfg.workdir) / "reference" / f"stats-{key}.npz"
    if cache.is_file():
        with np.load(cache) as z:
            data = {k: z[k] for k in z.files}
        say("evaluate", f"reference statistics from cache {cache}")
    else:
        index = ShardIndex(shard_paths(shards_dir, manifest))
        n = len(index) if e.reference != "ingest" or not e.reference_limit else min(len(index), e.reference_limit)
        feats = inception_features(net, ShardImages(index, n), e.batch_size, device, "reference",
                                   keep_pool=MAX_PR_REFERENCE, logits=False)
        data = {k: feats[k] for k in ("mu", "sigma", "mu_s", "sigma_s")} | {"pool": feats["pool"].astype(np.float32)}
        atomic_write_npz(cache, **data)
    pool = data.pop("pool")
    return data, pool, f"{shards_dir} ({len(pool)} images for precision/recall)"


# ----------------------------------------------------------------------------------------------
#                                          The stage
# ----------------------------------------------------------------------------------------------


def evaluate(cfg: ExperimentConfig, force: bool = False) -> None:
    run = begin("evaluate", cfg, force)
    if run is None:
        return
    e = cfg.eval
    device = device_or_exit("eval.device", e.device)
    try:
        net = load_inception(e.inception, device)
    except FileNotFoundError as exc:
        raise UsageError(f"eval.inception: {exc}") from None
    samples_path = run.upstream["sample"].path / "samples.npz"
    try:
        images = open_npz_array(samples_path, "arr_0")  # memory-mapped: read batch by batch
    except (KeyError, ValueError, OSError) as exc:
        raise UsageError(f"{samples_path}: {exc}") from None
    if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
        raise UsageError(f"{samples_path}: arr_0 must be uint8 [N,H,W,3], got {images.dtype} {images.shape}")

    ref, ref_pool, ref_desc = reference_statistics(cfg, run, net, device)
    feats = inception_features(net, images, e.batch_size, device, "samples")
    metrics: dict[str, float | int | str | None] = {
        "fid": frechet_distance(feats["mu"], feats["sigma"], ref["mu"], ref["sigma"]),
        "sfid": frechet_distance(feats["mu_s"], feats["sigma_s"], ref["mu_s"], ref["sigma_s"]),
    }
    if feats["logits"] is not None:
        metrics["is"], metrics["is_std"] = inception_score(feats["logits"], e.splits)
    if ref_pool is not None:
        metrics["precision"], metrics["recall"] = precision_recall(ref_pool, feats["pool"], k=e.k)
        metrics["kid"], metrics["kid_std"] = kernel_inception_distance(ref_pool, feats["pool"])
    else:
        metrics["precision"] = metrics["recall"] = metrics["kid"] = metrics["kid_std"] = None
        say("evaluate", "precision/recall and KID need reference images; the reference file has none (null)")
    metrics = {k: (float(v) if isinstance(v, (float, np.floating)) else v) for k, v in metrics.items()}
    metrics.update({"num_samples": int(len(images)), "reference": ref_desc, "inception": e.inception})
    atomic_write_json(run.path / "metrics.json", metrics)
    shown = ", ".join(f"{k} {metrics[k]:.3f}" for k in ("fid", "kid", "sfid", "is", "precision", "recall")
                      if isinstance(metrics.get(k), float))
    say("evaluate", f"{shown}  ({len(images)} samples)")
    run.finish([OutputEntry(name="metrics.json", kind="file", bytes=(run.path / "metrics.json").stat().st_size)],
               {"samples": int(len(images))}, extra={"metrics": metrics})
