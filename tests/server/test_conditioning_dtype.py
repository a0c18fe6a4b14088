"""CLIP and umT5 in bfloat16 (``--dtype bfloat16``): float32 outputs (the wire's dtype) close to float32's."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from frontends.conditioning import ConditioningConfig, ConditioningEncoders
from proto.chunk_specs import pad_text_context, session_open_specs
from proto.model_config import get_model_preset
from proto.wire import TensorSpec, check_specs

MODEL = get_model_preset("tiny")
CONFIG = ConditioningConfig.for_model(MODEL, tiny_seed=4)
# Observed on a CPU (tiny random encoders, seed 4): CLIP differs from float32 by at most 1.0 % of its largest
# value (0.46 % of its mean magnitude on average), umT5 by 0.69 % (0.63 %). Bounds with about 3x margin.
MAX_REL = 0.03
MEAN_REL = 0.02


@pytest.fixture(scope="module")
def encoders() -> dict[torch.dtype, ConditioningEncoders]:
    torch.set_num_threads(1)
    return {
        dtype: ConditioningEncoders.from_config(dataclasses.replace(CONFIG, dtype=dtype))
        for dtype in (torch.float32, torch.bfloat16)
    }


def _close(got: torch.Tensor, want: torch.Tensor) -> None:
    diff = (got - want).abs()
    assert diff.max() <= MAX_REL * want.abs().max(), (diff.max(), want.abs().max())
    assert diff.mean() <= MEAN_REL * want.abs().mean(), (diff.mean(), want.abs().mean())


def test_bfloat16_encoders_hold_bfloat16_weights(encoders) -> None:
    half = encoders[torch.bfloat16]
    assert {p.dtype for p in (*half.clip.parameters(), *half.umt5.parameters())} == {torch.bfloat16}


def test_bfloat16_encoders_return_float32_close_to_float32s(encoders) -> None:
    image = np.random.default_rng(0).integers(0, 256, (40, 48, 3), dtype=np.uint8)
    prompt = "a person talking"
    want = {"clip_fea": encoders[torch.float32].encode_image(image),
            "context": encoders[torch.float32].encode_prompt(prompt)}  # fmt: skip
    half = encoders[torch.bfloat16]
    got = {
        "context": pad_text_context(half.encode_prompt(prompt), MODEL),
        "clip_fea": half.encode_image(image),
        "face_boxes": torch.tensor([[0.0, 0.0, 1.0, 1.0]]),
    }
    # What the SessionOpen declares is what the score ranks accept: float32 tensors of the preset's shapes.
    declared = tuple(TensorSpec.of(name, t) for name, t in got.items())
    check_specs("SessionOpen", session_open_specs(MODEL, 1), declared)
    assert got["clip_fea"].device.type == got["context"].device.type == "cpu"
    _close(got["clip_fea"], want["clip_fea"])
    _close(got["context"], want["context"])
