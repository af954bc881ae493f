"""Pictures written as PNG files through matplotlib: sample grids and figures (curves, maps).
The one module of the runs layer that loads matplotlib, and only when a picture is drawn."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import numpy as np

from ..common.atomic import atomic_path


def as_rgb(image, image_shape) -> np.ndarray:
    """One flat image [D] in [0, 1] -> [H, W, 3] for display: colour (C = 3) as is, grey
    (C = 1) inverted (ink dark on white, as the grey grids always showed it)."""
    c, h, w = image_shape
    a = np.clip(np.asarray(image, dtype=np.float32).reshape(c, h, w), 0.0, 1.0)
    if c == 3:
        return a.transpose(1, 2, 0)
    return np.repeat(1.0 - a[0][..., None], 3, axis=2)


def save_grid(images, path: str | os.PathLike, image_shape=(1, 28, 28), nrow: int = 10,
              title: Optional[str] = None) -> Path:
    """images: [n, D] in [0, 1] -> a PNG grid with nrow images per row, written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    images = np.asarray(images.detach().cpu() if hasattr(images, "detach") else images)
    c, h, w = image_shape
    n = images.shape[0]
    rows = int(np.ceil(n / nrow))
    # colour images as RGB (on white); grey ones with ink dark on white, as before
    canvas = np.ones((rows * (h + 2), nrow * (w + 2), 3), dtype=np.float32)
    for i in range(n):
        r, col = divmod(i, nrow)
        canvas[r * (h + 2) + 1: r * (h + 2) + 1 + h,
               col * (w + 2) + 1: col * (w + 2) + 1 + w] = as_rgb(images[i], image_shape)
    fig = plt.figure(figsize=(nrow * 0.6, rows * 0.6 + (0.4 if title else 0)), dpi=100)
    plt.imshow(canvas, vmin=0, vmax=1, interpolation="nearest")
    plt.axis("off")
    if title:
        plt.title(title, fontsize=8)
    path = Path(path)
    try:
        with atomic_path(path) as tmp:  # a unique temp name: concurrent writers never share one
            fig.savefig(tmp, bbox_inches="tight", pad_inches=0.05)
    finally:
        plt.close(fig)
    return path


def save_figure(fig, path: Path) -> Path:
    """A matplotlib figure as a PNG, written through a temp name (never half a picture)."""
    import matplotlib.pyplot as plt

    path = Path(path)
    try:
        with atomic_path(path) as tmp:  # a unique temp name: concurrent writers never share one
            fig.savefig(tmp, bbox_inches="tight")
    finally:
        plt.close(fig)
    return path
