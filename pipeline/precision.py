"""What a `precision` setting ("fp32" | "bf16" | "fp16") means on a device: the autocast dtype.

fp32 runs without autocast (TF32 matmuls on CUDA); bf16 / fp16 autocast on CUDA only: CPU runs in fp32.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext

import torch

AUTOCAST = {"bf16": torch.bfloat16, "fp16": torch.float16}


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of `precision` on `device`, or None (no autocast)."""
    return AUTOCAST.get(precision) if device.type == "cuda" else None


def autocast(precision: str, device: torch.device) -> AbstractContextManager:
    """torch.autocast for `precision` on `device`, or a no-op context."""
    dtype = autocast_dtype(precision, device)
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else nullcontext()
