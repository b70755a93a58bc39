"""Alignment objectives: losses against plain loops and hand-computed values, heads, the objectives
on a tiny stand-in backbone (gradients, HASTE phases, grid resizing), the registry checks and the
gradient-angle trigger."""

from __future__ import annotations

import io
import math

import pytest
import torch
import torch.nn as nn

from pipeline.align import (
    HASTE,
    REPA,
    AlignmentError,
    FlowMatching,
    GradientAngleTrigger,
    Projector,
    URepa,
    align_to_grid,
    attention_ce,
    build_objective,
    build_trigger,
    check_compatible,
    manifold_loss,
    objective_class,
    repa_loss,
)
from pipeline.align.heads import ConvProjector
from pipeline.align.losses import spatial_normalize
from pipeline.models.output import ModelOutput
from pipeline.teachers.targets import TeacherTargets
from schemas.config import AlignConfig

# ----------------------------------------------------------------------------------------------
#                                  Independent references
# ----------------------------------------------------------------------------------------------


def _cos(a: list[float], b: list[float]) -> float:
    dot = sum(x * y for x, y in zip(a, b, strict=True))
    return dot / (math.sqrt(sum(x * x for x in a)) * math.sqrt(sum(y * y for y in b)))


def repa_ref(s: torch.Tensor, t: torch.Tensor) -> float:
    B, T, _ = s.shape
    total = sum(-_cos(s[b, n].tolist(), t[b, n].tolist()) for b in range(B) for n in range(T))
    return total / (B * T)


def manifold_ref(s: torch.Tensor, t: torch.Tensor, over: str) -> float:
    B, T, _ = s.shape
    if over == "tokens":
        per = []
        for b in range(B):
            acc = 0.0
            for i in range(T):
                for j in range(T):
                    d = _cos(t[b, i].tolist(), t[b, j].tolist()) - _cos(s[b, i].tolist(), s[b, j].tolist())
                    acc += d * d
            per.append(acc / (T * T))
        return sum(per) / B
    per = []
    for n in range(T):
        acc = 0.0
        for a in range(B):
            for c in range(B):
                d = _cos(t[a, n].tolist(), t[c, n].tolist()) - _cos(s[a, n].tolist(), s[c, n].tolist())
                acc += d * d
        per.append(acc / (B * B))
    return sum(per) / T


def attention_ce_ref(s: torch.Tensor, t: torch.Tensor) -> float:
    B, H, T, _ = s.shape
    total = 0.0
    for b in range(B):
        for h in range(H):
            for q in range(T):
                ts, ss = t[b, h, q].tolist(), s[b, h, q].tolist()
                zt = sum(math.exp(v) for v in ts)
                ms = max(ss)
                lse = ms + math.log(sum(math.exp(v - ms) for v in ss))
                total += -sum(math.exp(tv) / zt * (sv - lse) for tv, sv in zip(ts, ss, strict=True))
    return total / (B * H * T)


# ----------------------------------------------------------------------------------------------
#                                          Losses
# ----------------------------------------------------------------------------------------------

S22 = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])  # [B=1, T=2, D=2]
T22 = torch.tensor([[[1.0, 0.0], [1.0, 1.0]]])


def test_repa_loss_hand_and_loops():
    # cos = 1 and 1/sqrt(2): loss = -(1 + 0.70711) / 2
    assert repa_loss(S22, T22).item() == pytest.approx(-(1 + 2**-0.5) / 2, abs=1e-6)
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(3, 5, 4, generator=g), torch.randn(3, 5, 4, generator=g)
    out = repa_loss(s, t)
    assert out.ndim == 0 and out.dtype == torch.float32
    assert out.item() == pytest.approx(repa_ref(s, t), abs=1e-6)
    assert repa_loss(s.half(), t.half()).dtype == torch.float32
    with pytest.raises(ValueError, match="same shape"):
        repa_loss(s, t[:, :4])


def test_manifold_loss_hand_and_loops():
    # tokens: S_s = I, S_t off-diagonal 1/sqrt(2): two entries of 1/2 out of 4 -> 0.25
    assert manifold_loss(S22, T22, over="tokens").item() == pytest.approx(0.25, abs=1e-6)
    # samples: the same vectors as a batch of 2 images with one token each -> the same 2x2 matrices
    assert manifold_loss(S22.transpose(0, 1), T22.transpose(0, 1), over="samples").item() == pytest.approx(
        0.25, abs=1e-6
    )
    assert manifold_loss(T22, T22).item() == pytest.approx(0.0, abs=1e-7)
    g = torch.Generator().manual_seed(1)
    s, t = torch.randn(3, 4, 5, generator=g), torch.randn(3, 4, 5, generator=g)
    for over in ("tokens", "samples"):
        assert manifold_loss(s, t, over=over).item() == pytest.approx(manifold_ref(s, t, over), abs=1e-6)
    assert manifold_loss(s, t, "tokens").item() != pytest.approx(manifold_loss(s, t, "samples").item())
    with pytest.raises(ValueError, match="over"):
        manifold_loss(s, t, over="pairs")


def test_attention_ce_hand_and_loops():
    # row 0: p_t = (1/2, 1/2), p_s = (1/4, 3/4); row 1: p_t = (1/2, 1/2), p_s = (1/2, 1/2)
    student = torch.tensor([[[[0.0, math.log(3.0)], [0.0, 0.0]]]])
    teacher = torch.zeros(1, 1, 2, 2)
    row0 = -0.5 * (math.log(0.25) + math.log(0.75))
    row1 = math.log(2.0)
    assert attention_ce(student, teacher).item() == pytest.approx((row0 + row1) / 2, abs=1e-6)
    g = torch.Generator().manual_seed(2)
    s, t = 3 * torch.randn(2, 3, 4, 4, generator=g), 3 * torch.randn(2, 3, 4, 4, generator=g)
    assert attention_ce(s, t).item() == pytest.approx(attention_ce_ref(s, t), abs=1e-5)
    assert attention_ce(s.bfloat16(), t.bfloat16()).dtype == torch.float32


# ----------------------------------------------------------------------------------------------
#                                          Heads
# ----------------------------------------------------------------------------------------------


def test_projector_shape_and_layers():
    proj = Projector(6, 5, hidden=7)
    assert proj(torch.randn(2, 3, 6)).shape == (2, 3, 5)
    kinds = [type(m) for m in proj]
    assert kinds == [nn.Linear, nn.SiLU, nn.Linear, nn.SiLU, nn.Linear]
    assert (proj[0].in_features, proj[2].in_features, proj[4].out_features) == (6, 7, 5)
    assert Projector(6, 5)[0].out_features == 2048


def test_align_to_grid_nearest_and_bilinear():
    # 2x2 map with values 0..3 (one channel), tokens row-major
    tokens = torch.arange(4.0).reshape(1, 4, 1)
    up = align_to_grid(tokens, (2, 2), (4, 4), "nearest")
    expected = [[0, 0, 1, 1], [0, 0, 1, 1], [2, 2, 3, 3], [2, 2, 3, 3]]
    assert up.shape == (1, 16, 1)
    assert up[0, :, 0].reshape(4, 4).tolist() == expected
    # 4x4 -> 2x2 nearest picks source rows/cols floor(i * 2) = 0, 2
    big = torch.arange(16.0).reshape(1, 16, 1)
    assert align_to_grid(big, (4, 4), (2, 2), "nearest")[0, :, 0].tolist() == [0, 2, 8, 10]
    # bilinear 2x downsampling with align_corners=False and no antialias is a 2x2 average
    x = torch.randn(2, 16, 3)
    down = align_to_grid(x, (4, 4), (2, 2), "bilinear")
    grid = x.reshape(2, 4, 4, 3)
    ref = torch.stack([
        grid[:, 2 * i:2 * i + 2, 2 * j:2 * j + 2].mean(dim=(1, 2)) for i in range(2) for j in range(2)
    ], dim=1)
    torch.testing.assert_close(down, ref)
    # non-square, channels kept apart
    assert align_to_grid(torch.randn(1, 6, 5), (2, 3), (4, 6), "bicubic").shape == (1, 24, 5)
    assert align_to_grid(x, (4, 4), (4, 4)) is x
    with pytest.raises(ValueError, match="h\\*w"):
        align_to_grid(x, (3, 3), (4, 4))


# ----------------------------------------------------------------------------------------------
#                                   Stand-in backbones
# ----------------------------------------------------------------------------------------------


class TinyStudent(nn.Module):
    """x [B, C, S, S] -> one token per pixel, `depth` residual Linear blocks, a linear read-out.

    Block i also has q/k projections so attn_layers returns real pre-softmax logits. With
    `half_blocks`, the hidden state after those (1-indexed) blocks is returned 2x2-average-pooled
    on the half grid, like a U-Net's middle stage. Every call is recorded in `calls`.
    """

    name = "Tiny"

    def __init__(self, channels=2, size=4, width=8, depth=4, heads=3, half_blocks=(), attention=True):
        super().__init__()
        self.channels, self.size, self.hidden_size, self.depth, self.num_heads = channels, size, width, depth, heads
        self.supports_attention = attention
        self.default_align_depth = 2
        self.half_blocks = set(half_blocks)
        self.embed = nn.Linear(channels, width)
        self.t_embed = nn.Linear(1, width)
        self.y_embed = nn.Embedding(11, width)
        self.blocks = nn.ModuleList([nn.Linear(width, width) for _ in range(depth)])
        self.qk = nn.ModuleList([nn.Linear(width, 2 * heads * 2) for _ in range(depth)])
        self.out = nn.Linear(width, channels)
        self.calls: list[tuple[int | None, tuple[int, ...]]] = []

    def align_grid(self, depth):
        half = self.size // 2
        return (half, half) if depth in self.half_blocks else (self.size, self.size)

    def forward(self, x, t, y, *, align_depth=None, attn_layers=()):
        self.calls.append((align_depth, tuple(attn_layers)))
        B = x.shape[0]
        h = self.embed(x.flatten(2).transpose(1, 2)) + self.t_embed(t[:, None])[:, None] + self.y_embed(y)[:, None]
        hidden, logits = None, {}
        for i, block in enumerate(self.blocks):
            if i in attn_layers:
                q, k = self.qk[i](h).reshape(B, -1, 2, self.num_heads, 2).permute(2, 0, 3, 1, 4)
                logits[i] = q @ k.transpose(-1, -2) / math.sqrt(2)
            h = h + torch.tanh(block(h))
            if align_depth == i + 1:
                hidden = h
                if align_depth in self.half_blocks:
                    fmap = h.transpose(1, 2).reshape(B, -1, self.size, self.size)
                    hidden = nn.functional.avg_pool2d(fmap, 2).flatten(2).transpose(1, 2)
        v = self.out(h).transpose(1, 2).reshape_as(x)
        return ModelOutput(v, hidden, tuple(logits[i] for i in attn_layers))


def make_batch(B=3, C=2, S=4, seed=0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "x0": torch.randn(B, C, S, S, generator=g),
        "eps": torch.randn(B, C, S, S, generator=g),
        "t": torch.rand(B, generator=g),
        "y": torch.randint(0, 10, (B,), generator=g),
    }


def make_teacher(B=3, grid=(4, 4), D=5, heads=2, layers=2, seed=1) -> TeacherTargets:
    g = torch.Generator().manual_seed(seed)
    T = grid[0] * grid[1]
    return TeacherTargets(
        torch.randn(B, T, D, generator=g),
        tuple(torch.randn(B, heads, T, T, generator=g) for _ in range(layers)),
        grid,
    )


def cfg(**kw) -> AlignConfig:
    base = dict(depth=2, projector_dim=16, student_layers=[0, 1], teacher_layers=[8, 9], tau=5)
    return AlignConfig(**{**base, **kw})


def fm_ref(model: TinyStudent, batch) -> torch.Tensor:
    """Linear path: x_t = (1 - t) x0 + t eps, v = eps - x0, MSE per sample then mean."""
    t = batch["t"][:, None, None, None]
    x_t = (1 - t) * batch["x0"] + t * batch["eps"]
    v = model(x_t, batch["t"], batch["y"]).velocity
    return ((v - (batch["eps"] - batch["x0"])) ** 2).flatten(1).mean(1).mean()


def haste(model, **kw) -> HASTE:
    return build_objective("haste", model, cfg(**kw), path="linear", teacher_dim=5, teacher_grid=(4, 4),
                           teacher_heads=2)


# ----------------------------------------------------------------------------------------------
#                                        Objectives
# ----------------------------------------------------------------------------------------------


def test_flow_matching_matches_reference():
    torch.manual_seed(0)
    model, batch = TinyStudent(), make_batch()
    obj = build_objective("none", model, cfg(), path="linear", teacher_dim=None, teacher_grid=None,
                          teacher_heads=None)
    assert isinstance(obj, FlowMatching) and obj.align_depth is None and not obj.needs_teacher(0)
    loss, logs = obj(model, batch, None, 0)
    assert set(logs) == {"loss", "fm"}
    torch.testing.assert_close(loss, fm_ref(model, batch))


@pytest.mark.parametrize("align", ["repa", "urepa", "haste"])
def test_projector_starts_as_repas_xavier_uniform_with_zero_biases(align):
    # REPA's projectors live inside its SiT, whose initialize_weights gives every nn.Linear
    # xavier_uniform_ weights, U(-b, b) with b = sqrt(6 / (fan_in + fan_out)), and zero biases.
    # PyTorch's default (kaiming-uniform, b = 1 / sqrt(fan_in), random biases) fails every check.
    torch.manual_seed(0)
    obj = build_objective(align, TinyStudent(), cfg(projector_dim=1024), path="linear", teacher_dim=5,
                          teacher_grid=(4, 4), teacher_heads=2)
    linears = [m for m in obj.projector if isinstance(m, nn.Linear)]
    assert [tuple(m.weight.shape) for m in linears] == [(1024, 8), (1024, 1024), (5, 1024)]
    for layer in linears:
        fan_out, fan_in = layer.weight.shape
        bound = math.sqrt(6.0 / (fan_in + fan_out))
        w = layer.weight.detach().double()
        assert torch.count_nonzero(layer.bias) == 0
        assert bound * 0.98 < w.abs().max().item() <= bound
        assert abs(w.var().item() / (bound**2 / 3) - 1) < 0.06  # the variance of U(-b, b)
        assert abs(w.mean().item()) < 4 * bound / math.sqrt(3 * w.numel())


def test_repa_loss_composition_and_gradients_stop_at_aligned_block():
    torch.manual_seed(0)
    model, batch, teacher = TinyStudent(depth=4), make_batch(), make_teacher()
    obj = build_objective("repa", model, cfg(depth=2, coeff=0.5), path="linear", teacher_dim=5,
                          teacher_grid=(4, 4), teacher_heads=None)
    assert isinstance(obj, REPA) and obj.align_depth == 2 and obj.needs_teacher(10**9)
    assert all(name.startswith("projector.") for name, _ in obj.named_parameters())
    loss, logs = obj(model, batch, teacher, 0)
    assert set(logs) == {"loss", "fm", "repa"} and not logs["repa"].requires_grad
    torch.testing.assert_close(logs["fm"], fm_ref(model, batch).detach())
    torch.testing.assert_close(loss, logs["fm"] + 0.5 * logs["repa"])
    assert model.calls[-2] == (2, ())  # the objective's call (fm_ref made the last one)

    model.zero_grad()
    terms = obj.terms(model, batch, teacher, aligned=True)
    terms.parts["repa"].backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in obj.projector.parameters())
    for i, block in enumerate(model.blocks):
        reached = block.weight.grad is not None and block.weight.grad.abs().sum() > 0
        assert reached == (i < 2), f"block {i} (1-indexed {i + 1}), align_depth 2"
    assert model.out.weight.grad is None and model.embed.weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="pass its TeacherTargets"):
        obj(model, batch, None, 0)


def test_repa_resizes_any_student_grid_to_teacher_grid():
    torch.manual_seed(0)
    model, batch, teacher = TinyStudent(half_blocks={2}), make_batch(), make_teacher()
    obj = build_objective("repa", model, cfg(resize="nearest"), path="linear", teacher_dim=5,
                          teacher_grid=(4, 4), teacher_heads=None)
    assert obj.student_grid == (2, 2)
    _, logs = obj(model, batch, teacher, 0)
    t = batch["t"][:, None, None, None]
    hidden = model((1 - t) * batch["x0"] + t * batch["eps"], batch["t"], batch["y"], align_depth=2).hidden
    proj = obj.projector(hidden)  # [B, 4, 5] on 2x2, nearest-upsampled by hand to 4x4
    up = torch.stack([proj[:, (i // 2) * 2 + (j // 2)] for i in range(4) for j in range(4)], dim=1)
    assert logs["repa"].item() == pytest.approx(repa_ref(up.detach(), teacher.tokens), abs=1e-5)


def test_urepa_different_grids_and_composition():
    torch.manual_seed(0)
    model, batch, teacher = TinyStudent(half_blocks={2}), make_batch(), make_teacher()
    obj = build_objective("urepa", model, cfg(depth=0, manifold_weight=3.0, coeff=0.5), path="linear",
                          teacher_dim=5, teacher_grid=(4, 4), teacher_heads=None)
    assert isinstance(obj, URepa) and obj.align_depth == model.default_align_depth == 2
    assert obj.student_grid == (2, 2) and obj.teacher_grid == (4, 4)
    loss, logs = obj(model, batch, teacher, 0)
    assert set(logs) == {"loss", "fm", "repa", "manifold"}
    torch.testing.assert_close(loss, logs["fm"] + 0.5 * (logs["repa"] + 3.0 * logs["manifold"]))
    # projector first (on 2x2), then bilinear resize to 4x4
    t = batch["t"][:, None, None, None]
    hidden = model((1 - t) * batch["x0"] + t * batch["eps"], batch["t"], batch["y"], align_depth=2).hidden
    student = align_to_grid(obj.projector(hidden), (2, 2), (4, 4), "bilinear").detach()
    assert logs["manifold"].item() == pytest.approx(manifold_ref(student, teacher.tokens, "tokens"), abs=1e-5)
    loss.backward()
    assert obj.projector[0].weight.grad is not None

    samples = build_objective("urepa", model, cfg(manifold_over="samples"), path="linear", teacher_dim=5,
                              teacher_grid=(4, 4), teacher_heads=None)
    samples.load_state_dict(obj.state_dict())
    _, logs2 = samples(model, batch, teacher, 0)
    assert logs2["manifold"].item() == pytest.approx(manifold_ref(student, teacher.tokens, "samples"), abs=1e-5)


def test_haste_phase_one_terms():
    torch.manual_seed(0)
    model, batch, teacher = TinyStudent(heads=3), make_batch(), make_teacher(heads=2)
    obj = haste(model, coeff=0.5, attn_coeff=0.25)
    assert HASTE.teacher_blocks(cfg()) == (8, 9) and obj.needs_teacher(4)
    loss, logs = obj(model, batch, teacher, 4)
    assert model.calls[-1] == (2, (0, 1)) and set(logs) == {"loss", "fm", "repa", "attn"}
    torch.testing.assert_close(loss, logs["fm"] + 0.5 * logs["repa"] + 0.25 * logs["attn"])
    t = batch["t"][:, None, None, None]
    out = model((1 - t) * batch["x0"] + t * batch["eps"], batch["t"], batch["y"], attn_layers=(0, 1))
    ref = sum(attention_ce_ref(s[:, :2].detach(), tl) for s, tl in zip(out.attn_logits, teacher.attn_logits, strict=True)) / 2
    assert logs["attn"].item() == pytest.approx(ref, abs=1e-5)
    with pytest.raises(ValueError, match="attention logits"):
        obj(model, batch, teacher._replace(attn_logits=teacher.attn_logits[:1]), 0)


class Untouchable:
    def __getattr__(self, name):
        raise AssertionError(f"teacher.{name} read after termination")


def test_haste_after_tau_is_plain_flow_matching():
    torch.manual_seed(0)
    model, batch = TinyStudent(), make_batch()
    obj = haste(model, tau=5)
    assert not obj.needs_teacher(5) and not obj.needs_teacher(10**6)
    for teacher in (None, Untouchable()):
        model.calls.clear()
        loss, logs = obj(model, batch, teacher, 5)
        assert model.calls == [(None, ())]
        assert set(logs) == {"loss", "fm"}
        assert torch.equal(loss, fm_ref(model, batch))
    loss.backward()
    assert all(p.grad is None for p in obj.parameters())


def test_haste_terminate_persists_through_state_dict():
    model, batch = TinyStudent(), make_batch()
    obj = haste(model, tau=100)
    assert obj.needs_teacher(3) and obj.terminated_at is None
    obj.terminate(3)
    obj.terminate(7)  # the first call wins
    assert not obj.needs_teacher(4) and obj.terminated_at == 3
    buf = io.BytesIO()
    torch.save(obj.state_dict(), buf)
    buf.seek(0)
    fresh = haste(model, tau=100)
    assert fresh.needs_teacher(4)
    fresh.load_state_dict(torch.load(buf, weights_only=True))
    assert not fresh.needs_teacher(4) and fresh.terminated_at == 3
    model.calls.clear()
    fresh(model, batch, None, 4)
    assert model.calls == [(None, ())]


# ----------------------------------------------------------------------------------------------
#                                    Registry and checks
# ----------------------------------------------------------------------------------------------


def test_registry_errors():
    kw = dict(teacher_dim=5, teacher_grid=(4, 4), teacher_heads=2)
    with pytest.raises(AlignmentError, match="supports_attention is False"):
        check_compatible("haste", TinyStudent(attention=False), cfg(), **kw)
    with pytest.raises(AlignmentError, match="num_heads=1"):
        build_objective("haste", TinyStudent(heads=1), cfg(), path="linear", **kw)
    with pytest.raises(AlignmentError, match="student_layers contains 4"):
        check_compatible("haste", TinyStudent(depth=4), cfg(student_layers=[3, 4]), **kw)
    with pytest.raises(AlignmentError, match="teacher_layers contains 12"):
        check_compatible("haste", TinyStudent(), cfg(teacher_layers=[11, 12]), teacher_depth=12, **kw)
    with pytest.raises(AlignmentError, match="grid"):
        check_compatible("haste", TinyStudent(half_blocks={2}), cfg(student_layers=[0, 1]), **kw)
    with pytest.raises(AlignmentError, match="align.depth=9"):
        check_compatible("urepa", TinyStudent(depth=4), cfg(depth=9), **kw)
    with pytest.raises(AlignmentError, match="teacher_dim"):
        build_objective("repa", TinyStudent(), cfg(), path="linear", teacher_dim=None, teacher_grid=(4, 4),
                        teacher_heads=None)
    with pytest.raises(AlignmentError, match="train.align"):
        check_compatible("repb", TinyStudent(), cfg(), **kw)
    for align in ("none", "repa", "urepa", "haste"):
        check_compatible(align, TinyStudent(), cfg(), teacher_depth=12, **kw)
    assert issubclass(AlignmentError, ValueError)
    # what the data path and the fingerprint read from the classes
    assert [objective_class(a).reads_teacher for a in ("none", "repa", "urepa", "haste")] == [False, True, True, True]
    assert [objective_class(a).teacher_blocks(cfg()) for a in ("none", "repa", "urepa")] == [(), (), ()]
    assert set(REPA.config_fields) < set(URepa.config_fields) and "tau" in HASTE.config_fields
    assert "manifold_weight" not in HASTE.config_fields and FlowMatching.config_fields == ()
    assert all(set(c.config_fields) <= set(AlignConfig.model_fields) for c in (REPA, URepa, HASTE))


# ----------------------------------------------------------------------------------------------
#                                  Gradient-angle trigger
# ----------------------------------------------------------------------------------------------


def test_gradient_angle_trigger():
    torch.manual_seed(0)
    model, batch, teacher = TinyStudent(), make_batch(), make_teacher()
    obj = haste(model, tau=1000)
    trig = GradientAngleTrigger(start=10, every=5, threshold=-0.05)
    assert [s for s in range(25) if trig.should_check(s)] == [10, 15, 20]
    assert trig.probe_block(model, obj) is model.blocks[1]  # align_depth 2 -> 0-indexed 1
    value = trig.check(model, obj, batch, teacher)
    assert isinstance(value, float) and -1.0 <= value <= 1.0
    assert all(p.grad is None for p in model.parameters())  # the probe leaves .grad alone

    # independent: the same cosine by hand at one probe time
    single = GradientAngleTrigger(0, 1, times=(0.5,))
    block = list(model.blocks[1].parameters())
    terms = obj.terms(model, {**batch, "t": torch.full((3,), 0.5)}, teacher, aligned=True)
    ga = torch.cat([g.flatten() for g in torch.autograd.grad(terms.align, block, retain_graph=True)])
    gf = torch.cat([g.flatten() for g in torch.autograd.grad(terms.fm, block)])
    assert single.check(model, obj, batch, teacher) == pytest.approx(
        (ga @ gf / (ga.norm() * gf.norm())).item(), abs=1e-5
    )

    assert obj.needs_teacher(15)
    obj.terminate(15)
    obj.terminate(20)  # the first call wins
    assert not obj.needs_teacher(16) and obj.terminated_at == 15
    buf = io.BytesIO()
    torch.save(obj.state_dict(), buf)
    buf.seek(0)
    resumed = haste(model, tau=1000)
    resumed.load_state_dict(torch.load(buf, weights_only=True))
    assert not resumed.needs_teacher(16)
    assert build_trigger(HASTE, cfg(trigger="gradient-angle")).every == cfg().trigger_every
    assert build_trigger(obj, cfg(trigger="gradient-angle")).start == cfg().trigger_start
    assert build_trigger(HASTE, cfg()) is None and build_trigger(REPA, cfg(trigger="gradient-angle")) is None


# ----------------------------------------------------------------------------------------------
#                              Smoke test on a real backbone
# ----------------------------------------------------------------------------------------------


def test_real_sit_smoke():
    models = pytest.importorskip("pipeline.models")
    if not hasattr(models, "build_model"):
        pytest.skip("pipeline.models.build_model is not available yet")
    torch.manual_seed(0)
    model = models.build_model("SiT-T/2", input_size=8, in_channels=4, num_classes=10)
    batch = make_batch(B=2, C=4, S=8)
    heads = min(model.num_heads, 2)
    teacher = make_teacher(B=2, grid=(4, 4), D=6, heads=heads, layers=2)
    for align in ("repa", "urepa", "haste"):
        obj = build_objective(align, model, cfg(depth=0, student_layers=[0, 1]), path="linear", teacher_dim=6,
                              teacher_grid=(4, 4), teacher_heads=heads)
        loss, logs = obj(model, batch, teacher, 0)
        assert torch.isfinite(loss) and "repa" in logs
        loss.backward()


# ----------------------------------------------------------------------------------------------
#                              iREPA: conv projector, spatial norm
# ----------------------------------------------------------------------------------------------


def spatial_norm_ref(y: torch.Tensor, gamma: float) -> torch.Tensor:
    """Loops: per image b and channel d, u_n = y_n - gamma * mean_n(y); u / (sqrt(sum (u - mean u)^2 / (T-1)) + 1e-6)."""
    B, T, D = y.shape
    out = torch.empty(B, T, D, dtype=torch.float64)
    for b in range(B):
        for d in range(D):
            col = [float(y[b, n, d]) for n in range(T)]
            mean = sum(col) / T
            u = [v - gamma * mean for v in col]
            mu = sum(u) / T
            std = math.sqrt(sum((v - mu) ** 2 for v in u) / (T - 1))
            for n in range(T):
                out[b, n, d] = u[n] / (std + 1e-6)
    return out


@pytest.mark.parametrize("gamma", [1.0, 0.5, 0.0])
def test_spatial_normalize_against_loops(gamma):
    y = torch.randn(2, 6, 3, generator=torch.Generator().manual_seed(0)) * 3 + 2
    got = spatial_normalize(y, gamma)
    torch.testing.assert_close(got.double(), spatial_norm_ref(y, gamma), atol=1e-5, rtol=1e-5)
    if gamma == 1.0:  # each image's channels: zero mean and unit (unbiased) std over the tokens
        torch.testing.assert_close(got.mean(1), torch.zeros(2, 3), atol=1e-5, rtol=0)
        torch.testing.assert_close(got.std(1), torch.ones(2, 3), atol=1e-4, rtol=0)
    with pytest.raises(ValueError, match="T >= 2"):
        spatial_normalize(torch.zeros(2, 1, 3))


def conv_ref(tokens: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """A 3x3, padding-1 convolution over the row-major token grid, written out as sums."""
    B, N, C = tokens.shape
    h, w = grid
    n_out = weight.shape[0]
    out = torch.zeros(B, N, n_out, dtype=torch.float64)
    for b in range(B):
        for i in range(h):
            for j in range(w):
                for o in range(n_out):
                    acc = float(bias[o])
                    for di in (-1, 0, 1):
                        for dj in (-1, 0, 1):
                            ii, jj = i + di, j + dj
                            if 0 <= ii < h and 0 <= jj < w:
                                acc += float(weight[o, :, di + 1, dj + 1].double() @ tokens[b, ii * w + jj].double())
                    out[b, i * w + j, o] = acc
    return out


def test_conv_projector_against_written_out_convolution():
    torch.manual_seed(0)
    proj = ConvProjector(4, 3, (3, 2))
    tokens = torch.randn(2, 6, 4)
    ref = conv_ref(tokens, proj.conv.weight.detach(), proj.conv.bias.detach(), (3, 2))
    torch.testing.assert_close(proj(tokens).detach().double(), ref, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match=r"\[B, 6, 4\]"):
        proj(torch.randn(2, 5, 4))


@pytest.mark.parametrize("align", ["repa", "urepa", "haste"])
def test_irepa_options_apply_to_every_feature_term(align):
    """projector = conv and spatial_norm: the logged feature terms equal the formulas applied by hand to
    the conv projection of the aligned block and the normalised teacher tokens."""
    torch.manual_seed(0)
    model, batch, teacher = TinyStudent(heads=3), make_batch(), make_teacher(heads=2)
    obj = build_objective(align, model, cfg(projector="conv", spatial_norm=True, spatial_norm_gamma=0.8),
                          path="linear", teacher_dim=5, teacher_grid=(4, 4), teacher_heads=2)
    assert isinstance(obj.projector, ConvProjector) and obj.projector.grid == (4, 4)
    _, logs = obj(model, batch, teacher, 0)
    t = batch["t"][:, None, None, None]
    hidden = model((1 - t) * batch["x0"] + t * batch["eps"], batch["t"], batch["y"], align_depth=2).hidden
    student = conv_ref(hidden.detach(), obj.projector.conv.weight.detach(), obj.projector.conv.bias.detach(), (4, 4))
    target = spatial_norm_ref(teacher.tokens, 0.8)
    assert logs["repa"].item() == pytest.approx(repa_ref(student.float(), target.float()), abs=1e-5)
    if align == "urepa":
        assert logs["manifold"].item() == pytest.approx(manifold_ref(student.float(), target.float(), "tokens"),
                                                        abs=1e-5)
    # the defaults are REPA's: an MLP projector and the stored tokens
    plain = build_objective(align, model, cfg(), path="linear", teacher_dim=5, teacher_grid=(4, 4), teacher_heads=2)
    assert isinstance(plain.projector, Projector) and plain.targets(teacher) is teacher.tokens
