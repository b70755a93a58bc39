"""Random-batch read throughput of a teacher-token store, the training loop's access pattern.

Writes a store of N samples of fp16 [T, D] tokens (default: ImageNet-256 geometry, 256 x 768) to a
temporary directory, then times reads of sorted random batches through StoreReader.read. Prints one
JSON object. Usage: python bench/bench_store_read.py [--num 2048 --batch 256 --tokens 256 --dim 768 --per-shard 512]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time

import numpy as np

from pipeline.stores.zarr_store import ArraySpec, StoreReader, StoreWriter


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--num", type=int, default=2048)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--dim", type=int, default=768)
    ap.add_argument("--per-shard", type=int, default=512)
    ap.add_argument("--reads", type=int, default=20)
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        spec = ArraySpec("tokens", (args.tokens, args.dim), "float16")
        writer = StoreWriter(f"{tmp}/s.zarr", args.num, [spec], args.per_shard, {})
        writer.create()
        t0 = time.perf_counter()
        for start, stop in writer.ranges():
            data = rng.standard_normal((stop - start, args.tokens, args.dim), dtype=np.float32).astype(np.float16)
            writer.write_range(start, stop, {"tokens": data})
        write_s = time.perf_counter() - t0
        writer.finish()
        reader = StoreReader(f"{tmp}/s.zarr")
        reader.read("tokens", np.arange(4))  # warm the shard indexes
        t0 = time.perf_counter()
        for _ in range(args.reads):
            idx = np.sort(rng.choice(args.num, args.batch, replace=False))
            out = reader.read("tokens", idx)
        read_s = time.perf_counter() - t0
    mb = out.nbytes / 2**20
    print(json.dumps({
        "bench": "store_read", "num": args.num, "batch": args.batch, "sample_shape": [args.tokens, args.dim],
        "write_samples_per_s": round(args.num / write_s, 1),
        "read_batches_per_s": round(args.reads / read_s, 2),
        "read_samples_per_s": round(args.reads * args.batch / read_s, 1),
        "read_MiB_per_s": round(args.reads * mb / read_s, 1),
    }))


if __name__ == "__main__":
    main()
