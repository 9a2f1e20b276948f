"""Image I/O helpers: tensors in [-1, 1] <-> uint8, PNG grids and ``.npz`` sample dumps."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor


def to_uint8(images: Tensor) -> np.ndarray:
    """``(N, C, H, W)`` floats in [-1, 1] -> ``(N, H, W, C)`` uint8 (clipped, rounded)."""
    x = ((images.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).numpy()


def image_grid(
    images: Tensor, nrow: int | None = None, scale: int = 1, pad: int = 1
) -> Image.Image:
    """Tile ``(N, C, H, W)`` images in [-1, 1] into one PIL image, ``nrow`` per row."""
    arr = to_uint8(images)
    n, h, w, c = arr.shape
    nrow = nrow or math.ceil(math.sqrt(n))
    rows = math.ceil(n / nrow)
    grid = np.zeros((rows * (h + pad) + pad, nrow * (w + pad) + pad, c), dtype=np.uint8)
    for i in range(n):
        r, col = divmod(i, nrow)
        y, x = pad + r * (h + pad), pad + col * (w + pad)
        grid[y : y + h, x : x + w] = arr[i]
    img = Image.fromarray(grid[..., 0] if c == 1 else grid)
    if scale > 1:
        img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
    return img


def save_grid(images: Tensor, path: str | Path, nrow: int | None = None, scale: int = 4) -> Path:
    """Write a PNG grid of ``images`` (``(N, C, H, W)`` in [-1, 1]) and return its path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    image_grid(images, nrow=nrow, scale=scale).save(path)
    return path
