"""Samples/s that the training data path delivers, for W = 0, 1, 2, ... loader processes.

The real path of a training run: TrainDataset over StoreReader arrays (latent moments and their
mirrored variant, teacher tokens and theirs), shuffled epochs, per-sample flips, noise and times,
handed out by `TrainDataset.loader` (a background thread for W = 0, DataLoader processes otherwise)
to this process, which only takes the batches. Stores of random values at the ImageNet-256
geometry by default: SD-VAE moments fp32 [8, 32, 32] and DINOv2-B tokens fp16 [256, 768]; a latents
store and a teacher store, as the stages write them.

`--object-store moto` (a local S3 server, moto) or `--object-store s3://bucket/prefix` (the AWS
environment) also measures the stores read from object storage as a training worker on another
machine reads them: pushed from one working copy, pulled without their shard files into another, read
through tensorstore's `s3` driver; each line says its `source` (local / object-store).

Each line is one (workers, prefetch) setting, next to the rate a model consumes: `--consume` images/s
per training process (default: SiT-XL/2 bf16 on one H100 at 40 % MFU, 3,600 images/s per 8-GPU node
/ 8 = 450; SiT-B/2 is about 5x that) — take it from bench_models.py on the target device.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from jobs.train import StoreArrays
from pipeline.stores.mirror import WorkingCopy
from pipeline.stores.zarr_store import ArraySpec, StoreReader, StoreWriter
from pipeline.train.data import TrainDataset


def build(root: Path, n: int, per_shard: int, tokens: int, dim: int, latent: int, compression: str) -> tuple[StoreReader, StoreReader]:
    rng = np.random.default_rng(0)
    c2 = 8
    specs_l = [ArraySpec(k, (c2, latent, latent), "float32") for k in ("moments", "moments_flip")]
    specs_t = [ArraySpec(k, (tokens, dim), "float16") for k in ("tokens", "tokens_flip")]
    out = []
    for name, specs in (("latents", specs_l), ("teacher", specs_t)):
        writer = StoreWriter(root / f"{name}.zarr", n, specs, per_shard, compression=compression)
        writer.create()
        for a, b in writer.ranges():
            arrays = {}
            for s in specs:
                x = rng.standard_normal((b - a, *s.shape), dtype=np.float32)
                if s.name.startswith("moments"):
                    x[:, c2 // 2:] = np.abs(x[:, c2 // 2:]) * 0.1  # a positive std half
                arrays[s.name] = x
            writer.write_range(a, b, arrays)
        out.append(StoreReader(root / f"{name}.zarr"))
    return out[0], out[1]


def dataset(latents: StoreReader, teacher: StoreReader, batch: int) -> TrainDataset:
    """The dataset `repa train` builds, with the job's own (picklable) readers."""
    moments = [StoreArrays(latents, k) for k in ("moments", "moments_flip")]
    tokens = [StoreArrays(teacher, {"tokens": k}) for k in ("tokens", "tokens_flip")]
    return TrainDataset(moments, np.arange(len(latents)) % 1000, num_classes=1000, teacher=tokens, batch_size=batch)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--num", type=int, default=2048, help="samples in the stores")
    ap.add_argument("--per-shard", type=int, default=512)
    ap.add_argument("--batch", type=int, default=256, help="batch per training process")
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--dim", type=int, default=768)
    ap.add_argument("--latent", type=int, default=32)
    ap.add_argument("--steps", type=int, default=12, help="batches taken per setting (after one warm-up batch)")
    ap.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--prefetch", type=int, nargs="+", default=[0, 2])
    ap.add_argument("--compression", default="none", choices=["none", "zstd"])
    ap.add_argument("--consume", type=float, default=450.0, help="images/s one training process consumes")
    ap.add_argument("--dir", default=None, help="where to write the stores (default: a temporary directory)")
    ap.add_argument("--object-store", default=None,
                    help="also read the stores from object storage: 'moto' (a local S3 server) or s3://bucket/prefix")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp, contextlib.ExitStack() as stack:
        root = Path(tmp) / "here"
        if args.object_store:
            url = args.object_store
            if url == "moto":
                sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
                from tests.s3server import s3_server

                os.environ.update(stack.enter_context(s3_server()))
                url = "s3://repa/bench"
            os.environ["REPA_STAGING"] = str(Path(tmp) / "here")
            root = WorkingCopy.of(url).root
        latents, teacher = build(root, args.num, args.per_shard, args.tokens, args.dim, args.latent, args.compression)
        sources = [("local", latents, teacher)]
        if args.object_store:
            here = WorkingCopy.of(url)
            os.environ["REPA_STAGING"] = str(Path(tmp) / "there")  # another machine: metadata only
            there = WorkingCopy.of(url)
            for name in ("latents.zarr", "teacher.zarr"):
                here.push(root / name)
                there.pull(there.root / name, bulk=False)
            remote = [StoreReader(there.root / f"{n}.zarr") for n in ("latents", "teacher")]
            assert remote[0].remote is not None
            sources.append(("object-store", *remote))
        for (source, latents, teacher), workers in itertools.product(sources, args.workers):
            for prefetch in args.prefetch:
                if workers > 0 and prefetch == 0:
                    continue  # DataLoader processes always build at least one item ahead
                data = dataset(latents, teacher, args.batch)
                batches = iter(data.loader(0, args.steps + 1, workers, prefetch=prefetch))
                next(batches)  # start-up (processes, first reads) is not the steady rate
                t0 = time.perf_counter()
                taken = sum(1 for _ in batches)
                dt = time.perf_counter() - t0
                rate = taken * args.batch / dt
                print(json.dumps({
                    "bench": "loader", "source": source, "workers": workers, "prefetch": prefetch, "batch": args.batch,
                    "compression": args.compression, "cpus": os.cpu_count(),
                    "sample_MiB": round((8 * args.latent ** 2 * 4 + args.tokens * args.dim * 2) / 2**20, 3),
                    "samples_per_s": round(rate, 1), "consume_per_s": args.consume,
                    "outruns_consumer": rate >= args.consume,
                }), flush=True)


if __name__ == "__main__":
    main()
