"""MMDiT: shapes, the joint attention against a written-out computation, the image-image logits,
alignment on image tokens only, and the null text of caption dropout."""

from __future__ import annotations

import pytest
import torch

from pipeline.models import build_model
from pipeline.models.mmdit import JointBlock, joint_attention
from tests.test_models import randomize_zero_params

L, DT = 5, 12  # text length and width of the tiny tests


def text(b: int, seed: int = 0, valid: int = 3) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    mask = torch.zeros(b, L, dtype=torch.bool)
    mask[:, :valid] = True
    return {"tokens": torch.randn(b, L, DT, generator=g), "mask": mask, "pooled": torch.randn(b, DT, generator=g),
            "drop": torch.zeros(b, dtype=torch.bool)}


def tiny(**kw):
    torch.manual_seed(0)
    model = build_model("MMDiT-T/4", input_size=16, in_channels=4, text_dim=DT, text_len=L, **kw)
    return randomize_zero_params(model).eval()


def test_shapes_hidden_tokens_and_image_image_logits():
    model = tiny()
    x, t = torch.randn(2, 4, 16, 16), torch.rand(2)
    out = model(x, t, text(2), align_depth=2, attn_layers=(1, 3))
    assert out.velocity.shape == (2, 4, 16, 16)
    assert out.hidden.shape == (2, 16, 96)  # the 4x4 image tokens only, never the text's
    assert [tuple(a.shape) for a in out.attn_logits] == [(2, 6, 16, 16)] * 2  # image-image block
    plain = model(x, t, text(2))
    torch.testing.assert_close(plain.velocity, out.velocity, atol=1e-5, rtol=1e-4)  # the read-outs change nothing
    assert model.align_grid(2) == (4, 4) and model.align_width(2) == 96


def test_joint_attention_equals_the_written_out_formula():
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(2, 3, 7, 4, generator=g) for _ in range(3))
    mask = torch.tensor([[True] * 7, [False, True, True, False, True, True, True]])
    out, logits = joint_attention(q, k, v, mask, return_logits=True)
    fast, none = joint_attention(q, k, v, mask)
    assert none is None
    for b in range(2):
        for h in range(3):
            s = q[b, h] @ k[b, h].T / 2.0  # sqrt(head dim 4)
            torch.testing.assert_close(logits[b, h], s)
            w = torch.exp(s - s.max(dim=1, keepdim=True).values) * mask[b].float()  # masked keys weigh 0
            torch.testing.assert_close(out[b, h], (w / w.sum(dim=1, keepdim=True)) @ v[b, h])
    torch.testing.assert_close(fast, out, atol=1e-5, rtol=1e-5)


def test_joint_block_is_one_attention_over_text_and_image():
    """Text tokens change the image stream (they share one attention); padded text keys do not."""
    torch.manual_seed(0)
    block = randomize_zero_params(JointBlock(24, 4)).eval()
    txt, img, c = torch.randn(1, 3, 24), torch.randn(1, 5, 24), torch.randn(1, 24)
    key_mask = torch.ones(1, 8, dtype=torch.bool)
    _, a, _ = block(txt, img, c, key_mask)
    _, b, _ = block(torch.randn(1, 3, 24), img, c, key_mask)  # (a constant shift would vanish in the LayerNorm)
    assert not torch.allclose(a, b)
    masked = key_mask.clone()
    masked[0, 2] = False  # the third text token is padding
    altered = txt.clone()
    altered[0, 2] = torch.randn(24)
    _, m1, _ = block(txt, img, c, masked)
    _, m2, _ = block(altered, img, c, masked)
    torch.testing.assert_close(m1, m2)


def test_caption_dropout_uses_the_learned_null_text():
    model = tiny()
    x, t, y = torch.randn(2, 4, 16, 16), torch.rand(2), text(2)
    dropped = {**y, "drop": torch.tensor([True, False])}
    other = {**text(2, seed=5), "drop": torch.tensor([True, False])}
    a, b = model(x, t, dropped).velocity, model(x, t, other).velocity
    torch.testing.assert_close(a[0], b[0])  # sample 0 sees the null text whatever its caption was
    assert not torch.allclose(a[1], b[1])
    tokens, mask, pooled = model.text_condition(dropped)
    torch.testing.assert_close(tokens[0], model.null_tokens.detach())
    torch.testing.assert_close(pooled[0], model.null_pooled.detach())
    assert mask[0].all() and mask[1].tolist() == [True] * 3 + [False] * 2


def test_wrong_text_geometry_is_a_clear_error():
    model = tiny()
    y = text(1)
    y["tokens"] = torch.randn(1, L, DT + 1)
    with pytest.raises(ValueError, match="text store was made by another encoder"):
        model(torch.randn(1, 4, 16, 16), torch.rand(1), y)
    with pytest.raises(ValueError, match="missing"):
        model(torch.randn(1, 4, 16, 16), torch.rand(1), {"tokens": y["tokens"]})


def test_repa_size_follows_its_paper_code():
    with torch.device("meta"):
        m = build_model("MMDiT-R/2")
    assert (m.hidden_size, m.depth, m.num_heads, m.default_align_depth, m.text_dim, m.text_len) == (768, 24, 24, 8,
                                                                                                  768, 77)
