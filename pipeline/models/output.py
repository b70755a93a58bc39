"""What every diffusion backbone returns."""

from __future__ import annotations

from typing import NamedTuple

import torch


class ModelOutput(NamedTuple):
    """Output of a backbone's forward pass.

    velocity:    [B, C, H, W] predicted velocity (same shape as the input).
    hidden:      [B, N, C_h] tokens after the requested alignment block, row-major over the block's
                 (h, w) token grid, or None when no alignment depth was requested.
    attn_logits: one [B, heads, N, N] tensor of pre-softmax attention logits per requested layer,
                 in the order the layers were requested; empty when none were requested.
    """

    velocity: torch.Tensor
    hidden: torch.Tensor | None = None
    attn_logits: tuple[torch.Tensor, ...] = ()
