"""DINOv2 teacher: preprocessing order, read-outs, hidden-state recompute, int8 storage, local weights,
and the training-time target sources. A random ViT-S/14 at 56 px (4x4 patch grid) keeps it cheap."""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pipeline.stores.zarr_store import ArraySpec, StoreReader, StoreWriter
from pipeline.teachers import dinov2
from pipeline.teachers.quantize import dequantize, quantize_int8
from pipeline.teachers.target_sources import CachedHidden, CachedTokens, Online, build_teacher_source

RES = 56  # 4x4 patch tokens


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny tensors: one intra-op thread avoids oversubscribing a shared CPU (much faster here)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def no_grad():
    with torch.no_grad():
        yield


@pytest.fixture(scope="module")
def teacher():
    return dinov2.load_teacher("dinov2_vits14", "random", RES)


@pytest.fixture(scope="module")
def images():
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, 256, (3, 3, 64, 64), generator=g, dtype=torch.uint8)


def cos(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return F.cosine_similarity(a.float(), b.float(), dim=-1)


# ----------------------------------------------------------------------------------------------
#                                       Preprocessing
# ----------------------------------------------------------------------------------------------


def _cubic(t: float, a: float = -0.75) -> float:
    """Keys' cubic convolution kernel with PyTorch's a = -0.75."""
    t = abs(t)
    if t <= 1:
        return (a + 2) * t**3 - (a + 3) * t**2 + 1
    if t < 2:
        return a * t**3 - 5 * a * t**2 + 8 * a * t - 4 * a
    return 0.0


def _resize_matrix(n_in: int, n_out: int) -> np.ndarray:
    """[n_out, n_in] bicubic weights, align_corners=False, border samples clamped (PyTorch's rule)."""
    m = np.zeros((n_out, n_in))
    for o in range(n_out):
        src = (o + 0.5) * n_in / n_out - 0.5
        base = math.floor(src)
        for k in range(base - 1, base + 3):
            m[o, min(max(k, 0), n_in - 1)] += _cubic(src - k)
    return m


def test_preprocess_normalises_then_resizes_bicubic():
    g = torch.Generator().manual_seed(1)
    img = torch.randint(0, 256, (1, 3, 9, 11), generator=g, dtype=torch.uint8)
    out = dinov2.preprocess(img, 14)
    assert out.shape == (1, 3, 14, 14) and out.dtype == torch.float32
    mean, std = np.array(dinov2.IMAGENET_MEAN), np.array(dinov2.IMAGENET_STD)
    x = img[0].double().numpy() / 255.0
    x = (x - mean[:, None, None]) / std[:, None, None]  # normalise first ...
    rows, cols = _resize_matrix(9, 14), _resize_matrix(11, 14)
    expected = np.einsum("oh,chw,pw->cop", rows, x, cols)  # ... then the separable bicubic resize
    np.testing.assert_allclose(out[0].numpy(), expected, atol=1e-5)
    # resizing the uint8 image first (rounding to uint8, as image libraries do) is measurably different
    resized = np.clip(np.round(np.einsum("oh,chw,pw->cop", rows, img[0].double().numpy(), cols)), 0, 255)
    wrong = (resized / 255.0 - mean[:, None, None]) / std[:, None, None]
    assert np.abs(wrong - expected).max() > 1e-3
    # at the target size no resize happens
    same = dinov2.preprocess(img[..., :9, :9], 9)
    np.testing.assert_allclose(same[0].numpy(), x[:, :, :9], atol=1e-6)
    with pytest.raises(ValueError, match="uint8"):
        dinov2.preprocess(img.float(), 14)


# ----------------------------------------------------------------------------------------------
#                                         Loading
# ----------------------------------------------------------------------------------------------


def test_load_teacher_names_shapes_and_freezing(teacher):
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    assert dinov2.teacher_grid(teacher) == (4, 4)
    assert (dinov2.embed_dim(teacher), dinov2.depth(teacher), dinov2.num_heads(teacher)) == (384, 12, 6)
    assert dinov2.num_prefix_tokens(teacher) == 1
    assert dinov2.timm_name("dinov2_vitb14_reg") == "vit_base_patch14_reg4_dinov2.lvd142m"
    assert dinov2.timm_name("vit_giant_patch14_dinov2") == "vit_giant_patch14_dinov2.lvd142m"
    with pytest.raises(ValueError, match="unknown"):
        dinov2.load_teacher("dinov2_vitz14", "random", RES)
    with pytest.raises(ValueError, match="multiple of 14"):
        dinov2.load_teacher("dinov2_vits14", "random", 50)
    again = dinov2.load_teacher("dinov2_vits14", "random", RES)  # seeded init, global RNG untouched
    assert all(torch.equal(a, b) for a, b in zip(teacher.state_dict().values(), again.state_dict().values(), strict=True))


def test_missing_weight_file_says_where_to_put_it(tmp_path):
    missing = tmp_path / "nope.pth"
    with pytest.raises(FileNotFoundError, match=r"nope\.pth.*dinov2_vits14_pretrain\.pth"):
        dinov2.load_teacher("dinov2_vits14", str(missing), RES)
    with pytest.raises(FileNotFoundError, match="dinov2_vitb14_reg4_pretrain.pth"):
        dinov2.load_teacher("dinov2_vitb14_reg", str(missing), RES)


def test_local_weights_pth_and_safetensors_give_the_same_outputs(teacher, images, tmp_path):
    from safetensors.torch import save_file

    torch.save(teacher.state_dict(), tmp_path / "t.pth")
    save_file(teacher.state_dict(), str(tmp_path / "t.safetensors"))
    x = dinov2.preprocess(images, RES)
    ref = dinov2.patch_tokens(teacher, x)
    for f in ("t.pth", "t.safetensors"):
        loaded = dinov2.load_teacher("dinov2_vits14", str(tmp_path / f), RES)
        assert torch.equal(dinov2.patch_tokens(loaded, x), ref), f
        assert all(p.dtype == torch.float32 and p.device.type == "cpu" for p in loaded.parameters())
    half = {k: v.half() for k, v in teacher.state_dict().items()}  # an fp16 checkpoint loads as float32
    save_file(half, str(tmp_path / "half.safetensors"))
    loaded = dinov2.load_teacher("dinov2_vits14", str(tmp_path / "half.safetensors"), RES)
    assert loaded.pos_embed.dtype == torch.float32
    assert cos(dinov2.patch_tokens(loaded, x), ref).min() > 0.999
    partial = {k: v for k, v in teacher.state_dict().items() if not k.startswith("blocks.11.")}
    torch.save(partial, tmp_path / "partial.pth")
    with pytest.raises(ValueError, match=r"(?s)does not match teacher.*blocks\.11"):
        dinov2.load_teacher("dinov2_vits14", str(tmp_path / "partial.pth"), RES)


def test_meta_layout_with_37x37_table_is_converted_and_resampled(teacher, tmp_path):
    """Meta's file: pos_embed at 37x37 with a CLS slot, mask_token; resampled bicubic+antialias to 4x4."""
    meta = {k: v.clone() for k, v in teacher.state_dict().items()}
    meta["pos_embed"] = torch.randn(1, 1 + 37 * 37, 384, generator=torch.Generator().manual_seed(2))
    meta["mask_token"] = torch.zeros(1, 384)
    torch.save(meta, tmp_path / "dinov2_vits14_pretrain.pth")
    loaded = dinov2.load_teacher("dinov2_vits14", str(tmp_path / "dinov2_vits14_pretrain.pth"), RES)
    table = meta["pos_embed"][:, 1:].reshape(1, 37, 37, 384).permute(0, 3, 1, 2)
    small = F.interpolate(table, size=(4, 4), mode="bicubic", antialias=True, align_corners=False)
    expected = torch.cat([meta["pos_embed"][:, :1], small.permute(0, 2, 3, 1).reshape(1, 16, 384)], dim=1)
    torch.testing.assert_close(loaded.pos_embed, expected)
    torch.testing.assert_close(loaded.blocks[5].attn.qkv.weight, teacher.blocks[5].attn.qkv.weight)


def test_meta_layout_with_registers(teacher, tmp_path, images):
    """Meta's register models keep a CLS slot in pos_embed and name the registers register_tokens."""
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(4)
    state = {k: v.clone() for k, v in teacher.state_dict().items()}  # timm layout of the _reg4 model:
    state["pos_embed"] = state["pos_embed"][:, 1:]  # no position slot for CLS or registers
    state["reg_token"] = torch.randn(1, 4, 384, generator=g)
    save_file(state, str(tmp_path / "timm_reg.safetensors"))
    ref = dinov2.load_teacher("dinov2_vits14_reg", str(tmp_path / "timm_reg.safetensors"), RES)
    assert dinov2.num_prefix_tokens(ref) == 5
    cls_pos = torch.randn(1, 1, 384, generator=g)
    meta = {k: v for k, v in state.items() if k not in ("reg_token", "cls_token", "pos_embed")}
    meta |= {"register_tokens": state["reg_token"], "cls_token": state["cls_token"] - cls_pos,
             "pos_embed": torch.cat([cls_pos, state["pos_embed"]], dim=1), "mask_token": torch.zeros(1, 384)}
    torch.save(meta, tmp_path / "dinov2_vits14_reg4_pretrain.pth")
    loaded = dinov2.load_teacher("dinov2_vits14_reg", str(tmp_path / "dinov2_vits14_reg4_pretrain.pth"), RES)
    x = dinov2.preprocess(images, RES)
    torch.testing.assert_close(dinov2.patch_tokens(loaded, x), dinov2.patch_tokens(ref, x), atol=1e-5, rtol=1e-5)
    assert dinov2.patch_tokens(loaded, x).shape == (3, 16, 384)
    hidden = dinov2.hidden_before(ref, x, 3)
    assert hidden.shape == (3, 5 + 16, 384)
    tokens, (logits,) = dinov2.tail_forward(ref, hidden, 3, (4,))
    torch.testing.assert_close(tokens, dinov2.patch_tokens(ref, x), atol=1e-5, rtol=1e-5)
    assert logits.shape == (3, 6, 16, 16)


# ----------------------------------------------------------------------------------------------
#                                  Read-outs and recompute
# ----------------------------------------------------------------------------------------------


def _hand_logits(block, h: torch.Tensor, prefix: int) -> torch.Tensor:
    """(q * hd^-1/2) @ k^T over patch tokens, from the block's norm1 and qkv weights."""
    n = F.layer_norm(h, (h.shape[-1],), block.norm1.weight, block.norm1.bias, block.norm1.eps)
    qkv = n @ block.attn.qkv.weight.T + block.attn.qkv.bias
    b, s, _ = qkv.shape
    heads = block.attn.num_heads
    hd = h.shape[-1] // heads
    q, k, _ = qkv.reshape(b, s, 3, heads, hd).unbind(2)  # [B, S, H, hd]
    logits = torch.einsum("bihd,bjhd->bhij", q, k) / math.sqrt(hd)
    return logits[:, :, prefix:, prefix:]


def test_patch_tokens_are_final_norm_without_prefix(teacher, images):
    x = dinov2.preprocess(images, RES)
    full = teacher.forward_features(x)
    tokens = dinov2.patch_tokens(teacher, x)
    assert tokens.shape == (3, 16, 384)
    assert torch.equal(tokens, full[:, 1:])
    # the final LayerNorm: zero mean over channels before its affine (weight 1, bias 0 at init)
    torch.testing.assert_close(tokens.mean(-1), torch.zeros(3, 16), atol=1e-5, rtol=0)


def test_hidden_recompute_reproduces_tokens_and_attention_logits(teacher, images):
    x = dinov2.preprocess(images, RES)
    inputs = {}
    hooks = [teacher.blocks[i].register_forward_pre_hook(lambda m, a, i=i: inputs.__setitem__(i, a[0].clone()))
             for i in range(12)]
    try:
        ref_tokens = dinov2.patch_tokens(teacher, x)
    finally:
        for h in hooks:
            h.remove()
    hidden = dinov2.hidden_before(teacher, x, 8)
    assert hidden.shape == (3, 17, 384)
    torch.testing.assert_close(hidden, inputs[8])
    tokens, logits = dinov2.tail_forward(teacher, hidden, 8, (11, 8, 9))
    torch.testing.assert_close(tokens, ref_tokens, atol=1e-5, rtol=1e-5)
    assert [lg.shape for lg in logits] == [(3, 6, 16, 16)] * 3
    for block, lg in zip((11, 8, 9), logits, strict=True):
        hand = _hand_logits(teacher.blocks[block], inputs[block], 1)
        torch.testing.assert_close(lg, hand, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(dinov2.attention_logits(teacher.blocks[block], inputs[block], 1), hand,
                                   atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="attn_layers"):
        dinov2.tail_forward(teacher, hidden, 8, (7,))


def test_cached_hidden_in_fp16_through_a_store(teacher, images, tmp_path):
    """The teacher-stage path for HASTE: fp16 hidden state in a store -> recompute -> targets."""
    x = dinov2.preprocess(images, RES)
    ref_tokens = dinov2.patch_tokens(teacher, x)
    hidden = dinov2.hidden_before(teacher, x, 8)
    writer = StoreWriter(tmp_path / "t.zarr", 3, [ArraySpec("hidden", (17, 384), "float16")], 2)
    writer.create()
    for a, b in writer.ranges():
        writer.write_range(a, b, {"hidden": hidden[a:b].half().numpy()})
    cached = torch.from_numpy(StoreReader(tmp_path / "t.zarr").read("hidden", [2, 0, 1]))
    source = build_teacher_source(SimpleNamespace(cache="hidden", hidden_layer=8, resolution=RES, dtype="fp16"),
                                  teacher, attn_layers=(9, 11))
    assert isinstance(source, CachedHidden) and source.keys == ("hidden",)
    out = source({"hidden": cached})
    assert out.grid == (4, 4) and out.tokens.dtype == torch.float32
    assert cos(out.tokens, ref_tokens[[2, 0, 1]]).min() > 0.999
    _, ref_logits = dinov2.tail_forward(teacher, hidden, 8, (9, 11))
    for got, ref in zip(out.attn_logits, ref_logits, strict=True):
        assert got.dtype == torch.float32
        assert cos(got.flatten(2), ref[[2, 0, 1]].flatten(2)).min() > 0.999


# ----------------------------------------------------------------------------------------------
#                                 Cached tokens and int8 storage
# ----------------------------------------------------------------------------------------------


def test_cached_fp16_and_int8_tokens_match_fresh_tokens(teacher, images, tmp_path):
    x = dinov2.preprocess(images, RES)
    fresh = dinov2.patch_tokens(teacher, x)
    q, scale = quantize_int8(fresh)
    specs = [ArraySpec("tokens", (16, 384), "float16"), ArraySpec("tokens_q", (16, 384), "int8"),
             ArraySpec("tokens_scale", (16, 1), "float16")]
    writer = StoreWriter(tmp_path / "t.zarr", 3, specs, 2)
    writer.create()
    for a, b in writer.ranges():
        writer.write_range(a, b, {"tokens": fresh[a:b].numpy(), "tokens_q": q[a:b].numpy(),
                                  "tokens_scale": scale[a:b].numpy()})
    reader = StoreReader(tmp_path / "t.zarr")
    idx = [1, 2, 0]
    batch = {k: torch.from_numpy(reader.read(k, idx)) for k in reader.names}
    fp16 = build_teacher_source(SimpleNamespace(cache="tokens", dtype="fp16", resolution=RES, hidden_layer=8), None)
    assert isinstance(fp16, CachedTokens) and fp16.grid == (4, 4) and fp16.keys == ("tokens",)
    out = fp16(batch)
    assert out.tokens.dtype == torch.float32 and out.attn_logits == ()
    assert cos(out.tokens, fresh[idx]).min() > 0.999
    int8 = CachedTokens((4, 4), int8=True)
    assert int8.keys == ("tokens", "tokens_scale")
    got = int8({"tokens": batch["tokens_q"], "tokens_scale": batch["tokens_scale"]}).tokens
    assert cos(got, fresh[idx]).mean() > 0.995


def test_int8_quantisation_exact_properties():
    x = torch.tensor([[0.5, -2.0, 1.0, 0.0], [0.0, 0.0, 0.0, 0.0], [3e-3, 1e-3, -2e-3, 0.0]])
    q, scale = quantize_int8(x)
    assert q.dtype == torch.int8 and scale.dtype == torch.float16 and scale.shape == (3, 1)
    assert q[0].tolist() == [32, -127, 64, 0]  # round(0.5 / (2/127)) = round(31.75) = 32
    assert q[1].tolist() == [0, 0, 0, 0] and scale[1].item() == 0
    assert q[2].tolist() == [127, 42, -85, 0]
    back = dequantize(q, scale)
    assert back.dtype == torch.float32
    assert torch.all((back - x).abs() <= scale.float() / 2 + 1e-8)
    with pytest.raises(ValueError, match="int8"):
        dequantize(q.float(), scale)


def test_int8_keeps_cosine_on_dinov2_like_features():
    """[64, 256, 768] tokens: gaussian, a few heavy channels (DINOv2 has outlier dims), varied norms."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 256, 768, generator=g)
    heavy = torch.randperm(768, generator=g)[:8]
    x[..., heavy] *= 8.0
    x *= torch.rand(64, 256, 1, generator=g) * 3 + 0.2  # per-token norms vary
    q, scale = quantize_int8(x)
    c = cos(dequantize(q, scale), x)
    assert c.mean() > 0.995 and c.min() > 0.98


# ----------------------------------------------------------------------------------------------
#                                      Online and factory
# ----------------------------------------------------------------------------------------------


def test_online_source_and_factory_checks(teacher, images):
    x = dinov2.preprocess(images, RES)
    online = Online(teacher, RES)
    assert online.keys == ("images",)
    assert torch.equal(online({"images": images}).tokens, dinov2.patch_tokens(teacher, x))
    with_attn = build_teacher_source(SimpleNamespace(cache="online", resolution=RES, dtype="fp16", hidden_layer=8),
                                     teacher, attn_layers=(10,))
    out = with_attn({"images": images})
    torch.testing.assert_close(out.tokens, dinov2.patch_tokens(teacher, x), atol=1e-5, rtol=1e-5)
    hand = _hand_logits(teacher.blocks[10], dinov2.hidden_before(teacher, x, 10), 1)
    torch.testing.assert_close(out.attn_logits[0], hand, atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="teacher.cache = 'hidden'"):
        build_teacher_source(SimpleNamespace(cache="tokens", resolution=RES, dtype="fp16", hidden_layer=8), None, (8,))
    with pytest.raises(ValueError, match="earlier teacher.hidden_layer"):
        build_teacher_source(SimpleNamespace(cache="hidden", resolution=RES, dtype="fp16", hidden_layer=8), teacher, (7,))
    with pytest.raises(ValueError, match="pass the loaded teacher"):
        build_teacher_source(SimpleNamespace(cache="online", resolution=RES, dtype="fp16", hidden_layer=8), None)
    with pytest.raises(KeyError, match="images"):
        online({"tokens": torch.zeros(1)})
