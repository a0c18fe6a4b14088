"""The ``SessionOpen`` of a session and its tensors (umT5 prompt context, CLIP image tokens, face boxes):
one builder for ``run``, ``serve`` and ``training.evaluate``."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from frontends.conditioning import ConditioningEncoders
from frontends.image_io import center_rescale_crop
from proto.chunk_specs import pad_text_context, session_open_specs
from proto.model_config import ModelConfig
from proto.stream_config import StreamConfig
from proto.wire import SessionOpen, TensorSpec

FULL_FRAME = (0.0, 0.0, 1.0, 1.0)


def reference_image(model: ModelConfig, stream: StreamConfig, image: np.ndarray) -> np.ndarray:
    """The reference image a session is conditioned on (its VAE encode ``y`` and its CLIP tokens).

    The InfiniteTalk family (``model.audio_variant == "infinitetalk"``: InfiniteTalk, SoulX-LiveAct) crops and
    resizes it to the video size first (``frontends.image_io.center_rescale_crop``, upstream's PIL bicubic),
    so CLIP sees the framed picture the video shows. The TalkingMachines family keeps Wan I2V's: CLIP sees
    the whole image squashed to its square, the VAE a copy fitted by ``decoder.encode.fit_to_size``.
    """
    if model.audio_variant == "infinitetalk":
        return center_rescale_crop(image, stream.height, stream.width)
    return image


def session_open(
    session_id: str,
    model: ModelConfig,
    stream: StreamConfig,
    encoders: ConditioningEncoders,
    prompt: str,
    image: np.ndarray,
    face_boxes: Sequence[tuple[float, float, float, float]],
) -> tuple[SessionOpen, dict[str, torch.Tensor]]:
    """The ``SessionOpen`` of a session whose characters' faces are ``face_boxes`` (normalised x0, y0, x1,
    y1), and its tensors, from encoders already built (``training.evaluate`` keeps them across streams)."""
    tensors: dict[str, torch.Tensor] = {}
    for spec in session_open_specs(model, num_characters=len(face_boxes)):
        if spec.name == "context":
            tensors["context"] = pad_text_context(encoders.encode_prompt(prompt), model)
        elif spec.name == "clip_fea":
            tensors["clip_fea"] = encoders.encode_image(image)
        elif spec.name == "face_boxes":
            tensors["face_boxes"] = torch.tensor([list(box) for box in face_boxes], dtype=torch.float32)
    message = SessionOpen(
        session_id=session_id,
        latent_height=stream.latent_height,
        latent_width=stream.latent_width,
        num_characters=len(face_boxes),
        tensors=tuple(TensorSpec.of(name, t.contiguous()) for name, t in tensors.items()),
    )
    return message, tensors
