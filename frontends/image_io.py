"""Reference-image loading: PNG or JPEG → uint8 `[H, W, 3]` RGB, with limits checked from the header before
any pixels are decoded (a small file can declare a huge image): the pixel limit, and a floor on the bytes per
pixel above ``FREE_PIXELS`` (a 625-byte JPEG that claims 4000x4000 decodes to 16 M grey pixels for about a
second of CPU; no picture worth animating compresses that far)."""

from __future__ import annotations

import io
import warnings
from pathlib import Path
from typing import BinaryIO

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

DEFAULT_MAX_PIXELS = 4096 * 4096
# Above FREE_PIXELS, an image must bring at least one byte per MAX_PIXELS_PER_BYTE pixels. A flat grey
# 4000x4000 PNG is ~760 pixels per byte (RGB: ~280), photographs under 10: only near-empty bombs exceed it.
FREE_PIXELS = 1024 * 1024
MAX_PIXELS_PER_BYTE = 1024
SUPPORTED_FORMATS = ("PNG", "JPEG")


class ImageDecodeError(ValueError):
    """The reference image could not be used (unreadable, unsupported format, too large)."""


def load_image(source: str | Path | bytes | BinaryIO, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Decode a PNG/JPEG reference image.

    EXIF orientation is applied; grey, palette and CMYK images become RGB; transparency is composited over
    white (a transparent background should read as plain, not black).

    Args:
        source: a path, the encoded bytes, or a binary file object.
        max_pixels: largest accepted width x height.

    Returns:
        `[H, W, 3]` uint8 RGB.

    Raises:
        ImageDecodeError: missing file, unreadable data, a format other than PNG/JPEG, too many pixels, or
            more than ``MAX_PIXELS_PER_BYTE`` pixels per byte of a path or bytes source over ``FREE_PIXELS``.
    """
    size: int | None = None
    if isinstance(source, str | Path):
        what = f"image file {str(source)!r}"
        if not Path(source).is_file():
            raise ImageDecodeError(f"{what} does not exist or is not a file")
        stream: str | BinaryIO = str(source)
        size = Path(source).stat().st_size
    elif isinstance(source, bytes | bytearray):
        what = f"image data ({len(source)} bytes)"
        stream = io.BytesIO(bytes(source))
        size = len(source)
    else:
        what = "image stream"
        stream = source
    try:
        with warnings.catch_warnings():
            # Our own limit below replaces Pillow's decompression-bomb warning.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(stream, formats=SUPPORTED_FORMATS) as image:
                width, height = image.size
                if width * height > max_pixels:
                    raise ImageDecodeError(
                        f"{what} is {width}x{height} = {width * height} pixels, more than the limit of "
                        f"{max_pixels} — downscale it first"
                    )
                if size is not None and width * height > max(FREE_PIXELS, size * MAX_PIXELS_PER_BYTE):
                    raise ImageDecodeError(
                        f"{what} claims {width}x{height} pixels, more than {MAX_PIXELS_PER_BYTE} per byte of "
                        "file: nearly empty or truncated — send the picture at its real size"
                    )
                image.load()
                return _to_rgb(ImageOps.exif_transpose(image))
    except (UnidentifiedImageError, OSError, Image.DecompressionBombError) as exc:
        raise ImageDecodeError(
            f"{what} could not be decoded ({exc}); supported formats are {', '.join(SUPPORTED_FORMATS)}"
        ) from exc


def _to_rgb(image: Image.Image) -> np.ndarray:
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, rgba)
    return np.asarray(image.convert("RGB"), dtype=np.uint8).copy()


def center_rescale_crop(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """uint8 `[H, W, 3]` → uint8 `[height, width, 3]`: PIL bicubic resize by the larger of the two scales
    (each side rounded) so the image covers the target, then a centre crop of the overflow. SoulX-LiveAct's
    `center_rescale_crop_keep_ratio` (util_liveact.py), which InfiniteTalk-family pipelines apply to the
    reference image before both the VAE encode and CLIP."""
    if height <= 0 or width <= 0:
        raise ValueError(f"target size must be positive, got {height}x{width}")
    pil = Image.fromarray(np.ascontiguousarray(image))
    w, h = pil.size
    scale = max(width / w, height / h)
    new_w, new_h = round(w * scale), round(h * scale)
    pil = pil.resize((new_w, new_h), resample=Image.BICUBIC)
    left, top = (new_w - width) // 2, (new_h - height) // 2
    return np.asarray(pil.crop((left, top, left + width, top + height)), dtype=np.uint8).copy()
