"""Begin and finish a stage: the up-to-date check before compute, the manifest after it."""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from jobs import layout
from jobs.stage import (
    StageSpec,
    StageState,
    UsageError,
    build_manifest,
    invalidate,
    require_inputs,
    write_manifest,
)
from pipeline.stores.checksum import sha256_file
from schemas.config import ExperimentConfig
from schemas.manifest import Manifest, OutputEntry


def device_or_exit(key: str, name: str, worker: int = 0):
    """The torch device for the config value `key` = `name`; CUDA asked for but absent is a UsageError."""
    from pipeline.launch.ranges import resolve_device

    try:
        return resolve_device(name, worker)
    except ValueError:
        raise UsageError(f"{key} = {name!r} but CUDA is not available here; set {key} = 'auto' or 'cpu'") from None


def say(stage: str, message: str) -> None:
    print(f"[{stage}] {message}", file=sys.stderr, flush=True)


@dataclass
class StageRun:
    """One execution of a stage whose inputs are ready and whose output is not up to date."""

    spec: StageSpec
    cfg: ExperimentConfig
    state: StageState
    upstream: dict[str, StageState]
    inputs: dict[str, Manifest]
    started: float = field(default_factory=time.time)

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
    return StageRun(spec, cfg, state, upstream, inputs)
