"""SiT: the DiT transformer trained as a flow-matching velocity model.

x [B, C, H, W] -> patchify (conv p x p, stride p) -> tokens [B, N, hidden] on the (H/p, W/p) grid,
N = H*W / p^2 -> + fixed 2D sincos position embedding -> `depth` adaLN-Zero blocks conditioned on
c = embed(t) + embed(y) -> final adaLN layer -> unpatchify -> velocity [B, C, H, W].

Sizes follow the DiT table (S 384/12/6, B 768/12/12, L 1024/24/16, XL 1152/28/16 for width / depth /
heads) plus a tiny T (64/4/4) for tests and demos. learn_sigma is not used: the output has the input's
channels. Optional switches (off by default, as in DiT/SiT): 2D RoPE on q and k, and a
parameter-matched SwiGLU feed-forward.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn

from pipeline.models.layers import (
    Attention,
    TimestepEmbedder,
    add_label,
    check_align_depth,
    check_attn_layers,
    check_input,
    feed_forward,
    label_embedder,
    modulate,
    rope_2d,
    sincos_pos_embed_2d,
)
from pipeline.models.output import ModelOutput

# ----------------------------------------------------------------------------------------------
#                                     Core SiT components
# ----------------------------------------------------------------------------------------------


class SiTBlock(nn.Module):
    """Pre-norm transformer block with adaLN-Zero conditioning on x [B, N, C] and c [B, C].

    x = x + gate_msa * Attn(modulate(LN(x), shift_msa, scale_msa))
    x = x + gate_mlp * FF(modulate(LN(x), shift_mlp, scale_mlp))
    The six modulation vectors come from Linear(SiLU(c)), zero-initialised so the block starts as
    the identity.
    """

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float = 4.0, use_swiglu: bool = False):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(hidden_size, num_heads, qkv_bias=True)
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.mlp = feed_forward(hidden_size, mlp_ratio, use_swiglu)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size))

    def forward(
        self,
        x: torch.Tensor,
        c: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor] | None = None,
        return_logits: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """-> (x [B, N, C], attention logits [B, heads, N, N] or None)."""
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=1)
        attn_out, logits = self.attn(modulate(self.norm1(x), shift_msa, scale_msa), rope, return_logits)
        x = x + gate_msa.unsqueeze(1) * attn_out
        x = x + gate_mlp.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))
        return x, logits


class FinalLayer(nn.Module):
    """adaLN-modulated LayerNorm and a linear map of tokens [B, N, C] to patches [B, N, p*p*out]."""

    def __init__(self, hidden_size: int, patch_size: int, out_channels: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


def unpatchify(x: torch.Tensor, patch_size: int, channels: int, grid: tuple[int, int]) -> torch.Tensor:
    """Patches [B, h*w, p*p*channels] (row-major grid, each patch laid out (p, p, channels)) ->
    image [B, channels, h*p, w*p]."""
    h, w = grid
    p = patch_size
    x = x.reshape(x.shape[0], h, w, p, p, channels)
    x = torch.einsum("bhwpqc->bchpwq", x)
    return x.reshape(x.shape[0], channels, h * p, w * p)


def init_transformer_weights(model: nn.Module) -> None:
    """DiT-style initialisation of a transformer backbone.

    Xavier-uniform for every Linear (bias 0) and for the patch-embedding conv viewed as a Linear;
    normal(0.02) for the label table and the timestep MLP; zero for every adaLN modulation Linear and
    for the final output Linear (adaLN-Zero), so a fresh model predicts zeros.
    """
    for module in model.modules():
        if isinstance(module, nn.Linear):
            nn.init.xavier_uniform_(module.weight)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
    patch = model.x_embedder
    nn.init.xavier_uniform_(patch.weight.view(patch.weight.shape[0], -1))
    nn.init.zeros_(patch.bias)
    if model.y_embedder is not None:
        nn.init.normal_(model.y_embedder.embedding_table.weight, std=0.02)
    nn.init.normal_(model.t_embedder.mlp[0].weight, std=0.02)
    nn.init.normal_(model.t_embedder.mlp[2].weight, std=0.02)
    for module in model.modules():
        if isinstance(module, (SiTBlock, FinalLayer)):
            nn.init.zeros_(module.adaLN_modulation[-1].weight)
            nn.init.zeros_(module.adaLN_modulation[-1].bias)
    nn.init.zeros_(model.final_layer.linear.weight)
    nn.init.zeros_(model.final_layer.linear.bias)


# ----------------------------------------------------------------------------------------------
#                             What SiT and SiT-down share
# ----------------------------------------------------------------------------------------------


class PatchTransformer(nn.Module):
    """The parts of a patch-token transformer that SiT and SiT-down share: the stem (patchify conv,
    timestep and label embedders, sincos position embedding or RoPE tables on the full token grid),
    the checks at the top of forward, and the final layer at its end. A subclass sets its geometry
    with `_geometry`, builds the stem with `_stem`, then its own blocks and the final layer."""

    supports_attention = True

    def _geometry(self, name: str, input_size: int, patch_size: int, in_channels: int, hidden_size: int,
                  depth: int, num_heads: int, num_classes: int, use_rope: bool, use_swiglu: bool) -> None:
        self.name = name  # build_model sets the registry name
        self.in_channels = in_channels
        self.out_channels = in_channels
        self.input_size = input_size
        self.patch_size = patch_size
        self.num_classes = num_classes
        self.hidden_size = hidden_size
        self.num_heads = num_heads
        self.depth = depth
        self.use_rope = use_rope
        self.use_swiglu = use_swiglu
        self.grid = (input_size // patch_size, input_size // patch_size)

    def _stem(self, class_dropout_prob: float, abs_pos_embed: bool | None, rope_theta: float) -> None:
        """Patchify conv, timestep and label embedders, then the position code of the full grid:
        fixed sincos (abs_pos_embed; None = on unless RoPE is on) and/or the RoPE tables."""
        c = self.hidden_size
        self.x_embedder = nn.Conv2d(self.in_channels, c, kernel_size=self.patch_size, stride=self.patch_size)
        self.t_embedder = TimestepEmbedder(c)
        self.y_embedder = label_embedder(self.num_classes, c, class_dropout_prob)
        self.abs_pos_embed = (not self.use_rope) if abs_pos_embed is None else abs_pos_embed
        if self.abs_pos_embed:
            self.register_buffer("pos_embed", sincos_pos_embed_2d(c, self.grid)[None], persistent=False)
        else:
            self.pos_embed = None
        if self.use_rope:
            cos, sin = rope_2d(c // self.num_heads, self.grid, rope_theta)
            self.register_buffer("rope_cos", cos, persistent=False)
            self.register_buffer("rope_sin", sin, persistent=False)

    def align_width(self, depth: int) -> int:
        """Width of the hidden state after block `depth` (1-indexed): hidden_size at every block."""
        check_align_depth(depth, self.depth)
        return self.hidden_size

    def _embed(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, align_depth: int | None,
               attn_layers: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor, int | None, tuple[int, ...]]:
        """Checked inputs -> (tokens h [B, N, C], condition c [B, C], align_depth, attention layers)."""
        check_input(x, self.in_channels, self.input_size)
        align_depth = check_align_depth(align_depth, self.depth)
        layers = check_attn_layers(attn_layers, self.depth, self.supports_attention)
        h = self.x_embedder(x).flatten(2).transpose(1, 2)  # [B, N, C]
        if self.pos_embed is not None:
            h = h + self.pos_embed.to(h.dtype)
        c = add_label(self.t_embedder(t), self.y_embedder, y)  # [B, C]
        return h, c, align_depth, layers

    def _output(self, h: torch.Tensor, c: torch.Tensor, hidden: torch.Tensor | None,
                logits: dict[int, torch.Tensor], layers: tuple[int, ...]) -> ModelOutput:
        """Final layer and unpatchify: tokens [B, N, C] -> ModelOutput(velocity [B, C_in, H, W], ...)."""
        out = self.final_layer(h, c)  # [B, N, p*p*C]
        velocity = unpatchify(out, self.patch_size, self.out_channels, self.grid)
        return ModelOutput(velocity, hidden, tuple(logits[i] for i in layers))


# ----------------------------------------------------------------------------------------------
#                                        SiT backbone
# ----------------------------------------------------------------------------------------------


class SiT(PatchTransformer):
    """Class-conditional SiT/DiT backbone predicting the velocity field.

    forward(x [B, C, H, W], t [B] in [0, 1], y [B] long) -> ModelOutput(velocity [B, C, H, W],
    hidden [B, N, hidden_size] after block `align_depth` (1-indexed), attn_logits: one
    [B, heads, N, N] per 0-indexed block in `attn_layers`).

    abs_pos_embed: add the fixed sincos position embedding after patchify; None = on unless RoPE is
    on (RoPE then carries all position information).
    default_align_depth: the registry sets it per size from its SIT_ALIGN_DEPTH table (REPA's: B 4,
    L and XL 8); None (a model built outside the registry) = min(depth, 8) when hidden_size >= 768,
    else max(1, depth // 3).
    """

    def __init__(
        self,
        input_size: int = 32,
        patch_size: int = 2,
        in_channels: int = 4,
        hidden_size: int = 1152,
        depth: int = 28,
        num_heads: int = 16,
        mlp_ratio: float = 4.0,
        class_dropout_prob: float = 0.1,
        num_classes: int = 1000,
        use_rope: bool = False,
        use_swiglu: bool = False,
        abs_pos_embed: bool | None = None,
        rope_theta: float = 10000.0,
        default_align_depth: int | None = None,
    ):
        super().__init__()
        if input_size % patch_size:
            raise ValueError(f"input_size {input_size} must be divisible by patch_size {patch_size}")
        if depth < 1:
            raise ValueError(f"depth must be >= 1, got {depth}")
        self._geometry("SiT", input_size, patch_size, in_channels, hidden_size, depth, num_heads, num_classes,
                       use_rope, use_swiglu)
        if default_align_depth is None:
            default_align_depth = min(depth, 8) if hidden_size >= 768 else max(1, depth // 3)
        check_align_depth(default_align_depth, depth)
        self.default_align_depth = default_align_depth

        self._stem(class_dropout_prob, abs_pos_embed, rope_theta)
        self.blocks = nn.ModuleList(
            [SiTBlock(hidden_size, num_heads, mlp_ratio, use_swiglu) for _ in range(depth)]
        )
        self.final_layer = FinalLayer(hidden_size, patch_size, self.out_channels)
        init_transformer_weights(self)

    def align_grid(self, depth: int) -> tuple[int, int]:
        """(h, w) token grid of the hidden state after block `depth` (1-indexed): always the patch grid."""
        check_align_depth(depth, self.depth)
        return self.grid

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
        rope = (self.rope_cos, self.rope_sin) if self.use_rope else None

        hidden = None
        logits: dict[int, torch.Tensor] = {}
        for i, block in enumerate(self.blocks):
            h, block_logits = block(h, c, rope, return_logits=i in wanted)
            if block_logits is not None:
                logits[i] = block_logits
            if align_depth == i + 1:
                hidden = h
        return self._output(h, c, hidden, logits, layers)
