"""Peak memory of writing a samples.npz: streamed batch by batch vs concatenate + np.savez.

Each way runs in a fresh subprocess (peak RSS is a per-process high-water mark) and writes N uint8
images of RES x RES x 3 to a temporary file in batches of B, the way `repa sample` assembles its
output. Prints one JSON object. Usage: python bench/bench_samples_npz.py [--num 5000 --res 256 --batch 250]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile

CHILD = """
import resource, sys, time
import numpy as np
from pipeline.stores.npz import write_npz_streamed
mode, path, n, res, bs = sys.argv[1], sys.argv[2], *map(int, sys.argv[3:6])
batches = (np.full((min(bs, n - lo), res, res, 3), lo % 251, np.uint8) for lo in range(0, n, bs))
t = time.perf_counter()
if mode == "streamed":
    write_npz_streamed(path, {"arr_0": ((n, res, res, 3), np.uint8, batches)})
else:
    np.savez(path, arr_0=np.concatenate(list(batches)))
print(time.perf_counter() - t, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
"""


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--num", type=int, default=5000)
    ap.add_argument("--res", type=int, default=256)
    ap.add_argument("--batch", type=int, default=250)
    args = ap.parse_args()
    out = {"bench": "samples_npz", "num": args.num, "res": args.res, "batch": args.batch,
           "data_MiB": round(args.num * args.res * args.res * 3 / 2**20, 1)}
    with tempfile.TemporaryDirectory() as tmp:
        for mode in ("streamed", "concatenated"):
            proc = subprocess.run([sys.executable, "-c", CHILD, mode, f"{tmp}/{mode}.npz", str(args.num),
                                   str(args.res), str(args.batch)], capture_output=True, text=True, check=True)
            seconds, peak = map(float, proc.stdout.split())
            out[f"{mode}_peak_rss_MiB"], out[f"{mode}_s"] = round(peak), round(seconds, 2)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
