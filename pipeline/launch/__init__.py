"""The runtime layer: where each worker runs and how workers are started.

    resolve_device(request, worker)        the one device resolver ("auto" | "cpu" | "cuda" | "cuda:N")
    launcher(name)(train_fn, config, num_workers, use_gpu, **launcher_kwargs)
                                           SPMD training: train_fn(config) once per worker
    fan_out(name, task_fn, tasks, num_workers, device, on_result)
                                           task-parallel work (the store stages' shard ranges)

A training launcher ("local", "torchrun", "ray") initialises torch.distributed (when there is more
than one worker) and sets the worker's `WorkerContext` before calling `train_fn(config)`; the
training job reads its rank, world size, device and, under Ray, how to report checkpoints and where
a restored checkpoint lies from it. `train_fn` and `config` must be picklable (a module-level
function and a plain or pydantic object) for the multi-process and Ray launchers.

Ray is imported only by the "ray" launcher and the Ray fan-out.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

LAUNCHERS = ("local", "torchrun", "ray")

# (metrics, checkpoint path on rank 0 / None elsewhere) -> None; called by every rank in lockstep.
ReportFn = Callable[[dict[str, float], "str | None"], None]


# ----------------------------------------------------------------------------------------------
#                                       Worker context
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class WorkerContext:
    """Who this process is within a launched training job."""

    rank: int = 0  # global rank
    world_size: int = 1  # number of training workers
    local_rank: int = 0  # rank on this machine (selects the GPU)
    device: torch.device | None = None  # None: CUDA when available, else CPU
    launcher: str = "local"
    report_fn: ReportFn | None = None  # Ray: forwards checkpoints to ray.train.report
    restore_dir: str | None = None  # Ray: directory holding the restored checkpoint file, if any


_CURRENT: WorkerContext | None = None


def set_context(ctx: WorkerContext | None) -> None:
    """Install (or clear with None) this process's worker context; launchers call it."""
    global _CURRENT
    _CURRENT = ctx


def current_context() -> WorkerContext:
    """The context a launcher installed, else one derived from torch.distributed or the environment."""
    if _CURRENT is not None:
        return _CURRENT
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return WorkerContext(
            rank=torch.distributed.get_rank(),
            world_size=torch.distributed.get_world_size(),
            local_rank=int(os.environ.get("LOCAL_RANK", 0)),
            device=resolve_device("auto", int(os.environ.get("LOCAL_RANK", 0))),
        )
    return WorkerContext(device=resolve_device("auto"))


def resolve_device(request: str | torch.device | None = "auto", worker: int = 0, key: str = "device") -> torch.device:
    """The one device resolver: "auto" (or None) -> cuda:{worker mod #GPUs} when CUDA is available,
    else cpu; "cpu"; "cuda" -> cuda:{worker mod #GPUs}; "cuda:N" / a torch.device as given.
    Asking for CUDA where there is none is a ValueError naming the config `key`."""
    request = "auto" if request is None else request
    if isinstance(request, str) and request == "auto":
        request = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(request)
    if device.type != "cuda":
        return device
    if not torch.cuda.is_available():
        raise ValueError(f"{key} = {str(request)!r} but CUDA is not available here; set {key} = 'auto' or 'cpu'")
    return device if device.index is not None else torch.device("cuda", worker % torch.cuda.device_count())


def worker_device(use_gpu: bool | None, local_rank: int) -> torch.device:
    """A training worker's device: train.use_gpu (None = when available) as a resolve_device request."""
    if use_gpu and not torch.cuda.is_available():
        raise ValueError("train.use_gpu = true but CUDA is not available here: set train.use_gpu = false (or leave "
                         "it unset)")
    return resolve_device({None: "auto", True: "cuda", False: "cpu"}[use_gpu], local_rank)


# ----------------------------------------------------------------------------------------------
#                                         Launchers
# ----------------------------------------------------------------------------------------------


def launcher(name: str) -> Callable[..., Any]:
    """The training launcher `name`: a function (train_fn, config, num_workers=1, use_gpu=None, **kw).

    It returns rank 0's return value ("local", "torchrun") or the metrics of Ray's last report
    ("ray"). Keyword arguments: local (backend, port), torchrun (backend), ray (storage_path, name,
    max_failures, keep_checkpoints, cpus_per_worker, address).
    """
    if name == "local":
        from pipeline.launch.local import launch
    elif name == "torchrun":
        from pipeline.launch.torchrun import launch
    elif name == "ray":
        from pipeline.launch.ray import launch
    else:
        raise ValueError(f"train.launcher={name!r} is unknown; expected one of {list(LAUNCHERS)}")
    return launch


from pipeline.launch.tasks import fan_out  # noqa: E402  (uses resolve_device above)

__all__ = ["LAUNCHERS", "WorkerContext", "current_context", "fan_out", "launcher", "resolve_device", "set_context",
           "worker_device"]
