"""The stage framework every job uses: `with stage(name, cfg, force, wait) as run:` (one writer per
output, the up-to-date check before compute, disk and permission errors as one clear line),
`run.finish` (the manifest after it), and
the helpers several stages share (ingest shard paths, the VAE, store manifest entries)."""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from jobs import layout
from jobs.lock import hold, hold_object, lock_path
from jobs.stage import (
    StageSpec,
    StageState,
    UsageError,
    build_manifest,
    invalidate,
    require_inputs,
    write_manifest,
)
from pipeline import faults
from pipeline.stores.checksum import sha256_file
from pipeline.stores.mirror import CallerCopy, WorkingCopy
from schemas.config import ExperimentConfig
from schemas.manifest import MANIFEST_NAME, Manifest, OutputEntry

KEY_WIDTH = 64  # characters of a sample key in the stores' `keys` array


def device_or_exit(key: str, name: str, worker: int = 0):
    """The torch device for the config value `key` = `name`; CUDA asked for but absent is a UsageError."""
    from pipeline.launch import resolve_device

    try:
        return resolve_device(name, worker, key=key)
    except (ValueError, RuntimeError) as exc:
        raise UsageError(str(exc)) from None


def say(stage: str, message: str) -> None:
    print(f"[{stage}] {message}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------------------------
#                                   Running a stage function
# ----------------------------------------------------------------------------------------------

NO_SPACE = {errno.ENOSPC: "no space left on the device", errno.EDQUOT: "the disk quota is exceeded"}
NOT_WRITABLE = {errno.EACCES, errno.EPERM, errno.EROFS}
_ACTIVE: dict[str, StageRun] = {}  # stage -> its run in this process, for the error messages


class DiskError(UsageError):
    """The stage could not write its output (space, quota, permissions); a rerun resumes (exit 2)."""


def _size(directory: Path) -> int:
    return sum(f.stat().st_size for f in directory.rglob("*") if f.is_file()) if directory.is_dir() else 0


def _free(directory: Path) -> int:
    while not directory.exists() and directory != directory.parent:
        directory = directory.parent
    return shutil.disk_usage(directory).free


def _gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**27 else f"{n / 2**20:.1f} MiB"


def explain_os_error(stage: str, directory: Path, exc: OSError) -> DiskError | None:
    """One line for a disk-full or not-writable error while stage `stage` writes `directory`, else None."""
    where = exc.filename or directory
    if exc.errno in NO_SPACE:
        run = _ACTIVE.get(stage)
        need = ""
        if run is not None and run.expected_bytes:
            need = f"; the stage needs about {_gib(max(0, run.expected_bytes - _size(directory)))} more"
        return DiskError(f"stage {stage}: {NO_SPACE[exc.errno]} while writing {where} ({_gib(_free(directory))} "
                         f"free there{need}): free space or set workdir elsewhere, then rerun the same command; it "
                         "resumes where it stopped")
    if exc.errno in NOT_WRITABLE:
        return DiskError(f"stage {stage}: cannot write {where} ({exc.strerror}): make {directory} writable or set "
                         "workdir to a writable place, then rerun the same command")
    return None


@contextlib.contextmanager
def stage(name: str, cfg: ExperimentConfig, force: bool = False, wait: bool = False) -> Iterator[StageRun | None]:
    """Run stage `name`'s body inside `with stage(...) as run:`; `run` is None when it is up to date.

    The body runs holding the output's lock (jobs.lock; under torchrun only rank 0 takes it): a busy
    lock is exit 2 naming its holder, or with `wait` a wait for it. A disk-full or permission error
    becomes a DiskError that names the stage, the path, the space still needed and says that a rerun
    resumes.
    """
    directory = layout.SPECS[name].directory(cfg)
    copy = layout.working_copy(cfg)
    writer = int(os.environ.get("RANK", "0")) == 0  # under torchrun, rank 0 locks and publishes
    try:
        with contextlib.ExitStack() as held:
            if writer:
                what = f"stage {name} ({cfg.workdir if copy else directory})"
                lock = (hold(lock_path(cfg, directory), what, wait=wait, say=lambda m: say(name, m)) if copy is None
                        else hold_object(copy, lock_path(cfg, directory), what, wait=wait, say=lambda m: say(name, m)))
                held.enter_context(lock)
            if copy is not None:
                pull_state(name, cfg, copy)
            run = begin(name, cfg, force)
            if copy is not None and run is not None:
                if writer:
                    copy.forget(directory / MANIFEST_NAME)  # a crash from here on leaves the stage 'missing' there too
                pull_inputs(name, cfg, copy)
            yield run
            if copy is not None and run is not None and writer:
                say(name, f"publishing to {copy.url}/{copy.rel(directory)}")
                copy.push(directory, exclude=layout.NESTED.get(name, ()))
    except OSError as exc:
        explained = explain_os_error(name, directory, exc)
        if explained is None:
            raise
        raise explained from exc
    finally:
        _ACTIVE.pop(name, None)


# ----------------------------------------------------------------------------------------------
#                                Object-store workdirs (pipeline.stores.mirror)
# ----------------------------------------------------------------------------------------------

def pull_state(name: str, cfg: ExperimentConfig, copy: WorkingCopy) -> None:
    """Pull what decides whether stage `name` is up to date: the manifests and metadata of every stage up
    to it (and of the reference images for evaluate), without bulk files."""
    order = layout.stages(cfg)
    for up in order[: order.index(name) + 1] if name in order else (name,):  # its own output: keep local progress
        copy.pull(layout.SPECS[up].directory(cfg), bulk=False, exclude=layout.NESTED.get(up, ()), prune=up != name)
    if name == "evaluate":
        copy.pull(layout.workdir(cfg) / "reference", bulk=False)


def pull_all(cfg: ExperimentConfig, bulk: bool = False) -> None:
    """For the commands outside a stage (status, report, floor): pull every stage's state (`bulk`: and
    data, to hash it) when the workdir is on object storage; local files with no object are kept (but
    manifests: a stage is never up to date here and not there)."""
    copy = layout.working_copy(cfg)
    if copy is not None:
        for name in layout.stages(cfg):
            copy.pull(layout.SPECS[name].directory(cfg), bulk=bulk, exclude=layout.NESTED.get(name, ()), prune=False)


def pull_inputs(name: str, cfg: ExperimentConfig, copy: WorkingCopy) -> None:
    """Pull what stage `name` reads whole before it runs: its own output (to resume) and bulk_inputs; every
    other upstream output stays without its bulk files (training reads the stores' shard files in place)."""
    spec = layout.SPECS[name]
    copy.pull(spec.directory(cfg), exclude=layout.NESTED.get(name, ()), prune=False)
    for up in bulk_inputs(name, cfg):
        copy.pull(layout.SPECS[up].directory(cfg), exclude=layout.NESTED.get(up, ()))


def bulk_inputs(name: str, cfg: ExperimentConfig) -> tuple[str, ...]:
    """The upstream outputs stage `name` reads whole: the ingest shards for the encoders, for training
    with an online teacher and for evaluation against the ingested images; the checkpoints for sampling."""
    if name in ("latents", "teacher", "text"):
        return ("ingest",)
    if name == "train":
        return ("ingest",) if cfg.teacher.cache == "online" and cfg.train.align != "none" else ()
    if name == "sample":
        return ("train",)
    if name == "evaluate":
        return ("ingest",) if cfg.eval.reference == "ingest" else ()
    return ()


def remote_copy(cfg: ExperimentConfig) -> CallerCopy | None:
    """This machine's working copy, for plans sent to tasks that may run on other machines; None on a
    local workdir."""
    copy = layout.working_copy(cfg)
    return CallerCopy.of(copy) if copy is not None else None


def fetch(cfg: ExperimentConfig, paths: list[Path]) -> None:
    """Download these files of the working copy when the workdir is on object storage (bulk files a
    command reads whole outside its stage's pulls); nothing on a local workdir."""
    copy = layout.working_copy(cfg)
    if copy is not None:
        copy.pull_files(list(paths))


def publish(cfg: ExperimentConfig, *paths: Path) -> None:
    """Publish files written outside a stage's output directory (reference caches, reports) when the
    workdir is on object storage; nothing on a local workdir."""
    copy = layout.working_copy(cfg)
    if copy is not None:
        copy.push_files(paths)


# ----------------------------------------------------------------------------------------------
#                                      Begin and finish
# ----------------------------------------------------------------------------------------------


@dataclass
class StageRun:
    """One execution of a stage whose inputs are ready and whose output is not up to date."""

    spec: StageSpec
    cfg: ExperimentConfig
    state: StageState
    upstream: dict[str, StageState]
    inputs: dict[str, Manifest]
    started: float = field(default_factory=time.time)
    expected_bytes: int = 0  # what the outputs will take at most (from the array specs), for disk errors

    def expect(self, nbytes: int) -> None:
        """Record the most bytes the outputs will take (a disk-full message says how much is still needed)."""
        self.expected_bytes = int(nbytes)

    @property
    def path(self) -> Path:
        return self.state.path

    @property
    def fingerprint(self) -> str:
        return self.state.fingerprint

    def finish(self, outputs: list[OutputEntry], stats: dict[str, Any], extra: dict[str, Any] | None = None) -> Manifest:
        stats = {"seconds": round(time.time() - self.started, 3), **stats}
        outputs = [e.model_copy(update={"sha256": sha256_file(self.path / e.name)}) if e.kind == "file" and not e.sha256
                   else e for e in outputs]  # so `repa status --deep` can check every file's bytes
        manifest = build_manifest(self.spec, self.state, self.cfg, self.upstream, outputs, stats, extra)
        faults.point("manifest")
        write_manifest(self.path, manifest)
        say(self.spec.name, f"done in {stats['seconds']:.1f}s -> {self.path}")
        return manifest


def begin(stage: str, cfg: ExperimentConfig, force: bool = False) -> StageRun | None:
    """Check inputs and freshness; None means the stage is up to date and nothing is to be done.

    Raises UsageError (exit 2) when an input stage has not been run or is stale. When the stage
    will run, its old manifest is removed first, so a crash leaves it 'missing', never 'up to date'.
    """
    all_states = layout.states(cfg, upto=stage)
    spec = layout.SPECS[stage]
    state = all_states[stage]
    upstream = {n: all_states[n] for n in spec.inputs(cfg)}
    inputs = require_inputs(spec, upstream)
    if state.state == "up-to-date" and not force:
        say(stage, f"up to date ({state.path})")
        return None
    if state.state == "stale":
        say(stage, f"stale: {state.reason}")
    invalidate(state.path)
    run = StageRun(spec, cfg, state, upstream, inputs)
    _ACTIVE[stage] = run
    return run


# ----------------------------------------------------------------------------------------------
#                                 Helpers shared by stages
# ----------------------------------------------------------------------------------------------


def shard_paths(manifest_dir: Path, manifest: Manifest) -> list[Path]:
    """The ingest shards, in order, from an ingest manifest."""
    return [Path(manifest_dir) / name for name in manifest.extra["shards"]]


def load_vae_or_exit(cfg: ExperimentConfig, device: str = "cpu"):
    """The configured VAE on `device`, or a UsageError that says how to provide its weights."""
    from pipeline.vae.autoencoder import load_vae

    try:
        return load_vae(cfg.vae.name, cfg.vae.weights, device=device)
    except (FileNotFoundError, ValueError) as exc:
        raise UsageError(f"vae: {exc}") from None


def load_text_encoder_or_exit(t):
    """The caption encoder of the [text] section (pipeline.text.encoder), or a UsageError saying how to
    provide its weights."""
    from pipeline.text.encoder import load_text_encoder

    try:
        return load_text_encoder(t.name, t.weights, t.max_length)
    except (FileNotFoundError, ValueError, OSError) as exc:
        raise UsageError(f"text: {exc}") from None


def store_outputs(reader, index) -> list[OutputEntry]:
    """The manifest entries of a finished store (shape, dtype, bytes, sha256 over its shard files),
    after checking that row i of the store (a StoreReader) is image i of the ingest shards (a ShardIndex)."""
    keys = np.asarray(reader.array("keys")[:])
    if list(map(str, keys)) != index.keys:
        raise RuntimeError(f"store keys of {reader.path} do not match the ingest shards' keys")
    reader.add_missing_checksums()  # a store resumed from ranges published before checksums existed
    files, digests = reader.published_files(), reader.array_digests()
    return [OutputEntry(name=s.name, kind="array", shape=[len(reader), *s.shape], dtype=s.dtype, count=len(reader),
                        bytes=sum(f["bytes"] for f in files[s.name]), sha256=digests[s.name])
            for s in reader.specs.values()]
