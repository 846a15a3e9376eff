"""Writing frames to image files (GIF, PNG grids)."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

CAPTION_HEIGHT = 14  # pixels of the caption strip under each GIF frame (after scaling)


def write_gif(
    frames: np.ndarray, path: Path, fps: float = 10.0, scale: int = 4, captions: list[str] | None = None
) -> Path:
    """frames: (T, H, W, C) uint8 -> an animated GIF upscaled by `scale` (nearest), looping forever.

    captions: T strings drawn in a strip of CAPTION_HEIGHT pixels under each (scaled) frame; None = no strip.
    """
    if frames.ndim != 4 or frames.dtype != np.uint8 or frames.shape[0] < 1:
        raise ValueError(f"expected (T, H, W, C) uint8 frames, got {frames.shape} {frames.dtype}")
    if captions is not None and len(captions) != frames.shape[0]:
        raise ValueError(f"need one caption per frame, got {len(captions)} for {frames.shape[0]} frames")
    images = [Image.fromarray(f).resize((f.shape[1] * scale, f.shape[0] * scale), Image.NEAREST) for f in frames]
    if captions is not None:
        images = [with_caption(im, text) for im, text in zip(images, captions, strict=True)]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    images[0].save(path, save_all=True, append_images=images[1:], duration=int(1000 / fps), loop=0)
    return path


def with_caption(image: Image.Image, text: str, height: int = CAPTION_HEIGHT) -> Image.Image:
    """The image with a black strip of `height` pixels below it, `text` written in it in white."""
    out = Image.new("RGB", (image.width, image.height + height), (0, 0, 0))
    out.paste(image.convert("RGB"), (0, 0))
    draw_text(out, (2, image.height + 1), text)
    return out


def draw_text(image: Image.Image, xy: tuple[int, int], text: str, fill: tuple[int, int, int] = (255, 255, 255)) -> None:
    """Writes one line of text at `xy` with Pillow's default font (no font files needed)."""
    ImageDraw.Draw(image).text(xy, text, fill=fill, font=ImageFont.load_default())


def text_width(text: str) -> int:
    """Pixels `text` takes in the default font of draw_text."""
    return int(ImageDraw.Draw(Image.new("RGB", (1, 1))).textlength(text, font=ImageFont.load_default()))


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
