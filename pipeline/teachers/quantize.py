"""Per-token absmax int8 storage of teacher features (half the bytes of fp16).

Each token vector x [D] is stored as q = round(x / s) in int8 with one fp16 scale s = max|x| / 127,
so q lies in [-127, 127] and the element of largest magnitude maps to +-127. The division uses the
fp16-rounded scale, which is the one dequantization sees, so |x - q * s| <= s / 2 element-wise
(up to the clamp at +-127 when fp16 rounds s down). A token that is all zeros gets s = 0 and q = 0.
"""

from __future__ import annotations

import torch

QMAX = 127


def quantize_int8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., D] float -> (q int8 [..., D], scale float16 [..., 1]), per-token absmax."""
    if not x.is_floating_point():
        raise ValueError(f"quantize_int8 expects a floating-point tensor, got dtype {x.dtype}")
    x = x.float()
    scale = (x.abs().amax(dim=-1, keepdim=True) / QMAX).to(torch.float16)
    if not torch.isfinite(scale).all():
        raise ValueError("quantize_int8: features have non-finite values or exceed the fp16 scale range")
    divisor = scale.float().clamp_min(torch.finfo(torch.float32).tiny)
    q = torch.round(x / divisor).clamp_(-QMAX, QMAX).to(torch.int8)
    return q, scale


def dequantize(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """(q int8 [..., D], scale [..., 1]) -> float32 [..., D] = q * scale."""
    if q.dtype != torch.int8:
        raise ValueError(f"dequantize expects int8 codes, got dtype {q.dtype}")
    if scale.shape != (*q.shape[:-1], 1):
        raise ValueError(f"scale must have shape {(*q.shape[:-1], 1)} for codes of shape {tuple(q.shape)}, "
                         f"got {tuple(scale.shape)}")
    return q.float() * scale.float()
