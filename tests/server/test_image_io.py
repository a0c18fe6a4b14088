"""frontends.image_io: reference images to uint8 RGB, with clear errors."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from frontends.image_io import ImageDecodeError, load_image


def _encode(image: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt)
    return buf.getvalue()


def test_png_decodes_to_uint8_rgb_exactly(tmp_path: Path) -> None:
    pixels = np.random.default_rng(0).integers(0, 256, (20, 30, 3), dtype=np.uint8)
    path = tmp_path / "face.png"
    Image.fromarray(pixels).save(path)
    np.testing.assert_array_equal(load_image(path), pixels)


def test_jpeg_and_greyscale_become_rgb() -> None:
    grey = Image.fromarray(np.full((16, 24), 128, dtype=np.uint8), mode="L")
    image = load_image(_encode(grey, "JPEG"))
    assert image.shape == (16, 24, 3) and image.dtype == np.uint8
    assert np.abs(image.astype(int) - 128).max() <= 2


def test_transparency_is_composited_over_white() -> None:
    rgba = np.zeros((4, 4, 4), dtype=np.uint8)  # fully transparent black
    image = load_image(_encode(Image.fromarray(rgba, mode="RGBA"), "PNG"))
    assert (image == 255).all()


def test_image_over_the_pixel_limit_is_rejected() -> None:
    data = _encode(Image.new("RGB", (200, 100)), "PNG")
    with pytest.raises(ImageDecodeError, match=r"200x100 = 20000 pixels, more than the limit of 10000"):
        load_image(data, max_pixels=10_000)


def test_unreadable_image_raises_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "face.png"
    path.write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    with pytest.raises(ImageDecodeError, match=r"face\.png.*could not be decoded.*PNG, JPEG"):
        load_image(path)


def test_other_formats_are_rejected() -> None:
    with pytest.raises(ImageDecodeError, match="could not be decoded"):
        load_image(_encode(Image.new("RGB", (8, 8)), "BMP"))
