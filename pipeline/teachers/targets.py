"""What the teacher side hands to an alignment objective, whatever the cache mode."""

from __future__ import annotations

from typing import NamedTuple

import torch


class TeacherTargets(NamedTuple):
    """Alignment targets for one batch.

    tokens:      [B, T, D] float32 `x_norm_patchtokens` (CLS and registers excluded), row-major over
                 the teacher's (gh, gw) patch grid.
    attn_logits: one [B, H, T, T] pre-softmax logits tensor per requested teacher block (patch
                 tokens only: CLS and register rows/columns removed), in the requested order.
    grid:        (gh, gw), the teacher's patch grid; T = gh * gw.
    """

    tokens: torch.Tensor
    attn_logits: tuple[torch.Tensor, ...] = ()
    grid: tuple[int, int] = (16, 16)
