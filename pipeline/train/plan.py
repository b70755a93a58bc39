"""What one training run is, as two typed objects built once before compute.

    TrainPlan     the job's hand-over to every worker (crosses process and Ray boundaries: a frozen
                  pydantic model, picklable): the validated config, the stores and the geometry the
                  upstream manifests recorded, the backbone's constructor arguments.
    LoopSettings  the numbers `pipeline.train.loop.training_loop` reads, each with its one-line
                  comment (`from_config` maps the `[train]` section onto them).

Who and where a worker is (rank, world size, device) is not part of the plan: each worker reads it
from the launcher's `pipeline.launch.WorkerContext`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict

from pipeline.stores.mirror import CallerCopy
from schemas.config import ExperimentConfig, TrainConfig

# ----------------------------------------------------------------------------------------------
#                                   The job's hand-over
# ----------------------------------------------------------------------------------------------


class TeacherInfo(BaseModel):
    """The teacher as its stage recorded it (the teacher manifest's extra)."""

    model_config = ConfigDict(frozen=True, extra="ignore")

    teacher: str  # teacher.name, e.g. dinov2_vitb14
    dim: int  # token width D
    grid: tuple[int, int]  # patch grid (gh, gw)
    heads: int  # attention heads per block
    depth: int  # blocks
    cache: Literal["tokens", "hidden", "online"]  # what the store holds
    dtype: Literal["fp16", "int8"] = "fp16"  # how it holds the tokens
    hidden_layer: int | None = None  # block whose input `hidden` is (cache = hidden)


class TextInfo(BaseModel):
    """The caption store as its stage recorded it (the text manifest's extra)."""

    model_config = ConfigDict(frozen=True, extra="ignore")

    encoder: str  # text.name
    dim: int  # token width
    length: int  # tokens per caption (padded)
    captions_per_image: int  # caption slots per image


class TrainPlan(BaseModel):
    """Everything `jobs.train.worker_main` needs, validated once in the job."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    config: ExperimentConfig  # the whole validated experiment
    run_dir: Path  # {workdir}/runs/{run}: checkpoints, metrics, exports
    latents_store: Path  # the latents stage's store.zarr
    teacher_store: Path | None  # the teacher stage's store.zarr (None: no alignment, or an online teacher)
    teacher: TeacherInfo | None  # the teacher's geometry (None: align = none)
    shards: tuple[Path, ...] = ()  # ingest shards, for an online teacher only
    text_store: Path | None = None  # the text stage's store.zarr (text-to-image only)
    text: TextInfo | None = None  # its geometry
    latent_scale: float  # the VAE's scaling factor, multiplied into every latent
    dataset_classes: int  # classes in the stores' labels
    model_kwargs: dict[str, Any]  # the backbone's constructor arguments (latent geometry + [model])
    resume: Literal["auto", "never"] = "auto"  # never: --force, start over
    remote: CallerCopy | None = None  # object-store workdir: the working copy the paths above are in

    def on_this_machine(self, rank: int = 0) -> TrainPlan:
        """This plan with its paths in this machine's working copy of an object-store workdir, the
        stores' metadata pulled there (and the run directory, to resume: rank 0 prunes it to the store's
        objects, other ranks only download), the ingest shards of an online teacher too; itself where
        the caller's paths are valid."""
        copy = self.remote.elsewhere() if self.remote is not None else None
        if copy is None:
            return self

        def here(p: Path | None) -> Path | None:
            return None if p is None else self.remote.move(p, copy)

        moved = {k: here(getattr(self, k)) for k in ("run_dir", "latents_store", "teacher_store", "text_store")}
        for store in ("latents_store", "teacher_store", "text_store"):
            if moved[store] is not None:
                copy.pull(moved[store].parent, bulk=False)
        copy.pull(moved["run_dir"], exclude=("samples", "eval", "ray"), prune=rank == 0)  # layout.NESTED["train"]
        shards = tuple(map(here, self.shards))
        if shards:
            copy.pull_files(list(shards))
        return self.model_copy(update=moved | {"shards": shards})


# ----------------------------------------------------------------------------------------------
#                                    The loop's numbers
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LoopSettings:
    steps: int  # optimiser steps of the whole run (a resumed run continues up to it)
    batch_size: int = 256  # global batch: all workers and all accumulation rounds together
    grad_accum: int = 1  # micro batches per step on each worker
    lr: float = 1e-4  # AdamW learning rate after warm-up
    betas: tuple[float, float] = (0.9, 0.999)  # AdamW betas
    weight_decay: float = 0.0  # AdamW decoupled weight decay
    eps: float = 1e-8  # AdamW epsilon
    warmup_steps: int = 0  # linear learning-rate warm-up steps (0 = none)
    cooldown_steps: int = 0  # linear learning-rate decay over the run's last updates (0 = none)
    grad_clip: float = 1.0  # max global gradient norm (0 = no clipping)
    ema_decay: float = 0.9999  # EMA decay per step
    precision: str = "bf16"  # fp32 | bf16 | fp16 autocast (CUDA only; fp16 adds a GradScaler)
    compile: bool = False  # torch.compile the (DDP-wrapped) backbone
    checkpoint_every: int = 50_000  # steps between checkpoints (one is also written at the end)
    keep_checkpoints: int = 2  # newest checkpoints kept on disk
    log_every: int = 100  # steps between metrics rows (one is also written at the end)
    sample_every: int = 0  # steps between sample_fn calls (0 = only at the end)
    seed: int = 0  # model init (torch.manual_seed on every rank); the dataset carries its own seed
    loader_workers: int = 0  # DataLoader processes per worker (0 = load in this process)
    prefetch: int = 0  # batches built ahead per loader process (>= 1 used), or by a thread when loader_workers = 0
    resume: str = "auto"  # auto (newest checkpoint, if any) | never (start over) | path of a checkpoint

    def __post_init__(self):
        if self.precision not in ("fp32", "bf16", "fp16"):
            raise ValueError(f"train.precision={self.precision!r}; expected fp32, bf16 or fp16")
        if self.resume not in ("auto", "never") and not Path(self.resume).is_file():
            raise ValueError(f"resume={self.resume!r} is neither 'auto', 'never' nor an existing checkpoint file")

    @classmethod
    def from_config(cls, t: TrainConfig, **override: Any) -> LoopSettings:
        """The [train] section's loop fields; `override` sets the ones a run decides (resume, prefetch)."""
        fields = {name: getattr(t, name) for name in cls.__dataclass_fields__ if hasattr(t, name)}
        fields.update(steps=t.total_steps, betas=tuple(t.betas), **override)
        return cls(**fields)
