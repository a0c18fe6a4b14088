"""Face regions of a reference image: the caller's boxes, or OpenCV's bundled frontal-face Haar cascade, or
one central box when nothing is found.

The cascade ships inside ``opencv-python-headless`` (4.x; the 5.x wheels no longer bundle Haar cascades), so
detection needs no download. It is deterministic: the same image always yields the same boxes.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path

import cv2
import numpy as np

from proto.api import Character, Face, PixelBox

CASCADE_FILE = "haarcascade_frontalface_default.xml"
# Detection runs on a copy whose longer side is at most this many pixels: the cascade's cost grows with the
# area, and faces in a call portrait are large.
DETECT_MAX_SIDE = 640
# Central fallback box as fractions of (width, height, width, height): the middle half horizontally, the
# upper-middle band vertically, where a portrait's face usually is.
FALLBACK_BOX_NORM = (0.25, 0.15, 0.75, 0.75)
MAX_FACES = 16


@lru_cache(maxsize=1)
def _cascade() -> cv2.CascadeClassifier:
    path = Path(cv2.data.haarcascades) / CASCADE_FILE
    classifier = cv2.CascadeClassifier(str(path))
    if classifier.empty():
        raise RuntimeError(
            f"OpenCV face cascade {path} could not be loaded; install opencv-python-headless 4.x "
            "(the 5.x wheels do not bundle Haar cascades)"
        )
    return classifier


def _normalise(box: PixelBox, width: int, height: int) -> tuple[float, float, float, float]:
    x0, y0, x1, y1 = box
    return (x0 / width, y0 / height, x1 / width, y1 / height)


def detect_faces(image: np.ndarray) -> list[PixelBox]:
    """Frontal faces found by the Haar cascade.

    Args:
        image: ``[H, W, 3]`` uint8 RGB.

    Returns:
        pixel boxes ``(x0, y0, x1, y1)`` of the full-size image, ordered left to right, at most ``MAX_FACES``
        (the largest kept); empty when none is found.
    """
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"detect_faces takes [H, W, 3] uint8 RGB, got {image.dtype} {list(image.shape)}")
    height, width = image.shape[:2]
    scale = min(1.0, DETECT_MAX_SIDE / max(height, width))
    gray = cv2.cvtColor(image, cv2.COLOR_RGB2GRAY)
    if scale < 1.0:
        gray = cv2.resize(gray, (round(width * scale), round(height * scale)), interpolation=cv2.INTER_AREA)
    # Histogram equalisation makes the cascade robust to flat or low-contrast portraits (drawn avatars).
    gray = cv2.equalizeHist(gray)
    min_side = max(24, round(0.08 * min(gray.shape)))
    found = _cascade().detectMultiScale(gray, scaleFactor=1.05, minNeighbors=3, minSize=(min_side, min_side))
    boxes: list[PixelBox] = []
    for x, y, w, h in np.asarray(found, dtype=np.int64).reshape(-1, 4):
        x0, y0 = int(np.floor(x / scale)), int(np.floor(y / scale))
        x1, y1 = min(width, int(np.ceil((x + w) / scale))), min(height, int(np.ceil((y + h) / scale)))
        boxes.append((x0, y0, x1, y1))
    boxes.sort(key=lambda b: (b[2] - b[0]) * (b[3] - b[1]), reverse=True)
    return sorted(boxes[:MAX_FACES])


def fallback_box(width: int, height: int) -> PixelBox:
    """The central box used when no face is found, in pixels."""
    fx0, fy0, fx1, fy1 = FALLBACK_BOX_NORM
    return (round(fx0 * width), round(fy0 * height), round(fx1 * width), round(fy1 * height))


def resolve_faces(image: np.ndarray, characters: Sequence[Character] | None) -> list[Face]:
    """The session's faces: the caller's boxes when given (checked against the image), else detected ones,
    else one central fallback box.

    Args:
        image: ``[H, W, 3]`` uint8 RGB.
        characters: the caller's characters, or None to detect.

    Raises:
        ValueError: a given box reaches outside the image (the message names it and the image size).
    """
    height, width = image.shape[:2]
    if characters:
        faces = []
        for index, character in enumerate(characters):
            _, _, x1, y1 = character.box
            if x1 > width or y1 > height:
                raise ValueError(
                    f"characters[{index}].box {list(character.box)} reaches outside the {width}x{height} "
                    "image; boxes are pixels (x0, y0, x1, y1) with x1 <= width and y1 <= height"
                )
            faces.append(
                Face(
                    box=character.box,
                    box_norm=_normalise(character.box, width, height),
                    source="given",
                    name=character.name,
                )
            )
        return faces
    detected = detect_faces(image)
    if detected:
        return [Face(box=b, box_norm=_normalise(b, width, height), source="detected") for b in detected]
    box = fallback_box(width, height)
    return [Face(box=box, box_norm=_normalise(box, width, height), source="fallback")]
