"""The offline echo agent: its WAV reaches the avatar through a real livekit-server, sample for sample.

The receiver is our own avatar side, ``server.livekit.avatar_protocol.AvatarProtocol``, joined with the
avatar token (kind agent, ``lk.publish_on_behalf`` = the echo agent); it reports playout like the session
player does, so the echo agent gets its ``lk.playback_finished``.
"""

from __future__ import annotations

import asyncio
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from livekit import rtc
from livekit.agents.voice.io import PlaybackFinishedEvent

from deploy.agent.echo_agent import (
    AGENT_IDENTITY,
    UtteranceDetector,
    agent_token,
    load_wav,
    stream_wav_to_avatar,
)
from server.livekit.avatar_protocol import AudioChunk, AvatarProtocol, SegmentEnded, SegmentStarted
from server.livekit.token import mint_avatar_token

AVATAR = "tm-avatar"
RATE = 16000

pytestmark = pytest.mark.filterwarnings("ignore:The HMAC key is 6 bytes long")


def _tone(seconds: float, rate: int, hz: float = 220.0) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    return (0.3 * np.sin(2 * np.pi * hz * t) * 32767).astype(np.int16)


@dataclass
class Delivery:
    finished: PlaybackFinishedEvent
    audio: np.ndarray  # [N] float32 at 16 kHz, as the avatar received it
    segments_started: list[SegmentStarted] = field(default_factory=list)


async def _deliver(url: str, wav: Path) -> Delivery:
    room_name = f"echo-{uuid.uuid4().hex[:8]}"
    avatar_room, agent_room = rtc.Room(), rtc.Room()
    protocol = AvatarProtocol()
    chunks: list[np.ndarray] = []
    started: list[SegmentStarted] = []

    async def play() -> None:
        async for event in protocol:
            if isinstance(event, SegmentStarted):
                started.append(event)
            elif isinstance(event, AudioChunk):
                chunks.append(event.pcm)
            elif isinstance(event, SegmentEnded):
                protocol.playback_finished(sum(c.size for c in chunks) / RATE, interrupted=False)

    token = mint_avatar_token(
        api_key="devkey", api_secret="secret", room=room_name, identity=AVATAR, agent_identity=AGENT_IDENTITY
    )
    await avatar_room.connect(url, token)
    await protocol.attach(avatar_room)
    player = asyncio.create_task(play())
    try:
        await agent_room.connect(url, agent_token("devkey", "secret", room_name))
        finished = await stream_wav_to_avatar(
            agent_room, wav, avatar_identity=AVATAR, wait_for_video=False, playout_timeout_s=20
        )
    finally:
        await protocol.wait_rpcs_sent()
        player.cancel()
        await asyncio.gather(player, return_exceptions=True)
        await protocol.aclose()
        await agent_room.disconnect()
        await avatar_room.disconnect()
    return Delivery(finished, np.concatenate(chunks) if chunks else np.zeros(0, np.float32), started)


@pytest.fixture(scope="module")
def wav_16k_mono(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("echo") / "speech16k.wav"
    sf.write(path, _tone(1.3, RATE), RATE, subtype="PCM_16")
    return path


@pytest.fixture(scope="module")
def delivered_16k(livekit_server, wav_16k_mono: Path) -> Delivery:
    return asyncio.run(_deliver(livekit_server.url, wav_16k_mono))


def test_avatar_receives_every_sample_of_a_16khz_wav(delivered_16k: Delivery, wav_16k_mono: Path) -> None:
    sent, _ = sf.read(wav_16k_mono, dtype="int16")
    np.testing.assert_array_equal(delivered_16k.audio, sent.astype(np.float32) / 32768.0)


def test_wav_arrives_as_one_segment_declared_16khz_mono(delivered_16k: Delivery) -> None:
    assert [(s.sample_rate, s.num_channels) for s in delivered_16k.segments_started] == [(RATE, 1)]


def test_agent_gets_playback_finished_for_the_whole_clip(delivered_16k: Delivery) -> None:
    assert delivered_16k.finished.interrupted is False
    assert delivered_16k.finished.playback_position == pytest.approx(1.3, abs=1 / RATE)


def test_a_48khz_stereo_wav_arrives_resampled_to_16khz_mono(livekit_server, tmp_path: Path) -> None:
    path = tmp_path / "speech48k.wav"
    left = _tone(0.8, 48000)
    sf.write(path, np.stack([left, left], axis=1), 48000, subtype="PCM_16")
    delivery = asyncio.run(_deliver(livekit_server.url, path))
    expected = load_wav(path).astype(np.float32) / 32768.0
    # Same length; values within 2 LSB (two runs of the HIGH-quality resampler differ in the last bit).
    assert delivery.audio.size == expected.size
    np.testing.assert_allclose(delivery.audio, expected, rtol=0, atol=2 / 32768)
    assert delivery.audio.size == pytest.approx(0.8 * RATE, rel=0.01)
    assert [(s.sample_rate, s.num_channels) for s in delivery.segments_started] == [(RATE, 1)]


def test_load_wav_names_the_file_it_cannot_read(tmp_path: Path) -> None:
    bad = tmp_path / "not-audio.wav"
    bad.write_bytes(b"this is not a wav file")
    with pytest.raises(ValueError, match=r"not-audio\.wav"):
        load_wav(bad)


def _frames(pcm: np.ndarray, frame: int = 160) -> list[np.ndarray]:
    return [pcm[i : i + frame] for i in range(0, pcm.size, frame)]


def _run_detector(detector: UtteranceDetector, pcm: np.ndarray) -> list[np.ndarray]:
    return [u for f in _frames(pcm) if (u := detector.push(f)) is not None]


def test_detector_returns_speech_once_a_pause_follows() -> None:
    speech, pause = _tone(0.5, RATE), np.zeros(int(0.7 * RATE), np.int16)
    utterances = _run_detector(UtteranceDetector(pause_s=0.7), np.concatenate([pause, speech, pause]))
    assert len(utterances) == 1
    np.testing.assert_array_equal(utterances[0], np.concatenate([speech, pause]))


def test_detector_ignores_silence_and_clicks_shorter_than_min_speech() -> None:
    click = _tone(0.05, RATE)
    pause = np.zeros(RATE, np.int16)
    detector = UtteranceDetector(min_speech_s=0.25)
    assert _run_detector(detector, np.concatenate([pause, click, pause])) == []


def test_detector_cuts_an_utterance_at_the_maximum_length() -> None:
    detector = UtteranceDetector(max_speech_s=1.0)
    utterances = _run_detector(detector, _tone(2.5, RATE))
    assert [u.size for u in utterances] == [RATE, RATE]
