import io

import numpy as np
import pytest
from PIL import Image

from genie.media import CAPTION_HEIGHT, load_image, save_png, write_gif


def _png(w, h, color=(10, 200, 30)):
    buf = io.BytesIO()
    Image.new("RGB", (w, h), color).save(buf, format="PNG")
    return buf.getvalue()


def test_load_image_resizes_and_crops():
    out = load_image(_png(128, 64), 32, 32)  # wide: centre-cropped to square, then resized
    assert out.shape == (32, 32, 3) and out.dtype == np.uint8 and (out == (10, 200, 30)).all()
    assert load_image(_png(16, 40), 16, 16).shape == (16, 16, 3)


def test_png_round_trip(tmp_path):
    frame = np.random.default_rng(0).integers(0, 256, (8, 8, 3), dtype=np.uint8)
    assert np.array_equal(load_image(save_png(frame, tmp_path / "f.png"), 8, 8), frame)


@pytest.mark.parametrize("data", [b"", b"not an image", _png(8, 8)[:30]])
def test_corrupt_images_are_value_errors(data):
    with pytest.raises(ValueError, match="cannot read the prompt image"):
        load_image(data, 8, 8)


def test_write_gif_validates(tmp_path):
    with pytest.raises(ValueError, match="uint8"):
        write_gif(np.zeros((2, 4, 4, 3), np.float32), tmp_path / "x.gif")
    frames = np.stack([np.full((4, 4, 3), v, np.uint8) for v in (0, 100, 200)])
    path = write_gif(frames, tmp_path / "x.gif", scale=2)
    with Image.open(path) as im:
        assert im.n_frames == 3 and im.size == (8, 8)


def test_write_gif_captions_add_a_strip_and_keep_frames(tmp_path):
    frames = np.stack([np.full((8, 8, 3), v, np.uint8) for v in (0, 100, 200)])
    plain = write_gif(frames, tmp_path / "plain.gif", scale=4)
    captioned = write_gif(frames, tmp_path / "cap.gif", scale=4, captions=["prompt", "1: left", "2: jump"])
    with Image.open(plain) as a, Image.open(captioned) as b:
        assert a.size == (32, 32) and b.size == (32, 32 + CAPTION_HEIGHT)
        assert a.n_frames == b.n_frames == 3
        b.seek(0)
        strip = np.array(b.convert("RGB"))[32:]
        assert (strip > 128).any()  # text was written into the black strip
    with pytest.raises(ValueError, match="one caption per frame"):
        write_gif(frames, tmp_path / "bad.gif", captions=["only one"])
