"""Building blocks shared by the diffusion backbones.

Conditioning (adaLN modulation, timestep and label embedders), fixed 2D position codes (sincos
absolute embedding and axial rotary embedding), the two feed-forward variants (GELU MLP and SwiGLU),
multi-head self-attention that can hand back its pre-softmax logits, and the checks every backbone
applies to an alignment request.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

# ----------------------------------------------------------------------------------------------
#                                 Conditioning and embedders
# ----------------------------------------------------------------------------------------------


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """adaLN modulation: x [B, N, C], shift and scale [B, C] -> x * (1 + scale) + shift."""
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of scalar times t [B] -> [B, dim].

    Frequencies f_k = max_period ** (-k / half) for k = 0 .. half-1 (half = dim // 2); the output is
    [cos(t f_0) .. cos(t f_{half-1}), sin(t f_0) .. sin(t f_{half-1})], zero-padded when dim is odd.
    t is embedded as given (t in [0, 1] for the flow-matching models here, no rescaling).
    """
    half = dim // 2
    freqs = torch.exp(
        -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half
    )
    args = t.float()[:, None] * freqs[None, :]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


class TimestepEmbedder(nn.Module):
    """t [B] -> [B, hidden_size]: sinusoidal features followed by Linear - SiLU - Linear."""

    def __init__(self, hidden_size: int, frequency_embedding_size: int = 256):
        super().__init__()
        self.frequency_embedding_size = frequency_embedding_size
        self.mlp = nn.Sequential(
            nn.Linear(frequency_embedding_size, hidden_size),
            nn.SiLU(),
            nn.Linear(hidden_size, hidden_size),
        )

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        freq = timestep_embedding(t, self.frequency_embedding_size)
        return self.mlp(freq.to(self.mlp[0].weight.dtype))


class LabelEmbedder(nn.Module):
    """Class labels y [B] (long) in 0 .. num_classes -> [B, hidden_size].

    The table always has num_classes + 1 rows: the extra row (index num_classes) is the null class
    used for classifier-free guidance, so a sampler may ask for it whatever the training dropout was.
    Labels are never dropped here: the data path decides which samples get the null class (with
    probability class_dropout_prob, recorded on the module), so training stays deterministic.
    """

    def __init__(self, num_classes: int, hidden_size: int, class_dropout_prob: float):
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        if not 0.0 <= class_dropout_prob < 1.0:
            raise ValueError(f"class_dropout_prob must be in [0, 1), got {class_dropout_prob}")
        self.num_classes = num_classes
        self.class_dropout_prob = class_dropout_prob
        self.embedding_table = nn.Embedding(num_classes + 1, hidden_size)

    @property
    def null_class(self) -> int:
        """Index of the null (unconditional) class: num_classes."""
        return self.num_classes

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        return self.embedding_table(y)


def label_embedder(num_classes: int, hidden_size: int, class_dropout_prob: float) -> LabelEmbedder | None:
    """The label table of a class-conditional model, or None for an unconditional one (num_classes = 0:
    no label embedding at all; the condition is the timestep alone and guidance does not apply)."""
    if num_classes < 0:
        raise ValueError(f"num_classes must be >= 0 (0 = unconditional), got {num_classes}")
    return LabelEmbedder(num_classes, hidden_size, class_dropout_prob) if num_classes else None


def add_label(c: torch.Tensor, y_embedder: LabelEmbedder | None, y: torch.Tensor | None) -> torch.Tensor:
    """c + the label embedding of y ([B, C]); c itself when the model is unconditional (y is ignored)."""
    return c if y_embedder is None else c + y_embedder(y)


# ----------------------------------------------------------------------------------------------
#                                   Fixed 2D position codes
# ----------------------------------------------------------------------------------------------


def _sincos_1d(dim: int, pos: torch.Tensor) -> torch.Tensor:
    """pos [N] float64 -> [N, dim]: [sin(pos w_k), cos(pos w_k)] with w_k = 10000 ** (-2k / dim)."""
    omega = 1.0 / 10000.0 ** (torch.arange(dim // 2, dtype=torch.float64, device=pos.device) / (dim / 2))
    args = pos[:, None] * omega[None, :]
    return torch.cat([torch.sin(args), torch.cos(args)], dim=1)


def sincos_pos_embed_2d(embed_dim: int, grid: tuple[int, int]) -> torch.Tensor:
    """Fixed 2D sincos position embedding [h*w, embed_dim] (float32), row-major over (h, w).

    The first embed_dim/2 channels encode the column index, the last embed_dim/2 the row index, each
    as a 1D sincos code [sin, cos]. embed_dim must be divisible by 4.
    """
    if embed_dim % 4:
        raise ValueError(f"embed_dim must be divisible by 4 for a 2D sincos embedding, got {embed_dim}")
    h, w = grid
    rows = torch.arange(h, dtype=torch.float64).repeat_interleave(w)  # [h*w]
    cols = torch.arange(w, dtype=torch.float64).repeat(h)  # [h*w]
    emb = torch.cat([_sincos_1d(embed_dim // 2, cols), _sincos_1d(embed_dim // 2, rows)], dim=1)
    return emb.float()


def rope_2d(head_dim: int, grid: tuple[int, int], theta: float = 10000.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Axial 2D rotary embedding for a (h, w) token grid -> (cos, sin), each [h*w, head_dim // 2].

    The head_dim channels form head_dim/2 rotation pairs (2j, 2j+1). The first head_dim/4 pairs
    rotate by row * f_k, the last head_dim/4 pairs by column * f_k, with f_k = theta ** (-k / n) for
    k = 0 .. n-1, n = head_dim / 4. Tokens are row-major over the grid. head_dim must be divisible by 4.
    """
    if head_dim % 4:
        raise ValueError(f"head_dim must be divisible by 4 for 2D RoPE, got {head_dim}")
    h, w = grid
    n = head_dim // 4
    freqs = theta ** (-torch.arange(n, dtype=torch.float64) / n)  # [n]
    rows = torch.arange(h, dtype=torch.float64).repeat_interleave(w)
    cols = torch.arange(w, dtype=torch.float64).repeat(h)
    angles = torch.cat([rows[:, None] * freqs, cols[:, None] * freqs], dim=1)  # [N, head_dim/2]
    return torch.cos(angles).float(), torch.sin(angles).float()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate channel pairs of x [B, heads, N, D] by the angles behind cos, sin [N, D/2].

    Pair (x_{2j}, x_{2j+1}) -> (x_{2j} cos_j - x_{2j+1} sin_j, x_{2j} sin_j + x_{2j+1} cos_j).
    """
    x_pairs = x.reshape(*x.shape[:-1], -1, 2)
    x0, x1 = x_pairs.unbind(-1)
    cos = cos.to(x.dtype)
    sin = sin.to(x.dtype)
    out = torch.stack([x0 * cos - x1 * sin, x0 * sin + x1 * cos], dim=-1)
    return out.flatten(-2)


# ----------------------------------------------------------------------------------------------
#                                       Feed-forward
# ----------------------------------------------------------------------------------------------


class Mlp(nn.Module):
    """Linear(C, hidden) - GELU(tanh) - Linear(hidden, C) on [B, N, C]."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


def swiglu_hidden(dim: int, mlp_ratio: float, multiple_of: int = 8) -> int:
    """SwiGLU hidden width whose parameter count matches a GELU MLP of width mlp_ratio * dim.

    A GELU MLP has 2 * dim * (mlp_ratio * dim) weights, SwiGLU 3 * dim * hidden, so hidden =
    2/3 * mlp_ratio * dim, rounded up to a multiple of `multiple_of` (1152 -> 3072, 1024 -> 2736).
    """
    hidden = int(math.ceil(2.0 * mlp_ratio * dim / 3.0))
    return multiple_of * ((hidden + multiple_of - 1) // multiple_of)


class SwiGLU(nn.Module):
    """SwiGLU feed-forward on [B, N, C]: Linear(hidden, C)(SiLU(x W_gate) * (x W_value))."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.hidden = hidden
        self.fc1 = nn.Linear(dim, 2 * hidden)  # gate and value projections, fused
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, value = self.fc1(x).chunk(2, dim=-1)
        return self.fc2(F.silu(gate) * value)


def feed_forward(dim: int, mlp_ratio: float, use_swiglu: bool) -> nn.Module:
    """The block's feed-forward: SwiGLU (parameter-matched) or GELU MLP of width mlp_ratio * dim."""
    if use_swiglu:
        return SwiGLU(dim, swiglu_hidden(dim, mlp_ratio))
    return Mlp(dim, int(dim * mlp_ratio))


# ----------------------------------------------------------------------------------------------
#                                         Attention
# ----------------------------------------------------------------------------------------------


class Attention(nn.Module):
    """Multi-head self-attention on x [B, N, C] with optional 2D RoPE on q and k.

    By default it runs F.scaled_dot_product_attention. With return_logits=True it computes the
    pre-softmax logits (q * scale) @ k^T [B, heads, N, N] explicitly (after RoPE when given), applies
    softmax (in float32) and the value product itself, and returns the logits too; both paths give
    the same output up to rounding.
    """

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"hidden size {dim} must be divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim**-0.5
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)  # output laid out as [3, heads, head_dim]
        self.proj = nn.Linear(dim, dim)

    def forward(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor] | None = None,
        return_logits: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # each [B, heads, N, head_dim]
        if rope is not None:
            q = apply_rope(q, *rope)
            k = apply_rope(k, *rope)
        logits = None
        if return_logits:
            logits = (q * self.scale) @ k.transpose(-2, -1)  # [B, heads, N, N]
            attn = logits.softmax(dim=-1, dtype=torch.float32).to(v.dtype)
            out = attn @ v
        else:
            out = F.scaled_dot_product_attention(q, k, v)
        out = out.transpose(1, 2).reshape(B, N, C)
        return self.proj(out), logits


# ----------------------------------------------------------------------------------------------
#                                   Alignment request checks
# ----------------------------------------------------------------------------------------------


def as_int(value: object) -> int | None:
    """value as a Python int when it is an integer (int, numpy or 0-d tensor index), else None."""
    if isinstance(value, bool):
        return None
    try:
        return operator.index(value)
    except TypeError:
        return None


def check_align_depth(align_depth: int | None, num_blocks: int) -> int | None:
    """align_depth must be None or a block number in 1 .. num_blocks (1-indexed); returns it as int."""
    if align_depth is None:
        return None
    depth = as_int(align_depth)
    if depth is None or not 1 <= depth <= num_blocks:
        raise ValueError(
            f"align_depth={align_depth!r} is not a block of this model: allowed values are "
            f"1 .. {num_blocks} (1-indexed) or None"
        )
    return depth


def check_attn_layers(attn_layers: Sequence[int], num_blocks: int, supports_attention: bool) -> list[int]:
    """attn_layers must be 0-indexed block numbers in 0 .. num_blocks - 1; returns them as ints."""
    requested = list(attn_layers)
    if requested and not supports_attention:
        raise ValueError(
            f"attn_layers={requested} requested, but this model has no attention layers: pass attn_layers=()"
        )
    layers = []
    for layer in requested:
        index = as_int(layer)
        if index is None or not 0 <= index < num_blocks:
            raise ValueError(
                f"attn_layers contains {layer!r}, which is not a block of this model: allowed values "
                f"are 0 .. {num_blocks - 1} (0-indexed)"
            )
        layers.append(index)
    return layers


def check_input(x: torch.Tensor, in_channels: int, input_size: int) -> None:
    """x must be [B, in_channels, input_size, input_size]."""
    if x.ndim != 4 or x.shape[1] != in_channels or x.shape[2] != input_size or x.shape[3] != input_size:
        raise ValueError(
            f"x has shape {tuple(x.shape)}, expected [B, {in_channels}, {input_size}, {input_size}]"
        )
