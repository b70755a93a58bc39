"""Stage `sample` (`repa sample`): draw images from a trained run.

Recipe:
  1. read the run's manifest (model name and constructor arguments) and the latents manifest (VAE,
     scaling factor); load the EMA (or raw) weights from the run's safetensors export;
  2. for each batch: seeded noise, labels (`sample.labels`: REPA's uniform-random draw or
     class-balanced), the ODE or SDE sampler with classifier-free guidance inside
     [guidance_low, guidance_high] in `sample.precision` (fp32 with TF32 matmuls by default, as
     REPA's generate.py), VAE decode to uint8 (ADM's quantisation); each finished batch is saved
     to a parts folder, so a killed 50K-sample run resumes at the first missing batch;
  3. gather `samples.npz` in ADM's layout (arr_0 uint8 [N,H,W,3], arr_1 labels [N]) and `grid.png`;
     manifest last.

Noise and labels of batch i depend only on (sample.seed, i): a resumed run draws the same images,
and the noise is drawn on the CPU whatever the device, so a GPU draws the images a CPU would.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

from jobs import layout
from jobs.layout import CAPTIONS
from jobs.run import device_or_exit, load_text_encoder_or_exit, load_vae_or_exit, remote_copy, say, stage
from jobs.stage import UsageError
from pipeline import faults
from pipeline.launch import fan_out
from pipeline.models import build_model
from pipeline.precision import autocast
from pipeline.progress import progress_bar
from pipeline.sampling import image_grid, sample_labels, samples_to_uint8
from pipeline.sampling import sample as run_sampler
from pipeline.sampling.images import captioned_grid
from pipeline.stores.atomic import atomic_write_bytes, atomic_write_npz
from pipeline.stores.mirror import CallerCopy, WorkingCopy
from pipeline.stores.npz import open_npz_array, write_npz_streamed
from schemas.config import ExperimentConfig
from schemas.manifest import OutputEntry

# ----------------------------------------------------------------------------------------------
#                                    Loading a trained run
# ----------------------------------------------------------------------------------------------


def weights_path(run_dir: Path, weights: str, checkpoint: int = 0) -> Path:
    """The file sampling reads: the exported EMA (or raw) weights, or the checkpoint of step N."""
    if checkpoint:
        from pipeline.train.checkpoint import checkpoint_path, list_checkpoints

        path = checkpoint_path(run_dir, checkpoint)
        if not path.is_file():
            have = [p.stem for p in list_checkpoints(run_dir / "checkpoints")] if (run_dir / "checkpoints").is_dir() else []
            raise UsageError(f"sample.checkpoint = {checkpoint}: {path} is missing (the run keeps {have or 'none'}); "
                             "train with train.checkpoint_every dividing it and train.keep_checkpoints large enough")
        return path
    path = run_dir / ("ema.safetensors" if weights == "ema" else "model.safetensors")
    if not path.is_file():
        raise UsageError(f"{path} is missing: rerun `repa train` for this run (it exports the weights at the end)")
    return path


def load_run_model(run_dir: Path, train_extra: dict, weights: str, device: torch.device,
                   checkpoint: int = 0) -> torch.nn.Module:
    """The run's backbone (train manifest extra: model, model_kwargs) with its exported EMA (or raw)
    weights, or those of its checkpoint at step `checkpoint`, in eval mode on `device`."""
    path = weights_path(run_dir, weights, checkpoint)
    model = build_model(train_extra["model"], **train_extra["model_kwargs"])
    if checkpoint:
        from pipeline.train.checkpoint import load

        state = load(path)["ema" if weights == "ema" else "model"]
        state = {k.removeprefix("module.").removeprefix("_orig_mod."): v for k, v in state.items()}
    else:
        state = load_file(str(path))
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise UsageError(f"{path} does not fit {train_extra['model']}: missing {missing[:3]}, unexpected "
                         f"{unexpected[:3]}")
    return model.eval().requires_grad_(False).to(device)


def _part_images(files: list[Path]) -> Iterator[np.ndarray]:
    """The images of each drawn batch file, in order, one file open at a time."""
    for f in files:
        with np.load(f) as z:
            yield z["images"]


# ----------------------------------------------------------------------------------------------
#                                          The stage
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DrawPlan:
    """Everything a worker needs to draw batches on its own (plain data: crosses process and Ray)."""

    config: dict  # the experiment config (model_dump)
    run_dir: str  # the training run (exported weights)
    train_extra: dict  # the train manifest's extra: model name and constructor arguments
    parts: str  # folder of finished batches
    batches: tuple[tuple[int, int], ...]  # [lo, hi) of every batch
    labels: tuple[int, ...]  # labels of all samples (sample.labels; text-to-image: the prompts' classes, -1 unknown)
    prompts: tuple[str, ...] = ()  # text-to-image: the prompt of every sample
    remote: CallerCopy | None = None  # object-store workdir: the working copy the paths above are in


def text_condition(encoder, prompts: list[str], device: torch.device) -> dict[str, torch.Tensor]:
    """The MMDiT condition of `prompts`, rounded through fp16 as the text store holds training captions."""
    out = encoder.encode(prompts, device)
    return {"tokens": out["tokens"].half().float(), "mask": out["mask"], "pooled": out["pooled"].half().float(),
            "drop": torch.zeros(len(prompts), dtype=torch.bool, device=device)}


def sample_prompts(cfg: ExperimentConfig, ingest_dir: Path) -> tuple[list[str], np.ndarray]:
    """(prompt, class label) of every sample: the lines of sample.prompts in turn (label -1), or one
    caption of a training image per sample, images and captions drawn with sample.seed."""
    s = cfg.sample
    if s.prompts:
        path = Path(s.prompts).expanduser()
        if not path.is_file():
            raise UsageError(f"sample.prompts = {s.prompts!r} is not a file (one prompt a line)")
        lines = [line.strip() for line in path.read_text().splitlines() if line.strip()]
        if not lines:
            raise UsageError(f"{path} holds no prompt")
        return [lines[i % len(lines)] for i in range(s.num)], np.full(s.num, -1, dtype=np.int64)
    captions = json.loads((ingest_dir / CAPTIONS).read_text())
    labels = {}
    for line in (ingest_dir / "index.tsv").read_text().splitlines()[1:]:
        key, label, _ = line.split("\t", 2)
        labels[key] = int(label)
    keys = sorted(captions)
    rng = np.random.default_rng([s.seed, 7])
    images = rng.choice(len(keys), size=s.num, replace=s.num > len(keys))
    prompts = [captions[keys[i]][int(rng.integers(len(captions[keys[i]])))] for i in images]
    return prompts, np.array([labels[keys[i]] for i in images], dtype=np.int64)


CPU_CHUNK = 50  # rows per model call when sampling on a CPU


def draw(plan: DrawPlan, todo: list[int], device: torch.device, tick=None) -> int:
    """Draw batches `todo` (indices into plan.batches) on `device` and save each as parts/batch-{i}.npz."""

    cfg = ExperimentConfig.model_validate(plan.config)
    s = cfg.sample
    model = load_run_model(Path(plan.run_dir), plan.train_extra, s.weights, device, s.checkpoint)
    vae = load_vae_or_exit(cfg, str(device))  # decode() takes the scaled latent
    num_classes = int(plan.train_extra["model_kwargs"]["num_classes"])
    c, h, w = model.in_channels, model.input_size, model.input_size
    labels = np.asarray(plan.labels, dtype=np.int64)
    encoder = None
    if plan.prompts:
        encoder = load_text_encoder_or_exit(cfg.text).to(device)
    if device.type == "cuda":  # REPA's generate.py: fp32 weights and activations, TF32 matmuls
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True

    # On a CPU, chunks of CPU_CHUNK rows per model call keep activations in cache (the demo's student:
    # 433 ms for 500 rows in chunks of 50 against 620 ms in one call, bit-identical velocities).
    chunk = CPU_CHUNK if device.type == "cpu" else None

    def velocity(x: torch.Tensor, t: torch.Tensor, y) -> torch.Tensor:
        cut = chunk or len(x)
        parts = []
        for i in range(0, len(x), cut):
            yi = {k: v[i:i + cut] for k, v in y.items()} if isinstance(y, dict) else y[i:i + cut]
            with autocast(s.precision, device):
                parts.append(model(x[i:i + cut], t[i:i + cut], yi).velocity.float())
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    for i in todo:
        lo, hi = plan.batches[i]
        gen = torch.Generator().manual_seed(s.seed * 1_000_003 + i)
        noise = torch.randn(hi - lo, c, h, w, generator=gen).to(device)
        y = (text_condition(encoder, list(plan.prompts[lo:hi]), device) if encoder is not None
             else torch.from_numpy(labels[lo:hi]).to(device))
        with torch.inference_mode():
            z = run_sampler(velocity, noise, y, sampler=s.sampler, steps=s.steps, heun=s.heun,
                            path=cfg.train.path, cfg_scale=s.cfg_scale,
                            guidance_low=s.guidance_low, guidance_high=s.guidance_high,
                            null_class=num_classes, generator=gen, heun_guidance=s.heun_guidance)
            images = samples_to_uint8(vae.decode(z))
        atomic_write_npz(Path(plan.parts) / f"batch-{i:06d}.npz", images=images, labels=labels[lo:hi])
        if plan.remote is not None:  # object storage: a rerun on any machine resumes after this batch
            WorkingCopy.of(plan.remote.url).push_files([Path(plan.parts) / f"batch-{i:06d}.npz"])
        faults.point("sample.batch")
        if tick is not None:
            tick(hi - lo)
    return sum(plan.batches[i][1] - plan.batches[i][0] for i in todo)


@dataclass(frozen=True)
class DrawTask:
    """fan_out's task function: draw a list of batches on the device the launcher gives."""

    plan: DrawPlan

    def __call__(self, todo: list[int], device: torch.device, threads: int) -> int:
        plan = self.plan
        copy = plan.remote.elsewhere() if plan.remote is not None else None
        if copy is not None:  # another machine: the weights into its working copy (draw publishes the batches)
            plan = dataclasses.replace(plan, run_dir=str(plan.remote.move(plan.run_dir, copy)),
                                       parts=str(plan.remote.move(plan.parts, copy)))
            copy.pull(Path(plan.run_dir), exclude=layout.NESTED["train"], prune=False)
        return draw(plan, todo, device)


def sample(cfg: ExperimentConfig, force: bool = False, wait: bool = False) -> None:
    with stage("sample", cfg, force, wait) as run:
        if run is None:
            return
        s = cfg.sample
        train = run.inputs["train"]
        run_dir = run.upstream["train"].path
        weights_path(run_dir, s.weights, s.checkpoint)  # a missing file is a usage error before any compute
        num_classes = int(train.extra["model_kwargs"]["num_classes"])
        prompts: list[str] = []
        if "text_dim" in train.extra["model_kwargs"]:  # text-to-image: prompts instead of labels
            ingest_dir = layout.SPECS["ingest"].directory(cfg)  # here (a manifest records its writer's path)
            prompts, labels = sample_prompts(cfg, ingest_dir)
        else:
            labels = sample_labels(s.labels, s.num, num_classes, s.seed, s.batch_size)
        batches = [(lo, min(s.num, lo + s.batch_size)) for lo in range(0, s.num, s.batch_size)]
        parts = run.path / f".parts-{run.fingerprint[:16]}"
        parts.mkdir(parents=True, exist_ok=True)
        done = {int(p.stem.split("-")[1]) for p in parts.glob("batch-*.npz")}
        if done:
            say("sample", f"resuming: {len(done)} of {len(batches)} batches already drawn")
        heun = f" (heun, corrector guided at {s.heun_guidance})" if s.heun and s.sampler == "ode" else ""
        guidance = (f"cfg {s.cfg_scale} on t in [{s.guidance_low}, {s.guidance_high}]" if s.cfg_scale > 1
                    else f"cfg {s.cfg_scale}: no guidance (it needs cfg_scale > 1)")
        conditioned = f"prompts from {s.prompts or 'the training captions'}" if prompts else f"labels {s.labels}"
        say("sample", f"{s.num} images, {conditioned}, {s.sampler} {s.steps} steps{heun}, {guidance}, "
                      f"{s.precision}, {s.weights} weights" + (f" of checkpoint {s.checkpoint}" if s.checkpoint else "")
                      + f", {s.launcher} x {s.num_workers}")
        plan = DrawPlan(cfg.model_dump(mode="json"), str(run_dir.resolve()), dict(train.extra), str(parts.resolve()),
                        tuple(batches), tuple(int(v) for v in labels), tuple(prompts), remote_copy(cfg))
        todo = [i for i in range(len(batches)) if i not in done]
        bar = progress_bar(total=s.num, initial=sum(hi - lo for i, (lo, hi) in enumerate(batches) if i in done),
                   unit="img", desc="sample")
        try:
            if todo and s.launcher == "ray":  # the batches dealt round-robin to Ray tasks, one device each
                groups = [todo[k::s.num_workers] for k in range(s.num_workers) if todo[k::s.num_workers]]
                fan_out("ray", DrawTask(plan), groups, num_workers=s.num_workers, device=s.device,
                        on_result=bar.update)
                if plan.remote is not None:  # batches drawn on other machines
                    layout.working_copy(cfg).pull(parts, prune=False)
            elif todo:
                draw(plan, todo, device_or_exit("sample.device", s.device), tick=bar.update)
        finally:
            bar.close()

        part_files = [parts / f"batch-{i:06d}.npz" for i in range(len(batches))]
        with np.load(part_files[0]) as z:
            image_shape = z["images"].shape[1:]
        write_npz_streamed(run.path / "samples.npz", {  # one batch in memory at a time, not all 50K images
            "arr_0": ((s.num, *image_shape), np.uint8, _part_images(part_files)),
            "arr_1": ((s.num,), np.int64, [labels.astype(np.int64)]),
        })
        images = open_npz_array(run.path / "samples.npz", "arr_0")
        if prompts:  # the first 16 samples with their prompts under them; every prompt in prompts.txt
            atomic_write_bytes(run.path / "grid.png", captioned_grid(np.asarray(images[:16]), prompts[:16]))
            atomic_write_bytes(run.path / "prompts.txt", ("\n".join(prompts) + "\n").encode())
        else:
            atomic_write_bytes(run.path / "grid.png", image_grid(images))
        shutil.rmtree(parts)
        for old in run.path.glob(".parts-*"):
            shutil.rmtree(old, ignore_errors=True)
        outputs = [
            OutputEntry(name="samples.npz", kind="file", shape=list(images.shape), dtype="uint8", count=len(images),
                        bytes=(run.path / "samples.npz").stat().st_size),
            OutputEntry(name="grid.png", kind="file", bytes=(run.path / "grid.png").stat().st_size),
        ] + ([OutputEntry(name="prompts.txt", kind="file", bytes=(run.path / "prompts.txt").stat().st_size)]
             if prompts else [])
        seconds = max(bar.format_dict.get("elapsed", 0.0), 1e-9)
        drawn = sum(batches[i][1] - batches[i][0] for i in todo)
        run.finish(outputs, {"images": len(images), "images_drawn": drawn, "images_per_s": round(drawn / seconds, 2)},
                   extra={"num": len(images), "num_classes": num_classes, "resolution": int(images.shape[1]),
                          "prompts": bool(prompts),
                          "sampler": json.loads(s.model_dump_json())})
        say("sample", f"grid: {run.path / 'grid.png'}")
