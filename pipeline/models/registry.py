"""Named backbone configurations: `build_model("SiT-XL/2", input_size=32, ...)`.

| name                  | class   | width | depth / stages   | heads | patch | align depth |
|-----------------------|---------|-------|------------------|-------|-------|-------------|
| SiT-T/{2,4}           | SiT     | 64    | 4                | 4     | 2, 4  | 2           |
| SiT-S/{2,4,8}         | SiT     | 384   | 12               | 6     | 2,4,8 | 4           |
| SiT-B/{2,4,8}         | SiT     | 768   | 12               | 12    | 2,4,8 | 4 (REPA)    |
| SiT-L/{2,4,8}         | SiT     | 1024  | 24               | 16    | 2,4,8 | 8 (REPA)    |
| SiT-XL/{2,4,8}        | SiT     | 1152  | 28               | 16    | 2,4,8 | 8 (REPA)    |
| SiTDown-T/{2,4}       | SiTDown | 64    | [1, 2, 1]        | 4     | 2, 4  | 2 (middle)  |
| SiTDown-XS/{2,4}      | SiTDown | 96    | [2, 2, 2]        | 6     | 2, 4  | 3 (middle)  |
| SiTDown-B/2           | SiTDown | 768   | [5, 5, 5]        | 12    | 2     | 8 (middle)  |
| SiTDown-L/2           | SiTDown | 1024  | [9, 14, 9]       | 16    | 2     | 16 (middle) |
| SiTDown-XL/2          | SiTDown | 1152  | [10, 16, 10]     | 16    | 2     | 18 (middle) |
| UNet-T / UNet-S / UNet-B | UNet | ch 32 / 128 / 192 (see pipeline/models/unet.py) ||| mid block |

"align depth" is the block aligned when align.depth = 0 (1-indexed): SIT_ALIGN_DEPTH below for SiT,
the middle of the middle stage for SiT-down (U-REPA), the mid block for the U-Net.

Overrides are constructor keyword arguments (input_size, in_channels, num_classes,
class_dropout_prob, use_rope, use_swiglu, default_align_depth, ...); a value of None keeps the
architecture's default. The U-Net has no RoPE or SwiGLU: use_rope / use_swiglu may only be None or
False for it.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import torch.nn as nn

from pipeline.models.mmdit import MMDiT
from pipeline.models.sit import SiT
from pipeline.models.sit_down import SiTDown
from pipeline.models.unet import UNet
from schemas.names import MODELS

# ----------------------------------------------------------------------------------------------
#                                        The table
# ----------------------------------------------------------------------------------------------

# The block whose output REPA aligns by default (align.depth = 0), 1-indexed, per SiT size. REPA
# (arXiv 2410.06940) aligns SiT-L/2 and SiT-XL/2 at their 8th block and the shallower SiT-B/2 at its
# 4th (its implementation details; its public scripts pass --encoder-depth=8 for L/XL and 4 for B).
# S follows B (same depth); T (tests, demo) takes its middle block.
SIT_ALIGN_DEPTH: dict[str, int] = {"T": 2, "S": 4, "B": 4, "L": 8, "XL": 8}

_SIT_SIZES: dict[str, dict[str, Any]] = {
    "T": dict(hidden_size=64, depth=4, num_heads=4),
    "S": dict(hidden_size=384, depth=12, num_heads=6),
    "B": dict(hidden_size=768, depth=12, num_heads=12),
    "L": dict(hidden_size=1024, depth=24, num_heads=16),
    "XL": dict(hidden_size=1152, depth=28, num_heads=16),
}
_SIT_DOWN_SIZES: dict[str, dict[str, Any]] = {
    "T": dict(hidden_size=64, stage_depths=(1, 2, 1), num_heads=4),
    "XS": dict(hidden_size=96, stage_depths=(2, 2, 2), num_heads=6),
    "B": dict(hidden_size=768, stage_depths=(5, 5, 5), num_heads=12),
    "L": dict(hidden_size=1024, stage_depths=(9, 14, 9), num_heads=16),
    "XL": dict(hidden_size=1152, stage_depths=(10, 16, 10), num_heads=16),
}
# MMDiT sizes. R is REPA's text-to-image student on MS-COCO (sihyun-yu/REPA models/mmdit.py and
# train_t2i.py): 24 joint blocks, hidden size 32 x depth = 768, as many heads as blocks (head width 32),
# aligned at block 8 (--encoder-depth 8). T (6 heads: DINOv2-S's, for HASTE) is for CPU tests and demos.
_MMDIT_SIZES: dict[str, dict[str, Any]] = {
    "T": dict(hidden_size=96, depth=4, num_heads=6, default_align_depth=2),
    "S": dict(hidden_size=384, depth=12, num_heads=6, default_align_depth=4),
    "B": dict(hidden_size=768, depth=12, num_heads=12, default_align_depth=4),
    "R": dict(hidden_size=768, depth=24, num_heads=24, default_align_depth=8),
}
_UNET_SIZES: dict[str, dict[str, Any]] = {
    "T": dict(model_channels=32, channel_mult=(1, 2, 2), num_res_blocks=1, attn_levels=()),
    "S": dict(model_channels=128, channel_mult=(1, 2, 2), num_res_blocks=2, attn_levels=(1, 2)),
    "B": dict(model_channels=192, channel_mult=(1, 2, 3), num_res_blocks=2, attn_levels=(1, 2)),
}


# The names and their (architecture, size, patch) are in schemas/names.py (MODELS), so that a config
# can be checked without torch; this is what each architecture name builds.
ARCHITECTURES: dict[str, type[nn.Module]] = {"SiT": SiT, "SiTDown": SiTDown, "UNet": UNet, "MMDiT": MMDiT}


def _constructor_kwargs(cls: type[nn.Module], size: str, patch: int | None) -> dict[str, Any]:
    if cls is SiT:
        return dict(_SIT_SIZES[size], patch_size=patch, default_align_depth=SIT_ALIGN_DEPTH[size])
    if cls is SiTDown:
        return dict(_SIT_DOWN_SIZES[size], patch_size=patch)
    if cls is MMDiT:
        return dict(_MMDIT_SIZES[size], patch_size=patch)
    return dict(_UNET_SIZES[size])


_MODELS: dict[str, tuple[Callable[..., nn.Module], dict[str, Any]]] = {
    name: (ARCHITECTURES[arch], _constructor_kwargs(ARCHITECTURES[arch], size, patch))
    for name, (arch, size, patch) in MODELS.items()
}


# ----------------------------------------------------------------------------------------------
#                                        Public API
# ----------------------------------------------------------------------------------------------


def model_names() -> list[str]:
    """Every name build_model accepts, in table order."""
    return list(_MODELS)


def build_model(name: str, **overrides: Any) -> nn.Module:
    """Build the backbone `name` (see model_names()) with constructor overrides; None values are ignored.

    The returned module carries `name` (the registry name). Raises ValueError for an unknown name or
    an override the architecture does not take.
    """
    if name not in _MODELS:
        raise ValueError(f"unknown model {name!r} (model.name): valid names are {', '.join(_MODELS)}")
    cls, kwargs = _MODELS[name]
    overrides = {key: value for key, value in overrides.items() if value is not None}
    if cls is UNet:
        for switch in ("use_rope", "use_swiglu"):
            if overrides.pop(switch, False):
                raise ValueError(
                    f"{name} is a convolutional U-Net: it has no {switch} option; set model.{switch} to "
                    "None (architecture default) or false"
                )
    accepted = set(inspect.signature(cls.__init__).parameters) - {"self"}
    unknown = sorted(set(overrides) - accepted)
    if unknown:
        raise ValueError(f"{name} does not take {unknown}: accepted overrides are {sorted(accepted)}")
    model = cls(**{**kwargs, **overrides})
    model.name = name
    return model
