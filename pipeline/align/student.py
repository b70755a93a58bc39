"""What an alignment objective reads from the student backbone, checked once at construction.

A backbone (pipeline.models) exposes: `hidden_size`, `num_heads`, `default_align_depth`,
`supports_attention`, `align_grid(depth) -> (h, w)` and, when its alignment width differs from
`hidden_size` (conv U-Nets), `align_width(depth) -> int`. The number of blocks is `model.depth`
(or `len(model.blocks)`). Block numbers follow the model's forward: `align_depth` is 1-indexed (the
output of block k), `attn_layers` are 0-indexed. Nothing here keeps a reference to the model:
objectives own only their projector parameters.

Every check raises AlignmentError (a ValueError) with one line that names the model, the config
key and the fix.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch.nn as nn

from pipeline.models.layers import as_int


class AlignmentError(ValueError):
    """The student, the teacher and the align config cannot be combined as asked."""


# ----------------------------------------------------------------------------------------------
#                                    Reading the model
# ----------------------------------------------------------------------------------------------


def block_index(layer: object, count: int | None, key: str, owner: str) -> int:
    """`layer` as a 0-indexed block of `owner` (count None = unknown), else AlignmentError."""
    index = as_int(layer)
    if index is None or index < 0 or (count is not None and index >= count):
        allowed = f"0 .. {count - 1}" if count is not None else ">= 0"
        raise AlignmentError(f"{key} contains {layer!r}, which is not a block of {owner}: allowed {allowed} (0-indexed)")
    return index


def _is_grid(grid: object) -> bool:
    return (
        isinstance(grid, (tuple, list))
        and len(grid) == 2
        and all(as_int(g) is not None and g >= 1 for g in grid)
    )


def model_name(model: nn.Module) -> str:
    """The architecture name for messages ("SiT-XL/2", "UNet-T", ...), else the class name."""
    name = getattr(model, "name", None)
    return name if isinstance(name, str) and name else type(model).__name__


def num_blocks(model: nn.Module) -> int | None:
    """Number of blocks that `align_depth` and `attn_layers` index, or None when unknown."""
    depth = as_int(getattr(model, "depth", None))
    if depth is not None:
        return depth
    blocks = getattr(model, "blocks", None)
    if isinstance(blocks, (nn.ModuleList, nn.Sequential)):
        return len(blocks)
    return None


def resolve_align_depth(model: nn.Module, depth: int) -> int:
    """align.depth (1-indexed; 0 = the model's default) -> the checked block number."""
    if as_int(depth) is None or depth < 0:
        raise AlignmentError(f"align.depth must be an int >= 0 (0 = model default), got {depth!r}")
    if depth == 0:
        depth = getattr(model, "default_align_depth", None)
        if as_int(depth) is None:
            raise AlignmentError(
                f"align.depth is 0 (model default) but model {model_name(model)} has no "
                "default_align_depth: set align.depth"
            )
    n = num_blocks(model)
    if depth < 1 or (n is not None and depth > n):
        allowed = f"1 .. {n}" if n is not None else ">= 1"
        raise AlignmentError(
            f"align.depth={depth} is out of range for model {model_name(model)}: allowed {allowed} "
            "(1-indexed; 0 = model default)"
        )
    return int(depth)


def align_width(model: nn.Module, depth: int) -> int:
    """Width C_h of the hidden tokens after block `depth`: model.align_width(depth) or hidden_size."""
    fn = getattr(model, "align_width", None)
    width = fn(depth) if callable(fn) else getattr(model, "hidden_size", None)
    if as_int(width) is None or width < 1:
        raise AlignmentError(
            f"model {model_name(model)} exposes no usable alignment width (align_width(depth) or "
            f"hidden_size), got {width!r}"
        )
    return int(width)


def token_grid(model: nn.Module, depth: int) -> tuple[int, int]:
    """(h, w) grid of the tokens after block `depth` (1-indexed), from model.align_grid(depth)."""
    fn = getattr(model, "align_grid", None)
    if not callable(fn):
        raise AlignmentError(f"model {model_name(model)} has no align_grid(depth): it cannot be aligned")
    try:
        grid = fn(depth)
    except (IndexError, KeyError, ValueError) as err:
        raise AlignmentError(f"block {depth} of model {model_name(model)} has no token grid: {err}") from err
    if not _is_grid(grid):
        raise AlignmentError(f"model {model_name(model)}.align_grid({depth}) returned {grid!r}, not (h, w)")
    return int(grid[0]), int(grid[1])


class FeatureSite(NamedTuple):
    """Where the feature term reads the student: block `depth` (1-indexed), token width, (h, w) grid."""

    depth: int
    width: int
    grid: tuple[int, int]


def feature_site(model: nn.Module, depth: int) -> FeatureSite:
    """Resolve align.depth (0 = model default) and read the width and grid of that block's output."""
    resolved = resolve_align_depth(model, depth)
    return FeatureSite(resolved, align_width(model, resolved), token_grid(model, resolved))


# ----------------------------------------------------------------------------------------------
#                                    Attention layers
# ----------------------------------------------------------------------------------------------


def check_attention_layers(
    model: nn.Module,
    layers: Sequence[int],
    *,
    teacher_heads: int | None,
    teacher_grid: tuple[int, int],
    key: str = "align.student_layers",
    align: str = "haste",
) -> None:
    """The student can hand out pre-softmax logits of `layers` (0-indexed) that pair with the teacher's.

    Needs: model.supports_attention, every layer in 0 .. depth-1, at least `teacher_heads` heads
    (the student's first teacher_heads heads are aligned), and the token grid of each layer equal
    to the teacher's patch grid (attention maps are not resized).
    """
    name = model_name(model)
    if not getattr(model, "supports_attention", False):
        raise AlignmentError(
            f"align={align} needs attention logits, but model {name} has no attention layers "
            "(supports_attention is False); use a SiT/SiTDown model or align=repa|urepa"
        )
    if as_int(teacher_heads) is None or teacher_heads < 1:
        raise AlignmentError(
            f"align={align} needs the teacher's number of attention heads: teacher_heads must be an "
            f"int >= 1, got {teacher_heads!r}"
        )
    heads = as_int(getattr(model, "num_heads", None))
    if heads is None or heads < teacher_heads:
        raise AlignmentError(
            f"align={align} aligns the first {teacher_heads} attention heads of the student, but model "
            f"{name} has num_heads={heads}; use a student with at least {teacher_heads} heads"
        )
    n = num_blocks(model)
    for layer in layers:
        index = block_index(layer, n, key, f"model {name}")
        grid = token_grid(model, index + 1)
        if grid != tuple(teacher_grid):
            raise AlignmentError(
                f"{key}: block {index} of model {name} attends over a {grid[0]}x{grid[1]} token grid but "
                f"the teacher's attention maps are {teacher_grid[0]}x{teacher_grid[1]}; attention maps "
                "are not resized, so pick blocks that run on the teacher's grid (or change "
                "teacher.resolution / the model's input size)"
            )


# ----------------------------------------------------------------------------------------------
#                                        Teacher side
# ----------------------------------------------------------------------------------------------


def check_teacher_geometry(
    align: str, teacher_dim: int | None, teacher_grid: tuple[int, int] | None
) -> tuple[int, tuple[int, int]]:
    """Check the teacher's token width D and patch grid (gh, gw) that an alignment needs."""
    if as_int(teacher_dim) is None or teacher_dim < 1:
        raise AlignmentError(
            f"align={align} needs the teacher width: teacher_dim must be an int >= 1, got {teacher_dim!r}"
        )
    if not _is_grid(teacher_grid):
        raise AlignmentError(
            f"align={align} needs the teacher's patch grid: teacher_grid must be (gh, gw), got {teacher_grid!r}"
        )
    return int(teacher_dim), (int(teacher_grid[0]), int(teacher_grid[1]))


def check_teacher_layers(
    layers: Sequence[int], teacher_depth: int | None, key: str = "align.teacher_layers"
) -> None:
    """Teacher blocks are 0-indexed and must exist: 0 <= layer < teacher_depth (when it is known)."""
    for layer in layers:
        block_index(layer, teacher_depth, key, "the teacher")
