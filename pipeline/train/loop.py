"""The training loop every launcher runs: one function, configured by keyword arguments.

Steps are counted from 0: step s is the (s+1)-th optimiser update, it reads item s of the dataset
and calls the objective with `step=s`; once it is done, s+1 steps are done. Checkpoints, metric
rows, exported weights and error messages are labelled with the number of steps done, so
`step-000000003.pt` holds the state after 3 updates and resuming from it runs step index 3 next.

One step on each of W workers is `pipeline.train.step.train_step` (micro batches, backward, clip,
AdamW with the warm-up / cool-down schedule, EMA).
No step waits for the device: the first non-finite loss (or gradient norm) is recorded on the device
and raises RuntimeError at the next sync point (metrics row, checkpoint, sample, end), before
anything is written, so the newest checkpoint is always a good one.
Every `log_every` steps rank 0 appends the window's averages to metrics.jsonl and TensorBoard;
every `checkpoint_every` steps and at the end it writes a checkpoint (pipeline.train.checkpoint),
and every rank then calls `report_fn(metrics, path on rank 0 / None elsewhere)` (Ray needs all
ranks to report in lockstep); at the end it exports ema.safetensors and model.safetensors.

Who and where: the `worker` argument (a launcher's WorkerContext) gives rank, world size and device;
nothing here reads a global context. Under torch.distributed they must match the process group.
What to do: the `settings` argument (pipeline.train.plan.LoopSettings), each field with its comment.

Teacher arrays are read only for steps whose objective needs them, also in loader processes: the
training process decides per step when the DataLoader asks for it (`TeacherReads`), so a switch-off
at tau or by HASTE's trigger reaches every loader process and no teacher byte is read after it.

Determinism: the data of step s is a function of (seed, s) only (pipeline.train.data), the model is
initialised after torch.manual_seed(seed) on every rank, and a checkpoint carries the model, EMA,
optimiser, objective, grad scaler and RNG states; on CPU a run stopped and resumed ends with the
same bits as an uninterrupted one.
"""

from __future__ import annotations

import copy
import math
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
import torch.nn as nn

from pipeline import faults
from pipeline.launch import WorkerContext, resolve_device
from pipeline.precision import autocast_dtype as precision_autocast
from pipeline.progress import progress_bar
from pipeline.train import checkpoint as ckpt
from pipeline.train.data import TrainDataset
from pipeline.train.ema import EMA
from pipeline.train.logging import MetricsLogger
from pipeline.train.plan import LoopSettings
from pipeline.train.step import first_rows, learning_rate, to_device, train_step

if TYPE_CHECKING:
    from pipeline.teachers.target_sources import TeacherSource

# ----------------------------------------------------------------------------------------------
#                                         Small pieces
# ----------------------------------------------------------------------------------------------


def _check_process_group(rank: int, world_size: int) -> None:
    """Raise unless (rank, world_size) are torch.distributed's, when it runs."""
    if world_size > 1 and not dist.is_initialized():
        raise RuntimeError(f"world_size={world_size} but torch.distributed is not initialised: start the run "
                           "through pipeline.launch.launch (local, torchrun or ray)")
    if dist.is_available() and dist.is_initialized() and (rank, world_size) != (dist.get_rank(), dist.get_world_size()):
        raise RuntimeError(
            f"training_loop(rank={rank}, world_size={world_size}) but torch.distributed runs "
            f"{dist.get_world_size()} processes and this is rank {dist.get_rank()}: pass rank=, world_size= and "
            "device= from the launcher's WorkerContext (pipeline.launch.current_context())"
        )


def _check_same_everywhere(value: int, world_size: int, device: torch.device, what: str) -> None:
    """Raise unless every rank holds the same `value` (e.g. the step it resumes from)."""
    if world_size == 1:
        return
    t = torch.tensor([value, -value], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    if t[0].item() != -t[1].item():
        raise RuntimeError(
            f"workers disagree on {what} (from {-t[1].item():.0f} to {t[0].item():.0f}): every worker must see "
            "the same run directory (shared file system) or the same restored checkpoint"
        )


class _Window:
    """Sums over the steps since the last metrics row."""

    def __init__(self):
        self.sums: dict[str, torch.Tensor] = {}
        self.counts: dict[str, int] = {}
        self.steps = 0
        self.grad_norm: torch.Tensor | float = 0.0  # summed on the device: no sync per step
        self.data_wait = 0.0
        self.start = time.perf_counter()

    def add(self, logs: dict[str, torch.Tensor], grad_norm: torch.Tensor) -> None:
        """One step: its logs (0-d tensors) and its gradient norm."""
        for key, value in logs.items():
            self.sums[key] = self.sums.get(key, 0.0) + value.detach().float()
            self.counts[key] = self.counts.get(key, 0) + 1
        self.steps += 1
        self.grad_norm = self.grad_norm + grad_norm

    def row(self, world_size: int, batch_size: int, lr: float) -> dict[str, float]:
        """Averages over the window and the workers (a collective: every rank calls it)."""
        keys = sorted(self.sums)
        row: dict[str, float] = {}
        if keys:
            values = torch.stack([self.sums[k] / self.counts[k] for k in keys])
            if world_size > 1:
                dist.all_reduce(values)
                values /= world_size
            row.update(zip(keys, values.tolist(), strict=True))
        elapsed = max(time.perf_counter() - self.start, 1e-9)
        row.update(
            grad_norm=float(self.grad_norm) / max(self.steps, 1), lr=lr,
            steps_per_s=self.steps / elapsed, images_per_s=self.steps * batch_size / elapsed,
            data_wait=min(1.0, self.data_wait / elapsed),
        )
        return row


def _stop_if_non_finite(first_bad: torch.Tensor, steps: int, last_checkpoint: Path | None) -> None:
    """RuntimeError naming the first step whose loss or gradient norm was not finite (one host sync).

    The check is deferred to the loop's sync points (log rows, checkpoints, samples, the end) so a
    step does not wait for the device; no checkpoint or export is written after a bad step.
    """
    step, loss, norm = first_bad.tolist()
    if step < 0:
        return
    what, value = ("loss", loss) if not math.isfinite(loss) else ("gradient norm", norm)
    raise RuntimeError(
        f"{what} is {value} at step {int(step)} (update {int(step)} of {steps}); last good "
        f"checkpoint: {last_checkpoint if last_checkpoint is not None else 'none written yet'}"
    )


# ----------------------------------------------------------------------------------------------
#                                   Teacher reads and the trigger
# ----------------------------------------------------------------------------------------------


class TeacherReads:
    """Which steps' items are built with teacher arrays; called in the training process when the
    loader asks for item s (see pipeline.train.data.StepSampler), up to prefetch x max(1,
    loader_workers) steps before step s is trained.

    s is read when `needs(s)` holds and no trigger check that could still switch alignment off comes
    first (a check after c updates may end it from step c on). While one at c <= s has not run, s is
    deferred: its item comes without teacher arrays and `take(s)` tells the loop, when step s is
    trained, whether to read them itself. Without loading ahead (no loader processes, prefetch 0) nothing
    is ever deferred.
    """

    def __init__(self, needs: Callable[[int], bool], trigger: Any, checked: int):
        self.needs, self.trigger = needs, trigger
        self.checked = checked  # the trigger's checks after <= `checked` updates have run
        self.deferred: set[int] = set()

    def __call__(self, step: int) -> bool:
        if not self.needs(step):
            return False
        if self.trigger is not None and any(self.trigger.should_check(c) for c in range(self.checked + 1, step + 1)):
            self.deferred.add(step)
            return False
        return True

    def take(self, step: int) -> bool:
        """True when step `step` was deferred and still needs its teacher arrays."""
        if step not in self.deferred:
            return False
        self.deferred.discard(step)
        return self.needs(step)


PROBE_STEP = 0  # the gradient-angle trigger probes with (part of) the batch of this step


def probe_batch(dataset: TrainDataset, teacher_source, size: int, device: torch.device) -> tuple[dict, Any]:
    """The trigger's FIXED probe batch (HASTE's appendix): the first `size` samples (one micro batch)
    of this worker's share of step PROBE_STEP, with their noise, times and teacher targets. The data
    of a step is a pure function of (seed, step), so every check and every resumed run probes with
    the same samples."""
    item = dataset.item(PROBE_STEP, teacher=True)
    arrays = item.pop("teacher", None)
    micro = to_device(first_rows(item, size), device)
    arrays = to_device(first_rows(arrays, size), device) if arrays is not None else None
    return micro, teacher_source(arrays) if teacher_source is not None else None


def _trigger_check(trigger, model, objective, probe, done, rank, world_size, device, logger) -> None:
    """Measure the gradient angle on rank 0's fixed probe batch (`probe()` builds it); every rank
    takes rank 0's decision. Runs after `done` updates and switches alignment off from step `done`."""
    value = trigger.check(model, objective, *probe()) if rank == 0 else 0.0
    decision = torch.tensor([value, float(value < trigger.threshold)], device=device)
    if world_size > 1:
        dist.broadcast(decision, src=0)
    value, stop = decision.tolist()
    logger.log(done, {"trigger_cosine": value})
    if stop:
        objective.terminate(done)


# ----------------------------------------------------------------------------------------------
#                                          The loop
# ----------------------------------------------------------------------------------------------


def training_loop(
    settings: LoopSettings,  # the run's numbers: steps, batch, optimiser, schedule, cadence, resume
    *,
    run_dir: str | Path,  # output folder: checkpoints/, metrics.jsonl, tensorboard/, *.safetensors
    build_model: Callable[[], nn.Module],  # () -> backbone returning ModelOutput; called after manual_seed(seed)
    build_objective: Callable[[nn.Module], nn.Module],  # (model) -> objective(model, batch, teacher, step)
    dataset: TrainDataset,  # per-step batches; layout set here; its needs_teacher, if set, overrides the objective's
    teacher_source: TeacherSource | None = None,  # teacher arrays on the device -> TeacherTargets
    worker: WorkerContext | None = None,  # rank, world size, device; Ray's report_fn and restore_dir (None: rank 0 of 1)
    sample_fn: Callable[[nn.Module, int], None] | None = None,  # (ema model in eval mode, steps done), rank 0
    trigger: Any = None,  # HASTE early stop: .should_check(updates done), .check(...) -> cosine, .threshold
    metadata: dict[str, str] | None = None,  # extra metadata stored in the exported safetensors
    on_checkpoint: Callable[[Path], None] | None = None,  # (checkpoint path), rank 0: publish it (object storage)
    progress: bool = True,  # progress bar with steps/s and images/s on rank 0
) -> dict[str, Any]:
    """Train; returns {step, loss, steps_per_s, images_per_s, checkpoint, ema} (see module docstring)."""
    # -- who and where ------------------------------------------------------------------------------
    worker = worker or WorkerContext()
    rank, world_size, report_fn, restore_dir = worker.rank, worker.world_size, worker.report_fn, worker.restore_dir
    device = resolve_device(worker.device)
    _check_process_group(rank, world_size)
    steps, batch_size, grad_accum, resume = settings.steps, settings.batch_size, settings.grad_accum, settings.resume
    if batch_size % world_size or (batch_size // world_size) % grad_accum:
        raise ValueError(
            f"train.batch_size={batch_size} must split evenly over {world_size} workers x "
            f"{grad_accum} accumulation rounds (train.num_workers, train.grad_accum)"
        )
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    dataset.layout(batch_size, rank, world_size)

    # -- the trained state --------------------------------------------------------------------------
    torch.manual_seed(settings.seed)
    model = build_model().to(device).train()
    objective = build_objective(model).to(device).train()
    objective_params = [p for p in objective.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad] + objective_params,
                                  lr=settings.lr, betas=tuple(settings.betas), weight_decay=settings.weight_decay, eps=settings.eps)
    ema = EMA(model)
    autocast_dtype = precision_autocast(settings.precision, device)
    scaler = torch.amp.GradScaler("cuda") if autocast_dtype == torch.float16 else None

    # -- resume -------------------------------------------------------------------------------------
    start, restored = 0, None
    last_checkpoint = ckpt.resume_path(resume, run_dir, restore_dir)
    if resume == "never" and rank == 0:
        ckpt.remove_all(run_dir)
    if last_checkpoint is not None:
        restored = ckpt.load_training_state(last_checkpoint, model=model, ema=ema, optimizer=optimizer,
                                            objective=objective, scaler=scaler, data_seed=dataset.seed,
                                            batch_size=batch_size)
        start = restored.step
    _check_same_everywhere(start, world_size, device, "the step to resume from")
    if start > steps:
        raise ValueError(f"checkpoint {last_checkpoint} is at step {start}, past train.steps={steps}: raise "
                         "train.steps or use a new run directory")
    if world_size > 1:
        for p in objective_params:  # projectors start equal on every rank (the backbone: DDP does it)
            dist.broadcast(p.data, src=0)
    net: nn.Module = model
    if world_size > 1:
        net = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    if settings.compile:
        net = torch.compile(net)
    if restored is not None:
        ckpt.set_rng_state(restored.rng)
        if rank == 0:
            print(f"[train] resumed from {last_checkpoint} (step {start})", file=sys.stderr, flush=True)

    # -- bookkeeping --------------------------------------------------------------------------------
    logger = MetricsLogger(run_dir, enabled=rank == 0, resume_step=start)
    bar = progress_bar(total=steps, initial=start, unit="step", desc="train",
                       disable=not (progress and rank == 0))
    window, row, loss_value = _Window(), {}, math.nan
    first_bad = torch.full((3,), -1.0, device=device)  # (steps done, loss, grad norm) of the first non-finite step
    run_start, ema_model = time.perf_counter(), None
    micro_size = batch_size // world_size // grad_accum
    reads = None
    if dataset.teacher is not None:
        needs_rule = dataset.needs_teacher if dataset.needs_teacher is not None else objective.needs_teacher
        reads = TeacherReads(needs_rule, trigger, checked=start if start > 0 else -1)  # start 0: check 0 pending
    batches = iter(dataset.loader(start, steps, settings.loader_workers, pin_memory=device.type == "cuda", read_teacher=reads,
                                  prefetch=settings.prefetch))

    def maybe_trigger(done: int) -> None:
        """HASTE's gradient-angle check after `done` updates (trigger_start, + every, ...) while aligning.
        The probe batch is rebuilt from the data's definition at each check (it is the same batch every
        time) instead of holding its teacher targets, attention maps included, on the device all run."""
        if trigger is not None and objective.needs_teacher(done) and trigger.should_check(done):
            _trigger_check(trigger, model, objective, lambda: probe_batch(dataset, teacher_source, micro_size, device),
                           done, rank, world_size, device, logger)
        if reads is not None:
            reads.checked = done

    try:
        if start == 0:
            maybe_trigger(0)  # trigger_start = 0: a check before the first update
        for step in range(start, steps):
            # -- data -------------------------------------------------------------------------------
            t0 = time.perf_counter()
            batch = next(batches)
            window.data_wait += time.perf_counter() - t0
            arrays = batch.pop("teacher", None)
            if reads is not None and reads.take(step):  # deferred past a trigger check: read it here
                arrays = dataset.teacher_arrays(batch["index"], batch["flip"])
            batch = to_device(batch, device)
            needs = objective.needs_teacher(step)
            if needs and teacher_source is None:
                raise ValueError(f"{type(objective).__name__} needs teacher targets at step {step} but no "
                                 "teacher_source was given")
            if needs and arrays is not None:
                batch["teacher"] = {k: v.to(device, non_blocking=True) for k, v in arrays.items()}

            # -- one update -------------------------------------------------------------------------
            current_lr = learning_rate(step, settings.lr, settings.warmup_steps, settings.cooldown_steps, steps)
            out = train_step(net=net, model=model, objective=objective, optimizer=optimizer, ema=ema, batch=batch,
                             step=step, lr=current_lr, teacher_source=teacher_source if needs else None,
                             grad_accum=grad_accum, grad_clip=settings.grad_clip, ema_decay=settings.ema_decay,
                             autocast_dtype=autocast_dtype, scaler=scaler, world_size=world_size)
            first_bad = torch.where(out.bad & (first_bad[0] < 0),
                                    torch.stack([torch.full((), step + 1.0, device=device), out.loss, out.grad_norm]),
                                    first_bad)
            done = step + 1
            maybe_trigger(done)
            window.add(out.logs, out.grad_norm)
            bar.update(1)
            faults.point("train.step")

            # -- log, checkpoint, sample (each a sync point: a non-finite step stops the run first) -----
            sync = (done % settings.log_every == 0 or done % settings.checkpoint_every == 0 or done == steps
                    or (sample_fn is not None and settings.sample_every and done % settings.sample_every == 0))
            if sync:
                _stop_if_non_finite(first_bad, steps, last_checkpoint)
                loss_value = float(out.loss)
            if done % settings.log_every == 0 or done == steps:
                row = window.row(world_size, batch_size, current_lr)
                logger.log(done, row)
                bar.set_postfix(loss=f"{row.get('loss', loss_value):.4f}", img_s=f"{row['images_per_s']:.1f}",
                               refresh=False)
                window = _Window()
            if done % settings.checkpoint_every == 0 or done == steps:
                last_checkpoint = ckpt.checkpoint_path(run_dir, done)
                if rank == 0:
                    ckpt.save_training_state(run_dir, done, model=model, ema=ema, optimizer=optimizer,
                                             objective=objective, scaler=scaler, world_size=world_size,
                                             data_seed=dataset.seed, batch_size=batch_size, keep=settings.keep_checkpoints)
                    if on_checkpoint is not None:
                        on_checkpoint(last_checkpoint)
                if report_fn is not None:
                    report_fn({**row, "step": done}, str(last_checkpoint) if rank == 0 else None)
            if rank == 0 and sample_fn is not None and ((settings.sample_every and done % settings.sample_every == 0) or done == steps):
                if ema_model is None:
                    ema_model = copy.deepcopy(model)
                ema.copy_to(ema_model).eval()
                with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
                    sample_fn(ema_model, done)
    finally:
        bar.close()
        logger.close()
        del batches

    # -- export -------------------------------------------------------------------------------------
    ema_path = run_dir / "ema.safetensors"
    if rank == 0:
        ema_path = ckpt.export_weights(run_dir, model, ema, steps, metadata or {})
    if world_size > 1:
        dist.barrier()
    elapsed = max(time.perf_counter() - run_start, 1e-9)
    return {
        "step": steps, "loss": loss_value, "steps_per_s": (steps - start) / elapsed,
        "images_per_s": (steps - start) * batch_size / elapsed,
        "checkpoint": str(last_checkpoint) if last_checkpoint is not None else None, "ema": str(ema_path),
    }
