"""The stages chained end to end on tiny synthetic data: freshness, resume, compatibility, a full run.

Everything is CPU and offline: synthetic 32px images, the identity VAE, a random-init DINOv2-S at
56px (a 4x4 patch grid) and tiny backbones.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from jobs.layout import states
from pipeline.stores.zarr_store import StoreReader
from schemas.loading import load_config
from tests.conftest import repa

pytestmark = pytest.mark.slow

TINY = """
workdir = "{workdir}"
[data]
source = "synthetic"
resolution = 32
synthetic_count = 64
synthetic_classes = 4
shard_size = 32
num_workers = 1
[vae]
name = "identity"
weights = "none"
[teacher]
name = "dinov2_vits14"
weights = "random"
resolution = 56
batch_size = 16
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
checkpoint_every = 3
log_every = 1
[sample]
num = 16
sampler = "ode"
steps = 4
batch_size = 8
[eval]
reference = "ingest"
batch_size = 40
splits = 2
"""


def tiny_config(tmp_path: Path, name: str = "work") -> Path:
    path = tmp_path / f"{name}.toml"
    path.write_text(TINY.format(workdir=tmp_path / name))
    return path


def cfg_of(path: Path, *overrides: str):
    return load_config(path, list(overrides))


def stage_dir(cfg, stage: str) -> Path:
    """The output directory of `stage` for a loaded config (latents and teacher are variant directories)."""
    return states(cfg)[stage].path


def ok(proc) -> str:
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stderr


# ----------------------------------------------------------------------------------------------
#                                    Features: freshness
# ----------------------------------------------------------------------------------------------


def test_features_rerun_is_up_to_date_and_a_change_is_stale(tmp_path):
    config = tiny_config(tmp_path)
    ok(repa("features", "-c", str(config)))
    store = stage_dir(cfg_of(config), "teacher") / "store.zarr"
    before = {p: p.stat().st_mtime_ns for p in store.rglob("*") if p.is_file()}

    lat = StoreReader(stage_dir(cfg_of(config), "latents") / "store.zarr")
    tea = StoreReader(store)
    keys = np.asarray(lat.array("keys")[:])
    assert len(set(keys)) == 64 and np.array_equal(keys, np.asarray(tea.array("keys")[:]))
    np.testing.assert_array_equal(lat.array("labels")[:], tea.array("labels")[:])

    err = ok(repa("features", "-c", str(config)))
    assert err.count("up to date") == 3, err
    assert {p: p.stat().st_mtime_ns for p in store.rglob("*") if p.is_file()} == before

    rows = json.loads(ok_out(repa("status", "-c", str(config), "--json", "--set", "teacher.dtype=int8")))
    by = {r["stage"]: r for r in rows}
    assert by["ingest"]["state"] == by["latents"]["state"] == "up-to-date"
    # another teacher config is another store beside this one (nothing is rebuilt in place)
    assert by["teacher"]["state"] == "missing" and by["teacher"]["path"] != str(store.parent)
    assert by["teacher"]["reason"].endswith("differs in teacher.dtype"), by["teacher"]["reason"]

    rows = json.loads(ok_out(repa("status", "-c", str(config), "--json", "--set", "data.seed=1")))
    by = {r["stage"]: r for r in rows}
    assert by["ingest"]["reason"] == "data.seed changed"
    assert "input ingest changed" in by["latents"]["reason"] and "input ingest changed" in by["teacher"]["reason"]


def flip_a_byte(path: Path) -> None:
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    path.write_bytes(bytes(raw))


def test_manifests_carry_checksums_that_status_deep_rereads(tmp_path):
    config = tiny_config(tmp_path)
    ok(repa("features", "-c", str(config)))
    work = tmp_path / "work"
    store = stage_dir(cfg_of(config), "teacher") / "store.zarr"
    teacher = states(cfg_of(config))["teacher"].manifest
    tokens = next(o for o in teacher.outputs if o.kind == "array" and o.name == "tokens")
    shard_files = sorted(f for f in (store / "tokens" / "c").rglob("*") if f.is_file())
    assert tokens.bytes == sum(f.stat().st_size for f in shard_files) and len(shard_files) == 4
    assert tokens.sha256 == StoreReader(store).array_digests()["tokens"]
    by = {r["stage"]: r for r in json.loads(ok_out(repa("status", "-c", str(config), "--json", "--deep")))}
    assert [by[s]["state"] for s in ("ingest", "latents", "teacher")] == ["up-to-date"] * 3

    flip_a_byte(shard_files[1])  # same size: only rereading the bytes can tell
    by = {r["stage"]: r for r in json.loads(ok_out(repa("status", "-c", str(config), "--json")))}
    assert by["teacher"]["state"] == "up-to-date"
    by = {r["stage"]: r for r in json.loads(ok_out(repa("status", "-c", str(config), "--json", "--deep")))}
    assert by["latents"]["state"] == "up-to-date"
    assert by["teacher"]["state"] == "stale" and str(shard_files[1]) in by["teacher"]["reason"]
    assert "sha256" in by["teacher"]["reason"]

    ingest = states(cfg_of(config))["ingest"].manifest
    flip_a_byte(work / "ingest" / ingest.outputs[0].name)
    by = {r["stage"]: r for r in json.loads(ok_out(repa("status", "-c", str(config), "--json", "--deep")))}
    assert by["ingest"]["state"] == "stale" and "sha256" in by["ingest"]["reason"]
    # the stores were computed from the ingest's intact bytes (same fingerprint): they stay valid
    assert by["latents"]["state"] == "up-to-date"

    (store / ".ranges" / "16-32").write_text("{not json")  # a damaged marker: named, no traceback
    by = {r["stage"]: r for r in json.loads(ok_out(repa("status", "-c", str(config), "--json")))}
    assert by["teacher"]["state"] == "stale" and "16-32 is unreadable" in by["teacher"]["reason"]


def ok_out(proc) -> str:
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def test_int8_store_records_its_fidelity_and_matches_fp16(tmp_path):
    from jobs.encode import encode
    from jobs.ingest import ingest
    from jobs.teacher import teacher

    fp16 = cfg_of(tiny_config(tmp_path, "a"))
    int8 = cfg_of(tiny_config(tmp_path, "b"), "teacher.dtype=int8")
    for cfg in (fp16, int8):
        ingest(cfg)
        encode(cfg)
        teacher(cfg)
    m = states(int8)["teacher"].manifest
    assert m.extra["dtype"] == "int8" and m.extra["token_cos_mean"] > 0.999 and m.extra["token_cos_min"] > 0.99
    ref = StoreReader(stage_dir(fp16, "teacher") / "store.zarr")
    q = StoreReader(stage_dir(int8, "teacher") / "store.zarr")
    idx = np.arange(64)
    a = ref.read("tokens", idx).astype(np.float32)
    b = q.read("tokens", idx).astype(np.float32) * q.read("tokens_scale", idx).astype(np.float32)
    cos = (a * b).sum(-1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)
    assert cos.min() > 0.99
    # the int8 store is half the fp16 one, plus one fp16 scale per token
    assert q.read("tokens", idx[:1]).nbytes * 2 == ref.read("tokens", idx[:1]).nbytes


def test_killed_teacher_stage_resumes_to_identical_arrays(tmp_path, monkeypatch):
    from jobs import teacher as teacher_job
    from jobs.encode import encode
    from jobs.ingest import ingest

    whole = cfg_of(tiny_config(tmp_path, "whole"))
    killed = cfg_of(tiny_config(tmp_path, "killed"))
    for cfg in (whole, killed):
        ingest(cfg)
        encode(cfg)
    teacher_job.teacher(whole)

    calls = {"n": 0}
    original = teacher_job.TeacherExtractor.__call__

    def dies_on_third_batch(self, images):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt("simulated kill")
        return original(self, images)

    monkeypatch.setattr(teacher_job.TeacherExtractor, "__call__", dies_on_third_batch)
    with pytest.raises(KeyboardInterrupt):
        teacher_job.teacher(killed)
    assert states(killed)["teacher"].state == "missing"
    monkeypatch.setattr(teacher_job.TeacherExtractor, "__call__", original)
    teacher_job.teacher(killed)
    m = states(killed)["teacher"].manifest
    assert m.stats["ranges_resumed"] == 2 and m.stats["images_computed"] == 32
    a = StoreReader(stage_dir(whole, "teacher") / "store.zarr")
    b = StoreReader(stage_dir(killed, "teacher") / "store.zarr")
    idx = np.arange(64)
    np.testing.assert_array_equal(a.read("tokens", idx), b.read("tokens", idx))
    np.testing.assert_array_equal(a.read("labels", idx), b.read("labels", idx))


# ----------------------------------------------------------------------------------------------
#                                 Train: checks before compute
# ----------------------------------------------------------------------------------------------


def test_train_refuses_incompatible_inputs_with_exit_2(tmp_path):
    config = tiny_config(tmp_path)
    ok(repa("features", "-c", str(config)))
    cases = [
        (["--set", "train.align=haste", "--set", "model.name=SiT-S/8"], "teacher.cache"),
        (["--set", "model.num_classes=3"], "model.num_classes"),
        (["--set", "model.name=SiT-T/4", "--set", "train.align=repa", "--set", "align.depth=9"], "align.depth"),
    ]
    for args, key in cases:
        proc = repa("train", "-c", str(config), *args)
        assert proc.returncode == 2, (args, proc.stderr[-2000:])
        lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
        assert len(lines) == 1 and key in lines[0], proc.stderr
        assert "Traceback" not in proc.stderr
    proc = repa("train", "-c", str(config), "--set", "teacher.name=dinov2_vitb14")
    assert proc.returncode == 2 and "needs stage teacher first" in proc.stderr


def test_train_refuses_a_teacher_store_from_another_ingest(tmp_path):
    import shutil

    config = tiny_config(tmp_path)
    other = tiny_config(tmp_path, "other")
    ok(repa("features", "-c", str(config)))
    ok(repa("features", "-c", str(other), "--set", "data.seed=7"))
    store = stage_dir(cfg_of(config), "teacher") / "store.zarr"
    shutil.rmtree(store)
    shutil.copytree(stage_dir(cfg_of(other, "data.seed=7"), "teacher") / "store.zarr", store)  # same shapes, other images
    proc = repa("train", "-c", str(config))
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "not the one the manifest records" in proc.stderr and "Traceback" not in proc.stderr
    # without the manifest's checksums (stores written before they existed) the store's own
    # fingerprint attribute still gives it away
    manifest = store.parent / "manifest.json"
    data = json.loads(manifest.read_text())
    for entry in data["outputs"]:
        entry["sha256"] = ""
    manifest.write_text(json.dumps(data))
    proc = repa("train", "-c", str(config))
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "another ingest" in proc.stderr and "Traceback" not in proc.stderr
    assert not (states(cfg_of(config))["train"].path / "checkpoints").exists()


# ----------------------------------------------------------------------------------------------
#                                        A whole run
# ----------------------------------------------------------------------------------------------


def test_train_sample_evaluate_report_then_extend_the_run(tmp_path):
    config = tiny_config(tmp_path)
    ok(repa("features", "-c", str(config)))
    ok(repa("train", "-c", str(config)))
    ok(repa("eval", "-c", str(config)))
    report = ok_out(repa("report", "-c", str(config)))
    cfg = cfg_of(config)
    st = states(cfg)
    assert all(s.state == "up-to-date" for s in st.values()), {k: s.reason for k, s in st.items()}
    run_dir = st["train"].path
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    assert all(np.isfinite(r["loss"]) and "repa" in r and "manifold" in r for r in rows)
    samples = np.load(st["sample"].path / "samples.npz")
    assert samples["arr_0"].shape == (16, 32, 32, 3) and samples["arr_0"].dtype == np.uint8
    assert np.bincount(samples["arr_1"], minlength=4).tolist() == [4, 4, 4, 4]
    metrics = json.loads((st["evaluate"].path / "metrics.json").read_text())
    assert metrics["num_samples"] == 16 and metrics["fid"] > 0 and np.isfinite(metrics["sfid"])
    assert 0 <= metrics["precision"] <= 1 and 0 <= metrics["recall"] <= 1
    assert "FID" in report

    # every file a stage wrote carries its sha256 in the manifest; --deep rereads them
    for stage in ("train", "sample", "evaluate"):
        for entry in st[stage].manifest.outputs:
            assert entry.sha256 == hashlib.sha256((st[stage].path / entry.name).read_bytes()).hexdigest()
    assert all(s.state == "up-to-date" for s in states(cfg, deep=True).values())
    grid = st["sample"].path / "grid.png"
    original = grid.read_bytes()
    flip_a_byte(grid)
    assert states(cfg)["sample"].state == "up-to-date"
    deep = states(cfg, deep=True)["sample"]
    assert deep.state == "stale" and "grid.png does not have the sha256" in deep.reason
    grid.write_bytes(original)

    # the same batches drawn by two Ray tasks give the same file; evaluate stays up to date
    ok(repa("sample", "-c", str(config), "--force", "--set", "sample.launcher=ray", "--set", "sample.num_workers=2"))
    again = np.load(st["sample"].path / "samples.npz")
    np.testing.assert_array_equal(again["arr_0"], samples["arr_0"])
    assert states(cfg)["evaluate"].state == "up-to-date"

    # more steps: the same run continues from its step-6 checkpoint; sample and eval go stale
    proc = ok(repa("train", "-c", str(config), "--set", "train.steps=9"))
    assert "stale: train.steps changed" in proc
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 10))
    st = states(cfg_of(config, "train.steps=9"))
    assert st["train"].state == "up-to-date" and st["train"].manifest.stats["step"] == 9
    assert st["sample"].state == "stale" and "input train changed" in st["sample"].reason


def test_two_local_worker_processes_train_what_one_process_trains(tmp_path):
    from pipeline.train import checkpoint as ckpt

    config = tiny_config(tmp_path)
    ok(repa("features", "-c", str(config)))
    ok(repa("train", "-c", str(config), "--set", "train.name=one"))
    ok(repa("train", "-c", str(config), "--set", "train.name=two", "--set", "train.num_workers=2"))
    runs = tmp_path / "work" / "runs"
    for name in ("one", "two"):
        assert json.loads((runs / name / "manifest.json").read_text())["stats"]["step"] == 6
    one, two = (ckpt.load(ckpt.latest(runs / name))["model"] for name in ("one", "two"))
    at_step_3 = ckpt.load(ckpt.checkpoint_path(runs / "one", 3))["model"]
    assert any(not torch.equal(one[k], at_step_3[k]) for k in one)  # training moves the weights
    assert one.keys() == two.keys()
    for key in one:  # the same global batch, split over two gloo ranks
        torch.testing.assert_close(one[key], two[key], atol=1e-5, rtol=1e-5)


def test_haste_reads_no_teacher_features_after_tau(tmp_path, monkeypatch):
    from jobs.encode import encode
    from jobs.ingest import ingest
    from jobs.teacher import teacher
    from jobs.train import train

    cfg = cfg_of(tiny_config(tmp_path), "teacher.cache=hidden", "teacher.hidden_layer=8", "teacher.resolution=112",
                 "train.align=haste", "model.name=SiT-S/4", "align.tau=3", "align.projector_dim=64",
                 "train.checkpoint_every=100")
    ingest(cfg)
    encode(cfg)
    teacher(cfg)
    reads = []
    original = StoreReader.read

    def counting(self, name, indices):
        if name == "hidden":
            reads.append(len(indices))
        return original(self, name, indices)

    monkeypatch.setattr(StoreReader, "read", counting)
    train(cfg)
    assert len(reads) == 3  # steps 0, 1, 2; alignment is off for good from step tau = 3
    rows = [json.loads(line) for line in (states(cfg)["train"].path / "metrics.jsonl").read_text().splitlines()]
    assert all("attn" in r and "repa" in r for r in rows[:3])
    assert all("attn" not in r and "repa" not in r for r in rows[3:])


def test_ray_fan_out_of_the_stores_equals_one_process(tmp_path):
    from jobs.encode import encode
    from jobs.ingest import ingest
    from jobs.teacher import teacher

    local = cfg_of(tiny_config(tmp_path, "local"))
    fanned = cfg_of(tiny_config(tmp_path, "ray"), "stores.launcher=ray", "stores.num_workers=2")
    for cfg in (local, fanned):
        ingest(cfg)
        encode(cfg)
        teacher(cfg)
    assert states(fanned)["teacher"].manifest.stats["launcher"] == "ray"
    idx = np.arange(64)
    for store, names in (("latents", ("moments", "labels")), ("teacher", ("tokens", "labels"))):
        a = StoreReader(stage_dir(local, store) / "store.zarr")
        b = StoreReader(stage_dir(fanned, store) / "store.zarr")
        for name in names:
            np.testing.assert_array_equal(a.read(name, idx), b.read(name, idx))


def test_online_teacher_with_flips_trains_from_the_ingest_images(tmp_path):
    from jobs.encode import encode
    from jobs.ingest import ingest
    from jobs.teacher import teacher
    from jobs.train import train

    cfg = cfg_of(tiny_config(tmp_path), "teacher.cache=online", "vae.flip=true", "train.steps=3")
    ingest(cfg)
    encode(cfg)
    teacher(cfg)
    st = states(cfg)
    assert st["teacher"].manifest.outputs == [] and not (st["teacher"].path / "store.zarr").exists()
    assert "moments_flip" in StoreReader(st["latents"].path / "store.zarr").names
    train(cfg)
    rows = [json.loads(line) for line in (states(cfg)["train"].path / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 3 and all(np.isfinite(r["repa"]) and np.isfinite(r["manifold"]) for r in rows)


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_asked_for_without_cuda_is_a_usage_error(tmp_path):
    from jobs.encode import encode
    from jobs.ingest import ingest
    from jobs.stage import UsageError

    cfg = cfg_of(tiny_config(tmp_path), "vae.device=cuda")
    ingest(cfg)
    with pytest.raises(UsageError, match=r"vae.device = 'cuda' but CUDA is not available"):
        encode(cfg)
    assert states(cfg)["latents"].state == "missing"


def test_killed_sampling_resumes_at_the_first_missing_batch(tmp_path, monkeypatch):
    from jobs import sample as sample_job
    from jobs.encode import encode
    from jobs.ingest import ingest
    from jobs.teacher import teacher
    from jobs.train import train

    cfg = cfg_of(tiny_config(tmp_path), "train.steps=2", "sample.num=24")
    for stage in (ingest, encode, teacher, train):
        stage(cfg)
    sample_job.sample(cfg)
    out = states(cfg)["sample"].path / "samples.npz"
    whole = np.load(out)["arr_0"]

    calls = {"n": 0}
    original = sample_job.run_sampler

    def dies_on_second_batch(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt("simulated kill")
        return original(*args, **kwargs)

    monkeypatch.setattr(sample_job, "run_sampler", dies_on_second_batch)
    with pytest.raises(KeyboardInterrupt):
        sample_job.sample(cfg, force=True)
    assert states(cfg)["sample"].state == "missing"
    monkeypatch.setattr(sample_job, "run_sampler", original)
    sample_job.sample(cfg)
    m = states(cfg)["sample"].manifest
    assert m.stats["images_drawn"] == 16  # batches 1 and 2 of three 8-image batches
    np.testing.assert_array_equal(np.load(out)["arr_0"], whole)


# ----------------------------------------------------------------------------------------------
#                         Store variants, one store for every method, compare
# ----------------------------------------------------------------------------------------------


def test_store_variants_coexist_and_switching_back_rebuilds_and_deletes_nothing(tmp_path):
    config = tiny_config(tmp_path)
    ok(repa("features", "-c", str(config)))
    tokens_dir = stage_dir(cfg_of(config), "teacher")
    before = {p: p.stat().st_mtime_ns for p in tokens_dir.rglob("*") if p.is_file()}
    ok(repa("features", "-c", str(config), "--set", "teacher.cache=hidden"))
    hidden_dir = stage_dir(cfg_of(config, "teacher.cache=hidden"), "teacher")
    assert hidden_dir != tokens_dir and (hidden_dir / "store.zarr" / "hidden").is_dir()
    err = ok(repa("features", "-c", str(config)))  # back: every stage is up to date, nothing rebuilt
    assert err.count("up to date") == 3, err
    assert {p: p.stat().st_mtime_ns for p in tokens_dir.rglob("*") if p.is_file()} == before
    assert states(cfg_of(config, "teacher.cache=hidden"))["teacher"].state == "up-to-date"
    shown = ok_out(repa("status", "-c", str(config)))
    assert f"another teacher variant, kept: {hidden_dir}" in shown


def test_a_hidden_state_store_serves_repa_the_tokens_a_token_store_holds(tmp_path):
    """REPA and U-REPA read the final tokens a hidden-state store also holds: the run equals the one
    trained from a token store, and no teacher block runs per step."""
    from jobs.encode import encode
    from jobs.ingest import ingest
    from jobs.teacher import teacher
    from jobs.train import train
    from pipeline.teachers import dinov2

    runs = {}
    for cache in ("tokens", "hidden"):
        cfg = cfg_of(tiny_config(tmp_path), f"teacher.cache={cache}", "train.steps=3")
        ingest(cfg)
        encode(cfg)
        teacher(cfg)
        calls = []
        original = dinov2.tail_forward

        def counted(*a, calls=calls, original=original, **k):
            calls.append(1)
            return original(*a, **k)

        dinov2.tail_forward = counted
        try:
            train(cfg)
        finally:
            dinov2.tail_forward = original
        assert not calls
        runs[cache] = states(cfg)["train"].path
    assert runs["tokens"] != runs["hidden"]
    from safetensors.torch import load_file

    a, b = (load_file(str(runs[c] / "ema.safetensors")) for c in ("tokens", "hidden"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_compare_trains_each_method_once_and_tables_every_checkpoint(tmp_path):
    config = tiny_config(tmp_path)
    args = ["-c", str(config), "--set", 'compare.methods=["none","urepa"]', "--set", "compare.checkpoints=[3,6]",
            "--set", "eval.batch_size=16", "--set", "compare.seeds=[0,1]", "--set", 'compare.one_seed=["urepa"]']
    out = ok_out(repa("compare", *args))
    assert "| none | 2 |" in out and "| urepa | 1 |" in out and "Floor (real vs real, 32 vs 32" in out
    work = tmp_path / "work"
    result = json.loads((work / "compare" / "compare.json").read_text())
    assert set(result["methods"]) == {"none", "urepa"}
    assert result["methods"]["none"]["seeds"] == [0, 1] and result["methods"]["urepa"]["seeds"] == [0]
    secs = result["seconds"]  # every stage's wall time, summed from the manifests
    assert all(secs[k] >= 0 for k in ("ingest", "latents"))  # tiny stages round to 0.0 s
    assert all(secs[k] > 0 for k in ("teacher", "train", "sample", "evaluate"))
    assert secs["total"] == pytest.approx(sum(v for k, v in secs.items() if k != "total"), abs=0.5)
    assert "Time (stage manifests): features" in out
    for row in result["methods"].values():
        assert [p["step"] for p in row["points"]] == [3, 6] and [p["images"] for p in row["points"]] == [24, 48]
        assert all(p["fid"] > 0 and isinstance(p["kid"], float) for p in row["points"])
    # none's rows are the mean, min and max of its two seeds' evaluations
    seeds = result["methods"]["none"]["per_seed"]
    for k, p in enumerate(result["methods"]["none"]["points"]):
        fids = [seeds[s][k]["fid"] for s in ("0", "1")]
        assert fids[0] != fids[1] and p["fid"] == pytest.approx(sum(fids) / 2)
        assert (p["fid_min"], p["fid_max"]) == (min(fids), max(fids))
    assert (work / "compare" / "compare.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "![FID against training images](compare.png)" in (work / "compare" / "compare.md").read_text()
    # a rerun is up to date everywhere: nothing is trained, drawn or scored again
    err = ok(repa("compare", *args))
    assert "done in" not in err, err
    # the last checkpoint's EMA is the exported EMA: sampling either gives the same images
    ok(repa("sample", "-c", str(config), "--set", "train.align=urepa"))
    run = states(cfg_of(config, "train.align=urepa"))["train"].path
    final = np.load(run / "samples" / "samples.npz")["arr_0"]
    np.testing.assert_array_equal(np.load(run / "samples-step6" / "samples.npz")["arr_0"], final)
    assert not np.array_equal(np.load(run / "samples-step3" / "samples.npz")["arr_0"], final)


def test_compare_rejects_checkpoints_the_run_does_not_keep(tmp_path):
    config = tiny_config(tmp_path)
    proc = repa("compare", "-c", str(config), "--set", "compare.checkpoints=[2,6]")
    assert proc.returncode == 2 and "train.checkpoint_every = 3" in proc.stderr
    proc = repa("compare", "-c", str(config), "--set", "compare.checkpoints=[3,6]", "--set", "train.steps=9")
    assert proc.returncode == 2 and "train.keep_checkpoints" in proc.stderr


# ----------------------------------------------------------------------------------------------
#                          Unconditional models, a separate reference source
# ----------------------------------------------------------------------------------------------


def _reference_folder(root: Path, classes: int = 3, per_class: int = 6) -> Path:
    rng = np.random.default_rng(2)
    for c in range(classes):
        (root / f"c{c}").mkdir(parents=True)
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(root / f"c{c}" / f"{i}.png")
    return root


@pytest.mark.parametrize("model,align", [("SiT-T/4", "repa"), ("SiTDown-T/4", "urepa"), ("UNet-T", "urepa")])
def test_unconditional_model_trains_samples_and_ignores_labels(tmp_path, model, align):
    from jobs.sample import load_run_model

    config = tiny_config(tmp_path)
    sets = ["--set", f"model.name={model}", "--set", "model.num_classes=0", "--set", f"train.align={align}"]
    ok(repa("features", "-c", str(config)))
    ok(repa("train", "-c", str(config), *sets))
    ok(repa("sample", "-c", str(config), *sets))
    st = states(cfg_of(config, f"model.name={model}", "model.num_classes=0", f"train.align={align}"))
    assert st["train"].manifest.extra["model_kwargs"]["num_classes"] == 0
    run = st["train"].path
    net = load_run_model(run, st["train"].manifest.extra, "ema", torch.device("cpu"), 0)
    assert net.y_embedder is None and not any("y_embedder" in k for k in net.state_dict())
    x, t = torch.randn(2, 3, 32, 32), torch.rand(2)
    with torch.no_grad():
        torch.testing.assert_close(net(x, t, torch.tensor([0, 0])).velocity, net(x, t, torch.tensor([3, 1])).velocity)
    samples = np.load(st["sample"].path / "samples.npz")
    assert samples["arr_0"].shape == (16, 32, 32, 3) and (samples["arr_1"] == 0).all()
    # guidance needs classes: a usage error before any compute
    proc = repa("sample", "-c", str(config), *sets, "--set", "sample.cfg_scale=2", "--force")
    assert proc.returncode == 2 and "unconditional" in proc.stderr


def test_a_separate_reference_source_scores_and_gives_its_floor(tmp_path):
    config = tiny_config(tmp_path)
    folder = _reference_folder(tmp_path / "val")
    sets = ["--set", "eval.reference=source", "--set", "eval.reference_source=imagefolder",
            "--set", f"eval.reference_path={folder}", "--set", "eval.reference_limit=12", "--set", "eval.batch_size=16"]
    ok(repa("features", "-c", str(config)))
    ok(repa("train", "-c", str(config)))
    ok(repa("eval", "-c", str(config), *sets))
    cfg = cfg_of(config, *sets[1::2])
    st = states(cfg)
    assert st["evaluate"].state == "up-to-date"
    metrics = json.loads((st["evaluate"].path / "metrics.json").read_text())
    assert np.isfinite(metrics["fid"]) and isinstance(metrics["kid"], float)
    assert "reference/source/ingest" in metrics["reference"]
    held = json.loads((tmp_path / "work" / "reference" / "source" / "ingest" / "manifest.json").read_text())
    assert held["extra"]["num_images"] == 12 and held["extra"]["order"] == "shuffled"
    out = ok_out(repa("floor", "-c", str(config), *sets))
    assert "floor: FID" in out and "6 vs 6 images" in out
    # another reference folder is another evaluation
    other = _reference_folder(tmp_path / "val2", per_class=5)
    moved = [v if not v.startswith("eval.reference_path=") else f"eval.reference_path={other}" for v in sets[1::2]]
    assert states(cfg_of(config, *moved))["evaluate"].state != "up-to-date"
    proc = repa("evaluate", "-c", str(config), "--set", "eval.reference=source")
    assert proc.returncode == 2 and "eval.reference_path" in proc.stderr
