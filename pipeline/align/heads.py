"""What sits between a student's hidden tokens and the teacher's: the projector and the grid adapter.

Projectors: REPA's per-token MLP (the default) or iREPA's 3x3 convolution over the token grid.

U-REPA's order (arXiv 2503.18414): the projector MLP runs FIRST, per token, on the student's own grid; the
projected map is THEN resized to the teacher's patch grid. The same resize maps any student grid to
any teacher grid, up or down, so REPA with mismatched grids uses it too.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn as nn
import torch.nn.functional as F

ResizeMode = Literal["nearest", "bilinear", "bicubic"]
RESIZE_MODES = ("nearest", "bilinear", "bicubic")


# ----------------------------------------------------------------------------------------------
#                                         Projector
# ----------------------------------------------------------------------------------------------


class Projector(nn.Sequential):
    """REPA's per-token MLP: Linear(in, hidden) - SiLU - Linear(hidden, hidden) - SiLU - Linear(hidden, out).

    [B, N, in_dim] -> [B, N, out_dim]. Initialised as in REPA (and HASTE), whose projectors live
    inside the SiT and so get its `initialize_weights`: xavier-uniform weights, zero biases (not
    PyTorch's default Linear init).
    """

    def __init__(self, in_dim: int, out_dim: int, hidden: int = 2048):
        for name, value in (("in_dim", in_dim), ("out_dim", out_dim), ("hidden", hidden)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"Projector: {name} must be a positive int, got {value!r}")
        super().__init__(
            nn.Linear(in_dim, hidden),
            nn.SiLU(),
            nn.Linear(hidden, hidden),
            nn.SiLU(),
            nn.Linear(hidden, out_dim),
        )
        self.in_dim, self.out_dim, self.hidden = in_dim, out_dim, hidden
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """REPA's init of every Linear: xavier_uniform_ weight, zero bias."""
        for layer in self:
            if isinstance(layer, nn.Linear):
                nn.init.xavier_uniform_(layer.weight)
                nn.init.zeros_(layer.bias)


class ConvProjector(nn.Module):
    """iREPA's projector (arXiv 2512.10794): one 3x3 convolution (padding 1) over the student's token grid.

    [B, h*w, in_dim] -> [B, h*w, out_dim]. Each output token sees its 3x3 neighbourhood, so the
    projection carries the map's spatial structure instead of treating tokens one by one as the MLP
    does. Initialised as PyTorch's Conv2d (the paper's snippet builds a plain nn.Conv2d).
    """

    def __init__(self, in_dim: int, out_dim: int, grid: tuple[int, int]):
        super().__init__()
        self.grid = _check_grid("grid", grid)
        self.in_dim, self.out_dim = in_dim, out_dim
        self.conv = nn.Conv2d(in_dim, out_dim, kernel_size=3, padding=1)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h, w = self.grid
        b, n, c = tokens.shape
        if n != h * w or c != self.in_dim:
            raise ValueError(f"ConvProjector: tokens must be [B, {h * w}, {self.in_dim}] for grid {self.grid}, "
                             f"got {tuple(tokens.shape)}")
        fmap = tokens.transpose(1, 2).reshape(b, c, h, w)
        return self.conv(fmap).flatten(2).transpose(1, 2)

    def extra_repr(self) -> str:
        return f"grid={self.grid}"


def build_projector(kind: Literal["mlp", "conv"], in_dim: int, out_dim: int, hidden: int,
                    grid: tuple[int, int]) -> nn.Module:
    """align.projector: "mlp" (REPA's Projector, hidden width `hidden`) or "conv" (iREPA's ConvProjector)."""
    if kind == "mlp":
        return Projector(in_dim, out_dim, hidden)
    if kind == "conv":
        return ConvProjector(in_dim, out_dim, grid)
    raise ValueError(f"align.projector = {kind!r} is not one of 'mlp', 'conv'")


# ----------------------------------------------------------------------------------------------
#                                        Grid adapter
# ----------------------------------------------------------------------------------------------


def _check_grid(name: str, grid: tuple[int, int]) -> tuple[int, int]:
    if (
        not isinstance(grid, (tuple, list))
        or len(grid) != 2
        or not all(isinstance(g, int) and g >= 1 for g in grid)
    ):
        raise ValueError(f"{name} must be a pair of positive ints (h, w), got {grid!r}")
    return int(grid[0]), int(grid[1])


def align_to_grid(
    tokens: torch.Tensor,
    src_grid: tuple[int, int],
    dst_grid: tuple[int, int],
    mode: ResizeMode = "bilinear",
) -> torch.Tensor:
    """Resize a row-major token map from src_grid to dst_grid.

    tokens [B, h*w, D] -> [B, gh*gw, D]. The tokens are viewed as a D-channel (h, w) map and resized
    with F.interpolate: align_corners=False for bilinear/bicubic, antialias off in every direction,
    and "nearest" is PyTorch's nearest (source index floor(i * h / gh)). Matching grids return
    `tokens` itself. Differentiable; runs in the dtype of `tokens`.
    """
    h, w = _check_grid("src_grid", src_grid)
    gh, gw = _check_grid("dst_grid", dst_grid)
    if mode not in RESIZE_MODES:
        raise ValueError(f"align_to_grid: mode={mode!r} is not one of {RESIZE_MODES}")
    if tokens.ndim != 3 or tokens.shape[1] != h * w:
        raise ValueError(
            f"align_to_grid: tokens must be [B, h*w, D] = [B, {h * w}, D] for src_grid {(h, w)}, "
            f"got {tuple(tokens.shape)}"
        )
    if (h, w) == (gh, gw):
        return tokens
    b, _, d = tokens.shape
    fmap = tokens.reshape(b, h, w, d).permute(0, 3, 1, 2)  # [B, D, h, w] (channels-last memory)
    if mode == "nearest":
        out = F.interpolate(fmap, size=(gh, gw), mode="nearest")
    else:
        out = F.interpolate(fmap, size=(gh, gw), mode=mode, align_corners=False, antialias=False)
    return out.permute(0, 2, 3, 1).reshape(b, gh * gw, d)


class GridAdapter(nn.Module):
    """align_to_grid with fixed grids and mode; no parameters. [B, h*w, D] -> [B, gh*gw, D]."""

    def __init__(self, src_grid: tuple[int, int], dst_grid: tuple[int, int], mode: ResizeMode = "bilinear"):
        super().__init__()
        self.src_grid = _check_grid("src_grid", src_grid)
        self.dst_grid = _check_grid("dst_grid", dst_grid)
        self.mode = mode

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return align_to_grid(tokens, self.src_grid, self.dst_grid, self.mode)

    def extra_repr(self) -> str:
        return f"src_grid={self.src_grid}, dst_grid={self.dst_grid}, mode={self.mode!r}"
