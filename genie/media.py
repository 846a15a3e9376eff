"""Writing frames to image files (GIF, PNG grids)."""

from __future__ import annotations

import io
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


def save_png(frame: np.ndarray, path: Path) -> Path:
    """frame: (H, W, C) uint8 -> PNG."""
    Image.fromarray(frame).save(path, format="PNG")
    return Path(path)


def load_image(source: Path | bytes, height: int, width: int) -> np.ndarray:
    """Reads a PNG/JPEG (path or bytes) as (height, width, 3) uint8, centre-cropped to the aspect and resized.

    Raises ValueError with the reason for unreadable or corrupt images.
    """
    try:
        with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source) as im:
            im.load()
            rgb = im.convert("RGB")
    except (OSError, ValueError, Image.DecompressionBombError) as exc:
        raise ValueError(f"cannot read the prompt image: {exc}") from exc
    w, h = rgb.size
    target = width / height
    if w / h > target:  # too wide: crop the sides
        new_w = round(h * target)
        rgb = rgb.crop(((w - new_w) // 2, 0, (w - new_w) // 2 + new_w, h))
    elif w / h < target:
        new_h = round(w / target)
        rgb = rgb.crop((0, (h - new_h) // 2, w, (h - new_h) // 2 + new_h))
    if rgb.size != (width, height):
        rgb = rgb.resize((width, height), Image.BILINEAR)
    return np.array(rgb, dtype=np.uint8)  # a writable copy (torch.from_numpy warns on read-only arrays)
