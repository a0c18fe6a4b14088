"""``SpeechFeed``: the live session's audio clock — just-in-time feeding, silence padding, per-character
speech, barge-in. Uses the tiny random wav2vec2 (no serving group, no network)."""

from __future__ import annotations

import numpy as np
import pytest

from frontends.audio_features import AudioFeaturizer, AudioFeaturizerConfig, build_wav2vec2
from server.speech_feed import SpeechFeed

RATE, SPF = 16000, 1000


@pytest.fixture(scope="module")
def make_feed():
    config = AudioFeaturizerConfig(left_context_s=0.5)
    model, _ = build_wav2vec2(config)

    def make(characters: int = 1, speaking: tuple[int, ...] = (0,)) -> SpeechFeed:
        return SpeechFeed([AudioFeaturizer(config, model=model) for _ in range(characters)], list(speaking))

    return make


def tone(seconds: float) -> np.ndarray:
    t = np.arange(int(seconds * RATE)) / RATE
    return (0.3 * np.sin(2 * np.pi * 220 * t)).astype(np.float32)


def test_without_speech_a_chunk_is_silence_and_nobody_speaks(make_feed) -> None:
    feed = make_feed()
    index, audio, pcm = feed.take_chunk()
    assert index == 0
    assert pcm.shape == (9 * SPF,) and not pcm.any()
    assert not audio[0].speaking_latent.any()


def test_speech_is_fed_just_in_time_up_to_the_chunks_look_ahead(make_feed) -> None:
    feed = make_feed()
    speech = tone(2.0)
    feed.push(speech)
    _, audio, pcm = feed.take_chunk()
    np.testing.assert_array_equal(pcm, speech[: 9 * SPF])
    assert audio[0].speaking_latent.all()
    # Chunk 0 needs its 9 frames plus 8 frames of look-ahead: 17 000 samples left the pending queue.
    assert feed.pending_s == pytest.approx((speech.size - 17 * SPF) / RATE)


def test_missing_speech_is_padded_with_silence_instead_of_waiting(make_feed) -> None:
    feed = make_feed()
    feed.push(tone(0.25))
    _, _, pcm = feed.take_chunk()
    assert pcm[: 4 * SPF].any() and not pcm[4 * SPF :].any()
    assert feed.pending_s == 0.0


def test_only_speaking_characters_get_the_speech(make_feed) -> None:
    feed = make_feed(characters=2, speaking=(1,))
    feed.push(tone(2.0))
    _, audio, _ = feed.take_chunk()
    assert not audio[0].speaking_latent.any()
    assert audio[1].speaking_latent.all()


def test_clear_drops_pending_speech_and_the_fed_look_ahead(make_feed) -> None:
    feed = make_feed()
    feed.push(tone(3.0))
    feed.take_chunk()  # frames 0..8 generated; speech fed up to frame 17
    feed.clear(played_frame_end=9)
    assert feed.pending_s == 0.0
    _, audio, pcm = feed.take_chunk()
    assert not pcm.any()
    assert not audio[0].speaking_latent.any()


def test_a_segment_is_placed_on_the_timeline_where_its_audio_was_fed(make_feed) -> None:
    feed = make_feed()
    feed.take_chunk()  # 17 000 samples of silence fed
    segment = feed.open_segment("s1")
    feed.push(tone(0.5), segment)
    feed.end_segment(segment)
    feed.take_chunk()
    assert (segment.start_sample, segment.end_sample) == (17 * SPF, 17 * SPF + 8000)
    assert segment.received_all and segment.pending_samples == 0


def test_a_segment_counts_its_own_samples_not_the_silence_that_filled_an_underrun(make_feed) -> None:
    # the agent's audio arrives more slowly than chunks are generated: the feed pads the gap with silence,
    # which lies inside the segment's span but is not the agent's audio (playback_position must not count it)
    feed = make_feed()
    segment = feed.open_segment("s1")
    feed.push(tone(0.5), segment)
    feed.take_chunk()  # 17 000 samples needed, 8 000 of them the segment's
    feed.push(tone(0.25), segment)
    feed.end_segment(segment)
    feed.take_chunk()
    assert segment.end_sample - segment.start_sample == 17 * SPF + 4000  # the span includes the padding
    assert segment.fed_samples == 12_000  # 0.75 s of the agent's audio


def test_an_interruption_reports_the_agents_audio_played_not_the_silence_in_its_span(make_feed) -> None:
    from proto.model_config import get_model_preset
    from proto.stream_config import StreamConfig
    from server.live_session import LiveSession

    class Protocol:
        def __init__(self) -> None:
            self.pending_segments: list[str] = []
            self.finished: list[tuple[float, bool]] = []

        def playback_finished(self, position_s: float, interrupted: bool) -> None:
            self.finished.append((position_s, interrupted))

    feed = make_feed()
    stream = StreamConfig(height=64, width=64, train_latent_frames=15)
    session = LiveSession("s", get_model_preset("tiny"), stream, feed, None, None, seed=0)  # type: ignore[arg-type]
    session.protocol = Protocol()  # type: ignore[assignment]
    segment = feed.open_segment("s1")
    feed.push(tone(0.5), segment)
    feed.take_chunk()  # samples 0-17 000: the segment's 8 000, then 9 000 of silence (an underrun)
    feed.push(tone(0.5), segment)
    feed.take_chunk()  # samples 17 000-29 000: the segment's remaining 8 000, then silence
    assert segment.runs == [[0, 8000], [17_000, 8000]]
    session.on_clear(20)  # frames from 20 (sample 20 000) on dropped: 8 000 + 3 000 of its samples played
    assert session.protocol.finished == [(11_000 / RATE, True)]
    assert segment.own_samples_before(10**9) == segment.fed_samples == 16_000
