"""kill -9 at seeded points of every stage, rerun, and the outputs equal an uninterrupted run's.

Each stage of a tiny synthetic chain runs as `repa <stage>` in its own process group with
REPA_KILL_AT="<point>:<n>" (pipeline/faults.py), which SIGKILLs the group the n-th time it passes
<point>; the same command is rerun without it, and the stage's outputs must equal those of an
uninterrupted chain: byte-equal shards, store arrays and samples, equal weights, equal metrics. At
the end `repa status --deep` rehashes everything and finds it up to date.

CI runs one chain (a mid-work point of each stage, the passes drawn from FAULT_SEED);
REPA_FAULT_MATRIX=full adds three chains that pass every point of every stage (`make test-faults`).
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import ROOT, repa

pytestmark = pytest.mark.slow

FAULT_SEED = 14
CONFIG = """
workdir = "{workdir}"
[data]
source = "synthetic"
resolution = 32
synthetic_count = 64
synthetic_classes = 4
shard_size = 16
num_workers = 1
[vae]
name = "identity"
weights = "none"
[teacher]
name = "dinov2_vits14"
weights = "random"
resolution = 56
batch_size = 16
probe = 0
[stores]
samples_per_shard = 16
[model]
name = "SiTDown-T/4"
num_classes = 4
[train]
align = "urepa"
batch_size = 8
steps = 6
precision = "fp32"
checkpoint_every = 2
keep_checkpoints = 3
log_every = 1
grid = 0
[sample]
num = 16
sampler = "ode"
steps = 4
batch_size = 4
[eval]
reference = "ingest"
batch_size = 8
"""

# stage command -> (status name, kill points with the passes at which they may fire)
STAGES = {
    "ingest": ("ingest", {"ingest.shard": (1, 3), "manifest": (1, 1)}),
    "encode": ("latents", {"store.publish": (1, 3), "store.range": (1, 3), "manifest": (1, 1)}),
    "teacher": ("teacher", {"store.publish": (1, 3), "store.range": (1, 3), "manifest": (1, 1)}),
    "train": ("train", {"train.step": (1, 5), "manifest": (1, 1)}),
    "sample": ("sample", {"sample.batch": (1, 3), "manifest": (1, 1)}),
    "evaluate": ("evaluate", {"evaluate.batch": (1, 9), "manifest": (1, 1)}),
}


def chain_config(directory: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "config.toml"
    path.write_text(CONFIG.format(workdir=directory / "work"))
    return path


def stage_dir(config: Path, stage: str) -> Path:
    from jobs.layout import states
    from schemas.loading import load_config

    return states(load_config(str(config)), upto=stage)[stage].path


def killed(command: str, config: Path, point: str, n: int) -> subprocess.CompletedProcess:
    """`repa <command>` in its own process group, SIGKILLed at the n-th pass of `point`."""
    return subprocess.run([sys.executable, "-m", "jobs.cli", command, "--config", str(config)], cwd=ROOT,
                          capture_output=True, text=True, timeout=600, start_new_session=True,
                          env={**os.environ, "PYTHONPATH": str(ROOT), "REPA_KILL_AT": f"{point}:{n}"})


def outputs(directory: Path, stage: str) -> dict[str, object]:
    """What must not depend on a kill: file bytes, store arrays, weights, metrics (no timings)."""
    if stage == "train":
        from safetensors.numpy import load_file

        return {name: load_file(directory / name) for name in ("ema.safetensors", "model.safetensors")}
    if stage == "evaluate":
        metrics = json.loads((directory / "metrics.json").read_text())
        metrics.pop("reference")  # a description naming the workdir
        return metrics
    if stage in ("latents", "teacher"):
        from pipeline.stores.zarr_store import StoreReader

        store = StoreReader(directory / "store.zarr")
        return {name: np.asarray(store.array(name)[:]) for name in store.names}
    files = {p.relative_to(directory).as_posix(): p.read_bytes() for p in sorted(directory.rglob("*"))
             if p.is_file() and p.name != "manifest.json" and not p.name.startswith(".")}
    return files


def assert_equal(a: dict, b: dict, what: str) -> None:
    assert a.keys() == b.keys(), what
    for key in a:
        x, y = a[key], b[key]
        if isinstance(x, dict):
            assert_equal(x, y, f"{what}/{key}")
        elif isinstance(x, np.ndarray):
            assert np.array_equal(x, y), f"{what}/{key} differs"
        else:
            assert x == y, f"{what}/{key} differs"


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> dict[str, dict]:
    """The uninterrupted chain's outputs, by stage."""
    config = chain_config(tmp_path_factory.mktemp("uninterrupted"))
    result = {}
    for command, (stage, _) in STAGES.items():
        out = repa(command, "--config", str(config))
        assert out.returncode == 0, out.stderr[-2000:]
        result[stage] = outputs(stage_dir(config, stage), stage)
    return result


# The chain CI runs: a mid-work point of each stage (mid-publication for one store), passes seeded.
CI_POINTS = ("ingest.shard", "store.publish", "store.range", "train.step", "sample.batch", "evaluate.batch")


def plans() -> list[list[tuple[str, int]]]:
    """Kill points per chain: the CI chain, plus (REPA_FAULT_MATRIX=full) chains that together pass
    every point of every stage."""
    rng = random.Random(FAULT_SEED)
    ci = [(point, rng.randint(*points[point])) for (_, points), point in zip(STAGES.values(), CI_POINTS, strict=True)]
    if os.environ.get("REPA_FAULT_MATRIX") != "full":
        return [ci]
    return [ci] + [[(point, rng.randint(*passes)) for _, points in STAGES.values()
                    for point, passes in [sorted(points.items())[k % len(points)]]] for k in range(3)]


@pytest.mark.parametrize("chain", range(len(plans())))
def test_kill_at_any_point_then_rerun_gives_the_uninterrupted_outputs(tmp_path, reference, chain):
    config = chain_config(tmp_path)
    for (command, (stage, _)), (point, n) in zip(STAGES.items(), plans()[chain], strict=True):
        dead = killed(command, config, point, n)
        assert dead.returncode == -9, f"{command} at {point}:{n} was not killed: rc {dead.returncode} {dead.stderr[-800:]}"
        rerun = repa(command, "--config", str(config))
        assert rerun.returncode == 0, f"{command} after a kill at {point}:{n}: {rerun.stderr[-2000:]}"
        assert_equal(reference[stage], outputs(stage_dir(config, stage), stage), f"{stage} killed at {point}:{n}")
    deep = repa("status", "--config", str(config), "--deep", "--json")
    assert deep.returncode == 0, deep.stderr
    assert {r["stage"]: r["state"] for r in json.loads(deep.stdout)} == dict.fromkeys(
        [s for s, _ in STAGES.values()], "up-to-date")
