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
  4. text-to-image with class-named prompts: the agreement score (pipeline.metrics.agreement: a
     k-NN on the cached teacher features judges each sample's class against its prompt's);
  5. metrics.json (atomic), manifest last.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np

from jobs import layout
from jobs.run import device_or_exit, fetch, publish, pull_all, say, shard_paths, stage
from jobs.stage import UsageError, canonical_json
from pipeline.metrics import frechet_distance
from pipeline.metrics.features import ShardImages, inception_features
from pipeline.metrics.floor import floor_metrics
from pipeline.metrics.inception import load_inception
from pipeline.metrics.kid import kernel_inception_distance
from pipeline.metrics.reference import load_reference
from pipeline.metrics.scores import inception_score, precision_recall
from pipeline.stores.atomic import atomic_write_json, atomic_write_npz
from pipeline.stores.npz import open_npz_array
from pipeline.stores.tar_shards import ShardIndex
from schemas.config import ExperimentConfig
from schemas.manifest import Manifest, OutputEntry

MAX_PR_REFERENCE = 10_000  # reference images used for precision/recall (ADM's reference batch size)


# ----------------------------------------------------------------------------------------------
#                                   Text-image agreement
# ----------------------------------------------------------------------------------------------

AGREEMENT_BANK = 5000  # real images (teacher store rows) the k-NN judge compares with


def agreement(cfg: ExperimentConfig, images: np.ndarray, prompt_labels: np.ndarray, device) -> dict | None:
    """pipeline.metrics.agreement of the samples, or None (with a message) when it cannot be computed."""
    import torch

    from pipeline.metrics.agreement import prompt_agreement
    from pipeline.stores.zarr_store import StoreReader
    from pipeline.teachers import dinov2

    if not (prompt_labels >= 0).any():
        say("evaluate", "agreement: the prompts came from a file and name no class (null)")
        return None
    state = layout.states(cfg, upto="teacher")["teacher"]
    if state.state != "up-to-date" or cfg.teacher.cache == "online":
        say("evaluate", f"agreement needs the cached teacher features ({state.path}: {state.state}) (null)")
        return None
    store = StoreReader(state.path / "store.zarr")
    rows = np.arange(min(len(store), AGREEMENT_BANK))
    tokens = torch.from_numpy(np.asarray(store.read("tokens", rows))).float()
    if "tokens_scale" in store.names:
        from pipeline.teachers.quantize import dequantize

        tokens = dequantize(tokens, torch.from_numpy(np.asarray(store.read("tokens_scale", rows))))
    bank, bank_labels = tokens.mean(1).numpy(), np.asarray(store.read("labels", rows), dtype=np.int64)
    teacher = dinov2.load_teacher(cfg.teacher.name, cfg.teacher.weights, cfg.teacher.resolution).to(device)
    feats = []
    with torch.inference_mode():
        for lo in range(0, len(images), cfg.eval.batch_size):
            batch = torch.from_numpy(np.array(images[lo:lo + cfg.eval.batch_size])).permute(0, 3, 1, 2).to(device)
            feats.append(dinov2.patch_tokens(teacher, dinov2.preprocess(batch, cfg.teacher.resolution)).float()
                         .mean(1).cpu())
    return prompt_agreement(bank, bank_labels, torch.cat(feats).numpy(), prompt_labels)


# ----------------------------------------------------------------------------------------------
#                                          References
# ----------------------------------------------------------------------------------------------


def _ingest_reference_images(cfg: ExperimentConfig, run=None) -> tuple[Path, Manifest]:
    """The ingest output whose images are the reference: the training shards, or a held-out split
    (ingested beforehand by `repa evaluate`, from layout.holdout_config). `run`: the evaluate stage's
    run, whose checked inputs hold the training shards (None: looked up)."""
    e = cfg.eval
    if e.reference == "ingest" and run is not None:
        return run.upstream["ingest"].path, run.inputs["ingest"]
    if e.reference == "ingest":
        state = layout.states(cfg, upto="ingest")["ingest"]
        if state.state != "up-to-date" or state.manifest is None:
            raise UsageError(f"the training images (eval.reference = ingest) are {state.state} at {state.path}: "
                             "run `repa ingest` first")
        return state.path, state.manifest
    held = layout.holdout_config(cfg)
    state = layout.states(held, upto="ingest")["ingest"]
    span = f"images {e.reference_offset}..{e.reference_offset + e.reference_limit if e.reference_limit else 'end'}"
    if state.state != "up-to-date" or state.manifest is None:
        raise UsageError(f"the held-out reference images (eval.reference = {e.reference}, {span}) are "
                         f"{state.state} at {state.path}: run `repa evaluate`, which ingests them first")
    say("evaluate", f"reference: held-out {span} of {held.data.source}:{held.data.path}")
    return state.path, state.manifest


def _features(*args, **kwargs) -> dict:
    """pipeline.metrics.features.inception_features with its input errors as usage errors."""
    try:
        return inception_features(*args, **kwargs)
    except ValueError as exc:
        raise UsageError(str(exc)) from None


def reference_statistics(cfg: ExperimentConfig, run, net, device) -> tuple[dict, np.ndarray | None, str]:
    """(mu/sigma/mu_s/sigma_s, pool features for precision/recall or None, a description).
    `run`: the evaluate stage's run, or None outside the stage (`repa floor`)."""
    e = cfg.eval
    if e.reference not in ("ingest", *layout.REFERENCE_IMAGES):
        path = Path(e.reference)
        if not path.is_file():
            raise UsageError(f"eval.reference = {e.reference}: no such file; give an ADM reference batch .npz "
                             "(e.g. VIRTUAL_imagenet256_labeled.npz) or 'ingest' / 'holdout' / 'source'")
        ref = load_reference(path)
        pool = None
        if ref.images is not None:
            pool = _features(net, ref.images[:MAX_PR_REFERENCE], e.batch_size, device, "reference",
                             logits=False, stats=False)["pool"]
        stats = {"mu": ref.mu, "sigma": ref.sigma, "mu_s": ref.mu_s, "sigma_s": ref.sigma_s}
        return stats, pool, str(path)

    if run is None:  # `repa floor`, outside a stage: the states it reads from the object store
        pull_all(cfg)
    shards_dir, manifest = _ingest_reference_images(cfg, run)
    key = hashlib.sha256(canonical_json({"images": manifest.fingerprint, "inception": e.inception,
                                         "limit": e.reference_limit if e.reference == "ingest" else 0})
                         .encode()).hexdigest()[:16]
    cache = layout.workdir(cfg) / "reference" / f"stats-{key}.npz"
    if cache.is_file():
        with np.load(cache) as z:
            data = {k: z[k] for k in z.files}
        say("evaluate", f"reference statistics from cache {cache}")
    else:
        fetch(cfg, shard_paths(shards_dir, manifest))  # object storage: the reference shards, read whole
        index = ShardIndex(shard_paths(shards_dir, manifest))
        n = len(index) if e.reference != "ingest" or not e.reference_limit else min(len(index), e.reference_limit)
        feats = _features(net, ShardImages(index, n), e.batch_size, device, "reference",
                          keep_pool=MAX_PR_REFERENCE, logits=False)
        data = {k: feats[k] for k in ("mu", "sigma", "mu_s", "sigma_s")} | {"pool": feats["pool"].astype(np.float32)}
        atomic_write_npz(cache, **data)
        publish(cfg, cache)
    pool = data.pop("pool")
    return data, pool, f"{shards_dir} ({len(pool)} images for precision/recall)"


def reference_floor(cfg: ExperimentConfig) -> dict:
    """The real-vs-real floor of cfg's reference (floor_metrics of its pool features, the first
    MAX_PR_REFERENCE images), computed once and cached as {workdir}/reference/floor-{hash}.json."""
    e = cfg.eval
    key = hashlib.sha256(canonical_json({k: getattr(e, k) for k in ("reference", "reference_offset", "reference_limit",
                                                                   "reference_source", "reference_path", "inception")}
                                        | {"fingerprint": _reference_fingerprint(cfg)}).encode()).hexdigest()[:16]
    cache = layout.workdir(cfg) / "reference" / f"floor-{key}.json"
    if cache.is_file():
        return json.loads(cache.read_text())
    device = device_or_exit("eval.device", e.device)
    try:
        net = load_inception(e.inception, device)
    except FileNotFoundError as exc:
        raise UsageError(f"eval.inception: {exc}") from None
    _, pool, desc = reference_statistics(cfg, None, net, device)
    if pool is None:
        raise UsageError(f"eval.reference = {e.reference} holds statistics but no images: the floor needs images")
    try:
        result = floor_metrics(pool) | {"reference": desc}
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    atomic_write_json(cache, result)
    publish(cfg, cache)
    return result


def _reference_fingerprint(cfg: ExperimentConfig) -> str:
    """What identifies the reference images: the ingest fingerprint, or the .npz path."""
    if cfg.eval.reference not in ("ingest", *layout.REFERENCE_IMAGES):
        return cfg.eval.reference
    return _ingest_reference_images(cfg)[1].fingerprint


# ----------------------------------------------------------------------------------------------
#                                          The stage
# ----------------------------------------------------------------------------------------------


def evaluate(cfg: ExperimentConfig, force: bool = False, wait: bool = False) -> None:
    with stage("evaluate", cfg, force, wait) as run:
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
        feats = _features(net, images, e.batch_size, device, "samples")
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
        if run.inputs["sample"].extra.get("prompts"):
            agreed = agreement(cfg, images, np.asarray(open_npz_array(samples_path, "arr_1")), device)
            metrics.update(agreed or {"agreement": None})
        metrics = {k: (float(v) if isinstance(v, (float, np.floating)) else v) for k, v in metrics.items()}
        metrics.update({"num_samples": int(len(images)), "reference": ref_desc, "inception": e.inception})
        atomic_write_json(run.path / "metrics.json", metrics)
        shown = ", ".join(f"{k} {metrics[k]:.3f}" for k in ("fid", "kid", "sfid", "is", "precision", "recall",
                                                                 "agreement", "agreement_real")
                          if isinstance(metrics.get(k), float))
        say("evaluate", f"{shown}  ({len(images)} samples)")
        run.finish([OutputEntry(name="metrics.json", kind="file", bytes=(run.path / "metrics.json").stat().st_size)],
                   {"samples": int(len(images))}, extra={"metrics": metrics})
