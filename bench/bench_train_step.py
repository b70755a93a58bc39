"""Cached vs online teacher: the full training step timed with each `teacher.cache`.

One step = the batch read from feature stores (latent moments + the teacher's arrays, through
StoreReader and TrainDataset, as training reads them) + the teacher work the cache leaves + the
student forward/backward + AdamW + EMA (`pipeline.train.step.train_step`). Four cases, same student,
same batch:

    repa  + tokens   cached x_norm_patchtokens [T, D]: no teacher compute
    repa  + online   the teacher's full forward on the batch's images every step
    haste + hidden   the state entering teacher.hidden_layer [1+T, D]: only the blocks after it run
    haste + online   the full forward, with attention maps

The stores hold random values of the right shapes (the timings do not depend on them); the online
cases read uint8 images from a store array, so JPEG decoding is not in their time. Prints one JSON
line per case (step_s, and inside it data_s and teacher_s, the teacher work) and one with the ratios
online/cached. Presets: cpu (SiT-B/2 + DINOv2-B/14 at 224 px,
batch 8, fp32) and gpu (batch 256, bf16; `--model SiT-XL/2` for the large one).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from pipeline.align.registry import build_objective, objective_class
from pipeline.models import build_model
from pipeline.precision import autocast_dtype as precision_dtype
from pipeline.stores.zarr_store import ArraySpec, StoreReader, StoreWriter
from pipeline.teachers import dinov2
from pipeline.teachers.target_sources import build_teacher_source
from pipeline.train.data import TrainDataset
from pipeline.train.ema import EMA
from pipeline.train.step import train_step
from schemas.config import AlignConfig, TeacherConfig

PRESETS = {
    "cpu": {"model": "SiT-B/2", "teacher": "dinov2_vitb14", "resolution": 224, "batch": 8, "precision": "fp32",
            "steps": 2},
    "gpu": {"model": "SiT-B/2", "teacher": "dinov2_vitb14", "resolution": 224, "batch": 256, "precision": "bf16",
            "steps": 20},
}
CASES = [("repa", "tokens"), ("repa", "online"), ("haste", "hidden"), ("haste", "online")]


def build_stores(root: Path, n: int, tokens: int, dim: int, image_size: int) -> tuple[StoreReader, StoreReader]:
    """Latent moments [8, 32, 32] and teacher arrays (tokens, hidden, images) of n random samples."""
    rng = np.random.default_rng(0)
    latents = StoreWriter(root / "latents.zarr", n, [ArraySpec("moments", (8, 32, 32), "float32")], n)
    specs = [ArraySpec("tokens", (tokens, dim), "float16"), ArraySpec("hidden", (tokens + 1, dim), "float16"),
             ArraySpec("images", (3, image_size, image_size), "uint8")]
    teacher = StoreWriter(root / "teacher.zarr", n, specs, n)
    for writer, arrays in (
        (latents, {"moments": np.concatenate([rng.standard_normal((n, 4, 32, 32)), np.full((n, 4, 32, 32), 0.1)], 1)}),
        (teacher, {"tokens": rng.standard_normal((n, tokens, dim)), "hidden": rng.standard_normal((n, tokens + 1, dim)),
                   "images": rng.integers(0, 256, (n, 3, image_size, image_size), dtype=np.uint8)}),
    ):
        writer.create()
        writer.write_range(0, n, arrays)
    return StoreReader(root / "latents.zarr"), StoreReader(root / "teacher.zarr")


def time_case(align: str, cache: str, args: argparse.Namespace, stores: tuple[StoreReader, StoreReader],
              teacher: torch.nn.Module, device: torch.device) -> dict:
    latents, teacher_store = stores
    tcfg = TeacherConfig(name=args.teacher, weights="random", resolution=args.resolution, cache=cache)
    acfg = AlignConfig(projector_dim=2048)
    layers = objective_class(align).teacher_blocks(acfg)
    source = build_teacher_source(tcfg, teacher, layers).to(device)
    key = {"tokens": "tokens", "hidden": "hidden", "online": "images"}[cache]
    dataset = TrainDataset(lambda idx: latents.read("moments", idx), np.zeros(len(latents), np.int64), num_classes=1000,
                           teacher=lambda idx: {key: teacher_store.read(key, idx)}, batch_size=args.batch)
    model = build_model(args.model, input_size=32, in_channels=4, num_classes=1000).to(device).train()
    grid = (args.resolution // 14,) * 2
    objective = build_objective(align, model, acfg, path="linear", teacher_dim=args.dim, teacher_grid=grid,
                                teacher_heads=12).to(device).train()
    optimizer = torch.optim.AdamW(list(model.parameters()) + list(objective.parameters()), lr=1e-4)
    ema = EMA(model)
    dtype = precision_dtype(args.precision, device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    teacher_s = [0.0]

    def timed_source(arrays):  # the teacher work inside the step, timed on its own
        sync()
        t0 = time.perf_counter()
        out = source(arrays)
        sync()
        teacher_s[0] += time.perf_counter() - t0
        return out

    def one(step: int) -> tuple[float, float]:
        t0 = time.perf_counter()
        item = dataset.item(step)
        arrays = item.pop("teacher")
        batch = {k: v.to(device, non_blocking=True) for k, v in item.items()}
        batch["teacher"] = {k: v.to(device, non_blocking=True) for k, v in arrays.items()}
        t1 = time.perf_counter()
        train_step(net=model, model=model, objective=objective, optimizer=optimizer, ema=ema, batch=batch, step=step,
                   lr=1e-4, teacher_source=timed_source, autocast_dtype=dtype)
        sync()
        return t1 - t0, time.perf_counter() - t1

    one(0)  # warm-up
    data_s = compute_s = teacher_s[0] = 0.0
    for step in range(1, args.steps + 1):
        d, c = one(step)
        data_s, compute_s = data_s + d, compute_s + c
    total = data_s + compute_s
    return {"bench": "train_step", "align": align, "cache": cache, "model": args.model, "teacher": args.teacher,
            "resolution": args.resolution, "batch": args.batch, "precision": args.precision, "device": str(device),
            "step_s": round(total / args.steps, 3), "data_s": round(data_s / args.steps, 4),
            "teacher_s": round(teacher_s[0] / args.steps, 3),
            "images_per_s": round(args.batch * args.steps / total, 1)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", choices=sorted(PRESETS), default=None, help="default: gpu with CUDA, else cpu")
    ap.add_argument("--model", default=None)
    ap.add_argument("--batch", type=int, default=None)
    ap.add_argument("--steps", type=int, default=None, help="timed steps per case (after one warm-up step)")
    args = ap.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    preset = PRESETS[args.preset or ("gpu" if device.type == "cuda" else "cpu")]
    for key, value in preset.items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    teacher = dinov2.load_teacher(args.teacher, "random", args.resolution).to(device)
    args.dim = dinov2.embed_dim(teacher)
    tokens = (args.resolution // 14) ** 2
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        stores = build_stores(Path(tmp), args.batch * (args.steps + 1), tokens, args.dim, 256)
        for align, cache in CASES:
            row = time_case(align, cache, args, stores, teacher, device)
            rows[(align, cache)] = row
            print(json.dumps(row), flush=True)
    def ratio(a: tuple[str, str], b: tuple[str, str], key: str = "step_s") -> float | None:
        return round(rows[a][key] / rows[b][key], 2) if rows[b][key] > 0 else None

    repa, haste = (("repa", "online"), ("repa", "tokens")), (("haste", "online"), ("haste", "hidden"))
    print(json.dumps({"bench": "train_step_ratios", "model": args.model, "batch": args.batch, "device": str(device),
                      "repa_online_over_tokens": ratio(*repa), "haste_online_over_hidden": ratio(*haste),
                      "haste_teacher_online_over_hidden": ratio(*haste, key="teacher_s"),
                      "haste_hidden_over_repa_tokens": ratio(("haste", "hidden"), ("repa", "tokens"))}), flush=True)


if __name__ == "__main__":
    main()
