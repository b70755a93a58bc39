"""Stage `latents` (`repa encode`): the VAE posterior of every ingest image, computed once.

Recipe:
  1. read the ingest manifest; open its shards by index;
  2. load the VAE (hub, local directory/file, identity or tiny random) before any compute;
  3. compute `moments` = (posterior mean, posterior std) [N, 2c, h, w] float32 per shard range, and
     `moments_flip` of the mirrored image when `vae.flip`; publish each range atomically;
  4. write the manifest (with the VAE's scaling factor, which training multiplies into the latent).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from jobs.run import (
    KEY_WIDTH,
    device_or_exit,
    load_vae_or_exit,
    remote_copy,
    say,
    shard_paths,
    stage,
    store_outputs,
)
from jobs.stage import UsageError
from pipeline.launch.ranges import StoreJob, run_store_job
from pipeline.precision import autocast
from pipeline.stores.tar_shards import ShardIndex
from pipeline.stores.zarr_store import ArraySpec, StoreReader
from schemas.config import ExperimentConfig


@dataclass
class LatentExtractor:
    """images uint8 [B,3,H,W] -> moments [B,2c,h,w] (and the mirrored ones). Pickled without its VAE:
    a worker process loads its own in `setup`; in the stage's process the VAE it loaded is reused."""

    name: str
    weights: str
    flip: bool
    precision: str
    vae: object = field(default=None, repr=False)

    def __getstate__(self) -> dict:
        return {**self.__dict__, "vae": None}

    def setup(self, device: torch.device) -> None:
        from pipeline.vae.autoencoder import load_vae

        self.vae = load_vae(self.name, self.weights, device=str(device)) if self.vae is None else self.vae.to(device)

    def _moments(self, images: torch.Tensor) -> np.ndarray:
        with autocast(self.precision, images.device):
            moments = self.vae.encode_moments(images)
        return moments.float().cpu().numpy()

    def __call__(self, images: torch.Tensor) -> dict[str, np.ndarray]:
        out = {"moments": self._moments(images)}
        if self.flip:
            out["moments_flip"] = self._moments(images.flip(-1))
        return out


def encode(cfg: ExperimentConfig, force: bool = False, wait: bool = False) -> None:
    with stage("latents", cfg, force, wait) as run:
        if run is None:
            return
        ingest = run.inputs["ingest"]
        index = ShardIndex(shard_paths(run.upstream["ingest"].path, ingest))
        device_or_exit("vae.device", cfg.vae.device)  # before any compute
        vae = load_vae_or_exit(cfg)
        res = ingest.extra["resolution"]
        if res % vae.downsample:
            raise UsageError(f"data.resolution {res} is not divisible by the VAE's downsampling factor {vae.downsample}")
        latent = (2 * vae.latent_channels, res // vae.downsample, res // vae.downsample)
        specs = [ArraySpec("moments", latent, "float32")]
        if cfg.vae.flip:
            specs.append(ArraySpec("moments_flip", latent, "float32"))
        specs += [ArraySpec("labels", (), "int64"), ArraySpec("keys", (), f"<U{KEY_WIDTH}")]
        attrs = {"vae": cfg.vae.name, "scaling_factor": vae.scaling_factor, "flip": cfg.vae.flip,
                 "fingerprint": run.fingerprint}
        store_job = StoreJob(str(run.path / "store.zarr"), tuple(map(str, index.paths)), tuple(specs),
                             cfg.stores.samples_per_shard, attrs, cfg.vae.batch_size, KEY_WIDTH,
                             cfg.stores.compression, remote=remote_copy(cfg))
        run.expect(len(index) * sum(s.nbytes for s in specs))
        say("latents", f"{len(index)} images {res}px -> moments {list(latent)} with {cfg.vae.name} "
                       f"(scaling factor {vae.scaling_factor})")
        extractor = LatentExtractor(cfg.vae.name, cfg.vae.weights, cfg.vae.flip, cfg.vae.precision, vae=vae)
        stats = run_store_job(store_job, index, extractor, device=cfg.vae.device, launcher=cfg.stores.launcher,
                              num_workers=cfg.stores.num_workers, desc="encode", fresh=force)

        outputs = store_outputs(StoreReader(store_job.store), index)
        run.finish(outputs, stats, extra={
            "num_images": len(index), "scaling_factor": attrs["scaling_factor"], "latent_shape": list(latent),
            "latent_channels": latent[0] // 2, "vae": cfg.vae.name, "flip": cfg.vae.flip,
            "num_classes": ingest.extra["num_classes"], "resolution": res,
        })
