"""Run one training function on one or many workers, and tell each worker who it is.

    launch("local" | "torchrun" | "ray", train_fn, config, num_workers, use_gpu, **launcher_kwargs)

calls `train_fn(config)` once per worker. Before the call the launcher has initialised
torch.distributed (when there is more than one worker) and set the worker's `WorkerContext`, which
the training loop reads for its rank, world size, device and, under Ray, how to report checkpoints
and where a restored checkpoint lies. `train_fn` and `config` must be picklable (a module-level
function and a plain dict) for the multi-process and Ray launchers.

Ray is imported only by the "ray" launcher.
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
        )
    return WorkerContext()


def worker_device(use_gpu: bool | None, local_rank: int) -> torch.device:
    """cuda:{local_rank} when GPUs are requested (or available, for use_gpu=None), else cpu."""
    if use_gpu is None:
        use_gpu = torch.cuda.is_available()
    if use_gpu and not torch.cuda.is_available():
        raise ValueError("use_gpu=True but CUDA is not available here: set train.use_gpu = false (or leave it unset)")
    if not use_gpu:
        return torch.device("cpu")
    return torch.device("cuda", local_rank % torch.cuda.device_count())


# ----------------------------------------------------------------------------------------------
#                                        Common entry
# ----------------------------------------------------------------------------------------------


def launch(
    launcher: str,
    train_fn: Callable[[dict], Any],
    config: dict,
    num_workers: int = 1,
    use_gpu: bool | None = None,
    **kw: Any,
) -> Any:
    """Run `train_fn(config)` on `num_workers` workers with the named launcher.

    Returns rank 0's return value ("local", "torchrun") or the metrics of Ray's last report ("ray").
    Extra keyword arguments go to the launcher: local (backend, port), torchrun (backend),
    ray (storage_path, name, max_failures, keep_checkpoints, cpus_per_worker, address).
    """
    if launcher == "local":
        from pipeline.launch.local import launch as run
    elif launcher == "torchrun":
        from pipeline.launch.torchrun import launch as run
    elif launcher == "ray":
        from pipeline.launch.ray import launch as run
    else:
        raise ValueError(f"train.launcher={launcher!r} is unknown; expected one of {list(LAUNCHERS)}")
    if num_workers < 1:
        raise ValueError(f"train.num_workers must be >= 1, got {num_workers}")
    return run(train_fn, config, num_workers=num_workers, use_gpu=use_gpu, **kw)
