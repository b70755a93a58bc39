"""The loop's pieces on their own: one update (train_step), the training state in a checkpoint, the
choice of the checkpoint to resume from, and the per-step teacher decision of the loader.

CPU stand-ins of tests/test_train_loop.py: TinyNet, flow matching, in-memory arrays.
"""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from pipeline.align.base import FlowMatching
from pipeline.train import checkpoint as ckpt
from pipeline.train.data import StepSampler
from pipeline.train.ema import EMA
from pipeline.train.loop import TeacherReads, training_loop
from pipeline.train.step import learning_rate, train_step
from tests.test_train_loop import NanAt, TinyNet, dataset, loop_args, rows

LR = 3e-3


# ----------------------------------------------------------------------------------------------
#                                          Helpers
# ----------------------------------------------------------------------------------------------


def fresh(seed: int = 0, objective=None):
    """model, objective, AdamW and EMA built the way training_loop builds them."""
    torch.manual_seed(seed)
    model = TinyNet().train()
    objective = (objective or FlowMatching()).train()
    params = [p for p in model.parameters() if p.requires_grad] + [p for p in objective.parameters() if p.requires_grad]
    return model, objective, torch.optim.AdamW(params, lr=LR, weight_decay=0.0), EMA(model)


def update(state, batch, step, **kw):
    model, objective, optimizer, ema = state
    return train_step(net=model, model=model, objective=objective, optimizer=optimizer, ema=ema, batch=batch,
                      step=step, lr=learning_rate(step, LR, 0), grad_clip=1.0, ema_decay=0.9, **kw)


# ----------------------------------------------------------------------------------------------
#                                        One update
# ----------------------------------------------------------------------------------------------


def test_train_step_is_the_loops_update(tmp_path):
    training_loop(**loop_args(tmp_path, steps=3))  # lr 3e-3, clip 1, EMA 0.9, batch 8, fp32, cpu
    state, data = fresh(), dataset().layout(8)
    results = [update(state, data[s], s) for s in range(3)]
    model, _, _, ema = state
    raw, averaged = load_file(tmp_path / "model.safetensors"), load_file(tmp_path / "ema.safetensors")
    assert all(torch.equal(raw[k], v) for k, v in model.state_dict().items())
    assert all(torch.equal(averaged[k], v) for k, v in ema.state_dict().items())
    assert [float(r.logs["loss"]) for r in results] == [r["loss"] for r in rows(tmp_path)]
    assert [float(r.loss) for r in results] == [r["loss"] for r in rows(tmp_path)]
    assert all(r.grad_norm.ndim == 0 and not r.bad for r in results)


def test_train_step_splits_into_micro_batches(tmp_path):
    data = dataset().layout(8)
    one, two = fresh(), fresh()
    for s in range(2):
        update(one, data[s], s)
        update(two, data[s], s, grad_accum=2)
    for a, b in zip(one[0].parameters(), two[0].parameters(), strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    with pytest.raises(RuntimeError, match="does not split into 3 micro batches"):
        update(fresh(), data[0], 0, grad_accum=3)


def test_train_step_flags_a_non_finite_loss_without_a_sync():
    data = dataset().layout(8)
    state = fresh(objective=NanAt(1))
    assert not update(state, data[0], 0).bad
    result = update(state, data[1], 1)
    assert isinstance(result.bad, torch.Tensor) and bool(result.bad) and torch.isnan(result.loss)


# ----------------------------------------------------------------------------------------------
#                                  Training state and resume
# ----------------------------------------------------------------------------------------------


def test_training_state_round_trip(tmp_path):
    data = dataset().layout(8)
    state = fresh()
    for s in range(2):
        update(state, data[s], s)
    model, objective, optimizer, ema = state
    path = ckpt.save_training_state(tmp_path, 2, model=model, ema=ema, optimizer=optimizer, objective=objective,
                                    scaler=None, world_size=1, data_seed=0, batch_size=8)
    saved = ckpt.load(path)
    assert list(saved) == ["step", "model", "ema", "optimizer", "objective", "scaler", "rng", "world_size", "data"]
    assert saved["data"] == {"seed": 0, "batch_size": 8, "step": 2} and saved["scaler"] == {}
    expected_rng = torch.get_rng_state()

    other = fresh(seed=1)
    torch.rand(7)
    restored = ckpt.load_training_state(path, model=other[0], objective=other[1], optimizer=other[2], ema=other[3],
                                        scaler=None, data_seed=0, batch_size=8)
    assert restored.step == 2 and restored.path == path
    assert torch.equal(restored.rng["torch"], expected_rng)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), other[0].state_dict().values(), strict=True))
    assert all(torch.equal(ema.state_dict()[k], v) for k, v in other[3].state_dict().items())
    assert other[2].state_dict()["state"].keys() == optimizer.state_dict()["state"].keys()
    # the restored run continues exactly like the original
    a, b = update(state, data[2], 2), update(other, data[2], 2)
    assert torch.equal(a.loss, b.loss)
    assert all(torch.equal(x, y) for x, y in zip(model.parameters(), other[0].parameters(), strict=True))

    with pytest.raises(ValueError, match="data seed 0 and batch size 8, this run has 1 and 8"):
        ckpt.load_training_state(path, model=other[0], objective=other[1], optimizer=other[2], ema=other[3],
                                 scaler=None, data_seed=1, batch_size=8)


def test_resume_path_prefers_the_newest_of_run_and_restored_checkpoints(tmp_path):
    run, restored = tmp_path / "run", tmp_path / "restored"
    assert ckpt.resume_path("auto", run) is None
    ckpt.save(run, 2, {"step": 2})
    ckpt.save(restored, 4, {"step": 4})
    assert ckpt.resume_path("auto", run) == ckpt.checkpoint_path(run, 2)
    assert ckpt.resume_path("auto", run, restored) == ckpt.checkpoint_path(restored, 4)
    assert ckpt.resume_path("never", run, restored) is None
    assert ckpt.resume_path(str(ckpt.checkpoint_path(run, 2)), run, restored) == ckpt.checkpoint_path(run, 2)
    ckpt.remove_all(run)
    assert ckpt.latest(run) is None


# ----------------------------------------------------------------------------------------------
#                                Teacher decision per step
# ----------------------------------------------------------------------------------------------


def test_step_sampler_keys_carry_the_decision_of_this_process():
    assert list(StepSampler(2, 5)) == [2, 3, 4]
    switched = {"off": False}
    keys = iter(StepSampler(2, 6, read_teacher=lambda s: not switched["off"]))
    assert next(keys) == (2, True)
    switched["off"] = True  # decided between two requests: the next key already knows
    assert list(keys) == [(3, False), (4, False), (5, False)]
    data = dataset(teacher=lambda idx: {"tokens": torch.zeros(len(idx), 1).numpy()}).layout(8)
    assert "teacher" in data[(1, True)] and "teacher" not in data[(1, False)] and "teacher" in data[1]


class Checks:
    def __init__(self, *at):
        self.at = at

    def should_check(self, done):
        return done in self.at


def test_teacher_reads_defer_steps_behind_a_pending_trigger_check():
    aligning = {"until": 100}
    reads = TeacherReads(lambda s: s < aligning["until"], Checks(0, 3), checked=-1)
    assert [reads(s) for s in range(3)] == [False] * 3  # the check before the first update has not run
    reads.checked = 0
    assert [reads(s) for s in range(3, 6)] == [False] * 3  # behind the check after 3 updates
    reads.checked = 3
    assert reads(6) and not reads.take(6)  # nothing pending: read by the loader, not deferred
    aligning["until"] = 3  # the check after 3 updates switched alignment off from step 3
    assert [reads.take(s) for s in range(6)] == [True, True, True, False, False, False]
    assert not reads.take(0)  # taken once
    assert TeacherReads(lambda s: s < 2, None, checked=-1)(1) and not TeacherReads(lambda s: s < 2, None, -1)(2)
