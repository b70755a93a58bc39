"""The stage protocol every job follows.

1. validate the config and load the input manifests (a missing one names the stage to run first);
2. compute the fingerprint; if a manifest with the same fingerprint exists and its outputs verify,
   report "up to date" and stop (unless --force);
3. check compatibility across inputs before any compute (the job's own code);
4. write outputs atomically, the manifest last.

A stage's identity is its `StageSpec`: where its output lives, which config keys and which upstream
stages it depends on, and a format version bumped whenever its output layout changes.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import subprocess
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from schemas.config import ExperimentConfig
from schemas.manifest import MANIFEST_NAME, InputRef, Manifest, OutputEntry, read_manifest

PACKAGE_VERSION = "0.1.0"


# The command that produces each stage's output, for error messages.
COMMANDS = {"latents": "repa encode"}


class UsageError(Exception):
    """A problem the user must fix before the stage can run (exit code 2)."""


@dataclass(frozen=True)
class StageSpec:
    """What a stage depends on and where it writes.

    name:         stage name as `repa status` prints it.
    version:      output format version; part of the fingerprint.
    keys:         the dotted config keys whose values enter the fingerprint, given the config.
    inputs:       upstream stage names, given the config (some depend on it, e.g. the train stage
                  reads the teacher store only when aligning).
    directory:    the output directory (the one holding manifest.json), given the config.
    verify:       check that a manifest's outputs are still on disk, (manifest, directory, deep) ->
                  a reason or None; cheap (sizes, store markers) unless `deep` (rehash every byte).
    """

    name: str
    version: int
    keys: Callable[[ExperimentConfig], tuple[str, ...]]
    inputs: Callable[[ExperimentConfig], tuple[str, ...]]
    directory: Callable[[ExperimentConfig], Path]
    verify: Callable[[Manifest, Path, bool], str | None] = field(default=lambda m, p, deep: None)


# ----------------------------------------------------------------------------------------------
#                                      Fingerprints
# ----------------------------------------------------------------------------------------------


def lookup(cfg: ExperimentConfig, dotted: str) -> Any:
    node: Any = cfg
    for part in dotted.split("."):
        node = getattr(node, part)
    if hasattr(node, "model_dump"):
        return node.model_dump(mode="json")
    if isinstance(node, tuple):
        return list(node)
    return node


def stage_config(spec: StageSpec, cfg: ExperimentConfig) -> dict[str, Any]:
    """The flat {dotted key: value} view of the config that this stage depends on."""
    return {key: lookup(cfg, key) for key in spec.keys(cfg)}


def canonical_json(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True)


def fingerprint(spec: StageSpec, config: dict[str, Any], inputs: list[InputRef]) -> str:
    """sha256 of the stage's resolved config, its inputs' fingerprints and its format version."""
    payload = {
        "stage": spec.name,
        "version": spec.version,
        "config": config,
        "inputs": {ref.stage: ref.fingerprint for ref in inputs},
    }
    return hashlib.sha256(canonical_json(payload).encode()).hexdigest()


def code_version() -> str:
    """Package version plus the git commit when run from a checkout."""
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "--short=12", "HEAD"],
            cwd=Path(__file__).resolve().parent,
            capture_output=True,
            text=True,
            timeout=5,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        sha = ""
    return f"{PACKAGE_VERSION}+{sha}" if sha else PACKAGE_VERSION


# ----------------------------------------------------------------------------------------------
#                                         Status
# ----------------------------------------------------------------------------------------------


@dataclass
class StageState:
    stage: str
    state: str  # "up-to-date" | "stale" | "missing"
    reason: str
    path: Path
    manifest: Manifest | None = None
    fingerprint: str = ""

    def as_json(self) -> dict[str, str]:
        return {"stage": self.stage, "state": self.state, "reason": self.reason, "path": str(self.path)}


def _changed_keys(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    keys = sorted(set(old) | set(new))
    return [k for k in keys if canonical_json(old.get(k)) != canonical_json(new.get(k))]


def _nearest_variant(stage: str, path: Path, config: dict[str, Any]) -> tuple[Path, list[str]] | None:
    """For a variant directory (one per stage config, side by side): the sibling whose config differs
    from `config` in the fewest keys, and those keys; None when there is no sibling."""
    best = None
    parent = path.parent
    siblings = [p for p in parent.iterdir() if p != path and (p / MANIFEST_NAME).is_file()] if parent.is_dir() else []
    for sibling in sorted(siblings):
        try:
            old = read_manifest(sibling)
        except (OSError, ValueError):
            continue
        if old.stage != stage:
            continue
        changed = _changed_keys(old.config, config)
        if changed and (best is None or len(changed) < len(best[1])):
            best = (sibling, changed)
    return best


def evaluate_state(
    spec: StageSpec, cfg: ExperimentConfig, upstream: dict[str, StageState], deep: bool = False
) -> StageState:
    """State of one stage, given the states of the stages it reads; `deep` rehashes its outputs."""
    path = spec.directory(cfg)
    config = stage_config(spec, cfg)
    refs: list[InputRef] = []
    for name in spec.inputs(cfg):
        up = upstream[name]
        refs.append(InputRef(stage=name, path=str(up.path), fingerprint=up.fingerprint))
    fp = fingerprint(spec, config, refs)
    state = StageState(stage=spec.name, state="missing", reason="", path=path, fingerprint=fp)

    manifest_path = path / MANIFEST_NAME
    if not manifest_path.is_file():
        state.reason = "no manifest (never run, or the last run did not finish)"
        nearest = _nearest_variant(spec.name, path, config)
        if nearest is not None:
            state.reason = (f"not built for this config yet; the nearest kept variant {nearest[0].name} differs in "
                            f"{', '.join(nearest[1])}")
        return state
    try:
        manifest = read_manifest(path)
    except (OSError, ValueError) as exc:
        state.reason = f"unreadable manifest: {str(exc).splitlines()[0]}"
        return state
    state.manifest = manifest
    state.state = "stale"
    if manifest.stage != spec.name:
        state.reason = f"{manifest_path} belongs to stage {manifest.stage}"
        return state
    if manifest.fingerprint == fp:
        problem = spec.verify(manifest, path, deep)
        if problem:
            state.reason = f"outputs do not verify: {problem}"
            return state
        state.state, state.reason = "up-to-date", "fingerprint matches"
        return state
    reasons: list[str] = []
    if manifest.format_version != spec.version:
        reasons.append(f"format version {manifest.format_version} -> {spec.version}")
    reasons += [f"{k} changed" for k in _changed_keys(manifest.config, config)]
    old_inputs = {ref.stage: ref.fingerprint for ref in manifest.inputs}
    for ref in refs:
        if ref.stage not in old_inputs:
            reasons.append(f"new input {ref.stage}")
        elif old_inputs[ref.stage] != ref.fingerprint:
            reasons.append(f"input {ref.stage} changed")
    reasons += [f"input {s} dropped" for s in old_inputs if s not in {r.stage for r in refs}]
    for ref in refs:
        if upstream[ref.stage].state != "up-to-date" and f"input {ref.stage} changed" not in reasons:
            reasons.append(f"input {ref.stage} is {upstream[ref.stage].state}")
    state.reason = "; ".join(reasons) or "fingerprint differs"
    return state


# ----------------------------------------------------------------------------------------------
#                                      Running a stage
# ----------------------------------------------------------------------------------------------


def now_iso() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def require_inputs(spec: StageSpec, upstream: dict[str, StageState]) -> dict[str, Manifest]:
    """The manifests of the stage's inputs; a missing or stale one is a UsageError naming it."""
    manifests = {}
    for name, state in upstream.items():
        if state.state != "up-to-date" or state.manifest is None:
            raise UsageError(
                f"stage {spec.name} needs stage {name} first: {name} is {state.state} ({state.reason}) "
                f"at {state.path}; run `{COMMANDS.get(name, 'repa ' + name)}` with the same config"
            )
        manifests[name] = state.manifest
    return manifests


def build_manifest(
    spec: StageSpec,
    state: StageState,
    cfg: ExperimentConfig,
    upstream: dict[str, StageState],
    outputs: list[OutputEntry],
    stats: dict[str, Any],
    extra: dict[str, Any] | None = None,
) -> Manifest:
    return Manifest(
        stage=spec.name,
        format_version=spec.version,
        fingerprint=state.fingerprint,
        config=stage_config(spec, cfg),
        inputs=[
            InputRef(stage=n, path=str(upstream[n].path), fingerprint=upstream[n].fingerprint)
            for n in spec.inputs(cfg)
        ],
        outputs=outputs,
        created=now_iso(),
        code_version=code_version(),
        stats=stats,
        extra=extra or {},
    )


def write_manifest(directory: Path, manifest: Manifest) -> None:
    """Atomically write `directory/manifest.json`: the last thing a stage does."""
    directory.mkdir(parents=True, exist_ok=True)
    target = directory / MANIFEST_NAME
    tmp = directory / f".{MANIFEST_NAME}.tmp"
    tmp.write_text(manifest.model_dump_json(indent=2) + "\n")
    tmp.replace(target)


def invalidate(directory: Path) -> None:
    """Remove a stage's manifest before rewriting its outputs, so a crash leaves it 'missing'."""
    (directory / MANIFEST_NAME).unlink(missing_ok=True)


def probe_warning(probe: dict[str, Any]) -> str:
    """One line for a teacher store whose k-NN probe (pipeline.teachers.probe) says `suspect`."""
    return (f"the teacher store's k-NN probe is {probe['knn']:.1%}, no better than a random-init teacher's "
            f"{probe['knn_random_init']:.1%} (chance {probe['chance']:.1%}): the teacher is random or mis-wired "
            "(teacher.weights, preprocessing, cached layer); alignment to it will not help")
