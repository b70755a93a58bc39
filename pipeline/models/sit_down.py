"""SiT-down: U-REPA's U-Net-shaped SiT, with one downsampled middle stage and long skip connections.

Exact wiring (the paper does not publish skip wiring or conv channel counts; this is the reading
implemented here). E, M, D = blocks per stage (E == D), C = width at every stage, grid (h, w) =
(H/p, W/p):

    x [B, in, H, W] -> patchify conv p x p -> tokens [B, h*w, C] (+ sincos pos-embed, see below)
    encoder  blocks 1 .. E           on (h, w);    s_i = output of encoder block i
    down     tokens -> map [B, C, h, w] -> conv3x3(C -> C/4) -> PixelUnshuffle(2) -> [B, C, h/2, w/2]
    middle   blocks E+1 .. E+M       on (h/2, w/2)
    up       map [B, C, h/2, w/2] -> conv3x3(C -> 4C) -> PixelShuffle(2) -> [B, C, h, w] -> tokens
    decoder  blocks E+M+1 .. E+M+D   on (h, w); decoder block j (j = 1 .. D) reads
             Linear_j(concat[x, s_{E+1-j}], 2C -> C): the mirror pairing of U-ViT, the last encoder
             block feeding the first decoder block
    final adaLN layer -> unpatchify -> velocity [B, in, H, W]

Every block is a SiT adaLN-Zero block conditioned on c = embed(t) + embed(y). Block numbers are
1-indexed in forward order over all E + M + D blocks (alignment depth); attention layers are the same
blocks 0-indexed. The width is never doubled (the down/up convs keep C), so all blocks share C.
Alignment: default_align_depth = E + ceil(M / 2), a block inside the middle stage (B 8, L 16, XL 18
of 36 as in the paper); its hidden tokens lie on the half grid (align_grid), width C.

Switches (both on by default, as in the paper's model):
- use_rope: 2D axial rotary embedding on q and k in every block, on the block's own integer token
  grid (full grid outside, half grid in the middle stage). With RoPE on, the absolute sincos
  position embedding is dropped by default (abs_pos_embed=None -> not use_rope); pass
  abs_pos_embed=True to keep it.
- use_swiglu: SwiGLU feed-forward with hidden width 2/3 * 4C rounded up to a multiple of 8, which
  has the parameter count of the GELU MLP (4C), so neither switch moves the parameter count.

Parameters (4x32x32 latents, 1000 classes): B 190.7M, L 668.5M, XL 943.4M without the alignment
projector, which lives in pipeline/align/heads.py (docs/models-and-alignment.md compares them with the published counts).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn

from pipeline.models.layers import (
    check_align_depth,
    rope_2d,
)
from pipeline.models.output import ModelOutput
from pipeline.models.sit import FinalLayer, PatchTransformer, SiTBlock, init_transformer_weights

# ----------------------------------------------------------------------------------------------
#                                 Token-grid resampling
# ----------------------------------------------------------------------------------------------


def tokens_to_map(x: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """Row-major tokens [B, h*w, C] -> feature map [B, C, h, w]."""
    h, w = grid
    return x.transpose(1, 2).reshape(x.shape[0], x.shape[2], h, w)


def map_to_tokens(x: torch.Tensor) -> torch.Tensor:
    """Feature map [B, C, h, w] -> row-major tokens [B, h*w, C]."""
    return x.flatten(2).transpose(1, 2)


class Downsample(nn.Module):
    """Halve the token grid, keep the width: [B, C, h, w] -> conv3x3(C -> C/4) -> PixelUnshuffle(2)
    -> [B, C, h/2, w/2]."""

    def __init__(self, dim: int):
        super().__init__()
        self.conv = nn.Conv2d(dim, dim // 4, kernel_size=3, padding=1)
        self.shuffle = nn.PixelUnshuffle(2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.shuffle(self.conv(x))


class Upsample(nn.Module):
    """Double the token grid, keep the width: [B, C, h, w] -> conv3x3(C -> 4C) -> PixelShuffle(2)
    -> [B, C, 2h, 2w]."""

    def __init__(self, dim: int):
        super().__init__()
        self.conv = nn.Conv2d(dim, dim * 4, kernel_size=3, padding=1)
        self.shuffle = nn.PixelShuffle(2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.shuffle(self.conv(x))


# ----------------------------------------------------------------------------------------------
#                                      SiT-down backbone
# ----------------------------------------------------------------------------------------------


class SiTDown(PatchTransformer):
    """U-shaped SiT with stages [encoder, middle (half grid), decoder]; see the module docstring.

    forward(x [B, C, H, W], t [B] in [0, 1], y [B] long) -> ModelOutput(velocity [B, C, H, W],
    hidden [B, N_d, hidden_size] after block `align_depth` (N_d = h*w/4 in the middle stage, h*w
    elsewhere), attn_logits: one [B, heads, N_l, N_l] per 0-indexed block in `attn_layers`).
    default_align_depth: None = middle of the middle stage, E + ceil(M / 2) (XL 18, L 16, B 8).
    """

    def __init__(
        self,
        input_size: int = 32,
        patch_size: int = 2,
        in_channels: int = 4,
        hidden_size: int = 1152,
        stage_depths: Sequence[int] = (10, 16, 10),
        num_heads: int = 16,
        mlp_ratio: float = 4.0,
        class_dropout_prob: float = 0.1,
        num_classes: int = 1000,
        use_rope: bool = True,
        use_swiglu: bool = True,
        abs_pos_embed: bool | None = None,
        rope_theta: float = 10000.0,
        default_align_depth: int | None = None,
    ):
        super().__init__()
        stage_depths = tuple(int(d) for d in stage_depths)
        if len(stage_depths) != 3 or min(stage_depths) < 1 or stage_depths[0] != stage_depths[2]:
            raise ValueError(
                f"stage_depths must be [encoder, middle, decoder] with encoder == decoder >= 1 and "
                f"middle >= 1, got {list(stage_depths)}"
            )
        if input_size % (2 * patch_size):
            raise ValueError(
                f"input_size {input_size} must be divisible by 2 * patch_size = {2 * patch_size} "
                f"so the token grid can be halved"
            )
        if hidden_size % 4:
            raise ValueError(f"hidden_size must be divisible by 4 (downsample conv C -> C/4), got {hidden_size}")
        self._geometry("SiTDown", input_size, patch_size, in_channels, hidden_size, sum(stage_depths), num_heads,
                       num_classes, use_rope, use_swiglu)
        self.stage_depths = stage_depths
        n_enc, n_mid, _ = stage_depths
        self.half_grid = (self.grid[0] // 2, self.grid[1] // 2)
        if default_align_depth is None:
            default_align_depth = n_enc + (n_mid + 1) // 2
        check_align_depth(default_align_depth, self.depth)
        self.default_align_depth = default_align_depth

        self._stem(class_dropout_prob, abs_pos_embed, rope_theta)
        if use_rope:  # the middle stage's tables, on the half grid
            cos, sin = rope_2d(hidden_size // num_heads, self.half_grid, rope_theta)
            self.register_buffer("rope_half_cos", cos, persistent=False)
            self.register_buffer("rope_half_sin", sin, persistent=False)

        # All blocks in forward order: encoder [0, E), middle [E, E+M), decoder [E+M, E+M+D).
        self.blocks = nn.ModuleList(
            [SiTBlock(hidden_size, num_heads, mlp_ratio, use_swiglu) for _ in range(self.depth)]
        )
        self.downsample = Downsample(hidden_size)
        self.upsample = Upsample(hidden_size)
        # skip_linears[j] feeds decoder block j from concat[x, output of encoder block E-1-j] (0-indexed).
        self.skip_linears = nn.ModuleList([nn.Linear(2 * hidden_size, hidden_size) for _ in range(n_enc)])
        self.final_layer = FinalLayer(hidden_size, patch_size, self.out_channels)
        init_transformer_weights(self)
        for conv in (self.downsample.conv, self.upsample.conv):
            nn.init.xavier_uniform_(conv.weight.view(conv.weight.shape[0], -1))
            nn.init.zeros_(conv.bias)

    def stage_of(self, depth: int) -> str:
        """'encoder', 'middle' or 'decoder' for block `depth` (1-indexed)."""
        check_align_depth(depth, self.depth)
        n_enc, n_mid, _ = self.stage_depths
        if depth <= n_enc:
            return "encoder"
        return "middle" if depth <= n_enc + n_mid else "decoder"

    def align_grid(self, depth: int) -> tuple[int, int]:
        """(h, w) token grid after block `depth` (1-indexed): the half grid in the middle stage."""
        return self.half_grid if self.stage_of(depth) == "middle" else self.grid

    def forward(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        y: torch.Tensor,
        *,
        align_depth: int | None = None,
        attn_layers: Sequence[int] = (),
    ) -> ModelOutput:
        h, c, align_depth, layers = self._embed(x, t, y, align_depth, attn_layers)
        wanted = set(layers)
        n_enc, n_mid, _ = self.stage_depths
        rope_full = (self.rope_cos, self.rope_sin) if self.use_rope else None
        rope_half = (self.rope_half_cos, self.rope_half_sin) if self.use_rope else None

        hidden = None
        logits: dict[int, torch.Tensor] = {}
        skips: list[torch.Tensor] = []
        for i, block in enumerate(self.blocks):
            if i == n_enc:  # entering the middle stage
                h = map_to_tokens(self.downsample(tokens_to_map(h, self.grid)))
            elif i == n_enc + n_mid:  # entering the decoder stage
                h = map_to_tokens(self.upsample(tokens_to_map(h, self.half_grid)))
            if i >= n_enc + n_mid:
                j = i - n_enc - n_mid
                h = self.skip_linears[j](torch.cat([h, skips[n_enc - 1 - j]], dim=-1))
            rope = rope_half if n_enc <= i < n_enc + n_mid else rope_full
            h, block_logits = block(h, c, rope, return_logits=i in wanted)
            if i < n_enc:
                skips.append(h)
            if block_logits is not None:
                logits[i] = block_logits
            if align_depth == i + 1:
                hidden = h
        return self._output(h, c, hidden, logits, layers)
