"""Writing frames to image files (GIF, PNG grids)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image


def write_gif(frames: np.ndarray, path: Path, fps: float = 10.0, scale: int = 4) -> Path:
    """frames: (T, H, W, C) uint8 -> an animated GIF upscaled by `scale` (nearest), looping forever."""
    if frames.ndim != 4 or frames.dtype != np.uint8 or frames.shape[0] < 1:
        raise ValueError(f"expected (T, H, W, C) uint8 frames, got {frames.shape} {frames.dtype}")
    images = [Image.fromarray(f).resize((f.shape[1] * scale, f.shape[0] * scale), Image.NEAREST) for f in frames]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    images[0].save(path, save_all=True, append_images=images[1:], duration=int(1000 / fps), loop=0)
    return path
