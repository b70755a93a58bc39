"""Launcher "local": this process, or `num_workers` spawned processes on this machine.

num_workers = 1: `train_fn(config)` runs in the calling process as rank 0 of 1, without a process
group. num_workers > 1: torch.multiprocessing spawns one process per rank; each joins a gloo (CPU)
or NCCL (GPU) process group, runs `train_fn(config)` and leaves the group. The rendezvous store is
a TCPStore this process serves on a port the OS picks while it binds it, so no other program can take
the port between choosing and binding it. If any rank fails, the others are stopped and the error is
raised here.
"""

from __future__ import annotations

import gc
import os
import sys
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from pipeline.launch import WorkerContext, set_context, worker_device


def _worker(
    rank: int,
    train_fn: Callable[[dict], Any],
    config: dict,
    world_size: int,
    use_gpu: bool | None,
    backend: str,
    port: int,
    results: Any,
) -> None:
    """Body of spawned rank `rank`: join the group, run, leave; rank 0 sends back its result."""
    os.environ.update({
        "RANK": str(rank), "WORLD_SIZE": str(world_size), "LOCAL_RANK": str(rank),
        "LOCAL_WORLD_SIZE": str(world_size), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
    })
    device = worker_device(use_gpu, rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    else:  # share this machine's cores between the ranks instead of oversubscribing them
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world_size))
    store = dist.TCPStore("127.0.0.1", port, world_size, is_master=False)
    dist.init_process_group(backend, store=store, rank=rank, world_size=world_size)
    set_context(WorkerContext(rank=rank, world_size=world_size, local_rank=rank, device=device, launcher="local"))
    try:
        result = train_fn(config)
        if rank == 0:
            results.put(result)
    finally:
        set_context(None)
        dist.destroy_process_group()
        gc.collect()  # what still holds the group (a DDP reducer in a reference cycle) dies now, not at exit
    # Gloo's C++ threads abort the process (SIGABRT, "terminate called without an active exception")
    # when objects they hold die during interpreter finalisation. This rank's work, result and group
    # are done, so it leaves without finalising (atexit handlers of the worker do not run either).
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def launch(
    train_fn: Callable[[dict], Any],
    config: dict,
    num_workers: int = 1,
    use_gpu: bool | None = None,
    backend: str | None = None,
    port: int | None = None,
) -> Any:
    """Run `train_fn(config)` on `num_workers` local workers; returns rank 0's (small, picklable) result."""
    if num_workers < 1:
        raise ValueError(f"train.num_workers must be >= 1, got {num_workers}")
    if num_workers == 1:
        set_context(WorkerContext(device=worker_device(use_gpu, 0), launcher="local"))
        try:
            return train_fn(config)
        finally:
            set_context(None)
    device = worker_device(use_gpu, 0)
    if device.type == "cuda" and torch.cuda.device_count() < num_workers:
        raise ValueError(
            f"train.num_workers={num_workers} local GPU workers need as many GPUs, found "
            f"{torch.cuda.device_count()}: lower train.num_workers or use the ray launcher"
        )
    backend = backend or ("nccl" if device.type == "cuda" else "gloo")
    ctx = mp.get_context("spawn")
    results = ctx.SimpleQueue()
    store = dist.TCPStore("127.0.0.1", port or 0, None, is_master=True, wait_for_workers=False)
    mp.start_processes(
        _worker,
        args=(train_fn, config, num_workers, use_gpu, backend, store.port, results),
        nprocs=num_workers,
        join=True,
        start_method="spawn",
    )
    return None if results.empty() else results.get()
