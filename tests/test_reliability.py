"""One writer per stage output (locks), clear messages for disk and permission errors, and config
checks in every command."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from jobs.lock import StageBusy, hold, lock_path
from schemas.loading import load_config
from tests.conftest import ROOT, repa

HOLDER = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from jobs.lock import hold
    with hold(Path(sys.argv[1]), "the test output"):
        print("held", flush=True)
        time.sleep(float(sys.argv[2]))
""")


def start_holder(path: Path, seconds: float) -> subprocess.Popen:
    """A separate process that holds the lock `path` for `seconds` (returns once it holds it)."""
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(path), str(seconds)], stdout=subprocess.PIPE, text=True,
                            cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.stdout.readline().strip() == "held"
    return proc


def synthetic_config(tmp_path: Path) -> list[str]:
    return [f"workdir={tmp_path / 'work'}", "data.source=synthetic", "data.synthetic_count=8", "data.resolution=16",
            "data.shard_size=4", "data.num_workers=1"]


def test_a_busy_lock_names_its_holder_and_a_dead_holder_never_blocks(tmp_path):
    path = tmp_path / ".locks" / "x.lock"
    holder = start_holder(path, 60)
    try:
        with pytest.raises(StageBusy, match=rf"being written by pid {holder.pid} on .* --wait"):
            with hold(path, "the test output"):
                pass
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    started = time.monotonic()
    with hold(path, "the test output"):  # the OS released the dead holder's lock
        assert f'"pid": {os.getpid()}' in path.read_text()
    assert time.monotonic() - started < 5
    assert path.read_text() == ""  # released: the record is cleared


def test_wait_blocks_until_the_holder_finishes(tmp_path):
    path = tmp_path / "y.lock"
    holder = start_holder(path, 1.5)
    said = []
    started = time.monotonic()
    with hold(path, "the test output", wait=True, say=said.append):
        waited = time.monotonic() - started
    holder.wait()
    assert waited > 0.5 and said and f"pid {holder.pid}" in said[0]


def test_lock_files_live_outside_the_output_directories(tmp_path):
    cfg = load_config(str(ROOT / "configs" / "demo.toml"), [f"workdir={tmp_path}"])
    path = lock_path(cfg, tmp_path / "runs" / "SiT-B-2-repa-abc")
    assert path == tmp_path.resolve() / ".locks" / "runs--SiT-B-2-repa-abc.lock"


def test_a_second_invocation_of_a_stage_exits_2_with_one_line(tmp_path):
    overrides = synthetic_config(tmp_path)
    cfg = load_config(str(ROOT / "configs" / "demo.toml"), overrides)
    holder = start_holder(lock_path(cfg, Path(cfg.workdir) / "ingest"), 60)
    try:
        args = ["ingest", *[a for o in overrides for a in ("--set", o)]]
        busy = repa(*args)
        assert busy.returncode == 2, busy.stderr
        lines = busy.stderr.strip().splitlines()
        assert len(lines) == 1 and f"is being written by pid {holder.pid}" in lines[0] and "Traceback" not in busy.stderr
        assert not (Path(cfg.workdir) / "ingest" / "manifest.json").exists()  # nothing was written
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    done = repa(*args)
    assert done.returncode == 0, done.stderr
    assert (Path(cfg.workdir) / "ingest" / "manifest.json").is_file()


ALL_COMMANDS = ("status", "ingest", "features", "train", "eval", "report")


@pytest.mark.parametrize(("overrides", "words", "commands"), [
    # names and grids: checked when the config loads, by every command (no torch import)
    (["model.name=SiT-Q/3"], "unknown model 'SiT-Q/3'", ALL_COMMANDS),
    (["teacher.name=dinov3_vits16"], "teacher.name", ("status", "train")),
    (["vae.name=sd-vae-ft-mse2"], "unknown VAE", ("status", "report")),
    # geometry and the objective against the student and the teacher: every command that computes
    (["vae.name=sd-vae-ft-ema", "data.resolution=36"], "not divisible by the sd-vae-ft-ema VAE's downsampling factor 8",
     ("features", "train")),
    (["model.name=UNet-T", "train.align=haste", "teacher.cache=hidden", "align.student_layers=[2,3]",
      "align.teacher_layers=[10,11]"], "attention", ("features", "train", "eval")),
    (["vae.name=sd-vae-ft-ema"], "input_size 4 must be divisible", ("features", "train")),
])
def test_commands_refuse_a_config_no_stage_can_run(tmp_path, overrides, words, commands):
    sets = [a for o in [f"workdir={tmp_path}", *overrides] for a in ("--set", o)]
    for command in commands:
        out = repa(command, *sets)
        assert out.returncode == 2, (command, out.stderr)
        assert out.stderr.startswith("error: ") and len(out.stderr.strip().splitlines()) == 1, out.stderr
        assert words in out.stderr, out.stderr
    assert not any(tmp_path.iterdir())  # nothing was created


# ----------------------------------------------------------------------------------------------
#                                   Disk and permission errors
# ----------------------------------------------------------------------------------------------


def encode_config(tmp_path: Path, name: str):
    return load_config(str(ROOT / "configs" / "demo.toml"),
                       [*synthetic_config(tmp_path / name), "stores.samples_per_shard=4", "vae.name=identity"])


@pytest.mark.parametrize(("code", "words"), [
    (errno.ENOSPC, r"stage latents: no space left on the device while writing .*store\.zarr.* free there; the stage "
                   r"needs about .* more\): free space .* rerun the same command; it resumes where it stopped"),
    (errno.EROFS, r"stage latents: cannot write .*Read-only file system.* writable"),
])
def test_a_full_or_read_only_disk_is_one_line_and_a_rerun_resumes_to_the_same_store(tmp_path, monkeypatch, code, words):
    import numpy as np

    from jobs.encode import encode
    from jobs.ingest import ingest
    from jobs.layout import states
    from jobs.run import DiskError
    from jobs.stage import UsageError
    from pipeline.stores.zarr_store import StoreReader, StoreWriter

    whole, failed = encode_config(tmp_path, "whole"), encode_config(tmp_path, "failed")
    for cfg in (whole, failed):
        ingest(cfg)
    encode(whole)

    original, calls = StoreWriter._write_scratch, {"n": 0}

    def second_range_fails(self, scratch, spec, start, stop, *args, **kwargs):
        if start >= 4:  # the first range (rows 0-3) is published, then the disk "fills up"
            calls["n"] += 1
            raise OSError(code, os.strerror(code), str(scratch / spec.name))
        return original(self, scratch, spec, start, stop, *args, **kwargs)

    monkeypatch.setattr(StoreWriter, "_write_scratch", second_range_fails)
    with pytest.raises(DiskError, match=words) as raised:
        encode(failed)
    assert isinstance(raised.value, UsageError)  # the CLI's exit 2, one line
    assert calls["n"] == 1 and states(failed)["latents"].state == "missing"  # no manifest: never "up to date"
    monkeypatch.setattr(StoreWriter, "_write_scratch", original)
    encode(failed)  # the rerun resumes and finishes
    a = StoreReader(states(whole)["latents"].path / "store.zarr")
    b = StoreReader(states(failed)["latents"].path / "store.zarr")
    for name in ("moments", "labels", "keys"):
        assert np.array_equal(np.asarray(a.array(name)[:]), np.asarray(b.array(name)[:]))
    assert states(failed, deep=True)["latents"].state == "up-to-date"
