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
    TimestepEmbedder,
    add_label,
    check_align_depth,
    check_attn_layers,
    check_input,
    label_embedder,
    rope_2d,
    sincos_pos_embed_2d,
)
from pipeline.models.output import ModelOutput
from pipeline.models.sit import FinalLayer, SiTBlock, init_transformer_weights, unpatchify

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


class SiTDown(nn.Module):
    """U-shaped SiT with stages [encoder, middle (half grid), decoder]; see the module docstring.

    forward(x [B, C, H, W], t [B] in [0, 1], y [B] long) -> ModelOutput(velocity [B, C, H, W],
    hidden [B, N_d, hidden_size] after block `align_depth` (N_d = h*w/4 in the middle stage, h*w
    elsewhere), attn_logits: one [B, heads, N_l, N_l] per 0-indexed block in `attn_layers`).
    default_align_depth: None = middle of the middle stage, E + ceil(M / 2) (XL 18, L 16, B 8).
    """

    supports_attention = True

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
        self.name = "SiTDown"  # build_model sets the registry name
        self.in_channels = in_channels
        self.out_channels = in_channels
        self.input_size = input_size
        self.patch_size = patch_size
        self.num_classes = num_classes
        self.hidden_size = hidden_size
        self.num_heads = num_heads
        self.stage_depths = stage_depths
        self.depth = sum(stage_depths)
        self.use_rope = use_rope
        self.use_swiglu = use_swiglu
        n_enc, n_mid, _ = stage_depths
        self.grid = (input_size // patch_size, input_size // patch_size)
        self.half_grid = (self.grid[0] // 2, self.grid[1] // 2)
        if default_align_depth is None:
            default_align_depth = n_enc + (n_mid + 1) // 2
        check_align_depth(default_align_depth, self.depth)
        self.default_align_depth = default_align_depth

        self.x_embedder = nn.Conv2d(in_channels, hidden_size, kernel_size=patch_size, stride=patch_size)
        self.t_embedder = TimestepEmbedder(hidden_size)
        self.y_embedder = label_embedder(num_classes, hidden_size, class_dropout_prob)
        self.abs_pos_embed = (not use_rope) if abs_pos_embed is None else abs_pos_embed
        if self.abs_pos_embed:
            self.register_buffer("pos_embed", sincos_pos_embed_2d(hidden_size, self.grid)[None], persistent=False)
        else:
            self.pos_embed = None
        if use_rope:
            head_dim = hidden_size // num_heads
            cos, sin = rope_2d(head_dim, self.grid, rope_theta)
            self.register_buffer("rope_cos", cos, persistent=False)
            self.register_buffer("rope_sin", sin, persistent=False)
            cos, sin = rope_2d(head_dim, self.half_grid, rope_theta)
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

    def align_width(self, depth: int) -> int:
        """Width of the hidden state after block `depth` (1-indexed): hidden_size at every stage."""
        check_align_depth(depth, self.depth)
        return self.hidden_size

    def forward(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        y: torch.Tensor,
        *,
        align_depth: int | None = None,
        attn_layers: Sequence[int] = (),
    ) -> ModelOutput:
        check_input(x, self.in_channels, self.input_size)
        align_depth = check_align_depth(align_depth, self.depth)
        layers = check_attn_layers(attn_layers, self.depth, self.supports_attention)
        wanted = set(layers)
        n_enc, n_mid, _ = self.stage_depths
        rope_full = (self.rope_cos, self.rope_sin) if self.use_rope else None
        rope_half = (self.rope_half_cos, self.rope_half_sin) if self.use_rope else None

        h = self.x_embedder(x).flatten(2).transpose(1, 2)  # [B, N, C]
        if self.pos_embed is not None:
            h = h + self.pos_embed.to(h.dtype)
        c = add_label(self.t_embedder(t), self.y_embedder, y)  # [B, C]

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
        out = self.final_layer(h, c)  # [B, N, p*p*C]
        velocity = unpatchify(out, self.patch_size, self.out_channels, self.grid)
        return ModelOutput(velocity, hidden, tuple(logits[i] for i in layers))
