"""Launcher "ray": Ray Train's TorchTrainer runs `train_fn(config)` on `num_workers` workers.

Ray sets up torch.distributed in every worker; the worker reads its rank from
`ray.train.get_context()`. Checkpoints the training loop writes are also handed to
`ray.train.report` (every rank calls it at the same steps; rank 0 attaches the checkpoint file),
so Ray keeps them in `{storage_path}/{name}`. When Ray restarts the worker group after a failure
(`FailureConfig(max_failures)`), `ray.train.get_checkpoint()` returns the newest reported checkpoint;
its directory is offered to the loop as `WorkerContext.restore_dir`, and the loop resumes from the
newer of that and the run directory's own latest checkpoint (same files).

Works with Ray Train v1 and v2 (the default from Ray 2.5x, env RAY_TRAIN_V2_ENABLED): only the
APIs common to both are used. `ray` is imported inside the functions only.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from pipeline.launch import WorkerContext, set_context

# ----------------------------------------------------------------------------------------------
#                                     Inside each worker
# ----------------------------------------------------------------------------------------------


def report_to_ray(metrics: dict[str, float], checkpoint_path: str | None) -> None:
    """ray.train.report(metrics[, checkpoint]) with the checkpoint file in a directory of its own."""
    import ray.train

    metrics = {k: float(v) for k, v in metrics.items()}
    if checkpoint_path is None:
        ray.train.report(metrics)
        return
    with tempfile.TemporaryDirectory(prefix="ray-ckpt-") as tmp:
        target = Path(tmp) / Path(checkpoint_path).name
        try:
            os.link(checkpoint_path, target)  # same file system: no copy
        except OSError:
            shutil.copy2(checkpoint_path, target)
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))


class RayWorker:
    """The picklable train_loop_per_worker: sets the WorkerContext, then calls train_fn(config)."""

    def __init__(self, train_fn: Callable[[dict], Any]):
        self.train_fn = train_fn

    def __call__(self, config: dict) -> Any:
        import ray.train
        import ray.train.torch

        ctx = ray.train.get_context()
        device = ray.train.torch.get_device()
        if device.type == "cuda":
            torch.cuda.set_device(device)
        restored = ray.train.get_checkpoint()
        with restored.as_directory() if restored is not None else contextlib.nullcontext(None) as restore_dir:
            set_context(WorkerContext(
                rank=ctx.get_world_rank(), world_size=ctx.get_world_size(), local_rank=ctx.get_local_rank(),
                device=device, launcher="ray", report_fn=report_to_ray, restore_dir=restore_dir,
            ))
            try:
                return self.train_fn(config)
            finally:
                set_context(None)


# ----------------------------------------------------------------------------------------------
#                                         The driver
# ----------------------------------------------------------------------------------------------


def start_ray(num_cpus: int, address: str | None) -> bool:
    """Connect to Ray (RAY_ADDRESS / `address`) or start a local instance; True if started here."""
    import ray

    if ray.is_initialized():
        return False
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=True)
        return True
    # A local instance: let its workers import what this process imports (tests, scripts).
    paths = [p for p in sys.path if p and os.path.isdir(p)]
    ray.init(
        num_cpus=num_cpus, include_dashboard=False, log_to_driver=True,
        runtime_env={"env_vars": {"PYTHONPATH": os.pathsep.join(paths), "RAY_USAGE_STATS_ENABLED": "0"}},
    )
    return True


@contextlib.contextmanager
def ray_session(num_cpus: int, address: str | None = None) -> Iterator[None]:
    """Ray connected for the block: joins a running instance, or starts one and shuts it down after."""
    started = start_ray(num_cpus, address)
    try:
        yield
    finally:
        if started:
            import ray

            ray.shutdown()


def launch(
    train_fn: Callable[[dict], Any],
    config: dict,
    num_workers: int = 1,
    use_gpu: bool | None = None,
    storage_path: str | None = None,
    name: str | None = None,
    max_failures: int = 0,
    keep_checkpoints: int | None = None,
    cpus_per_worker: int = 1,
    address: str | None = None,
) -> dict[str, float]:
    """Fit a TorchTrainer running `train_fn(config)` per worker; returns the last reported metrics.

    storage_path: where Ray persists reported checkpoints (absolute; shared storage on a cluster;
    None = ~/ray_results). name: the run's folder under it. A failure after `max_failures` restarts
    raises Ray's TrainingFailedError.
    """
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    try:
        import ray
        import ray.train
        from ray.train.torch import TorchTrainer
    except ImportError as e:
        raise ValueError(f"train.launcher='ray' needs ray[train] ({e}): pip install 'ray[train]'") from e
    if use_gpu is None:
        use_gpu = torch.cuda.is_available()
    started = start_ray(max(os.cpu_count() or 1, num_workers * cpus_per_worker + 1), address)
    try:
        resources = {"CPU": cpus_per_worker, **({"GPU": 1} if use_gpu else {})}
        trainer = TorchTrainer(
            train_loop_per_worker=RayWorker(train_fn),
            train_loop_config=config,
            scaling_config=ray.train.ScalingConfig(
                num_workers=num_workers, use_gpu=use_gpu, resources_per_worker=resources),
            run_config=ray.train.RunConfig(
                storage_path=(storage_path if "://" in storage_path else os.path.abspath(storage_path))
                if storage_path else None,
                name=name,
                failure_config=ray.train.FailureConfig(max_failures=max_failures),
                checkpoint_config=ray.train.CheckpointConfig(num_to_keep=keep_checkpoints),
            ),
        )
        result = trainer.fit()
        return dict(result.metrics or {})
    finally:
        if started:
            ray.shutdown()
