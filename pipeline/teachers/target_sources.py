"""Where the alignment targets of a training batch come from: the cache, a cached hidden state, or
the teacher itself.

Every source is a callable `source(batch) -> TeacherTargets` whose `keys` name the batch entries it
reads (a dict of tensors already on the training device):

    source          teacher.cache   reads                                   gives
    CachedTokens    tokens          tokens [B,T,D] fp16/fp32                tokens
                                    (int8 tokens + tokens_scale [B,T,1])
    CachedHidden    hidden          hidden [B,P+T,D], the state entering    tokens + attention logits
                                    block `start_block`                     (blocks >= start_block)
    Online          online          images [B,3,H,W] uint8                  tokens + attention logits

The batch carries each array under its base name: a data pipeline that serves mirrored samples puts
`tokens_flip` of those samples under `tokens`. Targets are computed without autograd (torch.no_grad,
not inference_mode, so the losses may save them for backward) and returned in float32; attention
logits are float32 by construction (see dinov2.attention_logits).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING

import torch
from torch import nn

from pipeline.teachers import dinov2
from pipeline.teachers.quantize import dequantize
from pipeline.teachers.targets import TeacherTargets
from schemas.names import patch_grid

if TYPE_CHECKING:
    from schemas.config import TeacherConfig

TOKENS, TOKEN_SCALES, HIDDEN, IMAGES = "tokens", "tokens_scale", "hidden", "images"


def _take(batch: Mapping[str, torch.Tensor], key: str, source: str) -> torch.Tensor:
    if key not in batch:
        raise KeyError(f"{source} needs batch[{key!r}]; the batch holds {sorted(batch)}")
    return batch[key]


# ----------------------------------------------------------------------------------------------
#                                          Sources
# ----------------------------------------------------------------------------------------------


class CachedTokens:
    """Stored x_norm_patchtokens: fp16 `tokens`, or int8 `tokens` with fp16 `tokens_scale`.

    grid: the teacher's (gh, gw) patch grid, T = gh * gw.
    int8: whether the store holds int8 codes and per-token scales.
    """

    def __init__(self, grid: tuple[int, int], int8: bool = False):
        self.grid = (int(grid[0]), int(grid[1]))
        self.int8 = int8
        self.keys: tuple[str, ...] = (TOKENS, TOKEN_SCALES) if int8 else (TOKENS,)

    def to(self, device: torch.device | str) -> CachedTokens:
        return self  # nothing to move: the batch arrives on the training device

    def __call__(self, batch: Mapping[str, torch.Tensor]) -> TeacherTargets:
        tokens = _take(batch, TOKENS, "CachedTokens")
        if self.int8:
            tokens = dequantize(tokens, _take(batch, TOKEN_SCALES, "CachedTokens"))
        tokens = tokens.float()
        t = self.grid[0] * self.grid[1]
        if tokens.ndim != 3 or tokens.shape[1] != t:
            raise ValueError(f"cached tokens must be [B, {t}, D] for the {self.grid} grid, got {tuple(tokens.shape)}")
        return TeacherTargets(tokens=tokens, grid=self.grid)


class CachedHidden:
    """Recompute blocks start_block..end (+ final norm) from the cached state entering start_block.

    Exact: yields the same x_norm_patchtokens as a full forward, plus the attention logits of the
    blocks `attn_layers` (each >= start_block), at the cost of depth - start_block blocks.
    """

    def __init__(self, teacher: nn.Module, start_block: int, attn_layers: Sequence[int] = ()):
        self.teacher = teacher
        self.start_block = int(start_block)
        self.attn_layers = tuple(int(i) for i in attn_layers)
        self.grid = dinov2.teacher_grid(teacher)
        self.keys: tuple[str, ...] = (HIDDEN,)
        _check_layers(self.attn_layers, self.start_block, dinov2.depth(teacher), "teacher.hidden_layer")

    def to(self, device: torch.device | str) -> CachedHidden:
        self.teacher.to(device)
        return self

    def __call__(self, batch: Mapping[str, torch.Tensor]) -> TeacherTargets:
        hidden = _take(batch, HIDDEN, "CachedHidden")
        param = next(self.teacher.parameters())
        with torch.no_grad():
            tokens, logits = dinov2.tail_forward(self.teacher, hidden.to(param.dtype), self.start_block, self.attn_layers)
        return TeacherTargets(tokens=tokens.float(), attn_logits=logits, grid=self.grid)


class Online:
    """Run the teacher on the batch's uint8 images (REPA's preprocessing at `resolution`)."""

    def __init__(self, teacher: nn.Module, resolution: int, attn_layers: Sequence[int] = ()):
        self.teacher = teacher
        self.resolution = int(resolution)
        self.attn_layers = tuple(int(i) for i in attn_layers)
        self.grid = dinov2.teacher_grid(teacher)
        self.keys: tuple[str, ...] = (IMAGES,)
        _check_layers(self.attn_layers, 0, dinov2.depth(teacher), "block 0")

    def to(self, device: torch.device | str) -> Online:
        self.teacher.to(device)
        return self

    def __call__(self, batch: Mapping[str, torch.Tensor]) -> TeacherTargets:
        x = dinov2.preprocess(_take(batch, IMAGES, "Online"), self.resolution)
        with torch.no_grad():
            if not self.attn_layers:
                return TeacherTargets(tokens=dinov2.patch_tokens(self.teacher, x).float(), grid=self.grid)
            start = min(self.attn_layers)
            hidden = dinov2.hidden_before(self.teacher, x, start)
            tokens, logits = dinov2.tail_forward(self.teacher, hidden, start, self.attn_layers)
        return TeacherTargets(tokens=tokens.float(), attn_logits=logits, grid=self.grid)


# What training calls: the batch's teacher arrays (on the device) -> its targets. The three classes
# above are such callables; tests pass plain functions.
TeacherSource = Callable[[Mapping[str, torch.Tensor]], TeacherTargets]


def _check_layers(layers: tuple[int, ...], start: int, depth: int, what: str) -> None:
    bad = [i for i in layers if not start <= i < depth]
    if bad:
        raise ValueError(
            f"teacher attention layers {list(layers)} must lie in [{start}, {depth - 1}] ({what} = {start}, "
            f"{depth} blocks); out of range: {bad}. Cache an earlier teacher.hidden_layer or change "
            f"align.teacher_layers"
        )


# ----------------------------------------------------------------------------------------------
#                                          Factory
# ----------------------------------------------------------------------------------------------


def build_teacher_source(cfg: TeacherConfig, teacher: nn.Module | None, attn_layers: Sequence[int] = ()) -> CachedTokens | CachedHidden | Online:
    """The source for `cfg` (schemas.config.TeacherConfig: cache, dtype, resolution, hidden_layer).

    teacher:     the loaded teacher (dinov2.load_teacher), required for cache = hidden / online,
                 ignored (may be None) for cache = tokens.
    attn_layers: 0-indexed teacher blocks whose attention logits the objective needs (HASTE);
                 cached tokens cannot provide them.
    """
    attn_layers = tuple(attn_layers)
    if cfg.cache == "tokens" or (cfg.cache == "hidden" and not attn_layers):
        # A hidden-state store also holds the final tokens: an objective without attention terms
        # reads them directly (exact, and no teacher blocks run per step).
        if attn_layers:
            raise ValueError(
                f"the objective needs teacher attention logits of blocks {list(attn_layers)}, which "
                f"teacher.cache = 'tokens' does not store; set teacher.cache = 'hidden' (with "
                f"teacher.hidden_layer <= {min(attn_layers)}) or 'online'"
            )
        grid = dinov2.teacher_grid(teacher) if teacher is not None else patch_grid(cfg.resolution)
        return CachedTokens(grid, int8=cfg.dtype == "int8")
    if teacher is None:
        raise ValueError(f"teacher.cache = {cfg.cache!r} runs teacher blocks during training: pass the loaded teacher")
    if cfg.cache == "hidden":
        return CachedHidden(teacher, cfg.hidden_layer, attn_layers)
    if cfg.cache == "online":
        return Online(teacher, cfg.resolution, attn_layers)
    raise ValueError(f"teacher.cache = {cfg.cache!r} is unknown; use 'tokens', 'hidden' or 'online'")
