"""Launcher "torchrun": this process is one rank of a job started by `torchrun`.

torchrun sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT in every process it starts;
this launcher joins the process group from them (env:// rendezvous), runs `train_fn(config)` and
leaves the group. Example: `torchrun --nproc-per-node 8 -m jobs.cli train --config C`.
"""

from __future__ import annotations

import gc
import os
import warnings
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist

from pipeline.launch import WorkerContext, set_context, worker_device

REQUIRED_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def launch(
    train_fn: Callable[[dict], Any],
    config: dict,
    num_workers: int | None = None,
    use_gpu: bool | None = None,
    backend: str | None = None,
) -> Any:
    """Run `train_fn(config)` as the rank torchrun made this process; returns its result."""
    missing = [k for k in REQUIRED_ENV if k not in os.environ]
    if missing:
        raise ValueError(
            f"train.launcher='torchrun' but {missing} are not set: start the job with "
            "`torchrun --nproc-per-node N -m jobs.cli train --config ...` or use train.launcher='local'"
        )
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ["LOCAL_RANK"])
    if num_workers not in (None, 1, world_size):
        warnings.warn(
            f"train.num_workers={num_workers} is ignored under torchrun, which started {world_size} ranks",
            stacklevel=2,
        )
    device = worker_device(use_gpu, local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    owns_group = world_size > 1 and not dist.is_initialized()
    if owns_group:
        dist.init_process_group(backend or ("nccl" if device.type == "cuda" else "gloo"), init_method="env://")
    set_context(WorkerContext(rank=rank, world_size=world_size, local_rank=local_rank, device=device,
                              launcher="torchrun"))
    try:
        return train_fn(config)
    finally:
        set_context(None)
        if owns_group:
            dist.destroy_process_group()
            gc.collect()  # what still holds the group dies now, not during interpreter finalisation
