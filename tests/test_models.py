"""Backbones: shapes, wiring, attention logits, parameter counts, initialisation and the registry.

Reference values are computed here independently of pipeline/models: position codes and rotary
angles by plain loops, pixel (un)shuffle and unpatchify by explicit reshapes, attention logits from
the block's own weights, parameter counts in closed form.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from pipeline.models import ModelOutput, build_model, model_names

TINY = ["SiT-T/2", "SiT-T/4", "SiTDown-T/2", "SiTDown-T/4", "UNet-T"]
TRANSFORMERS = ["SiT-T/2", "SiT-T/4", "SiTDown-T/2", "SiTDown-T/4"]
SHAPES = [(3, 32), (4, 16)]  # (in_channels, input_size)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models run faster on one thread than with threads fighting over shared cores."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def tiny(name: str, in_channels: int = 4, input_size: int = 16, **overrides) -> nn.Module:
    return build_model(name, in_channels=in_channels, input_size=input_size, num_classes=10, **overrides)


def randomize_zero_params(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give every all-zero parameter (adaLN-Zero, zero-initialised outputs) random values."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if not p.any():
                p.copy_(0.1 * torch.randn(p.shape, generator=gen))
    return model


def inputs(model: nn.Module, batch: int = 2, seed: int = 1):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, model.in_channels, model.input_size, model.input_size, generator=gen)
    t = torch.rand(batch, generator=gen)
    y = torch.randint(0, model.num_classes, (batch,), generator=gen)
    return x, t, y


# ----------------------------------------------------------------------------------------------
#                      Independent references: position codes and resampling
# ----------------------------------------------------------------------------------------------


def sincos_table(dim: int, h: int, w: int) -> torch.Tensor:
    """[h*w, dim]: first half encodes the column, second half the row, each [sin..., cos...]."""
    quarter = dim // 4
    rows = []
    for r in range(h):
        for c in range(w):
            vec = []
            for pos in (c, r):
                omegas = [1.0 / 10000 ** (k / quarter) for k in range(quarter)]
                vec += [math.sin(pos * o) for o in omegas] + [math.cos(pos * o) for o in omegas]
            rows.append(vec)
    return torch.tensor(rows, dtype=torch.float32)


def rope_angles(head_dim: int, h: int, w: int, theta: float = 10000.0) -> torch.Tensor:
    """[h*w, head_dim/2] rotation angle of each channel pair: row * f_k for the first head_dim/4
    pairs, column * f_k for the rest, f_k = theta ** (-k / (head_dim/4))."""
    n = head_dim // 4
    table = []
    for r in range(h):
        for c in range(w):
            table.append([r * theta ** (-k / n) for k in range(n)] + [c * theta ** (-k / n) for k in range(n)])
    return torch.tensor(table, dtype=torch.float64)


def rope_tables(head_dim: int, h: int, w: int) -> tuple[torch.Tensor, torch.Tensor]:
    angles = rope_angles(head_dim, h, w)
    return torch.cos(angles).float(), torch.sin(angles).float()


def rotate(x: torch.Tensor, angles: torch.Tensor) -> torch.Tensor:
    """Rotate channel pairs (2j, 2j+1) of x [B, heads, N, D] as complex numbers by angles [N, D/2]."""
    z = torch.view_as_complex(x.double().reshape(*x.shape[:-1], -1, 2).contiguous())
    z = z * torch.polar(torch.ones_like(angles), angles)
    return torch.view_as_real(z).flatten(-2).float()


def unshuffle(x: torch.Tensor) -> torch.Tensor:
    """[B, C, H, W] -> [B, 4C, H/2, W/2], channel c*4 + 2i + j holds pixel (2r+i, 2s+j)."""
    B, C, H, W = x.shape
    return x.reshape(B, C, H // 2, 2, W // 2, 2).permute(0, 1, 3, 5, 2, 4).reshape(B, 4 * C, H // 2, W // 2)


def shuffle(x: torch.Tensor) -> torch.Tensor:
    """Inverse of unshuffle: [B, 4C, h, w] -> [B, C, 2h, 2w]."""
    B, C4, h, w = x.shape
    return x.reshape(B, C4 // 4, 2, 2, h, w).permute(0, 1, 4, 2, 5, 3).reshape(B, C4 // 4, 2 * h, 2 * w)


def patches_to_image(out: torch.Tensor, p: int, channels: int, gh: int, gw: int) -> torch.Tensor:
    """[B, gh*gw, p*p*channels], each patch laid out (p, p, channels) -> [B, channels, gh*p, gw*p]."""
    B = out.shape[0]
    img = torch.empty(B, channels, gh * p, gw * p)
    for n in range(gh * gw):
        r, c = divmod(n, gw)
        img[:, :, r * p : (r + 1) * p, c * p : (c + 1) * p] = out[:, n].reshape(B, p, p, channels).permute(0, 3, 1, 2)
    return img


# ----------------------------------------------------------------------------------------------
#                              Independent references: forward passes
# ----------------------------------------------------------------------------------------------


def reference_sit(m, x, t, y):
    """SiT forward from its parts -> (velocity, [hidden after block 1 .. depth])."""
    p, C = m.patch_size, m.hidden_size
    fm = F.conv2d(x, m.x_embedder.weight, m.x_embedder.bias, stride=p)
    gh, gw = fm.shape[-2:]
    tok = fm.flatten(2).transpose(1, 2)
    if m.pos_embed is not None:
        tok = tok + sincos_table(C, gh, gw)
    rope = rope_tables(C // m.num_heads, gh, gw) if m.use_rope else None
    c = m.t_embedder(t) + m.y_embedder(y)
    hiddens = []
    for block in m.blocks:
        tok, _ = block(tok, c, rope)
        hiddens.append(tok)
    return patches_to_image(m.final_layer(tok, c), p, m.in_channels, gh, gw), hiddens


def reference_sit_down(m, x, t, y):
    """SiT-down forward from its parts -> (velocity, [hidden after block 1 .. depth])."""
    E, M, D = m.stage_depths
    p, C = m.patch_size, m.hidden_size
    fm = F.conv2d(x, m.x_embedder.weight, m.x_embedder.bias, stride=p)
    B, _, gh, gw = fm.shape
    tok = fm.flatten(2).transpose(1, 2)
    if m.pos_embed is not None:
        tok = tok + sincos_table(C, gh, gw)
    full = rope_tables(C // m.num_heads, gh, gw) if m.use_rope else None
    half = rope_tables(C // m.num_heads, gh // 2, gw // 2) if m.use_rope else None
    c = m.t_embedder(t) + m.y_embedder(y)
    hiddens, skips = [], []
    for i in range(E):
        tok, _ = m.blocks[i](tok, c, full)
        hiddens.append(tok)
        skips.append(tok)
    fm = tok.transpose(1, 2).reshape(B, C, gh, gw)
    fm = unshuffle(F.conv2d(fm, m.downsample.conv.weight, m.downsample.conv.bias, padding=1))
    tok = fm.flatten(2).transpose(1, 2)  # [B, gh*gw/4, C]
    for i in range(E, E + M):
        tok, _ = m.blocks[i](tok, c, half)
        hiddens.append(tok)
    fm = tok.transpose(1, 2).reshape(B, C, gh // 2, gw // 2)
    fm = shuffle(F.conv2d(fm, m.upsample.conv.weight, m.upsample.conv.bias, padding=1))
    tok = fm.flatten(2).transpose(1, 2)
    for j in range(D):
        skip = skips[E - 1 - j]  # mirror pairing: last encoder block feeds the first decoder block
        tok = m.skip_linears[j](torch.cat([tok, skip], dim=-1))
        tok, _ = m.blocks[E + M + j](tok, c, full)
        hiddens.append(tok)
    return patches_to_image(m.final_layer(tok, c), p, m.in_channels, gh, gw), hiddens


# ----------------------------------------------------------------------------------------------
#                                         Shapes
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", TINY)
@pytest.mark.parametrize("in_channels,input_size", SHAPES)
def test_output_shapes(name, in_channels, input_size):
    m = tiny(name, in_channels, input_size)
    x, t, y = inputs(m)
    depth = m.default_align_depth
    out = m(x, t, y, align_depth=depth)
    assert isinstance(out, ModelOutput)
    assert out.velocity.shape == x.shape
    gh, gw = m.align_grid(depth)
    assert out.hidden.shape == (2, gh * gw, m.align_width(depth))
    assert out.attn_logits == ()
    assert m(x, t, y).hidden is None


def test_grids_by_hand():
    assert tiny("SiT-T/4", 3, 32).align_grid(2) == (8, 8)
    assert tiny("SiT-T/2", 4, 16).align_grid(1) == (8, 8)
    m = tiny("SiTDown-T/2", 4, 16)  # stages [1, 2, 1] on 8x8, 4x4, 8x8
    assert [m.align_grid(d) for d in range(1, 5)] == [(8, 8), (4, 4), (4, 4), (8, 8)]
    assert m.default_align_depth == 2
    u = tiny("UNet-T", 3, 32)  # levels at 32, 16, 8; channels 32, 64, 64
    assert u.align_grid(1) == (8, 8) and u.align_width(1) == 64 and u.depth == 1


@pytest.mark.parametrize(
    "name,overrides,stages",
    [
        ("SiTDown-T/2", {}, ["encoder", "middle", "middle", "decoder"]),
        ("SiTDown-T/4", dict(stage_depths=(2, 1, 2), use_rope=False), ["encoder"] * 2 + ["middle"] + ["decoder"] * 2),
    ],
)
def test_sit_down_matches_reference_at_every_depth(name, overrides, stages):
    m = randomize_zero_params(tiny(name, 3, 32, **overrides))
    x, t, y = inputs(m)
    with torch.no_grad():
        ref_velocity, ref_hiddens = reference_sit_down(m, x, t, y)
        assert ref_velocity.abs().max() > 1e-3
        for depth in range(1, m.depth + 1):
            out = m(x, t, y, align_depth=depth)
            gh, gw = m.align_grid(depth)
            assert out.hidden.shape == (2, gh * gw, m.hidden_size)
            torch.testing.assert_close(out.hidden, ref_hiddens[depth - 1], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(out.velocity, ref_velocity, atol=1e-5, rtol=1e-5)
    assert [m.stage_of(d) for d in range(1, m.depth + 1)] == stages


@pytest.mark.parametrize("use_rope,use_swiglu", [(False, False), (True, True)])
def test_sit_matches_reference(use_rope, use_swiglu):
    m = randomize_zero_params(tiny("SiT-T/4", 3, 32, use_rope=use_rope, use_swiglu=use_swiglu))
    assert (m.pos_embed is None) == use_rope
    x, t, y = inputs(m)
    with torch.no_grad():
        ref_velocity, ref_hiddens = reference_sit(m, x, t, y)
        out = m(x, t, y, align_depth=3)
    torch.testing.assert_close(out.velocity, ref_velocity, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.hidden, ref_hiddens[2], atol=1e-5, rtol=1e-5)


def test_unet_hidden_is_mid_block_row_major():
    m = randomize_zero_params(tiny("UNet-T", 3, 32))
    x, t, y = inputs(m)
    captured = {}
    m.mid.register_forward_hook(lambda mod, args, output: captured.__setitem__("mid", output))
    with torch.no_grad():
        out = m(x, t, y, align_depth=1)
    mid = captured["mid"]  # [B, C, 8, 8]
    assert mid.shape == (2, 64, 8, 8)
    for r, c in [(0, 0), (0, 7), (3, 5), (7, 7)]:
        torch.testing.assert_close(out.hidden[:, r * 8 + c], mid[:, :, r, c])


# ----------------------------------------------------------------------------------------------
#                                     Attention logits
# ----------------------------------------------------------------------------------------------


def logits_by_hand(block, x, c, angles):
    """(q * scale) @ k^T [B, heads, N, N] from the block input x [B, N, C] and condition c [B, C]."""
    C = x.shape[-1]
    heads = block.attn.num_heads
    hd = C // heads
    mod = F.linear(F.silu(c), block.adaLN_modulation[-1].weight, block.adaLN_modulation[-1].bias)
    shift, scale = mod[:, :C], mod[:, C : 2 * C]
    xm = F.layer_norm(x, (C,), eps=1e-6) * (1 + scale[:, None]) + shift[:, None]
    qkv = xm @ block.attn.qkv.weight.T + block.attn.qkv.bias  # [B, N, 3C]
    q = qkv[..., :C].reshape(*x.shape[:2], heads, hd).transpose(1, 2)
    k = qkv[..., C : 2 * C].reshape(*x.shape[:2], heads, hd).transpose(1, 2)
    if angles is not None:
        q, k = rotate(q, angles), rotate(k, angles)
    return q @ k.transpose(-2, -1) / math.sqrt(hd)


@pytest.mark.parametrize(
    "name,use_rope,layers",
    [("SiT-T/2", False, [3, 1]), ("SiT-T/2", True, [0, 2]), ("SiTDown-T/2", True, [1, 3]), ("SiTDown-T/4", False, [2])],
)
def test_attention_logits_match_hand_computation(name, use_rope, layers):
    m = randomize_zero_params(tiny(name, 4, 16, use_rope=use_rope))
    x, t, y = inputs(m)
    captured = {}
    for i in layers:
        m.blocks[i].register_forward_pre_hook(lambda mod, args, i=i: captured.__setitem__(i, (args[0], args[1])))
    with torch.no_grad():
        out = m(x, t, y, attn_layers=layers)
        plain = m(x, t, y)
    assert len(out.attn_logits) == len(layers)
    for i, logits in zip(layers, out.attn_logits, strict=True):
        block_in, c = captured[i]
        gh, gw = m.align_grid(i + 1)  # grid of block i (0-indexed) = grid after it
        assert logits.shape == (2, m.num_heads, gh * gw, gh * gw)
        angles = rope_angles(m.hidden_size // m.num_heads, gh, gw) if use_rope else None
        torch.testing.assert_close(logits, logits_by_hand(m.blocks[i], block_in, c, angles), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.velocity, plain.velocity, atol=1e-5, rtol=1e-5)
    assert plain.attn_logits == ()


def test_hidden_is_block_output():
    m = randomize_zero_params(tiny("SiT-T/2"))
    x, t, y = inputs(m)
    captured = {}
    m.blocks[2].register_forward_hook(lambda mod, args, output: captured.__setitem__("h", output[0]))
    with torch.no_grad():
        out = m(x, t, y, align_depth=3)  # 1-indexed depth 3 = blocks[2]
    torch.testing.assert_close(out.hidden, captured["h"])


def test_unet_rejects_attention_layers():
    m = tiny("UNet-T")
    x, t, y = inputs(m)
    assert m.supports_attention is False
    with pytest.raises(ValueError, match="HASTE"):
        m(x, t, y, attn_layers=[0])


@pytest.mark.parametrize("name", TRANSFORMERS)
def test_bad_alignment_requests(name):
    m = tiny(name)
    x, t, y = inputs(m)
    with pytest.raises(ValueError, match="align_depth"):
        m(x, t, y, align_depth=m.depth + 1)
    with pytest.raises(ValueError, match="align_depth"):
        m(x, t, y, align_depth=0)
    with pytest.raises(ValueError, match="attn_layers"):
        m(x, t, y, attn_layers=[m.depth])


# ----------------------------------------------------------------------------------------------
#                                     Parameter counts
# ----------------------------------------------------------------------------------------------


def meta_count(name: str, **overrides) -> int:
    with torch.device("meta"):
        m = build_model(name, **overrides)
    return sum(p.numel() for p in m.parameters())


def sit_count_closed_form(C: int, depth: int, p: int, in_ch: int, classes: int, freq: int = 256) -> int:
    embed = (in_ch * p * p * C + C) + (freq * C + C + C * C + C) + (classes + 1) * C
    block = (3 * C * C + 3 * C) + (C * C + C) + (4 * C * C + 4 * C) + (4 * C * C + C) + (6 * C * C + 6 * C)
    final = (2 * C * C + 2 * C) + (C * p * p * in_ch + p * p * in_ch)
    return embed + depth * block + final


def test_sit_parameter_counts():
    n = meta_count("SiT-XL/2", input_size=32, in_channels=4, num_classes=1000)
    assert n == sit_count_closed_form(1152, 28, 2, 4, 1000)
    assert abs(n - 675e6) / 675e6 < 0.01  # DiT-XL/2: 675M
    n = meta_count("SiT-B/2", input_size=32, in_channels=4, num_classes=1000)
    assert abs(n - 130e6) / 130e6 < 0.01  # DiT-B/2: 130M
    # SwiGLU is parameter-matched: hidden 2/3 * 4C = 3072 for C = 1152, so the weights agree
    # (3 * 1152 * 3072 == 2 * 1152 * 4608) and only the fused fc1 bias grows, 2 * 3072 vs 4 * 1152.
    assert meta_count("SiT-XL/2", use_swiglu=True) - meta_count("SiT-XL/2") == 28 * (2 * 3072 - 4 * 1152)


def repa_projector_count(C: int, hidden: int = 2048, out: int = 768) -> int:
    return (C * hidden + hidden) + (hidden * hidden + hidden) + (hidden * out + out)


@pytest.mark.parametrize(
    "name,width,blocks,swiglu_hidden,published",
    [
        ("SiTDown-B/2", 768, 15, 2048, 199.7e6),
        ("SiTDown-L/2", 1024, 32, 2736, 686.6e6),  # 8 * 1024 / 3 = 2730.7, rounded up to a multiple of 8
        ("SiTDown-XL/2", 1152, 36, 3072, 954.4e6),
    ],
)
def test_sit_down_parameter_counts(name, width, blocks, swiglu_hidden, published):
    n = meta_count(name, input_size=32, in_channels=4, num_classes=1000)
    # The published table counts the REPA projector inside the model (see pipeline/models/sit_down.py).
    assert abs(n + repa_projector_count(width) - published) / published < 0.03
    assert abs(n - published) / published < 0.05  # backbone alone (B: -4.5%)
    # Defaults are RoPE + SwiGLU; the GELU MLP differs by (3 * hidden - 8C) * C weights and the biases.
    per_block = (3 * swiglu_hidden - 8 * width) * width + (2 * swiglu_hidden - 4 * width)
    assert n - meta_count(name, use_rope=False, use_swiglu=False) == blocks * per_block


# ----------------------------------------------------------------------------------------------
#                                 Conditioning and initialisation
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", TINY)
def test_null_class_is_embeddable(name):
    m = tiny(name, class_dropout_prob=0.0)  # even without label dropout the sampler may ask for it
    assert m.y_embedder.embedding_table.num_embeddings == 11
    x, t, _ = inputs(m)
    m(x, t, torch.tensor([10, 3]))
    with pytest.raises(IndexError):
        m(x, t, torch.tensor([11, 3]))


@pytest.mark.parametrize("name", TINY)
def test_fresh_model_predicts_zero(name):
    m = tiny(name, 3, 32)
    x, t, y = inputs(m)
    out = m(x, t, y, align_depth=m.default_align_depth)
    assert torch.count_nonzero(out.velocity) == 0
    assert out.hidden.abs().sum() > 0


@pytest.mark.parametrize("name", TINY)
def test_gradients_reach_every_parameter(name):
    m = randomize_zero_params(tiny(name))
    x, t, _ = inputs(m, batch=3)
    y = torch.arange(11)[: 3]  # the loss touches only these rows of the label table
    out = m(x, t, y)
    out.velocity.square().mean().backward()
    silent = [n for n, p in m.named_parameters() if p.grad is None or not p.grad.any()]
    assert silent == []


# ----------------------------------------------------------------------------------------------
#                                         Registry
# ----------------------------------------------------------------------------------------------


def test_model_names():
    names = set(model_names())
    expected = {f"SiT-{s}/{p}" for s in ("S", "B", "L", "XL") for p in (2, 4, 8)}
    expected |= {"SiT-T/2", "SiT-T/4", "SiTDown-T/2", "SiTDown-T/4", "SiTDown-XS/2", "SiTDown-XS/4",
                 "SiTDown-B/2", "SiTDown-L/2", "SiTDown-XL/2"}
    expected |= {"UNet-T", "UNet-S", "UNet-B"}
    expected |= {"MMDiT-T/2", "MMDiT-T/4", "MMDiT-S/2", "MMDiT-B/2", "MMDiT-R/2"}
    assert names == expected


def test_sizes_follow_the_tables():
    sizes = {"S": (384, 12, 6), "B": (768, 12, 12), "L": (1024, 24, 16), "XL": (1152, 28, 16)}
    with torch.device("meta"):
        for size, (width, depth, heads) in sizes.items():
            m = build_model(f"SiT-{size}/4")
            assert (m.hidden_size, m.depth, m.num_heads, m.patch_size) == (width, depth, heads, 4)
            # REPA (arXiv 2410.06940) aligns SiT-B/2 at block 4 and SiT-L/2, SiT-XL/2 at block 8
            assert m.default_align_depth == {"S": 4, "B": 4, "L": 8, "XL": 8}[size]
        stages = {"B": (768, 12, (5, 5, 5), 8), "L": (1024, 16, (9, 14, 9), 16), "XL": (1152, 16, (10, 16, 10), 18)}
        for size, (width, heads, depths, align) in stages.items():
            m = build_model(f"SiTDown-{size}/2")
            assert (m.hidden_size, m.num_heads, m.stage_depths, m.default_align_depth) == (width, heads, depths, align)
            assert m.align_grid(align) == (8, 8) and m.align_grid(1) == (16, 16)
            assert m.use_rope and m.use_swiglu
        assert build_model("UNet-S").model_channels == 128 and build_model("UNet-B").model_channels == 192


def test_repa_objective_aligns_the_papers_default_block():
    # align.depth = 0 resolves through the registry's one table: SiT-B/2 at block 4, L and XL at 8
    from pipeline.align.registry import build_objective
    from pipeline.models.registry import SIT_ALIGN_DEPTH
    from schemas.config import AlignConfig

    assert SIT_ALIGN_DEPTH == {"T": 2, "S": 4, "B": 4, "L": 8, "XL": 8}
    for name, depth in (("SiT-B/2", 4), ("SiT-L/2", 8), ("SiT-XL/2", 8), ("SiT-B/4", 4)):
        with torch.device("meta"):
            model = build_model(name, input_size=32, in_channels=4)
            obj = build_objective("repa", model, AlignConfig(), path="linear", teacher_dim=768,
                                  teacher_grid=(16, 16), teacher_heads=12)
        assert obj.align_depth == depth, name
    with torch.device("meta"):
        assert build_model("SiT-B/2", default_align_depth=8).default_align_depth == 8  # still overridable


def test_build_model_overrides():
    m = build_model("SiT-T/2", input_size=8, in_channels=3, num_classes=5, class_dropout_prob=None, use_rope=None)
    assert (m.name, m.input_size, m.in_channels, m.num_classes, m.use_rope) == ("SiT-T/2", 8, 3, 5, False)
    assert build_model("SiTDown-T/2", use_rope=False).use_rope is False
    assert build_model("UNet-T", use_rope=None, use_swiglu=False).name == "UNet-T"
    with pytest.raises(ValueError, match="use_rope"):
        build_model("UNet-T", use_rope=True)
    with pytest.raises(ValueError, match="accepted overrides"):
        build_model("SiT-T/2", widht=3)


def test_unknown_name_lists_valid_names():
    with pytest.raises(ValueError, match="SiT-XL/2") as err:
        build_model("SiT-XXL/2")
    assert "UNet-B" in str(err.value) and "SiTDown-XL/2" in str(err.value)
