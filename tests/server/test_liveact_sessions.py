"""``serve``'s sessions of the SoulX-LiveAct family (``server.live_setup``): the family's live audio
front-end, its per-chunk requests (6, then 8 latent frames; the windows of the chunk's 21, then 32 video
frames), 48 kHz audio with the 24 fps frames, its reference image cropped before CLIP, and one character
only."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from decoder.vae import build_vae
from frontends.conditioning import ConditioningConfig, ConditioningEncoders
from frontends.image_io import center_rescale_crop
from frontends.infinitetalk_chunks import StreamChunkAudio
from proto.api import Face, FileOutput
from proto.chunk_specs import chunk_request_specs
from proto.model_config import get_model_preset
from proto.stream_config import StreamConfig
from proto.vae_config import get_vae_preset
from proto.wire import TensorSpec, check_specs
from server.backend import InvalidRequest
from server.live_setup import LiveConfig, SessionSetup

MODEL = get_model_preset("soulx-liveact-tiny")
STREAM = StreamConfig.for_schedule("soulx-liveact", height=32, width=32)
FULL = Face(box=(0, 0, 48, 64), box_norm=(0.0, 0.0, 1.0, 1.0), source="given")


@pytest.fixture(scope="module")
def setup() -> SessionSetup:
    torch.manual_seed(0)
    vae = build_vae(get_vae_preset("tiny"))
    encoders = ConditioningEncoders.from_config(ConditioningConfig.for_model(MODEL))
    config = LiveConfig(model=MODEL, stream=STREAM)
    return SessionSetup(config, vae, encoders, loop=None)  # type: ignore[arg-type]


def _image() -> np.ndarray:
    return (np.random.default_rng(0).random((64, 48, 3)) * 255).astype(np.uint8)


def test_a_liveact_session_prepares_the_schedule_s_chunks_with_48_khz_audio(setup: SessionSetup) -> None:
    session, message, tensors = setup.build("s", _image(), [FULL], "hello", [0])
    assert isinstance(session.feed.featurizers[0], StreamChunkAudio)
    assert (session.feed.output_rate, session.feed.output_spf) == (48_000, 2000)
    t = np.arange(16_000 * 3) / 16_000
    session.feed.push((0.3 * np.sin(2 * np.pi * 200 * t)).astype(np.float32))
    for c, (frames, latents, first) in enumerate(((21, 6, 0), (32, 8, 21), (32, 8, 53))):
        prepared = session.prepare_chunk()
        assert prepared.request.chunk_index == c and prepared.first_frame == first
        specs = chunk_request_specs(MODEL, STREAM, 1, c)
        declared = tuple(TensorSpec.of(n, v) for n, v in prepared.tensors.items())
        check_specs(f"chunk {c}", specs, declared)
        assert prepared.tensors["audio"].shape[1] == frames
        assert len(prepared.request.speaking[0]) == latents
        assert prepared.pcm.shape == (frames * 2000,)
    # CLIP saw the reference cropped to the video size, as upstream
    cropped = center_rescale_crop(_image(), 32, 32)
    assert torch.equal(tensors["clip_fea"], setup.encoders.encode_image(cropped))
    assert message.num_characters == 1


def test_a_liveact_session_with_two_characters_is_refused(setup: SessionSetup) -> None:
    left = Face(box=(0, 0, 24, 64), box_norm=(0.0, 0.0, 0.5, 1.0), source="given")
    right = Face(box=(24, 0, 48, 64), box_norm=(0.5, 0.0, 1.0, 1.0), source="given")
    with pytest.raises(InvalidRequest, match=r"animates one character.*has 2"):
        setup.build("two", _image(), [left, right], "hello", [0])


def test_a_liveact_file_session_writes_48_khz_audio(setup: SessionSetup, tmp_path: Path) -> None:
    session, _, _ = setup.build("f", _image(), [FULL], "hello", [0])
    setup.attach_output(session, FileOutput(type="file", path=str(tmp_path / "f.mp4")), lambda: None)
    output = session.output
    assert output is not None
    publisher = output.publisher  # type: ignore[attr-defined]
    assert (publisher.sample_rate, publisher.samples_per_frame) == (48_000, 2000)
    output.close()
