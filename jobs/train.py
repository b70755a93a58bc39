"""Stage `train` (`repa train`): fit the backbone to the cached latents, aligned to the teacher.

Recipe:
  1. read the latents manifest (latent shape, scaling factor, classes) and, when aligning, the
     teacher manifest (grid, width, heads, depth, cache mode);
  2. before any compute: build the model on the meta device and check that the objective fits the
     model and the teacher (one line, exit 2, naming the key to change);
  3. launch `worker_main` on every worker (local, torchrun or Ray): it opens the stores, builds the
     dataset, model, objective and teacher source and runs `pipeline.train.loop.training_loop`,
     which resumes from the run's newest checkpoint;
  4. rank 0 writes result.json; the manifest records the model, its constructor arguments and the
     throughput, so `repa sample` rebuilds the exact backbone.

The run directory is {workdir}/runs/{run}: raising `train.steps` keeps the same run and continues
it; `--force` starts it over.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from jobs import layout
from jobs.checks import check_manifests, model_kwargs
from jobs.run import load_vae_or_exit, remote_copy, say, shard_paths, stage
from jobs.stage import UsageError, probe_warning
from pipeline.stores.mirror import WorkingCopy
from pipeline.train.plan import LoopSettings, TeacherInfo, TextInfo, TrainPlan
from schemas.config import ExperimentConfig
from schemas.manifest import OutputEntry, read_manifest

RESULT = "result.json"


# ----------------------------------------------------------------------------------------------
#                                   Validation before compute
# ----------------------------------------------------------------------------------------------


def check_stores(latents_store: Path, teacher_store: Path | None, teacher: dict[str, Any] | None,
                 fingerprints: dict[str, str]) -> None:
    """Each store is the one its manifest describes (the stage fingerprint in its attrs), the two hold
    the same images in the same order, and the teacher arrays have its manifest's width."""
    from pipeline.stores.zarr_store import StoreReader

    if teacher_store is None or teacher is None or teacher["cache"] == "online":
        return
    try:
        lat, tea = StoreReader(latents_store), StoreReader(teacher_store)
    except (OSError, ValueError) as exc:
        raise UsageError(f"cannot open the feature stores: {exc}; rerun `repa features`") from None
    for name, store in (("latents", lat), ("teacher", tea)):
        if store.attrs.get("fingerprint") != fingerprints[name]:
            raise UsageError(
                f"the {name} store {store.path} does not belong to its manifest (written for another ingest or "
                f"config): rerun `repa {name} --force`")
    a, b = np.asarray(lat.array("keys")[:]), np.asarray(tea.array("keys")[:])
    if a.shape != b.shape or not np.array_equal(a, b):
        first = next((i for i in range(min(len(a), len(b))) if a[i] != b[i]), min(len(a), len(b)))
        raise UsageError(
            f"the teacher store {teacher_store} does not hold the latents' images ({len(b)} vs {len(a)} samples, "
            f"first difference at row {first}): it was built from another ingest; rerun `repa teacher --force`")
    name = "hidden" if teacher["cache"] == "hidden" else "tokens"
    width = int(tea.array(name).shape[-1])
    if width != int(teacher["dim"]):
        raise UsageError(f"the teacher store's {name} are {width} wide but its manifest says {teacher['dim']} "
                         f"({teacher['teacher']}): rerun `repa teacher --force`")


# ----------------------------------------------------------------------------------------------
#                                      Per-worker entry
# ----------------------------------------------------------------------------------------------


class StoreArrays:
    """A picklable reader for TrainDataset: reader(indices) -> one array, or {key: array} when `names`
    maps batch keys to store arrays (those reads are all in flight at once)."""

    def __init__(self, store, names: str | dict[str, str]):
        self.store, self.names = store, names

    def __call__(self, idx: np.ndarray):
        if isinstance(self.names, str):
            return self.store.read(self.names, idx)
        *ahead, (key, name) = self.names.items()  # the others in flight while this thread reads the last
        pending = {k: self.store.read_async(n, idx) for k, n in ahead}
        out = {key: self.store.read(name, idx)}
        return {**{k: p.result() for k, p in pending.items()}, **out}


class IngestImages:
    """A picklable reader of uint8 images [n, 3, H, W] from the ingest shards (online teacher)."""

    def __init__(self, shards: list[str], flip: bool):
        from pipeline.stores.tar_shards import ShardIndex

        self.index, self.flip = ShardIndex([Path(p) for p in shards]), flip

    def __call__(self, idx: np.ndarray) -> dict[str, np.ndarray]:
        batch = np.stack([self.index.read_image(int(i)) for i in idx]).transpose(0, 3, 1, 2)
        return {"images": np.ascontiguousarray(batch[..., ::-1] if self.flip else batch)}


def _moment_readers(store) -> list[StoreArrays]:
    names = ["moments", "moments_flip"] if "moments_flip" in store.names else ["moments"]
    return [StoreArrays(store, n) for n in names]


def _teacher_readers(plan: TrainPlan, variants: int) -> list | None:
    """One reader per moment variant: cached arrays, or the ingest images for an online teacher."""
    from pipeline.align.registry import objective_class
    from pipeline.stores.zarr_store import StoreReader

    info, cfg = plan.teacher, plan.config
    if info is None:
        return None
    suffixes = ["", "_flip"][:variants]
    if info.cache == "online":
        return [IngestImages([str(p) for p in plan.shards], bool(s)) for s in suffixes]
    store = StoreReader(plan.teacher_store)
    attends = bool(objective_class(cfg.train.align).teacher_blocks(cfg.align))
    keys = ["hidden"] if info.cache == "hidden" and attends else (
        ["tokens", "tokens_scale"] if info.dtype == "int8" else ["tokens"])
    if variants > 1 and not all(k + "_flip" in store.names for k in keys):
        suffixes = ["", ""]  # mirrored latents without mirrored teacher features: use the stored ones
    return [StoreArrays(store, {k: k + s for k in keys}) for s in suffixes]


def _sample_fn(cfg: ExperimentConfig, run_dir: Path, device: torch.device, num_classes: int):
    """Save a grid of `train.grid` EMA samples (Euler ODE, 32 steps, fixed noise) at steps-done `step`."""
    from pipeline.sampling import image_grid, samples_to_uint8
    from pipeline.sampling import sample as run_sampler
    from pipeline.stores.atomic import atomic_write_bytes

    vae = load_vae_or_exit(cfg, str(device))
    out = run_dir / "progress"

    def fn(model: torch.nn.Module, step: int) -> None:
        gen = torch.Generator().manual_seed(cfg.train.seed)
        n = cfg.train.grid
        noise = torch.randn(n, model.in_channels, model.input_size, model.input_size, generator=gen).to(device)
        y = (torch.arange(n) % num_classes).to(device)
        with torch.inference_mode():
            z = run_sampler(lambda x, t, yy: model(x, t, yy).velocity.float(), noise, y, sampler="ode", steps=32,
                            heun=False, path=cfg.train.path, cfg_scale=1.0, null_class=cfg.model.num_classes,
                            generator=gen)
            images = samples_to_uint8(vae.decode(z))
        atomic_write_bytes(out / f"step-{step:09d}.png", image_grid(images, columns=8))

    return fn


def _prefetch(prefetch: int, loader_workers: int, device: torch.device) -> int:
    """train.prefetch, except for a loader thread on a CPU: the step already uses every core there, and
    a thread beside it slowed the demo's training by a third (86.7 s -> 126.8 s for 300 steps) while
    hiding a 6 % data wait."""
    return prefetch if device.type == "cuda" or loader_workers > 0 else 0


def worker_main(plan: TrainPlan) -> dict:
    """Train on one worker: open the stores, build the dataset, teacher source and trigger, run the loop.
    Who and where this worker is comes from the launcher's WorkerContext."""
    from pipeline.align.registry import build_objective, objective_class
    from pipeline.align.trigger import build_trigger
    from pipeline.launch import current_context
    from pipeline.models import build_model
    from pipeline.stores.atomic import atomic_write_bytes
    from pipeline.stores.zarr_store import StoreReader
    from pipeline.teachers import dinov2
    from pipeline.teachers.target_sources import build_teacher_source
    from pipeline.train.data import TrainDataset
    from pipeline.train.loop import training_loop

    worker = current_context()
    plan = plan.on_this_machine(worker.rank)
    cfg, info = plan.config, plan.teacher
    copy = WorkingCopy.of(plan.remote.url) if plan.remote and worker.rank == 0 else None  # this machine's

    def publish_run(_checkpoint: Path | None = None) -> None:  # rank 0, object storage: what a rerun resumes from
        if copy is not None:
            copy.push(plan.run_dir, exclude=layout.NESTED["train"])

    t, objective = cfg.train, objective_class(cfg.train.align)
    latents = StoreReader(plan.latents_store)
    moments = _moment_readers(latents)
    labels = np.asarray(latents.array("labels")[:], dtype=np.int64)
    dataset = TrainDataset(moments, labels, num_classes=cfg.model.num_classes, seed=t.seed,
                           class_dropout=cfg.model.class_dropout, scale=plan.latent_scale,
                           time_sampling=t.time_sampling, path=t.path, teacher=_teacher_readers(plan, len(moments)),
                           text=StoreArrays(StoreReader(plan.text_store), {k: k for k in ("tokens", "mask", "pooled", "count")})
                           if plan.text_store else None)

    source = None
    if info is not None:
        module, layers = None, objective.teacher_blocks(cfg.align)
        if info.cache == "online" or (info.cache == "hidden" and layers):
            module = dinov2.load_teacher(cfg.teacher.name, cfg.teacher.weights, cfg.teacher.resolution)
            module = module.to(worker.device).eval().requires_grad_(False)
        source = build_teacher_source(cfg.teacher, module, layers).to(worker.device)

    def make_objective(model: torch.nn.Module):
        return build_objective(
            t.align, model, cfg.align, path=t.path,
            teacher_dim=info and info.dim, teacher_grid=info and info.grid, teacher_heads=info and info.heads)

    settings = LoopSettings.from_config(t, resume=plan.resume,
                                        prefetch=_prefetch(t.prefetch, t.loader_workers, worker.device))
    result = training_loop(
        settings,
        run_dir=plan.run_dir,
        build_model=lambda: build_model(cfg.model.name, **plan.model_kwargs),
        build_objective=make_objective,
        dataset=dataset,
        teacher_source=source,
        worker=worker,
        sample_fn=_sample_fn(cfg, plan.run_dir, worker.device, plan.dataset_classes)
        if worker.rank == 0 and t.grid and plan.text is None else None,  # (text-to-image: grids from `repa sample`)
        trigger=build_trigger(objective, cfg.align),
        metadata={"model": cfg.model.name, "model_kwargs": json.dumps(plan.model_kwargs)},
        on_checkpoint=publish_run if copy is not None else None,
    )
    if worker.rank == 0:
        atomic_write_bytes(plan.run_dir / RESULT, json.dumps(result, indent=2).encode())
        publish_run()
    return result


# ----------------------------------------------------------------------------------------------
#                                          The stage
# ----------------------------------------------------------------------------------------------


def train(cfg: ExperimentConfig, force: bool = False, wait: bool = False) -> None:
    with stage("train", cfg, force, wait) as run:
        if run is None:
            return
        t = cfg.train
        latents = run.inputs["latents"]
        teacher, text = run.inputs.get("teacher"), run.inputs.get("text")
        kwargs = model_kwargs(cfg, latents.extra, text.extra if text else None)
        check_manifests(cfg, latents.extra, teacher.extra if teacher else None, kwargs)
        run_dir = run.path.resolve()
        latents_store = run.upstream["latents"].path / "store.zarr"
        teacher_store = run.upstream["teacher"].path / "store.zarr" if teacher else None
        check_stores(latents_store, teacher_store, teacher.extra if teacher else None,
                     {name: st.fingerprint for name, st in run.upstream.items()})
        ingest_dir = layout.SPECS["ingest"].directory(cfg)  # here (a manifest records its writer's path)
        plan = TrainPlan(
            config=cfg, run_dir=run_dir, latents_store=latents_store.resolve(),
            teacher_store=teacher_store.resolve() if teacher_store else None,
            teacher=TeacherInfo.model_validate(teacher.extra) if teacher else None,
            shards=tuple(p.resolve() for p in shard_paths(ingest_dir, read_manifest(ingest_dir)))
            if teacher and teacher.extra["cache"] == "online" else (),
            latent_scale=float(latents.extra["scaling_factor"]), dataset_classes=int(latents.extra["num_classes"]),
            model_kwargs=kwargs, resume="never" if force else "auto",
            text_store=(run.upstream["text"].path / "store.zarr").resolve() if text else None,
            text=TextInfo.model_validate(text.extra) if text else None, remote=remote_copy(cfg))
        say("train", f"{cfg.model.name} {kwargs} align={t.align} on {latents.extra['num_images']} latents, "
                     f"{t.total_steps} steps x batch {t.batch_size}, {t.launcher} x {t.num_workers} -> {run_dir}")
        if teacher and teacher.extra.get("weights") == "random":
            say("train", "the teacher features are from a RANDOM-INIT teacher (teacher.weights = random)")
        if teacher and (teacher.extra.get("probe") or {}).get("verdict") == "suspect":
            say("train", "WARNING: " + probe_warning(teacher.extra["probe"]))
        (run_dir / RESULT).unlink(missing_ok=True)
        if force and plan.remote is not None:  # start over: the old checkpoints go from the object store now, so
            shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)  # a run killed before its first one
            layout.working_copy(cfg).push(run_dir, exclude=layout.NESTED["train"])  # cannot resume from them

        from pipeline.launch import launcher

        extra = {}
        if t.launcher == "ray":
            storage = (f"{cfg.workdir.rstrip('/')}/{layout.working_copy(cfg).rel(run_dir)}/ray" if plan.remote
                       else str(run_dir / "ray"))  # Ray's own checkpoint copies: storage every node reaches
            extra = {"storage_path": storage, "name": "train", "max_failures": t.max_failures,
                     "keep_checkpoints": t.keep_checkpoints}
        try:
            launcher(t.launcher)(worker_main, plan, num_workers=t.num_workers, use_gpu=t.use_gpu, **extra)
        except ValueError as exc:
            raise UsageError(str(exc)) from None
        if t.launcher == "torchrun" and int(os.environ.get("RANK", "0")) != 0:
            return  # rank 0 writes the manifest
        if plan.remote is not None:  # rank 0 may have run on another machine: what it published
            layout.working_copy(cfg).pull(run_dir, exclude=layout.NESTED["train"])
        result = json.loads((run_dir / RESULT).read_text())
        outputs = [OutputEntry(name=n, kind="file", bytes=(run_dir / n).stat().st_size)
                   for n in ("ema.safetensors", "model.safetensors")]
        run.finish(outputs, {k: result[k] for k in ("step", "loss", "steps_per_s", "images_per_s")},
                   extra={"model": cfg.model.name, "model_kwargs": kwargs, "align": t.align,
                          "num_classes": plan.dataset_classes, "run_dir": str(run_dir)})
