"""The speech feed's audio accounting and cap (``SpeechFeed.offer`` / ``mark_played`` / ``clear`` / ``close``
over ``server.audio_ledger.AudioLedger``): every accepted sample is played or dropped, in order, and pending
audio never passes the cap. Tiny random wav2vec2, no serving group (frames are 1000 samples at 16 fps)."""

from __future__ import annotations

import numpy as np
import pytest

from frontends.audio_features import AudioFeaturizer, AudioFeaturizerConfig, build_wav2vec2
from server.audio_ledger import AudioLedger
from server.backend import AudioBacklogFull, AudioTooLong, SessionEnded
from server.metrics import Metrics
from server.speech_feed import SpeechFeed

RATE, SPF = 16000, 1000


@pytest.fixture(scope="module")
def make_feed():
    config = AudioFeaturizerConfig(left_context_s=0.5)
    model, _ = build_wav2vec2(config)

    def make(cap_s: float | None = None, metrics: Metrics | None = None) -> SpeechFeed:
        observer = metrics.observe_audio_settled if metrics is not None else None
        ledger = AudioLedger(cap_s, name="s", observer=observer)
        return SpeechFeed([AudioFeaturizer(config, model=model)], [0], ledger=ledger)

    return make


def tone(seconds: float) -> np.ndarray:
    t = np.arange(round(seconds * RATE)) / RATE
    return (0.3 * np.sin(2 * np.pi * 220 * t)).astype(np.float32)


def dropped(metrics: Metrics, reason: str) -> float | None:
    return metrics.registry.get_sample_value("tm_audio_dropped_seconds_total", {"reason": reason})


def test_speech_counts_as_played_when_its_frames_play_and_a_clear_drops_the_rest(make_feed) -> None:
    metrics = Metrics()
    feed = make_feed(metrics=metrics)
    feed.offer(tone(2.0))
    feed.take_chunk()  # frames 0..8; speech fed up to sample 17 000 (the look-ahead)
    assert feed.ledger.account().pending == 32_000  # fed is not played
    feed.mark_played(9)
    assert feed.ledger.account().played == 9 * SPF
    feed.clear(played_frame_end=12)  # frames 9..11 played before the cut, the rest is dropped
    account = feed.ledger.account()
    assert (account.played, account.dropped, account.pending) == (12 * SPF, 32_000 - 12 * SPF, 0)
    assert metrics.registry.get_sample_value("tm_audio_played_seconds_total") == pytest.approx(12 / 16)
    assert dropped(metrics, "clear") == pytest.approx(20 / 16)


def test_silence_between_utterances_is_not_counted_as_played_speech(make_feed) -> None:
    feed = make_feed()
    feed.offer(tone(0.25))  # 4 frames of speech, then the feed pads silence
    feed.take_chunk()
    feed.mark_played(9)
    feed.offer(tone(0.5))
    feed.take_chunk()  # fed at sample 17 000
    feed.mark_played(17 + 4)
    assert feed.ledger.account().played == 4000 + 4000
    assert feed.ledger.account().pending == 4000


def test_closing_drops_exactly_what_had_not_played(make_feed) -> None:
    metrics = Metrics()
    feed = make_feed(metrics=metrics)
    feed.offer(tone(1.5))
    feed.take_chunk()
    feed.mark_played(5)
    final = feed.close("closed by the client")
    assert (final.accepted, final.played, final.dropped, final.pending) == (24_000, 5000, 19_000, 0)
    assert final.ended and feed.pending_s == 0.0
    assert dropped(metrics, "session_end") == pytest.approx(19 / 16)
    with pytest.raises(SessionEnded):
        feed.offer(tone(0.1))
    feed.mark_played(30)  # frames an output plays while it closes change nothing any more
    assert feed.ledger.account().played == 5000


def test_an_offer_past_the_cap_takes_nothing_and_says_when_it_fits(make_feed) -> None:
    feed = make_feed(cap_s=1.0)
    feed.offer(tone(0.8))
    with pytest.raises(AudioBacklogFull) as full:
        feed.offer(tone(0.5))
    assert full.value.retry_after_s == pytest.approx(0.3)
    assert full.value.pending_s == pytest.approx(0.8) and full.value.max_pending_s == 1.0
    assert feed.pending_s == pytest.approx(0.8)  # nothing of it queued
    with pytest.raises(AudioTooLong):
        feed.offer(tone(1.2))
    feed.take_chunk()
    feed.mark_played(9)  # 0.5625 s played: 0.2375 s pending, the push now fits
    feed.offer(tone(0.5))
    assert feed.ledger.account().pending_s == pytest.approx(0.7375)


def test_the_livekit_agents_audio_is_not_refused_but_counts_against_the_cap(make_feed) -> None:
    feed = make_feed(cap_s=1.0)
    feed.push(tone(1.5))  # the avatar protocol cannot refuse audio
    assert feed.ledger.account().pending_s == pytest.approx(1.5)
    with pytest.raises(AudioBacklogFull):
        feed.offer(tone(0.1))
