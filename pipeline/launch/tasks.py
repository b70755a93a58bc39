"""Task-parallel fan-out: `task_fn(task, device, threads)` once per task, on this process, a pool of
spawned processes (one device each) or Ray tasks; `on_result(result)` is called in this process as
each task ends, in completion order.

    fan_out(launcher, task_fn, tasks, num_workers=1, device="auto", on_result=None)

launcher "local": the calling process when num_workers = 1 or there is one task, else
min(num_workers, #tasks) spawned processes (CUDA and threaded torch do not survive fork), worker w
on resolve_device(device, w) with the machine's cores shared between them. "ray": one Ray task per
item (one GPU each unless device = "cpu"), `ray` imported only then. `task_fn` and the tasks must be
picklable for both.
"""

from __future__ import annotations

import concurrent.futures as cf
import multiprocessing as mp
import os
from collections.abc import Callable, Sequence
from typing import Any

import torch

from pipeline.launch import resolve_device

TaskFn = Callable[[Any, torch.device, int], Any]  # (task, device, torch threads) -> a small picklable result


def _run_one(task_fn: TaskFn, task: Any, device: str, worker: int, threads: int) -> Any:
    """One task in a worker process: its device resolved there, its share of the cores."""
    torch.set_num_threads(threads)
    return task_fn(task, resolve_device(device, worker), threads)


def fan_out(launcher: str, task_fn: TaskFn, tasks: Sequence[Any], *, num_workers: int = 1, device: str = "auto",
            on_result: Callable[[Any], None] | None = None) -> None:
    """Run every task; raise the first task error here (the others are cancelled or finish)."""
    done = on_result or (lambda _: None)
    if not tasks:
        return
    if launcher == "ray":
        _ray(task_fn, tasks, num_workers, device, done)
    elif launcher != "local":
        raise ValueError(f"stores.launcher={launcher!r} is unknown; expected 'local' or 'ray'")
    elif num_workers == 1 or len(tasks) == 1:
        dev = resolve_device(device)
        for task in tasks:
            done(task_fn(task, dev, torch.get_num_threads()))
    else:
        threads = max(1, (os.cpu_count() or 1) // num_workers)
        with cf.ProcessPoolExecutor(min(num_workers, len(tasks)), mp_context=mp.get_context("spawn")) as pool:
            futures = [pool.submit(_run_one, task_fn, task, device, w, threads) for w, task in enumerate(tasks)]
            for fut in cf.as_completed(futures):
                done(fut.result())


def _ray(task_fn: TaskFn, tasks: Sequence[Any], num_workers: int, device: str, done: Callable[[Any], None]) -> None:
    import ray  # only when asked for

    from pipeline.launch.ray import ray_session

    with ray_session(max(num_workers, 1)):
        gpus = 1 if device != "cpu" and torch.cuda.is_available() else 0
        remote = ray.remote(num_gpus=gpus, num_cpus=1)(_run_one)
        pending = [remote.remote(task_fn, task, device, 0, 1) for task in tasks]
        while pending:
            ready, pending = ray.wait(pending, num_returns=1)
            done(ray.get(ready[0]))
