"""Training library: data order and per-sample noise, EMA, checkpoints, the loop and its launchers.

Everything runs on CPU with stand-ins: a tiny conv backbone returning ModelOutput, the plain
flow-matching objective, and in-memory numpy arrays as the latents and teacher stores.
"""

from __future__ import annotations

import dataclasses
import json
import random
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file

from pipeline.align.base import FlowMatching
from pipeline.launch import WorkerContext, current_context, launcher, set_context
from pipeline.models.output import ModelOutput
from pipeline.teachers.targets import TeacherTargets
from pipeline.train import EMA, LoopSettings, TrainDataset, training_loop
from pipeline.train import checkpoint as ckpt
from pipeline.train.data import ThreadLoader

C, H, N, NUM_CLASSES = 2, 4, 24, 3
TESTS = Path(__file__).resolve().parent


# ----------------------------------------------------------------------------------------------
#                                         Stand-ins
# ----------------------------------------------------------------------------------------------


class TinyNet(nn.Module):
    """x [B,C,H,W], t [B], y [B] -> ModelOutput(velocity [B,C,H,W])."""

    name = "TinyNet"

    def __init__(self, width: int = 16):
        super().__init__()
        self.inp = nn.Conv2d(C, width, 3, padding=1)
        self.t_embed = nn.Linear(1, width)
        self.y_embed = nn.Embedding(NUM_CLASSES + 1, width)
        self.out = nn.Conv2d(width, C, 3, padding=1)

    def forward(self, x, t, y, align_depth=None, attn_layers=()):
        h = self.inp(x) + (self.t_embed(t[:, None]) + self.y_embed(y))[:, :, None, None]
        return ModelOutput(velocity=self.out(F.silu(h)))


class ArrayReader:
    """A picklable 'store': reader(sorted unique indices) -> rows, counting its calls."""

    def __init__(self, array: np.ndarray):
        self.array, self.calls = array, 0

    def __call__(self, indices: np.ndarray) -> np.ndarray:
        assert np.all(np.diff(indices) > 0), "readers get sorted unique indices"
        self.calls += 1
        return self.array[indices]


class TokenReader(ArrayReader):
    def __call__(self, indices):
        return {"tokens": super().__call__(indices)}


def store(n: int = N, std: float = 0.1, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """moments [n, 2C, H, H] (mean, std) and labels [n]."""
    rng = np.random.default_rng(seed)
    mean = rng.normal(size=(n, C, H, H)).astype(np.float32) * 2
    moments = np.concatenate([mean, np.full_like(mean, std)], axis=1)
    return moments, rng.integers(0, NUM_CLASSES, n)


def dataset(n: int = N, std: float = 0.1, **kw) -> TrainDataset:
    moments, labels = store(n, std)
    kw = {"num_classes": NUM_CLASSES, "seed": 0, "scale": 1.0, **kw}
    return TrainDataset(ArrayReader(moments), labels, **kw)


def loop_args(run_dir, worker: WorkerContext | None = None, **over) -> dict:
    """training_loop's arguments: the LoopSettings fields among `over` go into `settings`."""
    numbers = dict(steps=6, batch_size=8, lr=3e-3, grad_clip=1.0, ema_decay=0.9, precision="fp32",
                   checkpoint_every=3, keep_checkpoints=2, log_every=1, seed=0)
    args = dict(run_dir=run_dir, build_model=TinyNet, build_objective=lambda m: FlowMatching(), dataset=dataset(),
                worker=worker or WorkerContext(device=torch.device("cpu")), progress=False)
    for key, value in over.items():
        (numbers if key in LoopSettings.__dataclass_fields__ else args)[key] = value
    return {"settings": LoopSettings(**numbers), **args}


def rows(run_dir) -> list[dict]:
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def train_fn(config: dict) -> dict:
    """What a launcher runs per worker: rank, world size, device, ... come from the worker context."""
    ctx = current_context()
    assert torch.distributed.is_initialized() == (ctx.world_size > 1) or ctx.launcher == "ray"
    return training_loop(**loop_args(config["run_dir"], steps=config["steps"], checkpoint_every=config["steps"],
                                     grad_accum=config.get("grad_accum", 1), worker=ctx))


# ----------------------------------------------------------------------------------------------
#                                            Data
# ----------------------------------------------------------------------------------------------


def test_data_order_is_a_fixed_permutation_per_epoch():
    ds = dataset(n=10, batch_size=4)
    stream = np.concatenate([ds.indices(s) for s in range(5)])  # 20 positions = 2 epochs
    for e in range(2):
        epoch = stream[10 * e: 10 * (e + 1)]
        assert sorted(epoch) == list(range(10))
        assert np.array_equal(epoch, np.random.Generator(np.random.PCG64([0, e])).permutation(10))
    assert not np.array_equal(stream[:10], stream[10:])
    other = dataset(n=10, seed=1, batch_size=4)
    assert not np.array_equal(np.concatenate([other.indices(s) for s in range(3)]), stream[:12])


def test_two_workers_split_exactly_the_batch_of_one():
    one = dataset(n=20, batch_size=8)
    halves = [dataset(n=20, batch_size=8, rank=r, world_size=2) for r in range(2)]
    for step in (0, 2, 7):  # step 2 straddles the boundary of epochs 0 and 1
        full = one[step]
        parts = [h[step] for h in halves]
        for key in ("x0", "eps", "t", "y", "index", "flip"):
            assert torch.equal(full[key], torch.cat([p[key] for p in parts])), key
    assert not torch.equal(one[0]["eps"], one[1]["eps"])


def test_latent_sample_labels_and_dropout():
    moments, labels = store(std=0.0)
    ds = TrainDataset(ArrayReader(moments), labels, num_classes=NUM_CLASSES, scale=0.5, class_dropout=0.0,
                      batch_size=16)
    b = ds[3]
    assert torch.equal(b["x0"], torch.from_numpy(moments[b["index"].numpy(), :C]) * 0.5)  # std 0: z = mean*scale
    assert torch.equal(b["y"], torch.from_numpy(labels[b["index"].numpy()]))
    assert b["x0"].dtype == b["eps"].dtype == b["t"].dtype == torch.float32 and b["y"].dtype == torch.int64
    assert ((b["t"] > 0) & (b["t"] < 1)).all()
    dropped = TrainDataset(ArrayReader(moments), labels, num_classes=NUM_CLASSES, class_dropout=1.0, batch_size=16)
    assert (dropped[3]["y"] == NUM_CLASSES).all()
    # std 1, mean 0: (x0 / scale) is the posterior noise itself, a standard normal independent of eps
    unit = np.concatenate([np.zeros_like(moments[:, :C]), np.ones_like(moments[:, :C])], axis=1)
    noisy = TrainDataset(ArrayReader(unit), labels, num_classes=NUM_CLASSES, scale=2.0, batch_size=64)[0]
    z = noisy["x0"] / 2.0
    assert abs(z.mean().item()) < 0.1 and abs(z.std().item() - 1) < 0.1
    assert abs(torch.corrcoef(torch.stack([z.flatten(), noisy["eps"].flatten()]))[0, 1].item()) < 0.1


def test_flip_variant_is_chosen_per_sample():
    moments, labels = store(std=0.0)
    mirrored = moments.copy()
    mirrored[:, :C] += 100.0  # variant 1 is recognisable by its mean
    readers = [ArrayReader(moments), ArrayReader(mirrored)]
    b = TrainDataset(readers, labels, num_classes=NUM_CLASSES, scale=1.0, batch_size=24)[0]
    shifted = (b["x0"] > 50).flatten(1).all(dim=1)
    assert torch.equal(shifted, b["flip"] == 1)
    assert 0 < int(b["flip"].sum()) < 24
    assert torch.equal(b["x0"][~shifted], torch.from_numpy(moments[b["index"][~shifted].numpy(), :C]))


def test_teacher_is_read_only_while_needed():
    tokens = np.random.default_rng(0).normal(size=(N, 4, 8)).astype(np.float16)
    reader = TokenReader(tokens)
    ds = dataset(teacher=reader, needs_teacher=lambda s: s < 2, batch_size=8)
    has = [("teacher" in ds[s]) for s in range(6)]
    assert has == [True, True, False, False, False, False]
    assert ds.teacher_reads == reader.calls == 2
    b = ds[1]
    assert torch.equal(b["teacher"]["tokens"], torch.from_numpy(tokens[b["index"].numpy()]))


@pytest.mark.parametrize("workers,prefetch", [(0, 0), (0, 3), (1, 2)])
def test_loaders_hand_out_the_items_the_data_defines(workers, prefetch):
    tokens = np.random.default_rng(0).normal(size=(N, 4, 8)).astype(np.float16)
    ds = dataset(teacher=TokenReader(tokens), batch_size=8)
    loader = ds.loader(2, 9, workers, prefetch=prefetch)
    assert isinstance(loader, ThreadLoader) == (workers == 0 and prefetch > 0)
    got = list(loader)
    assert len(got) == 7
    for step, item in zip(range(2, 9), got, strict=True):
        ref = ds.item(step)
        for key in ("x0", "eps", "t", "y", "index", "flip"):
            assert torch.equal(item[key], ref[key]), (step, key)
        assert torch.equal(item["teacher"]["tokens"], ref["teacher"]["tokens"])


def test_store_readers_of_the_job_feed_loader_processes(tmp_path):
    """The training job's readers over real stores pickle into loader processes, which start from a
    fork server: the parent has used tensorstore (writing the stores), and a forked child using it
    would abort."""
    from jobs.train import StoreArrays
    from pipeline.stores.zarr_store import ArraySpec, StoreReader, StoreWriter

    moments, labels = store()
    tokens = np.random.default_rng(1).normal(size=(N, 4, 8)).astype(np.float16)
    writer = StoreWriter(tmp_path / "s.zarr", N, [ArraySpec("moments", moments.shape[1:], "float32"),
                                                  ArraySpec("tokens", (4, 8), "float16"),
                                                  ArraySpec("tokens_scale", (4, 1), "float16")], 16)
    writer.create()
    for a, b in writer.ranges():
        writer.write_range(a, b, {"moments": moments[a:b], "tokens": tokens[a:b], "tokens_scale": tokens[a:b, :, :1]})
    reader = StoreReader(tmp_path / "s.zarr")
    ds = TrainDataset(StoreArrays(reader, "moments"), labels, num_classes=NUM_CLASSES, batch_size=8,
                      teacher=StoreArrays(reader, {"tokens": "tokens", "tokens_scale": "tokens_scale"}))
    ds.item(0)  # the parent reads first
    got = list(ds.loader(0, 4, workers=1, prefetch=2))
    for step, item in enumerate(got):
        idx = ds.indices(step)
        assert torch.equal(item["teacher"]["tokens"], torch.from_numpy(tokens[idx]))
        assert torch.equal(item["teacher"]["tokens_scale"], torch.from_numpy(tokens[idx, :, :1]))
        assert torch.equal(item["x0"], ds.item(step)["x0"])


def test_thread_loader_builds_ahead_raises_in_order_and_stops_when_left():
    built: list[int] = []

    class Items:
        def __getitem__(self, key):
            built.append(key)
            if key == 5:
                raise OSError("shard 5 unreadable")
            return {"step": torch.tensor(key)}

    loader = ThreadLoader(Items(), range(8), depth=2)
    it = iter(loader)
    assert int(next(it)["step"]) == 0
    deadline = time.monotonic() + 5
    while len(built) < 4 and time.monotonic() < deadline:  # 1 handed out + 2 queued + 1 waiting to be queued
        time.sleep(0.01)
    assert built[:4] == [0, 1, 2, 3]
    assert [int(next(it)["step"]) for _ in range(4)] == [1, 2, 3, 4]
    with pytest.raises(OSError, match="shard 5"):  # the failing item's error, after the items before it
        next(it)
    built.clear()
    it = iter(ThreadLoader(Items(), range(100, 10_000), depth=2))
    next(it)
    it.close()  # leaving early: the thread stops after the item it is building
    time.sleep(0.5)
    settled = len(built)
    time.sleep(0.3)
    assert len(built) == settled <= 5


# ----------------------------------------------------------------------------------------------
#                                    EMA and checkpoints
# ----------------------------------------------------------------------------------------------


def test_ema_follows_the_closed_form():
    model = nn.BatchNorm1d(3)  # a parameter and an integer buffer
    with torch.no_grad():
        model.weight.fill_(2.0)
    ema = EMA(model)
    with torch.no_grad():
        model.weight.fill_(5.0)
        model.num_batches_tracked.fill_(7)
    for _ in range(3):
        ema.update(model, 0.9)
    expected = 0.9 ** 3 * 2.0 + (1 - 0.9 ** 3) * 5.0  # s_k = d^k s_0 + (1 - d^k) p
    assert torch.allclose(ema.state_dict()["weight"], torch.full((3,), expected), atol=1e-6)
    assert int(ema.state_dict()["num_batches_tracked"]) == 7
    fresh = ema.copy_to(nn.BatchNorm1d(3))
    assert torch.allclose(fresh.weight, torch.full((3,), expected), atol=1e-6)


def test_checkpoint_save_keep_latest_and_rng(tmp_path):
    for step in (2, 4, 6):
        ckpt.save(tmp_path, step, {"step": step, "w": torch.full((2,), float(step))}, keep=2)
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert names == ["step-000000004.pt", "step-000000006.pt"]  # no temporary files left either
    assert ckpt.latest(tmp_path).name == "step-000000006.pt"
    assert ckpt.load(ckpt.latest(tmp_path))["w"].tolist() == [6.0, 6.0]
    assert ckpt.latest(tmp_path / "nothing") is None

    state = ckpt.rng_state()
    first = (torch.rand(3), np.random.rand(), random.random())
    ckpt.save(tmp_path, 8, {"rng": state})
    torch.rand(5), np.random.rand(2), random.random()
    ckpt.set_rng_state(ckpt.load(tmp_path / "checkpoints" / "step-000000008.pt")["rng"])
    again = (torch.rand(3), np.random.rand(), random.random())
    assert torch.equal(first[0], again[0]) and first[1:] == again[1:]


# ----------------------------------------------------------------------------------------------
#                                          The loop
# ----------------------------------------------------------------------------------------------


def test_loss_decreases(tmp_path):
    summary = training_loop(**loop_args(tmp_path, steps=60, log_every=10, checkpoint_every=60, lr=1e-2))
    losses = [r["loss"] for r in rows(tmp_path)]
    assert len(losses) == 6
    assert losses[-1] < 0.85 * losses[0], losses
    assert summary["step"] == 60 and summary["images_per_s"] > 0


def test_learning_rate_warm_up_and_cool_down_by_hand():
    from pipeline.train.step import learning_rate

    # 10 updates, warm-up 4, cool-down 3: 1/4 2/4 3/4 1 1 1 1 | 3/3 -> 2/3 -> 1/3 of the last three
    got = [learning_rate(s, 2.0, 4, 3, 10) for s in range(10)]
    expected = [0.5, 1.0, 1.5, 2.0, 2.0, 2.0, 2.0, 2.0, 4 / 3, 2 / 3]
    assert got == pytest.approx(expected, rel=1e-12)
    assert [learning_rate(s, 2.0, 0, 0, 10) for s in range(10)] == [2.0] * 10
    # overlapping phases multiply: a 2-update run with warm-up 2 and cool-down 2
    assert [learning_rate(s, 1.0, 2, 2, 2) for s in range(2)] == pytest.approx([0.5, 0.5])
    with pytest.raises(ValueError, match="run length"):
        learning_rate(0, 1.0, 0, 5)  # a cool-down without the run's length would go negative


def test_the_loop_applies_the_cool_down(tmp_path):
    training_loop(**loop_args(tmp_path, steps=6, log_every=1, checkpoint_every=6, lr=0.3, cooldown_steps=3))
    assert [r["lr"] for r in rows(tmp_path)] == pytest.approx([0.3, 0.3, 0.3, 0.3, 0.2, 0.1])


def test_outputs_metrics_checkpoints_and_exports(tmp_path):
    summary = training_loop(**loop_args(tmp_path, steps=7, log_every=2, checkpoint_every=2, keep_checkpoints=2,
                                        ema_decay=1.0))
    assert [r["step"] for r in rows(tmp_path)] == [2, 4, 6, 7]
    for key in ("loss", "fm", "grad_norm", "lr", "images_per_s", "steps_per_s", "data_wait"):
        assert key in rows(tmp_path)[0], key
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-000000006.pt", "step-000000007.pt"]
    assert summary["checkpoint"] == str(tmp_path / "checkpoints" / "step-000000007.pt")
    assert any((tmp_path / "tensorboard").iterdir())
    # ema_decay = 1 freezes the EMA at the initial weights: those of TinyNet built after manual_seed(seed)
    torch.manual_seed(0)
    init = TinyNet().state_dict()
    ema, raw = load_file(tmp_path / "ema.safetensors"), load_file(tmp_path / "model.safetensors")
    assert ema.keys() == init.keys()
    assert all(torch.equal(ema[k], init[k]) for k in init)
    assert not all(torch.equal(raw[k], init[k]) for k in init)
    with safe_open(tmp_path / "ema.safetensors", "pt") as f:
        assert f.metadata() == {"model": "TinyNet", "step": "7"}


def test_grad_accumulation_matches_one_big_batch(tmp_path):
    training_loop(**loop_args(tmp_path / "a", steps=3))
    training_loop(**loop_args(tmp_path / "b", steps=3, grad_accum=2))
    a, b = load_file(tmp_path / "a" / "model.safetensors"), load_file(tmp_path / "b" / "model.safetensors")
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-5, rtol=1e-5)


def test_resume_after_a_crash_is_bitwise_equal(tmp_path):
    full = tmp_path / "full"
    training_loop(**loop_args(full))

    crashed = tmp_path / "crashed"

    def crash_at_4(model, step):
        if step == 4:
            raise KeyboardInterrupt("simulated kill after step 4")

    with pytest.raises(KeyboardInterrupt):
        training_loop(**loop_args(crashed, sample_fn=crash_at_4, sample_every=1))
    assert [p.name for p in (crashed / "checkpoints").iterdir()] == ["step-000000003.pt"]
    assert [r["step"] for r in rows(crashed)] == [1, 2, 3, 4]
    summary = training_loop(**loop_args(crashed, loader_workers=1))  # resumes at 3, data from a loader process
    assert summary["step"] == 6
    for name in ("model.safetensors", "ema.safetensors"):
        a, b = load_file(full / name), load_file(crashed / name)
        assert all(torch.equal(a[k], b[k]) for k in a), name
    assert [r["step"] for r in rows(crashed)] == [1, 2, 3, 4, 5, 6]
    assert [r["loss"] for r in rows(crashed)] == [r["loss"] for r in rows(full)]


def test_resume_from_a_launcher_restored_checkpoint(tmp_path):
    """Under Ray a restarted worker may find the newest checkpoint only in Ray's restored directory."""
    full = tmp_path / "full"
    training_loop(**loop_args(full))
    training_loop(**loop_args(tmp_path / "first", steps=3))
    restored = tmp_path / "restored"
    restored.mkdir()
    shutil.copy(tmp_path / "first" / "checkpoints" / "step-000000003.pt", restored)
    reports = []
    worker = WorkerContext(device=torch.device("cpu"), restore_dir=str(restored),
                           report_fn=lambda m, p: reports.append((m["step"], p)))
    training_loop(**loop_args(tmp_path / "second", worker=worker))
    assert [r["step"] for r in rows(tmp_path / "second")] == [4, 5, 6]
    assert reports == [(6, str(tmp_path / "second" / "checkpoints" / "step-000000006.pt"))]
    a, b = load_file(full / "model.safetensors"), load_file(tmp_path / "second" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_the_loop_reads_no_global_worker_context(tmp_path):
    """Rank, world size, device, report_fn and restore_dir come from the `worker` argument only: an installed context
    (here one that would resume from a restored checkpoint and report) changes nothing."""
    training_loop(**loop_args(tmp_path / "first", steps=3))
    reports = []
    set_context(WorkerContext(rank=1, world_size=2, restore_dir=str(tmp_path / "first"),
                              report_fn=lambda m, p: reports.append(m["step"])))
    try:
        training_loop(**loop_args(tmp_path / "second", steps=3))
    finally:
        set_context(None)
    assert [r["step"] for r in rows(tmp_path / "second")] == [1, 2, 3]  # started at 0, as rank 0 of 1
    assert reports == []


def test_rank_and_world_size_must_match_the_process_group(tmp_path):
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    try:
        with pytest.raises(RuntimeError, match=r"training_loop\(rank=1, world_size=2\) but torch.distributed runs 1"):
            training_loop(**loop_args(tmp_path, worker=WorkerContext(rank=1, world_size=2, device=torch.device("cpu"))))
    finally:
        torch.distributed.destroy_process_group()


class NanAt(FlowMatching):
    """Flow matching whose loss is NaN at step `bad_step`."""

    def __init__(self, bad_step: int):
        super().__init__()
        self.bad_step = bad_step

    def forward(self, model, batch, teacher, step):
        loss, logs = super().forward(model, batch, teacher, step)
        if step == self.bad_step:
            loss = loss * float("nan")
        return loss, {**logs, "loss": loss.detach()}


def test_nan_found_at_a_later_sync_point_names_its_own_step(tmp_path):
    # NaN at update 5; no metrics row until the end: the check at step 8 names step 5 and writes nothing
    with pytest.raises(RuntimeError, match=r"loss is nan at step 5 .*step-000000004\.pt"):
        training_loop(**loop_args(tmp_path, build_objective=lambda m: NanAt(4), checkpoint_every=4, log_every=100,
                                  steps=8))
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-000000004.pt"]
    assert not (tmp_path / "ema.safetensors").exists()


def test_nan_loss_stops_with_a_clear_error(tmp_path):
    with pytest.raises(RuntimeError, match=r"loss is nan at step 5 .*step-000000004\.pt"):
        training_loop(**loop_args(tmp_path, build_objective=lambda m: NanAt(4), checkpoint_every=2, steps=8))
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-000000002.pt", "step-000000004.pt"]
    assert not (tmp_path / "ema.safetensors").exists()
    state = ckpt.load(ckpt.latest(tmp_path))
    assert all(torch.isfinite(v).all() for v in state["model"].values())


class TeacherUntil(nn.Module):
    """Needs teacher targets for steps < tau and records the steps that got them; the loss is plain
    flow matching (the loop's objective interface: forward(model, batch, teacher, step), needs_teacher)."""

    def __init__(self, tau: int):
        super().__init__()
        self.tau, self.seen = tau, []
        self.fm = FlowMatching()

    def needs_teacher(self, step):
        return step < self.tau

    def forward(self, model, batch, teacher, step):
        if teacher is not None:
            assert teacher.tokens.shape == (batch["x0"].shape[0], 4, 8)
            self.seen.append(step)
        return self.fm(model, batch, None, step)


def test_no_teacher_data_after_switch_off(tmp_path):
    tokens = np.random.default_rng(0).normal(size=(N, 4, 8)).astype(np.float16)

    def run(steps):
        ds, obj = dataset(teacher=TokenReader(tokens)), TeacherUntil(tau=2)
        training_loop(**loop_args(tmp_path, steps=steps, dataset=ds, build_objective=lambda m: obj,
                                  teacher_source=lambda arrays: TeacherTargets(tokens=arrays["tokens"].float())))
        return ds, obj

    ds, obj = run(5)
    assert obj.seen == [0, 1] and ds.teacher_reads == 2 and ds.teacher.calls == 2
    ds, obj = run(7)  # resumes at step 5, past tau
    assert obj.seen == [] and ds.teacher_reads == 0 and ds.teacher.calls == 0


class RecordingReader(TokenReader):
    """A teacher reader that appends the sample indices of each call to a file: it runs in whichever
    process builds the batch, loader processes included."""

    def __init__(self, tokens: np.ndarray, log: Path):
        super().__init__(tokens)
        self.log = log

    def __call__(self, indices):
        with open(self.log, "a") as f:
            f.write(" ".join(str(int(i)) for i in indices) + "\n")
        return super().__call__(indices)


class Terminable(TeacherUntil):
    """HASTE-like: aligns until `terminate(step)` (called by the trigger in the training process) or
    tau; records every batch and teacher it is given."""

    def __init__(self, tau: int = 100):
        super().__init__(tau)
        self.stopped_at, self.batches = None, {}

    def needs_teacher(self, step):
        return step < self.tau and (self.stopped_at is None or step < self.stopped_at)

    def terminate(self, step):
        self.stopped_at = self.stopped_at if self.stopped_at is not None else step

    def forward(self, model, batch, teacher, step):
        self.batches[step] = ({k: v.clone() for k, v in batch.items()},
                              teacher.tokens.clone() if teacher is not None else None)
        return super().forward(model, batch, teacher, step)


class StopTrigger:
    """The loop's trigger interface: checks after `checks` updates; the one at `stop` switches alignment off."""

    threshold = 0.0

    def __init__(self, checks: tuple[int, ...], stop: int | None):
        self.checks, self.stop = checks, stop

    def should_check(self, done):
        return done in self.checks

    def check(self, model, objective, batch, teacher):
        return -1.0 if len(objective.batches) == self.stop else 0.5  # batches seen = updates done


@pytest.mark.parametrize("workers,prefetch", [(0, 0), (0, 4), (1, 2), (2, 2)])
@pytest.mark.parametrize("switch", ["tau", "trigger", "checks only"])
def test_no_teacher_bytes_are_read_after_switch_off_with_loader_workers(tmp_path, workers, prefetch, switch):
    # alignment ends at step 4: by tau, or by the trigger's check after 4 updates (it also checks after
    # 2); "checks only": the checks never stop it. Loader processes must read no teacher arrays for a
    # step >= 4, however far ahead they prefetch, and every step must see the batch the data defines.
    steps, end = 10, 4
    tokens = np.random.default_rng(0).normal(size=(N, 4, 8)).astype(np.float16)
    log = tmp_path / "reads.txt"
    log.touch()
    obj = Terminable(tau=end if switch == "tau" else 100)
    trigger = None if switch == "tau" else StopTrigger((2, end), stop=end if switch == "trigger" else None)
    training_loop(**loop_args(tmp_path / "run", steps=steps, checkpoint_every=steps, loader_workers=workers,
                              prefetch=prefetch, dataset=dataset(teacher=RecordingReader(tokens, log)), build_objective=lambda m: obj,
                              teacher_source=lambda arrays: TeacherTargets(tokens=arrays["tokens"].float()),
                              trigger=trigger))

    reference = dataset().layout(8)
    step_of = {tuple(np.unique(reference.indices(s))): s for s in range(steps)}
    assert len(step_of) == steps  # every step reads a different set of samples
    read = sorted(step_of[tuple(int(i) for i in line.split())] for line in log.read_text().splitlines())
    aligned = end if switch != "checks only" else steps
    probes = [] if trigger is None else [0, 0]  # each check probes with step 0's samples
    assert read == sorted(list(range(aligned)) + probes)
    assert sorted(obj.batches) == list(range(steps))
    for s, (batch, teacher) in obj.batches.items():  # the batches are the data's, teacher or not
        item = reference.item(s)
        for key in ("x0", "eps", "t", "y", "index", "flip"):
            assert torch.equal(batch[key], item[key]), (s, key)
        if s < aligned:
            assert torch.equal(teacher, torch.from_numpy(tokens[item["index"].numpy()]).float()), s
        else:
            assert teacher is None, s


class ProbeSpy:
    """The trigger interface of the loop (should_check, check, threshold) with GradientAngleTrigger's
    schedule; records what each check is shown and how many updates ran before it."""

    threshold = -1.0  # never stops

    def __init__(self, start: int, every: int, objective: TeacherUntil, grad_accum: int):
        from pipeline.align import GradientAngleTrigger

        self.schedule = GradientAngleTrigger(start, every)
        self.objective, self.grad_accum, self.calls = objective, grad_accum, []

    def should_check(self, step):
        return self.schedule.should_check(step)

    def check(self, model, objective, batch, teacher):
        updates = len(self.objective.seen) // self.grad_accum  # training micro batches seen so far
        self.calls.append((updates, {k: v.clone() for k, v in batch.items()}, teacher.tokens.clone()))
        return 0.5


def test_trigger_probes_a_fixed_batch_after_start_updates(tmp_path):
    # HASTE's appendix: the gradient angle is measured on a FIXED probe batch; the first check comes
    # after trigger_start updates (not one later), then every trigger_every updates; a resumed run
    # probes with the same batch. The probe is the first micro batch of step 0, recomputed here from
    # the data's definition.
    tokens = np.random.default_rng(0).normal(size=(N, 4, 8)).astype(np.float16)
    source = lambda arrays: TeacherTargets(tokens=arrays["tokens"].float())  # noqa: E731
    reference = dataset(teacher=TokenReader(tokens)).layout(8).item(0)
    probe = {k: v[:4] for k, v in reference.items() if k != "teacher"}

    def run(steps, start, every, run_dir):
        obj = TeacherUntil(tau=100)
        spy = ProbeSpy(start, every, obj, grad_accum=2)
        training_loop(**loop_args(run_dir, steps=steps, grad_accum=2, dataset=dataset(teacher=TokenReader(tokens)),
                                  build_objective=lambda m: obj, teacher_source=source, trigger=spy))
        return spy.calls

    calls = run(7, 2, 2, tmp_path / "a")
    assert [c[0] for c in calls] == [2, 4, 6]
    for _, batch, teacher in calls:
        assert batch.keys() == probe.keys()
        for k in probe:
            torch.testing.assert_close(batch[k], probe[k], rtol=0, atol=0)
        torch.testing.assert_close(teacher, torch.from_numpy(tokens[probe["index"].numpy()]).float())
    assert [r["trigger_cosine"] for r in rows(tmp_path / "a") if "trigger_cosine" in r] == [0.5] * 3

    assert [c[0] for c in run(3, 0, 2, tmp_path / "b")] == [0, 2]  # trigger_start = 0: before any update
    resumed = run(6, 0, 2, tmp_path / "b")  # resumes at step 3 (checkpoint_every = 3)
    assert [c[0] for c in resumed] == [1, 3]  # i.e. after 4 and 6 updates (this objective saw 3 fewer)
    torch.testing.assert_close(resumed[0][1]["x0"], probe["x0"], rtol=0, atol=0)


# ----------------------------------------------------------------------------------------------
#                                     Multi-worker launchers
# ----------------------------------------------------------------------------------------------


def assert_same_weights(a_dir: Path, b_dir: Path) -> None:
    a, b = load_file(a_dir / "model.safetensors"), load_file(b_dir / "model.safetensors")
    torch.manual_seed(0)
    init = TinyNet().state_dict()
    assert not all(torch.equal(a[k], init[k]) for k in a)  # training moved the weights
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-5, rtol=1e-5)


def test_launch_errors_and_torchrun_from_env(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="train.launcher='slurm' is unknown"):
        launcher("slurm")(train_fn, {})
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(key, raising=False)
    with pytest.raises(ValueError, match="torchrun --nproc-per-node"):
        launcher("torchrun")(train_fn, {})
    env = {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29999"}
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    out = launcher("torchrun")(train_fn, {"run_dir": str(tmp_path), "steps": 2}, use_gpu=False)
    assert out["step"] == 2 and (tmp_path / "ema.safetensors").is_file()
    assert current_context() == WorkerContext(device=torch.device("cpu"))  # cleared after the run: the default again


@pytest.mark.slow
def test_two_local_workers_equal_one(tmp_path):
    one = launcher("local")(train_fn, {"run_dir": str(tmp_path / "one"), "steps": 3}, num_workers=1, use_gpu=False)
    two = launcher("local")(train_fn, {"run_dir": str(tmp_path / "two"), "steps": 3}, num_workers=2, use_gpu=False)
    assert one["step"] == two["step"] == 3
    assert_same_weights(tmp_path / "one", tmp_path / "two")


def fail_on_rank_one(config: dict) -> str:
    """A per-worker function whose second rank raises."""
    if current_context().rank == 1:
        raise RuntimeError("rank one broke")
    return "rank zero finished"


@pytest.mark.slow
def test_local_launcher_raises_the_error_of_a_failed_rank():
    with pytest.raises(Exception, match="rank one broke"):
        launcher("local")(fail_on_rank_one, {}, num_workers=2, use_gpu=False)
    assert current_context() == WorkerContext(device=torch.device("cpu"))  # cleared: the default again


@pytest.fixture
def local_ray():
    """A local 3-CPU Ray instance whose workers import this test module; skips where Ray cannot start."""
    ray = pytest.importorskip("ray", reason="ray is not installed")
    try:
        ray.init(num_cpus=3, include_dashboard=False, log_to_driver=False,
                 runtime_env={"env_vars": {"PYTHONPATH": f"{TESTS}:{TESTS.parent}", "RAY_USAGE_STATS_ENABLED": "0"}})
    except Exception as e:  # noqa: BLE001
        pytest.skip(f"a local Ray instance cannot start here: {type(e).__name__}: {e}")
    try:
        yield ray
    finally:
        ray.shutdown()


@pytest.mark.slow
def test_two_ray_workers_equal_one(tmp_path, local_ray):
    launcher("local")(train_fn, {"run_dir": str(tmp_path / "one"), "steps": 3}, num_workers=1, use_gpu=False)
    metrics = launcher("ray")(train_fn, {"run_dir": str(tmp_path / "two"), "steps": 3}, num_workers=2,
                     use_gpu=False, storage_path=str(tmp_path / "ray"), name="equal")
    assert metrics["step"] == 3
    assert_same_weights(tmp_path / "one", tmp_path / "two")
    assert list((tmp_path / "ray" / "equal").glob("checkpoint_*/step-000000003.pt"))


def crash_once_fn(config: dict) -> dict:
    """Train `steps`, checkpointing every 2 steps. The first time through, every rank fails right
    after reporting step `crash_at` to Ray, and rank 0 first deletes the run directory's own
    checkpoints (the disk of a lost node), so only Ray's copy of the checkpoint can resume the run.
    Every rank appends the steps it reports to `{run_dir}/../reports-{rank}`."""
    ctx = current_context()
    root = Path(config["run_dir"]).parent

    def report(metrics: dict, path: str | None) -> None:
        ctx.report_fn(metrics, path)
        step = int(metrics["step"])
        with open(root / f"reports-{ctx.rank}", "a") as f:
            f.write(f"{step}\n")
        crashed = root / f"crashed-{ctx.rank}"
        if step == config["crash_at"] and not crashed.exists():
            crashed.touch()
            if ctx.rank == 0:
                shutil.rmtree(Path(config["run_dir"]) / "checkpoints")
            raise RuntimeError(f"rank {ctx.rank} fails on purpose after step {step}")

    return training_loop(**loop_args(config["run_dir"], steps=config["steps"], checkpoint_every=2,
                                     worker=dataclasses.replace(ctx, report_fn=report)))


@pytest.mark.slow
def test_ray_restarts_a_failed_worker_group_from_its_reported_checkpoint(tmp_path, local_ray):
    launcher("local")(train_fn, {"run_dir": str(tmp_path / "one" / "run"), "steps": 6}, num_workers=1, use_gpu=False)
    metrics = launcher("ray")(crash_once_fn, {"run_dir": str(tmp_path / "two" / "run"), "steps": 6, "crash_at": 4},
                     num_workers=2, use_gpu=False, storage_path=str(tmp_path / "ray"), name="restart",
                     max_failures=1)
    assert metrics["step"] == 6
    for rank in range(2):  # steps 2 and 4, the failure, then only step 6: resumed at 4, not restarted at 0
        assert (tmp_path / "two" / f"reports-{rank}").read_text().split() == ["2", "4", "6"]
        assert (tmp_path / "two" / f"crashed-{rank}").exists()
    assert_same_weights(tmp_path / "one" / "run", tmp_path / "two" / "run")


# ----------------------------------------------------------------------------------------------
#                          Every objective with a real backbone learns
# ----------------------------------------------------------------------------------------------


class AttnReader(ArrayReader):
    """Teacher arrays: tokens [n, T, D] and attention logits [n, L, heads, T, T]."""

    def __init__(self, tokens: np.ndarray, logits: np.ndarray):
        super().__init__(tokens)
        self.logits = logits

    def __call__(self, indices):
        return {"tokens": super().__call__(indices), "attn": self.logits[indices]}


@pytest.mark.parametrize("align, model", [("none", "SiT-T/2"), ("repa", "SiT-T/2"), ("urepa", "SiTDown-T/2"),
                                          ("haste", "SiT-T/2")])
def test_each_objective_lowers_its_loss_with_a_real_backbone(tmp_path, align, model):
    from pipeline.align.registry import build_objective
    from pipeline.models import build_model
    from schemas.config import AlignConfig

    n, d, grid, heads = 16, 32, (2, 2), 6
    rng = np.random.default_rng(0)
    # latents [n, 2C, 4, 4]; patch 2 -> a 2x2 token grid, the teacher's grid
    moments, labels = store(n, std=0.05)
    tokens = rng.normal(size=(n, 4, d)).astype(np.float32)
    logits = rng.normal(size=(n, 4, heads, 4, 4)).astype(np.float32) * 3
    kw = dict(input_size=H, in_channels=C, num_classes=NUM_CLASSES)
    if align == "haste":
        kw.update(depth=8, num_heads=6, hidden_size=48)
    cfg = AlignConfig(depth=8 if align == "haste" else 2, projector_dim=64, tau=10_000)
    data = TrainDataset(ArrayReader(moments), labels, num_classes=NUM_CLASSES, seed=0, scale=1.0,
                        teacher=None if align == "none" else AttnReader(tokens, logits))

    def source(arrays):
        attn = arrays.get("attn")
        return TeacherTargets(tokens=arrays["tokens"].float(), grid=grid,
                              attn_logits=tuple(attn[:, i] for i in range(attn.shape[1])) if align == "haste" else ())

    def objective(m):
        return build_objective(align, m, cfg, path="linear", teacher_dim=d, teacher_grid=grid, teacher_heads=heads)

    training_loop(**loop_args(tmp_path, build_model=lambda: build_model(model, **kw), build_objective=objective,
                              dataset=data, teacher_source=source, steps=40, log_every=10,
                              checkpoint_every=40, lr=2e-3))
    losses = [r["loss"] for r in rows(tmp_path)]
    assert losses[-1] < losses[0] - 0.05, losses
    if align != "none":
        terms = [k for k in rows(tmp_path)[0] if k not in ("step", "loss", "fm", "grad_norm", "lr", "steps_per_s",
                                                               "images_per_s", "data_wait")]
        assert terms, rows(tmp_path)[0]


def test_exported_weights_are_the_same_bytes_whatever_the_metadata_order(tmp_path):
    """The safetensors library writes metadata in hash-map order, which changes between processes; the
    export rewrites the header in one order, so equal weights give equal files, and they still load."""
    from safetensors.torch import save as safetensors_bytes

    weights = {"b": torch.arange(3.0), "a": torch.ones(2, 2, dtype=torch.float16)}
    one = ckpt.canonical_safetensors(safetensors_bytes(weights, metadata={"x": "1", "y": "2", "z": "3"}))
    two = ckpt.canonical_safetensors(safetensors_bytes(weights, metadata={"z": "3", "y": "2", "x": "1"}))
    assert one == two and int.from_bytes(one[:8], "little") % 8 == 0
    path = tmp_path / "w.safetensors"
    path.write_bytes(one)
    with safe_open(path, "pt") as f:
        assert f.metadata() == {"x": "1", "y": "2", "z": "3"}
        assert torch.equal(f.get_tensor("b"), weights["b"]) and torch.equal(f.get_tensor("a"), weights["a"])
