"""frontends.image_io: reference images to uint8 RGB, with clear errors."""

from __future__ import annotations

import io
import time
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


def _jpeg_bomb(width: int = 4000, height: int = 4000) -> bytes:
    """A JPEG header for width x height and an entropy-coded scan cut after a few bytes: ~625 bytes that
    libjpeg decodes (padding the missing data) to width x height grey pixels — issue 20's case."""
    full = _encode(Image.new("RGB", (width, height), (128, 128, 128)), "JPEG")
    start_of_scan = full.index(b"\xff\xda")
    return full[: start_of_scan + 14] + b"\xff\xd9"


def test_a_tiny_file_claiming_a_huge_image_is_refused_from_its_header_before_decoding(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    data = _jpeg_bomb()
    assert len(data) < 700 and Image.open(io.BytesIO(data)).size == (4000, 4000)

    def no_decode(self: Image.Image) -> None:
        raise AssertionError("pixels were decoded")

    monkeypatch.setattr(Image.Image, "load", no_decode)
    monkeypatch.setattr("PIL.ImageFile.ImageFile.load", no_decode)
    started = time.perf_counter()
    with pytest.raises(ImageDecodeError, match=r"claims 4000x4000 pixels, more than 1024 per byte"):
        load_image(data)
    assert time.perf_counter() - started < 0.05  # a header read (today: ~1 s of decode, then accepted)


def test_plain_but_real_images_pass_the_bytes_per_pixel_floor() -> None:
    # A flat grey 2000x2000 PNG (~200 pixels per byte) and a small flat image under FREE_PIXELS both load.
    flat = _encode(Image.new("L", (2000, 2000), 128), "PNG")
    assert load_image(flat).shape == (2000, 2000, 3)
    tiny = _encode(Image.new("1", (1000, 1000), 1), "PNG")
    assert len(tiny) < 1000 and load_image(tiny).shape == (1000, 1000, 3)
