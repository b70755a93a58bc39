"""One optimiser update (`train_step`) and what it is made of: micro batches, the projector-gradient
all-reduce, the learning-rate schedule.

One step on each of W workers:
    batch (this worker's b = B/W samples: x0, eps [b,C,H,W], t, y [b], teacher {name: [b, ...]}) ->
    grad_accum micro batches of b/grad_accum -> loss, logs = objective(model, micro batch, teacher
    targets, s); (loss / grad_accum).backward() [DDP averages the backbone's gradients; the
    objective's projector gradients are averaged by one all-reduce] -> clip the global grad norm ->
    AdamW (linear warm-up and cool-down of the learning rate) -> EMA update.
Nothing here synchronises with the host: the returned statistics stay on the device.
"""

from __future__ import annotations

import contextlib
import math
from typing import TYPE_CHECKING, Any, NamedTuple

import torch
import torch.distributed as dist
import torch.nn as nn

from pipeline.train.ema import EMA

if TYPE_CHECKING:
    from pipeline.teachers.target_sources import TeacherSource



def learning_rate(step: int, lr: float, warmup_steps: int, cooldown_steps: int = 0, steps: int = 0) -> float:
    """Learning rate of update `step` (0-based) of a `steps`-update run:

        lr * min(1, (step + 1) / warmup_steps) * min(1, (steps - step) / cooldown_steps)

    a linear warm-up over the first `warmup_steps` updates, constant, then a linear cool-down to
    lr / cooldown_steps at the last update over the final `cooldown_steps` (0 = none; the
    warmup-stable-decay schedule, whose decay phase short runs gain the most from).
    """
    scale = 1.0
    if warmup_steps > 0:
        scale *= min(1.0, (step + 1) / warmup_steps)
    if cooldown_steps > 0:
        if not 0 <= step < steps:
            raise ValueError(f"a cool-down needs the run length: update {step} is not inside a {steps}-update run")
        scale *= min(1.0, (steps - step) / cooldown_steps)
    return lr * scale


def to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """Every tensor of `batch` (nested dicts too: a text condition) on `device`, without waiting."""
    return {k: to_device(v, device) if isinstance(v, dict) else v.to(device, non_blocking=True)
            for k, v in batch.items()}


def first_rows(batch: dict[str, Any], n: int) -> dict[str, Any]:
    """The first `n` samples of every tensor of `batch` (nested dicts too)."""
    return {k: first_rows(v, n) if isinstance(v, dict) else v[:n] for k, v in batch.items()}


def split_micro(batch: dict[str, Any], n: int) -> list[dict[str, Any]]:
    """Cut every tensor of `batch` (nested dicts too) into n equal parts along dim 0."""
    if n == 1:
        return [batch]
    parts: list[dict[str, Any]] = [{} for _ in range(n)]
    for key, value in batch.items():
        pieces = split_micro(value, n) if isinstance(value, dict) else value.chunk(n)
        for part, piece in zip(parts, pieces, strict=True):
            part[key] = piece
    return parts


def average_grads(params: list[nn.Parameter], world_size: int) -> None:
    """Average the gradients of `params` over the workers with one all-reduce (None stays None)."""
    grads = [p.grad for p in params if p.grad is not None]
    if world_size == 1 or not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= world_size
    offset = 0
    for g in grads:
        g.copy_(flat[offset: offset + g.numel()].view_as(g))
        offset += g.numel()


class StepResult(NamedTuple):
    """What one update leaves on the device (nothing here has been synchronised)."""

    logs: dict[str, torch.Tensor]  # the objective's 0-d logs, averaged over the micro batches (this worker)
    loss: torch.Tensor  # 0-d float32: the loss, averaged over the micro batches and the workers
    grad_norm: torch.Tensor  # 0-d float32: global gradient norm before clipping, averaged over the workers
    bad: torch.Tensor  # 0-d bool: the loss or the norm is not finite (fp16: the loss; the scaler skips inf norms)


def train_step(
    *,
    net: nn.Module,  # what is called: the backbone, DDP-wrapped and/or compiled
    model: nn.Module,  # the bare backbone: its gradients are clipped, the EMA follows it
    objective: nn.Module,  # (net, micro batch, teacher targets | None, step) -> (loss, logs)
    optimizer: torch.optim.Optimizer,  # over the backbone's then the objective's trainable parameters
    ema: EMA,  # updated after the optimiser step
    batch: dict[str, Any],  # this worker's batch on the device; teacher {name: [b, ...]} arrays if any
    step: int,  # 0-based index of this update (given to the objective and the teacher source)
    lr: float,  # learning rate of this update
    teacher_source: TeacherSource | None = None,  # teacher arrays -> targets; None = no teacher this step
    grad_accum: int = 1,  # micro batches per step (the batch splits evenly into them)
    grad_clip: float = 1.0,  # max global gradient norm (0 = no clipping)
    ema_decay: float = 0.9999,  # EMA decay per step
    autocast_dtype: torch.dtype | None = None,  # forward under torch.autocast in this dtype (None = off)
    scaler: torch.amp.GradScaler | None = None,  # fp16 loss scaling
    world_size: int = 1,  # workers: > 1 averages the projector gradients and the returned stats
) -> StepResult:
    """One optimiser update: forward and backward over the micro batches, clip, AdamW, EMA."""
    device = batch["x0"].device
    if batch["x0"].shape[0] % grad_accum:
        raise RuntimeError(f"batch of {batch['x0'].shape[0]} samples does not split into {grad_accum} micro batches")

    # -- forward and backward over the micro batches ------------------------------------------------
    loss_sum, logs_sum = torch.zeros((), device=device), {}
    for i, micro in enumerate(split_micro(batch, grad_accum)):
        arrays = micro.pop("teacher", None)
        teacher = teacher_source(arrays) if teacher_source is not None else None
        last = i == grad_accum - 1
        sync = contextlib.nullcontext() if last or world_size == 1 else net.no_sync()
        amp = torch.autocast(device.type, dtype=autocast_dtype) if autocast_dtype else contextlib.nullcontext()
        with sync:
            with amp:
                loss, logs = objective(net, micro, teacher, step)
            scaled = loss / grad_accum
            (scaler.scale(scaled) if scaler is not None else scaled).backward()
        loss_sum += loss.detach().float() / grad_accum
        for k, v in logs.items():
            logs_sum[k] = logs_sum.get(k, 0.0) + v.detach().float() / grad_accum
    if world_size > 1:  # the projectors are outside DDP: their gradients are averaged here
        average_grads([p for p in objective.parameters() if p.requires_grad], world_size)

    # -- clip; the stats stay on the device --------------------------------------------------------
    if scaler is not None:
        scaler.unscale_(optimizer)
    params = [p for group in optimizer.param_groups for p in group["params"]]  # the backbone's, then the objective's
    grad_norm = torch.nn.utils.clip_grad_norm_(params, grad_clip if grad_clip > 0 else math.inf)
    stats = torch.stack([loss_sum, grad_norm.detach().float().to(device)])
    if world_size > 1:
        dist.all_reduce(stats)
        stats /= world_size
    bad = ~torch.isfinite(stats[0]) if scaler is not None else ~torch.isfinite(stats).all()

    # -- update --------------------------------------------------------------------------------------
    for group in optimizer.param_groups:
        group["lr"] = lr
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    ema.update(model, ema_decay)
    return StepResult(logs=logs_sum, loss=stats[0], grad_norm=stats[1], bad=bad)
