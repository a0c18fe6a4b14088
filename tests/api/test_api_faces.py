"""Face regions: given boxes, Haar-cascade detection, and the central fallback."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from frontends.faces import detect_faces, fallback_box, resolve_faces
from frontends.image_io import load_image
from proto.api import Character

PORTRAIT = Path(__file__).resolve().parents[2] / "examples" / "portrait.png"


def test_a_blank_image_falls_back_to_one_central_box() -> None:
    faces = resolve_faces(np.full((200, 300, 3), 90, dtype=np.uint8), None)
    assert [(f.box, f.source) for f in faces] == [((75, 30, 225, 150), "fallback")]
    assert faces[0].box_norm == (0.25, 0.15, 0.75, 0.75)


def test_the_fallback_is_deterministic_and_centred() -> None:
    assert fallback_box(512, 512) == fallback_box(512, 512) == (128, 77, 384, 384)


def test_the_cascade_finds_the_drawn_face_of_the_example_portrait() -> None:
    image = load_image(PORTRAIT)
    faces = resolve_faces(image, None)
    assert [f.source for f in faces] == ["detected"]
    x0, y0, x1, y1 = faces[0].box
    # The drawn face ellipse spans x 136..376, y 70..370 of the 512x512 portrait.
    assert x0 < 200 < 310 < x1 and y0 < 150 < 330 < y1
    assert faces[0].box == detect_faces(image)[0]  # deterministic


def test_detection_reports_boxes_in_full_resolution_pixels() -> None:
    image = load_image(PORTRAIT)
    big = np.repeat(np.repeat(image, 3, axis=0), 3, axis=1)  # 1536x1536: detection runs downscaled
    (box,) = detect_faces(big)
    (small,) = detect_faces(image)
    assert np.allclose(np.array(box) / 3, small, atol=12)


def test_given_boxes_are_used_as_they_are() -> None:
    faces = resolve_faces(np.zeros((100, 200, 3), np.uint8), [Character(box=(10, 20, 50, 80), name="a")])
    assert [(f.box, f.box_norm, f.source, f.name) for f in faces] == [
        ((10, 20, 50, 80), (0.05, 0.2, 0.25, 0.8), "given", "a")
    ]


def test_a_given_box_outside_the_image_is_rejected() -> None:
    with pytest.raises(ValueError, match=r"outside the 200x100 image"):
        resolve_faces(np.zeros((100, 200, 3), np.uint8), [Character(box=(10, 20, 50, 120))])
