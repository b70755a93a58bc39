"""MMDiT: a text-conditioned flow-matching transformer with joint attention over text and image tokens
(the SD3 block), the student of the text-to-image setting.

x [B, C, H, W] -> patchify -> image tokens [B, N, hidden] + sincos position embedding;
text tokens [B, L, text_dim] -> Linear -> [B, L, hidden].
c = embed(t) + MLP(pooled text [B, text_dim]) conditions every block by adaLN-Zero.
Each block has separate weights per stream (norms, modulation, qkv, output projection, MLP) and ONE
attention over the concatenated sequence [text; image] (L + N tokens; padded text keys masked out),
then splits it again. After `depth` blocks a final adaLN layer maps the image tokens back to the
velocity [B, C, H, W]; the text stream is discarded.

What alignment reads: `hidden` = the IMAGE tokens after block `align_depth` (1-indexed), on the patch
grid; `attn_logits` = per requested 0-indexed block the image-to-image part [B, heads, N, N] of the
joint pre-softmax logits (HASTE distils the teacher's patch attention into it).

The condition `y` is a dict of the batch's text:
    tokens [B, L, text_dim] float, mask [B, L] bool (True = a real token), pooled [B, text_dim],
    drop [B] bool (caption dropout for classifier-free guidance: those samples see the learned null
    text instead; the data path decides which, as it does for class labels).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from pipeline.models.layers import (
    TimestepEmbedder,
    check_align_depth,
    check_attn_layers,
    check_input,
    feed_forward,
    modulate,
    sincos_pos_embed_2d,
)
from pipeline.models.output import ModelOutput
from pipeline.models.sit import FinalLayer, unpatchify

TEXT_KEYS = ("tokens", "mask", "pooled", "drop")

# ----------------------------------------------------------------------------------------------
#                                       Joint attention
# ----------------------------------------------------------------------------------------------


def joint_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_mask: torch.Tensor,
                    return_logits: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """softmax(q k^T / sqrt(d) + mask) v over one sequence.

    q, k, v [B, heads, S, d]; key_mask [B, S] bool (False keys get no weight).
    -> (out [B, heads, S, d], logits [B, heads, S, S] before the mask, or None).
    """
    bias = torch.zeros(key_mask.shape, dtype=q.dtype, device=q.device).masked_fill(~key_mask, float("-inf"))
    bias = bias[:, None, None, :]  # [B, 1, 1, S]
    if not return_logits:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=bias), None
    logits = (q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)
    attn = (logits + bias).softmax(dim=-1, dtype=torch.float32).to(v.dtype)
    return attn @ v, logits


class StreamHalf(nn.Module):
    """One stream's weights in a joint block: adaLN modulation (6 vectors), pre-attention norm and qkv,
    output projection, post-attention norm and feed-forward."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float, use_swiglu: bool):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, hidden_size // num_heads
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size))
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.qkv = nn.Linear(hidden_size, 3 * hidden_size)
        self.proj = nn.Linear(hidden_size, hidden_size)
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.mlp = feed_forward(hidden_size, mlp_ratio, use_swiglu)

    def qkv_heads(self, x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        """x [B, S, C] -> q, k, v stacked [3, B, heads, S, d]."""
        B, S, _ = x.shape
        qkv = self.qkv(modulate(self.norm1(x), shift, scale))
        return qkv.reshape(B, S, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)

    def finish(self, x: torch.Tensor, attn: torch.Tensor, gate_msa, shift_mlp, scale_mlp, gate_mlp) -> torch.Tensor:
        """Gated residuals: x + g * proj(attn); x + g * FF(modulate(LN(x))). attn [B, S, C]."""
        x = x + gate_msa.unsqueeze(1) * self.proj(attn)
        return x + gate_mlp.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))


class JointBlock(nn.Module):
    """SD3's MM-DiT block: text and image streams with their own weights, one attention over both.

    forward(txt [B, L, C], img [B, N, C], c [B, C], key_mask [B, L + N]) -> (txt, img, image-image
    logits [B, heads, N, N] or None).
    """

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float = 4.0, use_swiglu: bool = False):
        super().__init__()
        if hidden_size % num_heads:
            raise ValueError(f"hidden size {hidden_size} must be divisible by num_heads {num_heads}")
        self.txt = StreamHalf(hidden_size, num_heads, mlp_ratio, use_swiglu)
        self.img = StreamHalf(hidden_size, num_heads, mlp_ratio, use_swiglu)

    def forward(self, txt: torch.Tensor, img: torch.Tensor, c: torch.Tensor, key_mask: torch.Tensor,
                return_logits: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        mt = self.txt.adaLN_modulation(c).chunk(6, dim=1)
        mi = self.img.adaLN_modulation(c).chunk(6, dim=1)
        L = txt.shape[1]
        qkv = torch.cat([self.txt.qkv_heads(txt, mt[0], mt[1]), self.img.qkv_heads(img, mi[0], mi[1])], dim=3)
        out, logits = joint_attention(*qkv.unbind(0), key_mask, return_logits)
        out = out.transpose(1, 2).flatten(2)  # [B, L + N, C]
        txt = self.txt.finish(txt, out[:, :L], mt[2], mt[3], mt[4], mt[5])
        img = self.img.finish(img, out[:, L:], mi[2], mi[3], mi[4], mi[5])
        return txt, img, None if logits is None else logits[:, :, L:, L:]


# ----------------------------------------------------------------------------------------------
#                                         The backbone
# ----------------------------------------------------------------------------------------------


class MMDiT(nn.Module):
    """Text-conditioned backbone predicting the velocity field.

    forward(x [B, C, H, W], t [B] in [0, 1], y {tokens, mask, pooled, drop} (module docstring)) ->
    ModelOutput(velocity [B, C, H, W], hidden [B, N, hidden_size] image tokens after block
    `align_depth`, attn_logits: one [B, heads, N, N] image-image block per 0-indexed `attn_layers`).

    text_dim / text_len: width and (padded) length of the cached text token states.
    default_align_depth: as SiT's (REPA aligns block 8 of 24-block models).
    """

    supports_attention = True
    text_conditioned = True

    def __init__(
        self,
        input_size: int = 32,
        patch_size: int = 2,
        in_channels: int = 4,
        hidden_size: int = 768,
        depth: int = 24,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        text_dim: int = 768,
        text_len: int = 77,
        class_dropout_prob: float = 0.1,  # caption dropout, applied by the data path
        num_classes: int = 0,  # unused: the condition is text
        use_rope: bool = False,
        use_swiglu: bool = False,
        default_align_depth: int | None = None,
    ):
        super().__init__()
        if input_size % patch_size:
            raise ValueError(f"input_size {input_size} must be divisible by patch_size {patch_size}")
        if use_rope:
            raise ValueError("MMDiT uses the sincos position embedding; model.use_rope is not supported")
        self.name = "MMDiT"
        self.in_channels = self.out_channels = in_channels
        self.input_size, self.patch_size = input_size, patch_size
        self.hidden_size, self.depth, self.num_heads = hidden_size, depth, num_heads
        self.text_dim, self.text_len = text_dim, text_len
        self.class_dropout_prob, self.num_classes = class_dropout_prob, num_classes
        self.grid = (input_size // patch_size, input_size // patch_size)
        self.default_align_depth = default_align_depth or (min(depth, 8) if hidden_size >= 768 else max(1, depth // 3))
        check_align_depth(self.default_align_depth, depth)

        self.x_embedder = nn.Conv2d(in_channels, hidden_size, kernel_size=patch_size, stride=patch_size)
        self.register_buffer("pos_embed", sincos_pos_embed_2d(hidden_size, self.grid)[None], persistent=False)
        self.t_embedder = TimestepEmbedder(hidden_size)
        self.context_embedder = nn.Linear(text_dim, hidden_size)
        self.pooled_embedder = nn.Sequential(nn.Linear(text_dim, hidden_size), nn.SiLU(),
                                             nn.Linear(hidden_size, hidden_size))
        self.null_tokens = nn.Parameter(torch.zeros(text_len, text_dim))  # the learned "no caption"
        self.null_pooled = nn.Parameter(torch.zeros(text_dim))
        self.blocks = nn.ModuleList([JointBlock(hidden_size, num_heads, mlp_ratio, use_swiglu) for _ in range(depth)])
        self.final_layer = FinalLayer(hidden_size, patch_size, in_channels)
        self._init_weights()

    def _init_weights(self) -> None:
        """DiT's: xavier Linears, zero adaLN modulations and output (a fresh model predicts zeros),
        normal(0.02) for the null text and the timestep MLP."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
        nn.init.xavier_uniform_(self.x_embedder.weight.view(self.x_embedder.weight.shape[0], -1))
        nn.init.zeros_(self.x_embedder.bias)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        nn.init.normal_(self.null_tokens, std=0.02)
        nn.init.normal_(self.null_pooled, std=0.02)
        for module in self.modules():
            if isinstance(module, (StreamHalf, FinalLayer)):
                nn.init.zeros_(module.adaLN_modulation[-1].weight)
                nn.init.zeros_(module.adaLN_modulation[-1].bias)
        nn.init.zeros_(self.final_layer.linear.weight)
        nn.init.zeros_(self.final_layer.linear.bias)

    # -- what alignment asks --------------------------------------------------------------------

    def align_width(self, depth: int) -> int:
        check_align_depth(depth, self.depth)
        return self.hidden_size

    def align_grid(self, depth: int) -> tuple[int, int]:
        check_align_depth(depth, self.depth)
        return self.grid

    # -- forward --------------------------------------------------------------------------------

    def text_condition(self, y: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The batch's text with dropped captions replaced by the null text:
        (tokens [B, L, text_dim], key mask [B, L] bool, pooled [B, text_dim])."""
        missing = [k for k in TEXT_KEYS if k not in y]
        if missing:
            raise ValueError(f"MMDiT's condition y must be a dict with {list(TEXT_KEYS)}; missing {missing}")
        tokens, mask, pooled, drop = y["tokens"], y["mask"].bool(), y["pooled"], y["drop"].bool()
        if tokens.shape[1:] != (self.text_len, self.text_dim) or pooled.shape[1:] != (self.text_dim,):
            raise ValueError(f"text tokens {tuple(tokens.shape)} / pooled {tuple(pooled.shape)} do not fit this "
                             f"MMDiT (text_len {self.text_len}, text_dim {self.text_dim}): the text store was made "
                             "by another encoder")
        d = drop[:, None]
        tokens = torch.where(d[..., None], self.null_tokens.to(tokens.dtype), tokens)
        pooled = torch.where(d, self.null_pooled.to(pooled.dtype), pooled)
        mask = mask | d  # the null text attends with all its tokens
        return tokens, mask, pooled

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: dict[str, torch.Tensor], *,
                align_depth: int | None = None, attn_layers: Sequence[int] = ()) -> ModelOutput:
        check_input(x, self.in_channels, self.input_size)
        align_depth = check_align_depth(align_depth, self.depth)
        layers = tuple(check_attn_layers(attn_layers, self.depth, True))
        tokens, mask, pooled = self.text_condition(y)
        img = self.x_embedder(x).flatten(2).transpose(1, 2) + self.pos_embed.to(x.dtype)  # [B, N, C]
        txt = self.context_embedder(tokens.to(img.dtype))  # [B, L, C]
        c = self.t_embedder(t) + self.pooled_embedder(pooled.to(img.dtype))  # [B, C]
        key_mask = torch.cat([mask, torch.ones(img.shape[:2], dtype=torch.bool, device=img.device)], dim=1)
        hidden, logits = None, {}
        for i, block in enumerate(self.blocks):
            txt, img, lg = block(txt, img, c, key_mask, return_logits=i in layers)
            if lg is not None:
                logits[i] = lg
            if align_depth == i + 1:
                hidden = img
        velocity = unpatchify(self.final_layer(img, c), self.patch_size, self.out_channels, self.grid)
        return ModelOutput(velocity, hidden, tuple(logits[i] for i in layers))
