"""UNet: a small ADM-style convolutional U-Net velocity model (what Stable-Diffusion users call a U-Net).

x [B, C, H, W] -> conv3x3 -> encoder levels -> middle block -> decoder levels -> GN - SiLU -
conv3x3 (zero-initialised) -> velocity [B, C, H, W].

    encoder level l (l = 0 .. L-1, channels ch * mult[l]): num_res_blocks x [ResBlock (+ self-attention
            when l in attn_levels)], then a stride-2 conv3x3 downsample (not after the last level);
            every layer's output is pushed on the skip stack (the input conv's output too)
    middle: ResBlock - self-attention - ResBlock at the lowest resolution (H / 2^(L-1))
    decoder level l (l = L-1 .. 0): num_res_blocks + 1 x [concat(h, skip.pop()) -> ResBlock
            (+ self-attention when l in attn_levels)], then nearest x2 + conv3x3 upsample
            (not after level 0)

ResBlocks are conditioned on emb = MLP(sincos(t)) + table(y) by adaptive GroupNorm:
GN(h) * (1 + scale) + shift with (scale, shift) = Linear(SiLU(emb)). As in ADM, the last conv of
every ResBlock, the output projection of every attention block and the output conv start at zero,
so a fresh model is the identity inside and predicts zero velocity.

Alignment: the U-Net has a single alignment point, the middle block's output (depth = 1,
default_align_depth = 1). Its hidden state is the middle feature map [B, C_mid, h, w] flattened
row-major to tokens [B, h*w, C_mid]; align_grid(1) = (h, w), align_width(1) = C_mid. The U-Net does not
hand out attention logits (supports_attention = False): attention alignment (HASTE) needs a
transformer backbone.

Sizes (3 levels, 32x32 input -> 8x8 middle grid): UNet-T ch 32, mult (1, 2, 2), 1 ResBlock per level,
attention only in the middle (tests, demo); UNet-S ch 128, mult (1, 2, 2), 2 ResBlocks, attention at
levels 1, 2; UNet-B ch 192, mult (1, 2, 3), 2 ResBlocks, attention at levels 1, 2.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from pipeline.models.layers import TimestepEmbedder, add_label, check_align_depth, check_input, label_embedder
from pipeline.models.output import ModelOutput

# ----------------------------------------------------------------------------------------------
#                                      Convolutional layers
# ----------------------------------------------------------------------------------------------


def group_norm(channels: int, max_groups: int = 32) -> nn.GroupNorm:
    """GroupNorm with the largest group count <= max_groups that divides `channels`."""
    return nn.GroupNorm(math.gcd(channels, max_groups), channels, eps=1e-6)


class ResBlock(nn.Module):
    """Residual conv block with adaptive GroupNorm conditioning.

    x [B, C_in, H, W], emb [B, E] -> [B, C_out, H, W]:
    h = conv3x3(SiLU(GN(x))); h = GN(h) * (1 + scale) + shift; h = conv3x3(dropout(SiLU(h)));
    out = skip(x) + h, skip = identity or conv1x1 when C_in != C_out.
    """

    def __init__(self, in_channels: int, out_channels: int, emb_dim: int, dropout: float = 0.0):
        super().__init__()
        self.in_norm = group_norm(in_channels)
        self.in_conv = nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1)
        self.emb_proj = nn.Sequential(nn.SiLU(), nn.Linear(emb_dim, 2 * out_channels))
        self.out_norm = group_norm(out_channels)
        self.dropout = nn.Dropout(dropout)
        self.out_conv = nn.Conv2d(out_channels, out_channels, kernel_size=3, padding=1)
        if in_channels == out_channels:
            self.skip = nn.Identity()
        else:
            self.skip = nn.Conv2d(in_channels, out_channels, kernel_size=1)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.in_conv(F.silu(self.in_norm(x)))
        scale, shift = self.emb_proj(emb)[:, :, None, None].chunk(2, dim=1)
        h = self.out_norm(h) * (1 + scale) + shift
        h = self.out_conv(self.dropout(F.silu(h)))
        return self.skip(x) + h


class SelfAttention2d(nn.Module):
    """Residual multi-head self-attention over the pixels of x [B, C, H, W] (GroupNorm first)."""

    def __init__(self, channels: int, head_channels: int = 64):
        super().__init__()
        self.num_heads = max(1, channels // head_channels)
        if channels % self.num_heads:
            raise ValueError(f"attention channels {channels} must be divisible by {self.num_heads} heads")
        self.norm = group_norm(channels)
        self.qkv = nn.Linear(channels, 3 * channels)
        self.proj = nn.Linear(channels, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        tokens = self.norm(x).flatten(2).transpose(1, 2)  # [B, HW, C]
        qkv = self.qkv(tokens).reshape(B, H * W, 3, self.num_heads, C // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each [B, heads, HW, C/heads]
        out = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, H * W, C)
        return x + self.proj(out).transpose(1, 2).reshape(B, C, H, W)


class Downsample(nn.Module):
    """[B, C, H, W] -> conv3x3 stride 2 -> [B, C, H/2, W/2]."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, kernel_size=3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class Upsample(nn.Module):
    """[B, C, H, W] -> nearest x2 -> conv3x3 -> [B, C, 2H, 2W]."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, kernel_size=3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class CondSequential(nn.Sequential):
    """nn.Sequential whose forward(x, emb) hands emb to the ResBlocks and x alone to the rest."""

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        for layer in self:
            x = layer(x, emb) if isinstance(layer, ResBlock) else layer(x)
        return x


# ----------------------------------------------------------------------------------------------
#                                         U-Net backbone
# ----------------------------------------------------------------------------------------------


class UNet(nn.Module):
    """Class-conditional convolutional U-Net predicting the velocity field; see the module docstring.

    forward(x [B, C, H, W], t [B] in [0, 1], y [B] long) -> ModelOutput(velocity [B, C, H, W],
    hidden [B, h*w, C_mid] from the middle block when align_depth == 1, attn_logits = ()).
    """

    supports_attention = False
    depth = 1
    default_align_depth = 1

    def __init__(
        self,
        input_size: int = 32,
        in_channels: int = 4,
        num_classes: int = 1000,
        class_dropout_prob: float = 0.1,
        model_channels: int = 128,
        channel_mult: Sequence[int] = (1, 2, 2),
        num_res_blocks: int = 2,
        attn_levels: Sequence[int] = (1, 2),
        head_channels: int = 64,
        dropout: float = 0.0,
    ):
        super().__init__()
        channel_mult = tuple(int(m) for m in channel_mult)
        levels = len(channel_mult)
        if levels < 1 or min(channel_mult) < 1 or num_res_blocks < 1 or model_channels < 1:
            raise ValueError(
                f"UNet needs model_channels >= 1, num_res_blocks >= 1 and a non-empty channel_mult of "
                f"positive ints, got {model_channels}, {num_res_blocks}, {list(channel_mult)}"
            )
        if any(not 0 <= level < levels for level in attn_levels):
            raise ValueError(f"attn_levels {list(attn_levels)} must be level indices in 0 .. {levels - 1}")
        factor = 2 ** (levels - 1)
        if input_size % factor:
            raise ValueError(
                f"input_size {input_size} must be divisible by 2^(levels - 1) = {factor} for "
                f"channel_mult {list(channel_mult)}"
            )
        self.name = "UNet"
        self.in_channels = in_channels
        self.out_channels = in_channels
        self.input_size = input_size
        self.num_classes = num_classes
        self.model_channels = model_channels
        self.channel_mult = channel_mult
        self.mid_channels = model_channels * channel_mult[-1]
        self.hidden_size = self.mid_channels
        self.num_heads = max(1, self.mid_channels // head_channels)
        self.mid_grid = (input_size // factor, input_size // factor)
        emb_dim = 4 * model_channels

        self.t_embedder = TimestepEmbedder(emb_dim)
        self.y_embedder = label_embedder(num_classes, emb_dim, class_dropout_prob)
        self.input_conv = nn.Conv2d(in_channels, model_channels, kernel_size=3, padding=1)

        def level_layer(c_in: int, c_out: int, level: int) -> CondSequential:
            layers: list[nn.Module] = [ResBlock(c_in, c_out, emb_dim, dropout)]
            if level in attn_levels:
                layers.append(SelfAttention2d(c_out, head_channels))
            return CondSequential(*layers)

        # Encoder: every entry's output goes on the skip stack.
        self.down = nn.ModuleList()
        skip_channels = [model_channels]
        ch = model_channels
        for level, mult in enumerate(channel_mult):
            for _ in range(num_res_blocks):
                self.down.append(level_layer(ch, model_channels * mult, level))
                ch = model_channels * mult
                skip_channels.append(ch)
            if level != levels - 1:
                self.down.append(CondSequential(Downsample(ch)))
                skip_channels.append(ch)

        self.mid = CondSequential(
            ResBlock(ch, ch, emb_dim, dropout), SelfAttention2d(ch, head_channels), ResBlock(ch, ch, emb_dim, dropout)
        )

        # Decoder: every entry first concatenates one skip.
        self.up = nn.ModuleList()
        for level, mult in reversed(list(enumerate(channel_mult))):
            for i in range(num_res_blocks + 1):
                layer = level_layer(ch + skip_channels.pop(), model_channels * mult, level)
                ch = model_channels * mult
                if level != 0 and i == num_res_blocks:
                    layer.append(Upsample(ch))
                self.up.append(layer)

        self.out = nn.Sequential(group_norm(ch), nn.SiLU(), nn.Conv2d(ch, self.out_channels, kernel_size=3, padding=1))
        self._init_weights()

    def _init_weights(self) -> None:
        """ADM-style: default conv/linear init, normal(0.02) embedders, zero for every residual
        branch's last layer (ResBlock out_conv, attention proj) and the output conv."""
        if self.y_embedder is not None:
            nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        zero = [self.out[-1]]
        for module in self.modules():
            if isinstance(module, ResBlock):
                zero.append(module.out_conv)
            elif isinstance(module, SelfAttention2d):
                zero.append(module.proj)
        for layer in zero:
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def align_grid(self, depth: int) -> tuple[int, int]:
        """(h, w) grid of the middle block's feature map (depth must be 1)."""
        check_align_depth(depth, self.depth)
        return self.mid_grid

    def align_width(self, depth: int) -> int:
        """Channels of the middle block's feature map (depth must be 1)."""
        check_align_depth(depth, self.depth)
        return self.mid_channels

    def forward(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        y: torch.Tensor,
        *,
        align_depth: int | None = None,
        attn_layers: Sequence[int] = (),
    ) -> ModelOutput:
        if len(attn_layers):
            raise ValueError(
                f"attn_layers={list(attn_layers)} requested from {self.name}, a convolutional U-Net that "
                "hands out no attention logits: attention alignment (HASTE) needs a transformer backbone "
                "(SiT-*, SiTDown-*); use train.align = repa or urepa with a U-Net"
            )
        check_input(x, self.in_channels, self.input_size)
        align_depth = check_align_depth(align_depth, self.depth)
        emb = add_label(self.t_embedder(t), self.y_embedder, y)  # [B, 4 ch]

        h = self.input_conv(x)
        skips = [h]
        for layer in self.down:
            h = layer(h, emb)
            skips.append(h)
        h = self.mid(h, emb)  # [B, C_mid, h, w]
        hidden = h.flatten(2).transpose(1, 2) if align_depth == 1 else None
        for layer in self.up:
            h = layer(torch.cat([h, skips.pop()], dim=1), emb)
        return ModelOutput(self.out(h), hidden, ())
