"""Stage 1, ingest: source images -> ADM center crop -> WebDataset shards of key.png + key.cls.

Recipe:
  list the source (cheap) -> cut the selected items into shards of `data.shard_size` ->
  write the missing shards in parallel processes, each published atomically with a sidecar
  (count, sha256, skipped files) stamped with this run's fingerprint -> remove leftovers of older
  configs -> index.tsv (and captions.json, when data.captions is set: every caption of every kept
  image) -> the manifest last.

A killed ingest resumes: a shard whose tar and sidecar both carry the current fingerprint is kept.
"""

from __future__ import annotations

import io
import json
import shutil
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from jobs.layout import CAPTIONS
from jobs.run import say, stage
from jobs.stage import UsageError
from pipeline import faults
from pipeline.datasets.center_crop import adm_center_crop
from pipeline.datasets.sources import SourceError, SourceItem, fit_small, open_source
from pipeline.progress import progress_bar
from pipeline.stores.atomic import atomic_write_json, atomic_write_text
from pipeline.stores.mirror import pull_source
from pipeline.stores.objects import is_url
from pipeline.stores.tar_shards import write_shard
from pipeline.text.captions import CaptionError, image_captions
from schemas.config import ExperimentConfig
from schemas.manifest import OutputEntry

SHARD_PATTERN = "shard-{:06d}.tar"


class ImageFailure(RuntimeError):
    """An unreadable image under data.on_error = "fail" (exit code 1)."""


@dataclass(frozen=True)
class ShardTask:
    index: int
    items: tuple[SourceItem, ...]
    out_dir: str
    resolution: int
    on_error: str
    fingerprint: str
    pad_small: bool


# ----------------------------------------------------------------------------------------------
#                                     Per-process work
# ----------------------------------------------------------------------------------------------

_SOURCE = None  # set once per worker process by _init_worker


def _init_worker(source) -> None:
    global _SOURCE
    _SOURCE = source


def to_png(image: Image.Image, resolution: int, pad_small: bool) -> bytes:
    """Center-crop (or zero-pad a small image) to resolution and encode as PNG."""
    arr = fit_small(image, resolution) if pad_small else None
    if arr is None:
        arr = adm_center_crop(image, resolution)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG", compress_level=6)
    return buf.getvalue()


def write_one(task: ShardTask) -> dict:
    """Write shard `task.index`; returns its sidecar record."""
    skipped: list[dict] = []

    def samples():
        for item in task.items:
            try:
                png = to_png(_SOURCE.load(item), task.resolution, task.pad_small)
            except Exception as exc:  # noqa: BLE001 - any decoder error means the same thing
                reason = f"{type(exc).__name__}: {exc}"
                if task.on_error == "fail":
                    raise ImageFailure(f"cannot read {item.origin}: {reason} (set data.on_error=skip to skip it)") from None
                skipped.append({"key": item.key, "origin": item.origin, "reason": reason})
                continue
            yield item.key, png, item.label

    out = Path(task.out_dir)
    info = write_shard(out / SHARD_PATTERN.format(task.index), samples())
    record = {
        "fingerprint": task.fingerprint,
        "index": task.index,
        "name": SHARD_PATTERN.format(task.index),
        "count": info.count,
        "sha256": info.sha256,
        "bytes": info.bytes,
        "skipped": skipped,
        "keys": [it.key for it in task.items if it.key not in {s["key"] for s in skipped}],
        "labels": [it.label for it in task.items if it.key not in {s["key"] for s in skipped}],
        "origins": [it.origin for it in task.items if it.key not in {s["key"] for s in skipped}],
    }
    atomic_write_json(out / f"{record['name']}.json", record)
    faults.point("ingest.shard")
    return record


def _done(out: Path, index: int, fingerprint: str) -> dict | None:
    """The sidecar of a finished shard of this exact run, or None."""
    name = SHARD_PATTERN.format(index)
    sidecar = out / f"{name}.json"
    if not (out / name).is_file() or not sidecar.is_file():
        return None
    try:
        record = json.loads(sidecar.read_text())
    except (OSError, ValueError):
        return None
    if record.get("fingerprint") != fingerprint or (out / name).stat().st_size != record.get("bytes"):
        return None
    return record


# ----------------------------------------------------------------------------------------------
#                                          The stage
# ----------------------------------------------------------------------------------------------


def select(items: list[SourceItem], offset: int, limit: int, order_seed: int | None = None) -> list[SourceItem]:
    """Items [offset, offset + limit) of the source (limit 0 = to the end), in the source's order, or
    (order_seed given) in the order of numpy's default_rng(order_seed).permutation(len(items)). Keys
    stay the items' positions in the source, so a key names the same image in either order."""
    if offset >= len(items):
        raise UsageError(f"data.offset={offset} is past the end of the source ({len(items)} images)")
    if order_seed is not None:
        perm = np.random.default_rng(order_seed).permutation(len(items))
        items = [items[i] for i in perm]
    end = len(items) if limit == 0 else min(len(items), offset + limit)
    return items[offset:end]


def source_num_classes(source) -> int:
    """Number of classes a source can emit: folder names, or the synthetic/Fashion-MNIST count."""
    classes = getattr(source, "classes", 10)
    return len(classes()) if callable(classes) else int(classes)


def open_configured_source(cfg: ExperimentConfig):
    d = cfg.data
    try:
        path = str(pull_source(d.path)) if is_url(d.path) else d.path  # on object storage: a local copy
        return open_source(d.source, path, count=d.synthetic_count, classes=d.synthetic_classes, seed=d.seed,
                           size=max(64, d.resolution))
    except (SourceError, FileNotFoundError) as exc:
        raise UsageError(str(exc)) from None


def ingest(cfg: ExperimentConfig, force: bool = False, wait: bool = False) -> None:
    with stage("ingest", cfg, force, wait) as run:
        if run is None:
            return
        d = cfg.data
        source = open_configured_source(cfg)
        try:
            items = select(source.items(), d.offset, d.limit, d.order_seed if d.shuffled else None)
            num_classes = source_num_classes(source)
            captions = image_captions(d, source, items) if d.captions != "none" else {}
        except (SourceError, CaptionError) as exc:
            raise UsageError(str(exc)) from None

        out = run.path
        out.mkdir(parents=True, exist_ok=True)
        for stale in out.glob(".*.tmp*"):  # temporary files of a killed run (never published)
            if stale.is_dir():
                shutil.rmtree(stale)
            else:
                stale.unlink()
        shards = [tuple(items[i : i + d.shard_size]) for i in range(0, len(items), d.shard_size)]
        records: dict[int, dict] = {}
        for j in range(len(shards)):
            if (rec := _done(out, j, run.fingerprint)) is not None:
                records[j] = rec
        todo = [
            ShardTask(j, shards[j], str(out), d.resolution, d.on_error, run.fingerprint, d.source == "fashion-mnist")
            for j in range(len(shards)) if j not in records
        ]
        if records:
            say("ingest", f"resuming: {len(records)} of {len(shards)} shards already written")
        order = f"shuffled (seed {d.order_seed})" if d.shuffled else "source order"
        say("ingest", f"{len(items)} images from {d.source}:{d.path} ({order}, offset {d.offset}) -> {len(shards)} "
                      f"shards at {d.resolution}px")

        bar = progress_bar(total=sum(len(t.items) for t in todo), unit="img", desc="ingest")
        try:
            if d.num_workers == 1 or len(todo) <= 1:
                _init_worker(source)
                for task in todo:
                    records[task.index] = write_one(task)
                    bar.update(len(task.items))
            else:
                with ProcessPoolExecutor(min(d.num_workers, len(todo)), initializer=_init_worker,
                                         initargs=(source,)) as pool:
                    futures = {pool.submit(write_one, t): t for t in todo}
                    for fut in as_completed(futures):
                        rec = fut.result()
                        records[rec["index"]] = rec
                        bar.update(len(futures[fut].items))
        finally:
            bar.close()

        keep = {SHARD_PATTERN.format(j) for j in range(len(shards))}
        for path in out.glob("shard-*"):
            if path.name not in keep and path.name.removesuffix(".json") not in keep:
                path.unlink()
        ordered = [records[j] for j in range(len(shards))]
        lines = ["key\tlabel\torigin"] + [
            f"{k}\t{lab}\t{o}" for r in ordered for k, lab, o in zip(r["keys"], r["labels"], r["origins"], strict=True)
        ]
        atomic_write_text(out / "index.tsv", "\n".join(lines) + "\n")
        if d.captions != "none":  # every caption of every kept image, in key order
            kept = [k for r in ordered for k in r["keys"]]
            atomic_write_json(out / CAPTIONS, {k: captions[k] for k in kept})
        skipped = [s for r in ordered for s in r["skipped"]]
        count = sum(r["count"] for r in ordered)
        if count == 0:
            raise UsageError(f"no readable image among the {len(items)} selected from {d.path}")
        if skipped:
            say("ingest", f"skipped {len(skipped)} unreadable file(s); see skipped in {out / 'manifest.json'}")
        outputs = [OutputEntry(name=r["name"], kind="shard", count=r["count"], bytes=r["bytes"], sha256=r["sha256"])
                   for r in ordered]
        if d.captions != "none":
            outputs.append(OutputEntry(name=CAPTIONS, kind="file", bytes=(out / CAPTIONS).stat().st_size))
        seconds = max(1e-9, bar.format_dict.get("elapsed", 0.0))
        run.finish(
            outputs,
            stats={"images": count, "skipped": len(skipped), "shards": len(ordered),
                   "images_per_s_written": round(bar.n / seconds, 1), "workers": d.num_workers},
            extra={"num_images": count, "num_classes": num_classes, "resolution": d.resolution,
                   "order": "shuffled" if d.shuffled else "source", "order_seed": d.order_seed if d.shuffled else None,
                   "shards": [r["name"] for r in ordered], "skipped": skipped},
        )
