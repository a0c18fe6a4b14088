"""Fixtures shared by the score-side tests."""

from __future__ import annotations

import pytest
import torch

from proto.model_config import get_model_preset
from workers.model import WanModel


@pytest.fixture(scope="module")
def model() -> WanModel:
    """The tiny DiT with every layer random (the head and the audio layers too, so outputs depend on the
    inputs), seed 0, one torch thread. A module that needs other weights defines its own ``model``."""
    torch.set_num_threads(1)
    torch.manual_seed(0)
    m = WanModel(get_model_preset("tiny"))
    m.init_weights(zero_head=False, zero_audio=False)
    return m.eval()
