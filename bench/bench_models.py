"""Forward+backward throughput of the backbones (with their alignment objective) on this machine.

Default: the tiny demo models at 32px on CPU; on a GPU pass e.g. `--models SiT-XL/2 SiTDown-XL/2
--input-size 32 --channels 4 --batch 64 --precision bf16` for the ImageNet-256 latent geometry.
Prints one JSON object per model, with the model FLOPs of one step (forward + backward of backbone
and objective, counted by torch.utils.flop_counter on one step) and, on a GPU whose dense bf16 peak
is known (PEAK_TFLOPS, or --peak-tflops), the model FLOP utilisation mfu = FLOPs/s / peak.
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

from pipeline.align.registry import build_objective
from pipeline.models import build_model
from pipeline.teachers.targets import TeacherTargets
from schemas.config import AlignConfig

# Dense (no sparsity) bf16 tensor-core peaks, TFLOP/s, by a substring of torch.cuda.get_device_name.
PEAK_TFLOPS = {"H200": 989.4, "H100 PCIe": 756.0, "H100": 989.4, "A100": 312.0, "L40S": 362.1, "L4": 121.0,
               "A10G": 70.0, "RTX 4090": 165.2, "V100": 125.0}


def peak_tflops(device: torch.device, override: float | None) -> float | None:
    """The device's dense bf16 peak in TFLOP/s (override wins); None on CPU or for an unknown GPU."""
    if override:
        return override
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_TFLOPS.items() if k in name), None)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", nargs="+", default=["SiT-T/4", "SiTDown-T/4", "UNet-T"])
    ap.add_argument("--align", default="auto", help="auto: urepa for SiTDown/UNet, repa for SiT; or none")
    ap.add_argument("--input-size", type=int, default=32)
    ap.add_argument("--channels", type=int, default=3)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--teacher-grid", type=int, default=4)
    ap.add_argument("--teacher-dim", type=int, default=384)
    ap.add_argument("--projector-dim", type=int, default=2048)
    ap.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    ap.add_argument("--compile", action="store_true", help="torch.compile the backbone, as train.compile = true")
    ap.add_argument("--peak-tflops", type=float, default=None, help="the device's peak, for mfu (default: table)")
    args = ap.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    for name in args.models:
        print(json.dumps(bench_one(name, args, device)), flush=True)


def bench_one(name: str, args: argparse.Namespace, device: torch.device) -> dict:
    """Time `args.steps` optimiser steps of model `name` with its objective on random data."""
    align = args.align if args.align != "auto" else ("repa" if name.startswith("SiT-") else "urepa")
    model = build_model(name, input_size=args.input_size, in_channels=args.channels, num_classes=1000).to(device)
    g = (args.teacher_grid, args.teacher_grid)
    obj = build_objective(align, model, AlignConfig(projector_dim=args.projector_dim), path="linear", teacher_dim=args.teacher_dim,
                          teacher_grid=g, teacher_heads=6).to(device)
    opt = torch.optim.AdamW(list(model.parameters()) + list(obj.parameters()), lr=1e-4)
    b, c, s = args.batch, args.channels, args.input_size
    batch = {"x0": torch.randn(b, c, s, s, device=device), "eps": torch.randn(b, c, s, s, device=device),
             "t": torch.rand(b, device=device), "y": torch.randint(0, 1000, (b,), device=device)}
    teacher = TeacherTargets(tokens=torch.randn(b, g[0] * g[1], args.teacher_dim, device=device), grid=g)
    amp = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.precision == "bf16")
    net = torch.compile(model) if args.compile else model

    def step() -> None:
        with amp:
            loss, _ = obj(net, batch, teacher if align != "none" else None, 0)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    t0 = time.perf_counter()
    for _ in range(2):
        step()
    warmup_s = time.perf_counter() - t0  # includes compilation with --compile
    counter = FlopCounterMode(display=False)
    with counter:
        step()
    flops = counter.get_total_flops()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for _ in range(args.steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    peak = peak_tflops(device, args.peak_tflops)
    achieved = flops * args.steps / dt
    return {
        "bench": "models", "model": name, "align": align, "device": str(device), "precision": args.precision,
        "compile": args.compile, "warmup_s": round(warmup_s, 1),
        "batch": b, "input": [c, s, s], "params_M": round(sum(p.numel() for p in model.parameters()) / 1e6, 3),
        "steps_per_s": round(args.steps / dt, 3), "images_per_s": round(args.steps * b / dt, 1),
        "gflop_per_step": round(flops / 1e9, 1), "tflop_s": round(achieved / 1e12, 2),
        "mfu": round(achieved / (peak * 1e12), 4) if peak else None, "peak_tflops": peak,
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "peak_mem_GiB": round(torch.cuda.max_memory_allocated() / 2**30, 2) if device.type == "cuda" else None,
    }

if __name__ == "__main__":
    main()
