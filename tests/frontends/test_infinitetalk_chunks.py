"""frontends.infinitetalk_chunks: the InfiniteTalk / LiveAct audio windows of each chunk of the soulx-liveact
schedule, for ``run`` (the whole clip, upstream's offline windows) and ``serve`` (the live front-end driven by
``server.speech_feed.SpeechFeed``), on the tiny random wav2vec2."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from frontends.audio_io import resample
from frontends.infinitetalk_audio import (
    InfiniteTalkAudio,
    InfiniteTalkAudioConfig,
    frame_windows,
    upstream_iteration_frames,
)
from frontends.infinitetalk_chunks import (
    ClipChunkAudio,
    StreamChunkAudio,
    build_front_end,
    chunk_frames,
    latent_frames,
)
from proto.chunk_specs import chunk_request_specs
from proto.model_config import get_model_preset
from proto.stream_config import StreamConfig
from server.speech_feed import SpeechFeed

STREAM = StreamConfig.for_schedule("soulx-liveact", height=32, width=32)
MODEL = get_model_preset("soulx-liveact-tiny")


@pytest.fixture(scope="module")
def front() -> InfiniteTalkAudio:
    assert MODEL.audio is not None
    return build_front_end(MODEL.audio, STREAM, None)  # type: ignore[arg-type]


def _speech(seconds: float, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = np.arange(round(16_000 * seconds)) / 16_000
    bursts = np.clip(np.sin(2 * np.pi * 2.5 * t), 0, None)
    voiced = 0.3 * bursts * np.sin(2 * np.pi * 180 * t)
    return (voiced + 0.01 * rng.standard_normal(t.size)).astype(np.float32)


def test_chunks_cover_21_then_32_video_frames_and_their_latent_frames() -> None:
    assert [chunk_frames(STREAM, i) for i in range(3)] == [range(0, 21), range(21, 53), range(53, 85)]
    assert [len(r) for r in latent_frames(STREAM, 0)] == [1] + [4] * 5
    assert latent_frames(STREAM, 1)[0] == range(21, 25) and latent_frames(STREAM, 1)[-1] == range(49, 53)
    assert len(latent_frames(STREAM, 2)) == STREAM.frames_in_chunk(2) == 8


def test_run_s_chunks_are_upstreams_iteration_windows_of_their_own_frames(front: InfiniteTalkAudio) -> None:
    """Upstream hands iteration c the windows of 53 frames from 32·(c−1) and the chunk keeps its own part:
    the first 21 (c = 0) or the last 32; here chunk c gets exactly those, clamped at the clip's end."""
    x = _speech(3.0)
    clip = ClipChunkAudio(front, x, STREAM)
    embedding = front.clip_embedding(x)
    assert embedding.shape[0] == 72  # 3 s at 24 fps
    for c in range(4):
        upstream = upstream_iteration_frames(c)
        windows = frame_windows(embedding, upstream.start, upstream.stop)
        own = windows[:21] if c == 0 else windows[21:]
        got = clip.features_for_chunk(c)
        torch.testing.assert_close(got.span, own, rtol=0, atol=0)
        assert got.span.shape == (STREAM.video_frames_in_chunk(c), 5, 2, 32)
        assert got.speaking.shape == (STREAM.frames_in_chunk(c),)
    assert clip.features_for_chunk(0).speaking.any()
    assert not clip.features_for_chunk(3).speaking.any()  # frames 85.. are past the 3 s clip


def test_the_chunk_s_audio_is_the_wire_spec_of_the_infinitetalk_variant(front: InfiniteTalkAudio) -> None:
    from engine.chunks import chunk_request

    class Y:
        def chunk(self, index: int) -> torch.Tensor:
            return torch.zeros(20, STREAM.frames_in_chunk(index), 4, 4)

    clip = ClipChunkAudio(front, _speech(2.0), STREAM)
    for c in range(2):
        specs = chunk_request_specs(MODEL, STREAM, 1, c)
        request, tensors = chunk_request("s", c, 0, specs, [clip.features_for_chunk(c)], Y())
        assert tensors["audio"].shape == (1, STREAM.video_frames_in_chunk(c), 5, 2, 32)
        assert len(request.speaking[0]) == STREAM.frames_in_chunk(c)


def test_serve_s_stream_gives_the_live_front_end_s_windows_once_its_audio_arrived(
    front: InfiniteTalkAudio,
) -> None:
    x = _speech(4.0)
    live = StreamChunkAudio(front, STREAM)
    reference = front.stream()
    reference.push(x)
    need = live.required_samples(0)
    # frame 20, 2 frames of look-ahead and the stretch's lag
    assert 21 * 16_000 / 24 < need < 23 * 16_000 / 24 + 2500
    live.push(x[: need - 1])
    with pytest.raises(RuntimeError, match="not ready"):
        live.features_for_chunk(0)
    live.push(x[need - 1 : live.required_samples(1)])
    for c in range(2):
        frames = chunk_frames(STREAM, c)
        got = live.features_for_chunk(c)
        torch.testing.assert_close(got.span, reference.windows(frames.start, frames.stop), rtol=0, atol=0)
    with pytest.raises(RuntimeError, match="already taken"):
        live.features_for_chunk(1)


def test_a_front_end_that_does_not_fit_the_model_is_refused() -> None:
    wide = InfiniteTalkAudio(InfiniteTalkAudioConfig(tiny_hidden_size=16))
    from frontends.infinitetalk_chunks import check_matches

    with pytest.raises(ValueError, match=r"\(window, layers, hidden\) = \(5, 2, 16\).*expects \(5, 2, 32\)"):
        check_matches(wide, MODEL.audio)  # type: ignore[arg-type]


def test_the_24_fps_feed_publishes_48_khz_audio_of_the_chunk_s_frames(front: InfiniteTalkAudio) -> None:
    feed = SpeechFeed([StreamChunkAudio(front, STREAM)], [0], fps=24)
    assert (feed.output_rate, feed.output_spf) == (48_000, 2000)
    speech = _speech(3.0)
    feed.push(speech)
    up = resample(speech, 16_000, 48_000)
    index, audio, pcm = feed.take_chunk()
    assert index == 0 and pcm.shape == (21 * 2000,) and audio[0].span.shape[0] == 21
    np.testing.assert_allclose(pcm, up[: 21 * 2000], atol=1e-6)
    _, audio, pcm = feed.take_chunk()
    assert pcm.shape == (32 * 2000,) and audio[0].speaking.shape == (8,)
    np.testing.assert_allclose(pcm, up[21 * 2000 : 53 * 2000], atol=1e-6)
    assert feed.frame_sample(21) == 14_000 and feed.frame_sample(53) == 35_333


def test_a_barge_in_silences_what_the_live_front_end_holds(front: InfiniteTalkAudio) -> None:
    feed = SpeechFeed([StreamChunkAudio(front, STREAM)], [0], fps=24)
    feed.push(_speech(6.0))
    feed.take_chunk()
    feed.clear(played_frame_end=21)  # everything after chunk 0's frames is dropped
    _, audio, pcm = feed.take_chunk()
    assert not pcm[3 * 70 :].any()  # at most the upsampling filter's tail of frame 20 (68 input samples)
    assert not audio[0].speaking.any()


def test_a_wav2vec2_folder_in_chinese_wav2vec2_base_layout_is_the_front_end_when_given() -> None:
    from pathlib import Path

    folder = Path(__file__).resolve().parents[1] / "fixtures" / "liveact_audio" / "wav2vec2"
    front = build_front_end(MODEL.audio, STREAM, str(folder))  # type: ignore[arg-type]
    assert front.config.checkpoint == str(folder) and front.feature_extractor.do_normalize
    windows = ClipChunkAudio(front, _speech(1.0), STREAM).features_for_chunk(0).span
    assert windows.shape == (21, 5, 2, 32)
    with pytest.raises(ValueError, match=r"expects \(5, 12, 768\)"):  # the 14B preset wants the base model
        build_front_end(get_model_preset("soulx-liveact").audio, STREAM, str(folder))  # type: ignore[arg-type]
