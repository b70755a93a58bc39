"""Workdirs on S3-compatible object storage, against a real S3 HTTP server on 127.0.0.1 (moto's server
mode, tests/s3server.py): conditional writes, the working copy's pull and push, the lock object, one-line
errors, and (slow) the tiny chain end to end, equal to a local run, resumed after kill -9 on a machine
with an empty working copy, and two concurrent `repa features` on one workdir."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import ROOT, repa
from tests.s3server import free_port, s3_server


@pytest.fixture(scope="module")
def aws():
    with s3_server() as env:
        yield env


@pytest.fixture
def s3(aws, monkeypatch, tmp_path):
    """This process pointed at the server, with its working copies under tmp_path/staging."""
    for k, v in aws.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("REPA_STAGING", str(tmp_path / "staging"))
    return aws


def url(tmp_path: Path) -> str:
    return f"s3://repa/{tmp_path.name}"


# ----------------------------------------------------------------------------------------------
#                                  Objects and the working copy
# ----------------------------------------------------------------------------------------------


def test_conditional_writes_are_refused_by_the_server(s3, tmp_path):
    from pipeline.stores.objects import ObjectURL, PreconditionFailed, get_bytes, put_bytes

    u = ObjectURL.parse(url(tmp_path))
    etag = put_bytes(u, "lock", b"first", if_none_match=True)
    with pytest.raises(PreconditionFailed):
        put_bytes(u, "lock", b"second", if_none_match=True)
    with pytest.raises(PreconditionFailed):
        put_bytes(u, "lock", b"third", if_match="0" * 32)
    put_bytes(u, "lock", b"fourth", if_match=etag)
    assert get_bytes(u, "lock")[0] == b"fourth"


def _tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_push_then_pull_on_another_machine_gives_the_same_files(s3, tmp_path, monkeypatch):
    from pipeline.stores import objects
    from pipeline.stores.mirror import REMOTE_MARK, WorkingCopy
    from pipeline.stores.zarr_verify import file_size

    here = WorkingCopy.of(url(tmp_path))
    out = here.root / "ingest"
    (out / ".scratch").mkdir(parents=True)
    (out / ".scratch" / "partial").write_bytes(b"x")
    (out / "shard-000000.tar").write_bytes(os.urandom(3000))
    (out / "index.tsv").write_text("a\t0\n")
    (out / ".shard-000001.tar.abc.tmp").write_bytes(b"half")
    (out / "manifest.json").write_text("{}\n")
    order: list[str] = []
    real = objects.put_file
    monkeypatch.setattr("pipeline.stores.mirror.put_file", lambda u, rel, p: order.append(rel) or real(u, rel, p))
    assert here.push(out) == 3
    assert order[-1].endswith("manifest.json")  # published last: a stage with a manifest has all its objects
    assert here.push(out) == 0  # in sync: nothing uploaded again

    monkeypatch.setenv("REPA_STAGING", str(tmp_path / "other-machine"))
    there = WorkingCopy.of(url(tmp_path))
    assert there.pull(there.root / "ingest") == 3
    assert _tree(there.root / "ingest") == {k: v for k, v in _tree(out).items() if not k.startswith(".")}

    # without bulk files: the tar stays in the store, its size is known, verification sees it
    monkeypatch.setenv("REPA_STAGING", str(tmp_path / "third"))
    third = WorkingCopy.of(url(tmp_path))
    third.pull(third.root / "ingest", bulk=False)
    assert not (third.root / "ingest" / "shard-000000.tar").exists()
    assert json.loads((third.root / "ingest" / REMOTE_MARK).read_text())["sizes"] == {"shard-000000.tar": 3000}
    assert file_size(third.root / "ingest" / "shard-000000.tar") == 3000

    # a manifest deleted in the store is deleted by the next pull: the stage is no longer up to date
    there.forget(there.root / "ingest" / "manifest.json")
    third.pull(third.root / "ingest", bulk=False)
    assert not (third.root / "ingest" / "manifest.json").exists()


def test_lock_object_one_holder_takeover_of_a_dead_one(s3, tmp_path, monkeypatch):
    from jobs.lock import StageBusy, hold_object
    from pipeline.stores.mirror import WorkingCopy
    from pipeline.stores.objects import get_bytes, put_bytes

    copy = WorkingCopy.of(url(tmp_path))
    path = copy.root / ".locks" / "ingest.lock"
    with hold_object(copy, path, "stage ingest"):
        holder = json.loads(get_bytes(copy.objects, ".locks/ingest.lock")[0])
        assert holder["pid"] == os.getpid() and holder["expires"] > time.time()
        with pytest.raises(StageBusy, match=f"pid {os.getpid()}"):
            with hold_object(copy, path, "stage ingest"):
                pass
    from pipeline.stores.objects import head

    assert head(copy.objects, ".locks/ingest.lock") is None  # released

    # a holder whose lease ran out, and a dead process on this host, are taken over
    for record in ({"pid": 1, "host": "elsewhere", "expires": time.time() - 1},
                   {"pid": _dead_pid(), "host": socket.gethostname(), "expires": time.time() + 3600}):
        put_bytes(copy.objects, ".locks/ingest.lock", json.dumps(record).encode())
        said: list[str] = []
        with hold_object(copy, path, "stage ingest", say=said.append):
            assert json.loads(get_bytes(copy.objects, ".locks/ingest.lock")[0])["pid"] == os.getpid()
        assert said and "took over" in said[0]


def test_lock_lease_is_renewed_while_held(s3, tmp_path, monkeypatch):
    import jobs.lock
    from pipeline.stores.mirror import WorkingCopy
    from pipeline.stores.objects import get_bytes

    monkeypatch.setattr(jobs.lock, "LEASE_S", 0.8)
    copy = WorkingCopy.of(url(tmp_path))
    with jobs.lock.hold_object(copy, copy.root / ".locks" / "x.lock", "stage x"):
        first = json.loads(get_bytes(copy.objects, ".locks/x.lock")[0])["expires"]
        time.sleep(1.0)
        later = json.loads(get_bytes(copy.objects, ".locks/x.lock")[0])["expires"]
    assert later > first


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_wrong_endpoint_or_credentials_is_one_line_exit_2(aws, tmp_path):
    config = tmp_path / "c.toml"
    config.write_text(f'workdir = "{url(tmp_path)}"\n[data]\nsource = "synthetic"\n')
    env = {**aws, "REPA_STAGING": str(tmp_path / "staging")}
    closed = repa("status", "-c", str(config), env={**env, "AWS_ENDPOINT_URL": f"http://127.0.0.1:{free_port()}"})
    assert closed.returncode == 2 and "cannot reach the object store" in closed.stderr
    assert len(closed.stderr.strip().splitlines()) == 1
    with s3_server(check_credentials=True) as strict:
        refused = repa("features", "-c", str(config), env={**env, **strict})
    assert refused.returncode == 2 and "refused the credentials" in refused.stderr, refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "staging").exists() or not any((tmp_path / "staging").rglob("manifest.json"))


# ----------------------------------------------------------------------------------------------
#                                 The chain on object storage (slow)
# ----------------------------------------------------------------------------------------------


def _chain_outputs(cfg_path: Path, env: dict | None = None,
                   stages: tuple[str, ...] = ("latents", "teacher", "train", "evaluate")) -> dict:
    """Store arrays, weights and metrics of the tiny chain's config (read where its working copy is)."""
    from tests.test_faults import outputs
    from tests.test_jobs_e2e import cfg_of

    old = dict(os.environ)
    os.environ.update(env or {})
    try:
        from jobs.layout import states
        from jobs.run import pull_all

        cfg = cfg_of(cfg_path)
        pull_all(cfg, bulk=True)
        found = states(cfg)
        return {stage: outputs(found[stage].path, stage) for stage in stages}
    finally:
        os.environ.clear()
        os.environ.update(old)


@pytest.fixture(scope="module")
def local_chain(tmp_path_factory):
    from tests.test_jobs_e2e import tiny_config

    tmp = tmp_path_factory.mktemp("local")
    config = tiny_config(tmp)
    for command in ("features", "train", "eval"):
        assert repa(command, "-c", str(config)).returncode == 0
    return _chain_outputs(config)


def s3_config(tmp_path: Path) -> Path:
    from tests.test_jobs_e2e import TINY

    path = tmp_path / "s3.toml"
    path.write_text(TINY.format(workdir=url(tmp_path)))
    return path


def machine(aws: dict, tmp_path: Path, name: str) -> dict:
    """The environment of a `repa` process on machine `name`: its own, initially empty, working copy."""
    return {**aws, "REPA_STAGING": str(tmp_path / name)}


def _assert_same(a: dict, b: dict) -> None:
    from tests.test_faults import assert_equal

    for stage in a:
        assert_equal(a[stage], b[stage], stage)


@pytest.mark.slow
def test_chain_on_object_storage_equals_the_local_chain(aws, tmp_path, local_chain):
    config = s3_config(tmp_path)
    for i, command in enumerate(("features", "train", "eval")):  # each on a machine of its own
        out = repa(command, "-c", str(config), env=machine(aws, tmp_path, f"m{i}"))
        assert out.returncode == 0, out.stderr[-3000:]
    _assert_same(local_chain, _chain_outputs(config, machine(aws, tmp_path, "reader")))
    status = repa("status", "-c", str(config), "--json", env=machine(aws, tmp_path, "m-status"))
    assert status.returncode == 0, status.stderr
    assert {r["state"] for r in json.loads(status.stdout)} == {"up-to-date"}
    # training on that machine read the stores' shard files in place: none were downloaded
    assert not list((tmp_path / "m1").rglob("c/0/0/0/0"))


@pytest.mark.slow
def test_kill_at_a_store_publish_and_a_train_step_resumes_from_the_object_store(aws, tmp_path, local_chain):
    config = s3_config(tmp_path)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "REPA_LOCK_LEASE_S": "5"}
    reruns = {}
    for command, point in (("features", "store.publish:5"), ("train", "train.step:5"), ("eval", "sample.batch:1")):
        dead = subprocess.run([sys.executable, "-m", "jobs.cli", command, "-c", str(config)], cwd=ROOT,
                              capture_output=True, text=True, timeout=600, start_new_session=True,
                              env={**env, **machine(aws, tmp_path, f"dead-{command}"), "REPA_KILL_AT": point})
        assert dead.returncode == -9, dead.stderr[-2000:]
        # the rerun is on another machine: it resumes from what the killed one published
        rerun = reruns[command] = repa(command, "-c", str(config), env={**machine(aws, tmp_path, f"rerun-{command}"),
                                                                          "REPA_LOCK_LEASE_S": "5"})
        assert rerun.returncode == 0, rerun.stderr[-3000:]
        assert "took over the lock" in rerun.stderr  # of the killed process (same host, dead pid)
    from jobs.layout import states
    from tests.test_jobs_e2e import cfg_of

    old = dict(os.environ)
    os.environ.update(machine(aws, tmp_path, "inspect"))
    try:
        from jobs.run import pull_all

        pull_all(cfg_of(config))
        found = states(cfg_of(config))
    finally:
        os.environ.clear()
        os.environ.update(old)
    assert found["latents"].manifest.stats["ranges_resumed"] >= 1  # range 0 came from the killed machine
    assert "resumed from" in reruns["train"].stderr and "(step 3)" in reruns["train"].stderr  # its checkpoint
    assert "resuming: 1 of 2 batches already drawn" in reruns["eval"].stderr  # the batch the killed machine drew
    _assert_same(local_chain, _chain_outputs(config, machine(aws, tmp_path, "reader")))


@pytest.mark.slow
def test_two_features_at_once_on_one_workdir(aws, tmp_path, local_chain):
    config = s3_config(tmp_path)
    procs = [subprocess.Popen([sys.executable, "-m", "jobs.cli", "features", "-c", str(config)], cwd=ROOT,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env={**os.environ, "PYTHONPATH": str(ROOT), **machine(aws, tmp_path, f"p{i}")})
             for i in range(2)]
    results = [(p.wait(600), p.stderr.read()) for p in procs]
    for rc, err in results:
        assert rc in (0, 2), err[-2000:]
        if rc == 2:
            assert "is being written by" in err and len(err.strip().splitlines()[-1]) > 0
    again = repa("features", "-c", str(config), env=machine(aws, tmp_path, "p3"))
    assert again.returncode == 0 and "publishing" not in again.stderr, again.stderr[-2000:]
    got = _chain_outputs(config, machine(aws, tmp_path, "reader"), ("latents", "teacher"))
    _assert_same({k: local_chain[k] for k in got}, got)


def test_a_source_on_object_storage_ingests_like_its_local_copy(s3, tmp_path, monkeypatch):
    from pipeline.stores import mirror
    from pipeline.stores.objects import ObjectURL, put_file
    from tests.test_ingest import _class_folder

    folder = _class_folder(tmp_path / "images")
    u = ObjectURL.parse(url(tmp_path))
    for f in sorted(folder.rglob("*.png")):
        put_file(u, f"images/{f.relative_to(folder).as_posix()}", f)
    outs = {}
    for name, path in (("local", str(folder)), ("s3", f"{url(tmp_path)}/images")):
        config = tmp_path / f"{name}.toml"
        config.write_text(f'workdir = "{tmp_path / name}"\n[data]\nsource = "imagefolder"\npath = "{path}"\n'
                          'resolution = 8\nshard_size = 8\n')
        out = repa("ingest", "-c", str(config), env={"REPA_STAGING": str(tmp_path / "staging")})
        assert out.returncode == 0, out.stderr[-2000:]
        outs[name] = {p.name: p.read_bytes() for p in sorted((tmp_path / name / "ingest").glob("*.tar"))}
    assert outs["local"] == outs["s3"] and len(outs["s3"]) == 3

    calls: list[int] = []
    real = mirror.WorkingCopy._download
    monkeypatch.setattr(mirror.WorkingCopy, "_download", lambda self, objs: calls.append(1) or real(self, objs))
    local = mirror.pull_source(f"{url(tmp_path)}/images")
    assert calls == [] and sorted(p.name for p in local.iterdir() if not p.name.startswith(".")) == [
        f"class{c}" for c in range(4)]  # unchanged since the ingest's pull: nothing fetched or hashed
    with pytest.raises(FileNotFoundError):
        mirror.pull_source(f"{url(tmp_path)}/nothing-here")


def test_a_holder_that_loses_its_lock_stops(s3, tmp_path, monkeypatch):
    import jobs.lock
    from pipeline.stores.mirror import WorkingCopy
    from pipeline.stores.objects import put_bytes

    monkeypatch.setattr(jobs.lock, "LEASE_S", 0.8)
    copy = WorkingCopy.of(url(tmp_path))
    with pytest.raises(jobs.lock.StageBusy, match="lost its lock"):
        with jobs.lock.hold_object(copy, copy.root / ".locks" / "x.lock", "stage x"):
            put_bytes(copy.objects, ".locks/x.lock", b'{"pid": 1, "host": "elsewhere", "expires": 1e12}')
            time.sleep(5)  # the next renewal finds another holder's object and interrupts this block


HOLDER = """
import sys, time
from pathlib import Path
from jobs.lock import hold_object
from pipeline.stores.mirror import WorkingCopy
copy = WorkingCopy.of(sys.argv[1])
with hold_object(copy, copy.root / ".locks" / "ingest.lock", "the test"):
    print("held", flush=True)
    time.sleep(float(sys.argv[2]))
"""


@pytest.mark.slow
def test_a_busy_stage_on_object_storage_exits_2_or_waits(aws, tmp_path):
    config = s3_config(tmp_path)
    env = {**os.environ, "PYTHONPATH": str(ROOT), **machine(aws, tmp_path, "holder")}
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, url(tmp_path), "4"], cwd=ROOT, env=env,
                              stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    busy = repa("ingest", "-c", str(config), env=machine(aws, tmp_path, "other"))
    assert busy.returncode == 2 and f"pid {holder.pid}" in busy.stderr and "--wait" in busy.stderr, busy.stderr
    waited = repa("ingest", "-c", str(config), "--wait", env=machine(aws, tmp_path, "other"))
    assert holder.wait(30) == 0
    assert waited.returncode == 0 and "waiting for" in waited.stderr, waited.stderr[-2000:]


@pytest.mark.parametrize("workdir, message", [("gs://bucket/x", "only local paths and s3://"),
                                              ("s3:///x", "names no bucket")])
def test_a_workdir_url_the_pipeline_cannot_use_is_refused_when_the_config_loads(tmp_path, workdir, message):
    from schemas.loading import ConfigError, load_config

    config = tmp_path / "c.toml"
    config.write_text(f'workdir = "{workdir}"\n')
    with pytest.raises(ConfigError, match=message):
        load_config(config, [])


def test_a_plan_is_moved_to_another_machine_even_where_the_staging_paths_are_equal(s3, tmp_path, monkeypatch):
    from pipeline.stores import mirror

    caller = mirror.CallerCopy.of(mirror.WorkingCopy.of(url(tmp_path)))
    assert caller.elsewhere() is None  # the caller's own copy: its paths are valid as they are
    monkeypatch.setattr(mirror, "machine_id", lambda: "another-node/boot")
    here = caller.elsewhere()
    assert here is not None and here.root == Path(caller.root)  # same path, another machine: pull there
    assert caller.move(Path(caller.root) / "ingest" / "x.tar", here) == here.root / "ingest" / "x.tar"


def test_bulk_files_of_another_build_are_dropped_by_a_pull_without_them(s3, tmp_path, monkeypatch):
    from pipeline.stores.mirror import WorkingCopy

    a = WorkingCopy.of(url(tmp_path))
    out = a.root / "ingest"
    out.mkdir(parents=True)
    (out / "shard-000000.tar").write_bytes(b"old images")
    (out / "manifest.json").write_text('{"build": 1}\n')
    a.push(out)
    monkeypatch.setenv("REPA_STAGING", str(tmp_path / "b"))
    b = WorkingCopy.of(url(tmp_path))
    b.pull(b.root / "ingest")  # machine b holds build 1, tar included
    (out / "shard-000000.tar").write_bytes(b"new images")  # same size, other bytes: rebuilt on machine a
    (out / "manifest.json").write_text('{"build": 2}\n')
    a.push(out)
    b.pull(b.root / "ingest", bulk=False)
    assert not (b.root / "ingest" / "shard-000000.tar").exists()  # not trusted for its size: gone
    b.pull(b.root / "ingest", bulk=False)  # the same build again: nothing to drop, nothing fetched
    b.pull(b.root / "ingest")
    assert (b.root / "ingest" / "shard-000000.tar").read_bytes() == b"new images"
