"""Decoded samples as images: ADM's uint8 quantisation and a PNG grid."""

from __future__ import annotations

import io

import numpy as np
import torch
from PIL import Image


def samples_to_uint8(x: torch.Tensor) -> np.ndarray:
    """[B,3,H,W] in [-1, 1] -> uint8 [B,H,W,3], ADM's quantisation (as REPA's generate.py):
    clamp((x + 1) * 127.5, 0, 255) truncated towards zero by the uint8 cast, not rounded."""
    return ((x.float() + 1) * 127.5).clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def image_grid(images: np.ndarray, columns: int = 16) -> bytes:
    """PNG bytes of a grid of uint8 [N,H,W,3] images (at most 8 rows)."""
    n = min(len(images), columns * 8)
    columns = min(columns, n)
    rows = -(-n // columns)
    h, w = images.shape[1:3]
    canvas = np.zeros((rows * h, columns * w, 3), np.uint8)
    for k in range(n):
        r, c = divmod(k, columns)
        canvas[r * h:(r + 1) * h, c * w:(c + 1) * w] = images[k]
    buf = io.BytesIO()
    Image.fromarray(canvas).save(buf, format="PNG")
    return buf.getvalue()


def captioned_grid(images: np.ndarray, prompts: list[str], columns: int = 4, rows: int = 4, cell: int = 128,
                   lines: int = 3) -> bytes:
    """PNG bytes of the first columns x rows images, each scaled (nearest) to `cell` pixels wide with
    its prompt wrapped under it in `lines` lines of PIL's built-in font (cut with "..." when longer)."""
    import textwrap

    from PIL import ImageDraw, ImageFont

    n = min(len(images), len(prompts), columns * rows)
    columns = min(columns, n)
    rows = -(-n // columns)
    font = ImageFont.load_default()
    line_h = 12
    chars = max(8, cell // 6)  # the default font is about 6 px wide per character
    h = int(round(images.shape[1] * cell / images.shape[2]))
    canvas = Image.new("RGB", (columns * cell, rows * (h + lines * line_h + 4)), "white")
    draw = ImageDraw.Draw(canvas)
    for k in range(n):
        r, c = divmod(k, columns)
        x, y = c * cell, r * (h + lines * line_h + 4)
        canvas.paste(Image.fromarray(images[k]).resize((cell, h), Image.NEAREST), (x, y))
        text = textwrap.wrap(prompts[k], chars) or [""]
        if len(text) > lines:
            text = text[:lines]
            text[-1] = text[-1][: chars - 3] + "..."
        for i, line in enumerate(text):
            draw.text((x + 2, y + h + 2 + i * line_h), line, fill="black", font=font)
    buf = io.BytesIO()
    canvas.save(buf, format="PNG")
    return buf.getvalue()
