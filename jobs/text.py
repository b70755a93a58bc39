"""Stage `text` (`repa text`): every caption of every ingest image encoded once, for text-to-image.

Recipe:
  1. read the ingest manifest and its captions.json (data.captions must be set); load the encoder
     (a hub id through transformers, a local directory, or the offline MiniLM copy) before compute;
  2. per shard range of images: each image's captions in `text.captions_per_image` slots (an image
     with fewer repeats them in order; one with more keeps the first ones; `count` says how many are
     its own), each encoded to `tokens` [K, L, D] fp16 (the last hidden state, padded to
     text.max_length), `mask` [K, L] uint8 (1 = a real token) and `pooled` [K, D] fp16; published
     atomically per range like the latents and teacher stores (checksums, resume, variants, locks);
  3. write the manifest with the encoder's geometry (L, D), which training checks against the model.

Row i of the store is image i of the ingest shards, as in the latents and teacher stores.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import numpy as np
import torch

from jobs.layout import CAPTIONS
from jobs.run import (
    KEY_WIDTH,
    device_or_exit,
    load_text_encoder_or_exit,
    remote_copy,
    say,
    shard_paths,
    stage,
    store_outputs,
)
from jobs.stage import UsageError
from pipeline.launch.ranges import StoreJob, run_store_job
from pipeline.stores.tar_shards import ShardIndex
from pipeline.stores.zarr_store import ArraySpec, StoreReader
from schemas.config import ExperimentConfig, TextConfig


def caption_slots(captions: list[str], k: int) -> tuple[list[str], int]:
    """An image's captions in k slots (repeated in order when it has fewer) and how many are its own."""
    if not captions:
        raise ValueError("an image without captions")
    return [captions[i % len(captions)] for i in range(k)], min(len(captions), k)


@dataclass
class TextExtractor:
    """Rows' captions -> tokens [B,K,L,D] fp16, mask [B,K,L] uint8, pooled [B,K,D] fp16, count [B].
    Pickled without its encoder: a worker process loads its own in `setup`."""

    cfg: TextConfig
    captions: dict[str, list[str]]
    encoder: object = field(default=None, repr=False)

    def __getstate__(self) -> dict:
        return {**self.__dict__, "encoder": None}

    def setup(self, device: torch.device) -> None:
        self.encoder = (load_text_encoder_or_exit(self.cfg) if self.encoder is None else self.encoder).to(device)
        self.device = device

    def load(self, index: ShardIndex, lo: int, hi: int) -> list[list[str]]:
        return [self.captions[key] for key in index.keys[lo:hi]]

    def __call__(self, rows: list[list[str]]) -> dict[str, np.ndarray]:
        k = self.cfg.captions_per_image
        slots, counts = zip(*(caption_slots(c, k) for c in rows), strict=True)
        flat = [c for s in slots for c in s]
        parts = [self.encoder.encode(flat[i:i + self.cfg.batch_size], self.device)
                 for i in range(0, len(flat), self.cfg.batch_size)]
        out = {key: torch.cat([p[key] for p in parts]) for key in ("tokens", "mask", "pooled")}
        b = len(rows)
        return {"tokens": out["tokens"].half().reshape(b, k, *out["tokens"].shape[1:]).cpu().numpy(),
                "mask": out["mask"].to(torch.uint8).reshape(b, k, -1).cpu().numpy(),
                "pooled": out["pooled"].half().reshape(b, k, -1).cpu().numpy(),
                "count": np.asarray(counts, dtype=np.int64)}


def text(cfg: ExperimentConfig, force: bool = False, wait: bool = False) -> None:
    with stage("text", cfg, force, wait) as run:
        if run is None:
            return
        t = cfg.text
        ingest_dir = run.upstream["ingest"].path
        index = ShardIndex(shard_paths(ingest_dir, run.inputs["ingest"]))
        captions = json.loads((ingest_dir / CAPTIONS).read_text())
        missing = [k for k in index.keys if not captions.get(k)]
        if missing:
            raise UsageError(f"{len(missing)} ingest images have no caption (first: {missing[0]}); rerun `repa ingest`")
        device = device_or_exit("text.device", t.device)
        encoder = load_text_encoder_or_exit(t)
        dim, k, length = encoder.dim, t.captions_per_image, t.max_length
        specs = [ArraySpec("tokens", (k, length, dim), "float16"), ArraySpec("mask", (k, length), "uint8"),
                 ArraySpec("pooled", (k, dim), "float16"), ArraySpec("count", (), "int64"),
                 ArraySpec("labels", (), "int64"), ArraySpec("keys", (), f"<U{KEY_WIDTH}")]
        info = {"encoder": t.name, "weights": t.weights, "dim": dim, "length": length, "captions_per_image": k,
                "num_images": len(index), "num_captions": sum(len(captions[key]) for key in index.keys)}
        store_job = StoreJob(str(run.path / "store.zarr"), tuple(map(str, index.paths)), tuple(specs),
                             cfg.stores.samples_per_shard, {**info, "fingerprint": run.fingerprint}, t.batch_size,
                             KEY_WIDTH, cfg.stores.compression, remote=remote_copy(cfg))
        run.expect(len(index) * sum(s.nbytes for s in specs))
        say("text", f"{info['num_captions']} captions of {len(index)} images -> {t.name} ({t.weights}): {k} x "
                    f"{length} tokens x {dim} per image")
        extractor = TextExtractor(t, captions, encoder)
        extractor.setup(device)
        stats = run_store_job(store_job, index, extractor, device=t.device, launcher=cfg.stores.launcher,
                              num_workers=cfg.stores.num_workers, desc="text", fresh=force)
        outputs = store_outputs(StoreReader(store_job.store), index)
        run.finish(outputs, stats, extra=info)
