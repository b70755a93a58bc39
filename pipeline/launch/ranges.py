"""Fan a per-image computation out over the shard ranges of a Zarr store.

The encode and teacher stages both turn the ingest images into per-sample arrays. The store is cut
into shard-aligned ranges [start, stop); each range is computed in batches and published atomically
by `StoreWriter.write_range`, so ranges are the unit of parallelism and of resume: a rerun after a
crash skips the ranges already published.

    extractor   a picklable object with `setup(device)` (loads its networks; called once per worker)
                and `__call__(images uint8 [B,3,H,W] on device) -> {array name: np.ndarray [B, ...]}`;
                one with `load(index, lo, hi)` is given what that returns for rows [lo, hi) instead
                of the images (the text stage: the rows' captions).
    launcher    pipeline.launch.fan_out's: "local" (this process, or spawned processes one device
                each) or "ray" (one Ray task per range).
"""

from __future__ import annotations

import concurrent.futures as cf
import dataclasses
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from pipeline.launch.tasks import fan_out
from pipeline.progress import progress_bar
from pipeline.stores.mirror import CallerCopy, WorkingCopy
from pipeline.stores.tar_shards import ShardIndex
from pipeline.stores.zarr_layout import RANGES_DIR
from pipeline.stores.zarr_store import ArraySpec, StoreWriter


class Extractor(Protocol):
    def setup(self, device: torch.device) -> None: ...

    def __call__(self, images: torch.Tensor) -> dict[str, np.ndarray]: ...


@dataclass(frozen=True)
class StoreJob:
    """Everything a worker needs to rebuild the writer and the image index in its own process."""

    store: str  # path of the Zarr store
    shards: tuple[str, ...]  # ingest shard paths, in order
    specs: tuple[ArraySpec, ...]  # per-sample arrays the extractor produces, plus keys/labels
    samples_per_shard: int
    attrs: dict[str, Any]
    batch_size: int
    keys_width: int  # fixed width of the `keys` string array
    compression: str = "none"  # inside the shards of numeric arrays: "none" or "zstd"
    remote: CallerCopy | None = None  # on object storage: the working copy the paths above are in

    def on_this_machine(self, index: ShardIndex | None,
                        ranges: list[tuple[int, int]]) -> tuple[StoreJob, ShardIndex | None]:
        """(this job, `index`) with their paths in this machine's working copy: the store's metadata and
        the ingest shards that `ranges` read pulled there (a task on another machine of the cluster,
        given the caller's index); unchanged on a local workdir or on the caller's machine."""
        copy = self.remote.elsewhere() if self.remote is not None else None
        if copy is None:
            return self, index

        def here(p: str) -> str:
            return str(self.remote.move(p, copy))

        store, shards = here(self.store), tuple(map(here, self.shards))
        if index is None:
            copy.pull(Path(shards[0]).parent)
        else:
            index = copy_index(index, list(shards))
            needed = sorted({int(i) for a, b in ranges for i in np.unique(index.shard_ids[a:b])})
            copy.pull_files([Path(shards[i]) for i in needed])
        copy.pull(Path(store), bulk=False, prune=False)
        return dataclasses.replace(self, store=store, shards=shards), index

    def publish_range(self, marker: dict[str, Any]) -> None:
        """Upload a range just published in the working copy (its marker, from StoreWriter.write_range):
        its shard files, then the marker file."""
        if self.remote is None:
            return
        copy = WorkingCopy.of(self.remote.url)
        copy.push_files([Path(self.store) / name / e["key"] for name, entries in marker["files"].items() for e in entries])
        copy.push_files([Path(self.store) / RANGES_DIR / f"{marker['start']}-{marker['stop']}"])

    def writer(self, num_samples: int) -> StoreWriter:
        return StoreWriter(self.store, num_samples, list(self.specs), self.samples_per_shard, self.attrs,
                           compression=self.compression)


# ----------------------------------------------------------------------------------------------
#                                     One range, one worker
# ----------------------------------------------------------------------------------------------


def _batches(start: int, stop: int, size: int) -> Iterator[tuple[int, int]]:
    for lo in range(start, stop, size):
        yield lo, min(stop, lo + size)


def compute_range(job: StoreJob, index: ShardIndex, extractor: Extractor, device: torch.device,
                  start: int, stop: int, tick: Callable[[int], None] | None = None) -> dict[str, np.ndarray]:
    """Compute samples [start, stop) batch by batch: the range's arrays, as write_range takes them."""
    parts: dict[str, list[np.ndarray]] = {}
    load = getattr(extractor, "load", None)  # an extractor of something else than the images (captions)
    for lo, hi in _batches(start, stop, job.batch_size):
        if load is not None:
            batch = load(index, lo, hi)
        else:
            images = np.stack([index.read_image(i) for i in range(lo, hi)])  # [b, H, W, 3] uint8
            batch = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous().to(device, non_blocking=True)
        with torch.inference_mode():
            out = extractor(batch)
        for name, value in out.items():
            parts.setdefault(name, []).append(value)
        if tick is not None:
            tick(hi - lo)
    arrays = {name: np.concatenate(chunks) for name, chunks in parts.items()}
    arrays["keys"] = np.asarray(index.keys[start:stop], dtype=f"<U{job.keys_width}")
    arrays["labels"] = index.labels[start:stop].astype(np.int64)
    return arrays


def copy_index(index: ShardIndex, paths: list[str]) -> ShardIndex:
    """`index` reading the same shards at `paths` (another machine's working copy)."""
    moved = ShardIndex.__new__(ShardIndex)
    moved.__dict__.update(index.__dict__, paths=list(paths), _pid=-1, _fds={})
    return moved


def _write_and_publish(job: StoreJob, writer: StoreWriter, start: int, stop: int, arrays: dict) -> None:
    job.publish_range(writer.write_range(start, stop, arrays))


def compute_ranges(job: StoreJob, index: ShardIndex, extractor: Extractor, device: torch.device,
                   ranges: list[tuple[int, int]], tick: Callable[[int], None] | None = None) -> None:
    """Compute and publish `ranges` in order. A background thread publishes range k (tensorstore
    write, sha256, fsync, rename) while range k+1 is computed, so writing costs the device nothing
    unless it is slower than the compute; at most two ranges are in memory. A failed publication
    raises here, at the latest when the last range is done."""
    writer = job.writer(len(index))
    with cf.ThreadPoolExecutor(1, thread_name_prefix="publish") as pool:
        pending: cf.Future | None = None
        for start, stop in ranges:
            arrays = compute_range(job, index, extractor, device, start, stop, tick)
            if pending is not None:
                pending.result()
            pending = pool.submit(_write_and_publish, job, writer, start, stop, arrays)
        if pending is not None:
            pending.result()


@dataclass
class RangeTask:
    """fan_out's task function: compute and publish a list of ranges on a device, return the image
    count. Picklable until it runs; the extractor's networks are loaded by `setup` on first use (in
    the calling process a stage may pass an extractor already set up)."""

    job: StoreJob
    extractor: Extractor
    tick: Callable[[int], None] | None = None  # per-batch progress, in the calling process only
    index: ShardIndex | None = None  # the caller's index (in its process, or sent to other machines), else rebuilt

    def __call__(self, ranges: list[tuple[int, int]], device: torch.device, threads: int) -> int:
        job, index = self.job.on_this_machine(self.index, ranges)
        index = index or ShardIndex(list(job.shards))
        self.extractor.setup(device)
        compute_ranges(job, index, self.extractor, device, ranges, self.tick)
        return sum(stop - start for start, stop in ranges)


# ----------------------------------------------------------------------------------------------
#                                        The fan-out
# ----------------------------------------------------------------------------------------------


def run_store_job(job: StoreJob, index: ShardIndex, extractor: Extractor, *, device: str = "auto",
                  launcher: str = "local", num_workers: int = 1, desc: str = "extract",
                  fresh: bool = False) -> dict[str, Any]:
    """Create the store (or reopen it), compute every unpublished range, verify. Returns stats.

    An existing store is resumed only when its layout and attrs (which carry the stage's
    fingerprint) equal the job's; otherwise, or with `fresh`, it is rebuilt from scratch.
    """
    writer = job.writer(len(index))
    rebuilt = fresh
    try:
        writer.create(overwrite=fresh)
    except ValueError as exc:
        reason = "written for another configuration" if "fingerprint" in str(exc) else str(exc).split(". Delete")[0]
        print(f"[{desc}] rebuilding {job.store}: {reason}", file=sys.stderr, flush=True)
        writer.create(overwrite=True)
        rebuilt = True
    if job.remote is not None:  # the store's metadata first, so ranges published from here on can be resumed;
        # a rebuilt store's old ranges and shard files go from the object store too (a rerun must not count them)
        WorkingCopy.of(job.remote.url).push(Path(job.store), prune=rebuilt)
    done = writer.done()
    todo = [r for r in writer.ranges() if r[0] not in done]
    total = sum(stop - start for start, stop in todo)
    resumed = len(writer.ranges()) - len(todo)
    begin = time.perf_counter()
    bar = progress_bar(total=total, unit="img", desc=desc, disable=total == 0)
    in_process = launcher == "local" and (num_workers == 1 or len(todo) == 1)
    task = RangeTask(job, extractor, tick=bar.update if in_process else None,
                     index=index if in_process or job.remote is not None else None)  # remote: its shards only
    try:  # in this process: one task of every range (publication overlaps compute); else one per range
        fan_out(launcher, task, [todo] if in_process else [[r] for r in todo], num_workers=num_workers,
                device=device, on_result=None if in_process else bar.update)
    finally:
        bar.close()
    seconds = time.perf_counter() - begin
    if job.remote is not None:  # ranges published by tasks on other machines: their markers
        WorkingCopy.of(job.remote.url).pull(Path(job.store), bulk=False, prune=False)
    writer.finish()  # raises if a range is missing; drops the scratch area
    return {
        "images_computed": total,
        "ranges_resumed": resumed,
        "ranges_total": len(writer.ranges()),
        "compute_seconds": round(seconds, 3),
        "images_per_s": round(total / seconds, 1) if total and seconds > 0 else None,
        "workers": num_workers,
        "launcher": launcher,
    }
