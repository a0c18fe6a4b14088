"""``talkingmachines serve`` end to end with a real livekit-server: what a LiveKit room actually gets.

The server runs as a real process (``python -m server.cli serve``, colocated single-rank serving group, tiny
preset at 32x32, which generates faster than real time on this CPU) with ``--sync-probe``: frames whose own
audio is loud are painted white, so the A/V offset can be measured at a subscriber through the whole
pipeline (featurizer timeline → score → decode → publisher → SFU → subscriber). Two calls are observed once
per module by a subscriber using the ``livekit`` SDK:

- a silent call: a session with no audio at all, watched for 2 s of warm-up and a 10 s window;
- an agent call: a LiveKit agent (livekit-agents' ``DataStreamAudioOutput``) speaks examples/speech.wav,
  then a beep train (one loud frame every 0.5 s), then a long quiet clip that it clears mid-segment.
"""

from __future__ import annotations

import asyncio
import statistics
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import soundfile as sf
from livekit import api, rtc
from livekit.agents.voice.avatar import DataStreamAudioOutput
from livekit.agents.voice.io import PlaybackFinishedEvent

from server.livekit.publisher import AUDIO_TRACK_NAME, VIDEO_TRACK_NAME
from server.livekit.token import mint_avatar_token
from tests.serve.conftest import AUTH, SPEECH, ServeProcess, portrait_base64, start_serve

pytestmark = pytest.mark.filterwarnings("ignore:The HMAC key is 6 bytes long")

SIZE, FPS, RATE = 32, 16, 16000
SPF = RATE // FPS
WARMUP_S = 2.0
WINDOW_S = 10.0
ONE_FRAME_S = 1.0 / FPS
AVATAR, AGENT = "tm-avatar", "voice-agent"


@dataclass
class Observed:
    """What a subscriber saw: (arrival time, width, height, mean luma) per frame, (time, rms) per 10 ms."""

    video: list[tuple[float, int, int, float]] = field(default_factory=list)
    audio: list[tuple[float, float]] = field(default_factory=list)
    sources: dict[str, int] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)
    finished: list[tuple[str, PlaybackFinishedEvent, float]] = field(default_factory=list)
    clips: dict[str, tuple[float, float]] = field(default_factory=dict)  # perf_counter span of each clip


class Viewer:
    """A subscriber in the room recording avatar_video and avatar_audio arrivals."""

    def __init__(self, url: str, room_name: str, out: Observed) -> None:
        self.url, self.room_name, self.out = url, room_name, out
        self.room = rtc.Room()
        self.tasks: list[asyncio.Task[None]] = []

    async def __aenter__(self) -> Viewer:
        @self.room.on("track_subscribed")
        def _on_track(track: rtc.Track, publication: rtc.RemoteTrackPublication, _: object) -> None:
            self.out.sources[publication.name] = publication.source
            if publication.name == VIDEO_TRACK_NAME:
                self.tasks.append(asyncio.create_task(self._video(track)))
            elif publication.name == AUDIO_TRACK_NAME:
                self.tasks.append(asyncio.create_task(self._audio(track)))

        token = (
            api.AccessToken("devkey", "secret")
            .with_identity(f"viewer-{uuid.uuid4().hex[:4]}")
            .with_grants(api.VideoGrants(room_join=True, room=self.room_name))
            .to_jwt()
        )
        await self.room.connect(self.url, token)
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.room.disconnect()
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)

    async def _video(self, track: rtc.Track) -> None:
        async for event in rtc.VideoStream(track, format=rtc.VideoBufferType.I420):
            frame = event.frame
            luma = np.frombuffer(frame.data, np.uint8)[: frame.width * frame.height]
            self.out.video.append((time.perf_counter(), frame.width, frame.height, float(luma.mean())))

    async def _audio(self, track: rtc.Track) -> None:
        async for event in rtc.AudioStream(track, sample_rate=RATE, num_channels=1, frame_size_ms=10):
            pcm = np.frombuffer(event.frame.data, np.int16).astype(np.float32) / 32768.0
            self.out.audio.append((time.perf_counter(), float(np.sqrt(np.mean(pcm**2)))))

    async def wait_for_video(self, timeout_s: float = 30.0) -> None:
        deadline = time.monotonic() + timeout_s
        while not self.out.video and time.monotonic() < deadline:
            await asyncio.sleep(0.05)


def _agent_token(room_name: str) -> str:
    return (
        api.AccessToken("devkey", "secret")
        .with_kind("agent")
        .with_identity(AGENT)
        .with_grants(api.VideoGrants(room_join=True, room=room_name, can_update_own_metadata=True))
        .to_jwt()
    )


async def _create(http: httpx.AsyncClient, output: dict[str, Any]) -> dict[str, Any]:
    response = await http.post("/v1/sessions", json={"image": portrait_base64(), "output": output})
    assert response.status_code == 201, response.text
    return response.json()


async def _speak(output: DataStreamAudioOutput, pcm: np.ndarray, chunk_s: float = 0.1) -> None:
    step = int(chunk_s * RATE)
    for start in range(0, pcm.size, step):
        piece = pcm[start : start + step]
        await output.capture_frame(rtc.AudioFrame(piece.tobytes(), RATE, 1, piece.size))
    output.flush()


def beep_train(seconds: float, every_s: float = 0.5) -> np.ndarray:
    """int16: near silence with one loud 1 kHz frame (1/16 s, frame-aligned) every ``every_s``."""
    pcm = np.zeros(int(seconds * RATE), np.float32)
    t = np.arange(SPF) / RATE
    for start in range(int(0.25 * RATE), pcm.size - SPF, int(every_s * RATE)):
        pcm[start : start + SPF] = 0.8 * np.sin(2 * np.pi * 1000 * t)
    return (pcm * 32767).astype(np.int16)


def quiet_tone(seconds: float) -> np.ndarray:
    t = np.arange(int(seconds * RATE)) / RATE
    return (0.1 * np.sin(2 * np.pi * 220 * t) * 32767).astype(np.int16)


async def _silent_call(server: ServeProcess, lk_url: str) -> Observed:
    out = Observed()
    room_name = f"silent-{uuid.uuid4().hex[:8]}"
    async with httpx.AsyncClient(base_url=server.url, headers=AUTH, timeout=30) as http:
        async with Viewer(lk_url, room_name, out) as viewer:
            # No token: the server mints one with its LiveKit key and secret.
            info = await _create(
                http,
                {
                    "type": "livekit",
                    "url": lk_url,
                    "room": room_name,
                    "identity": AVATAR,
                    "agent_identity": AGENT,
                },
            )
            await viewer.wait_for_video()
            await asyncio.sleep(WARMUP_S + WINDOW_S + 0.5)
            out.info = (await http.get(f"/v1/sessions/{info['id']}")).json()
            await http.delete(f"/v1/sessions/{info['id']}")
    return out


async def _agent_call(server: ServeProcess, lk_url: str) -> Observed:
    out = Observed()
    room_name = f"agent-{uuid.uuid4().hex[:8]}"
    agent_room = rtc.Room()
    await agent_room.connect(lk_url, _agent_token(room_name))
    output = DataStreamAudioOutput(
        agent_room,
        destination_identity=AVATAR,
        sample_rate=RATE,
        wait_remote_track=rtc.TrackKind.KIND_VIDEO,
        wait_playback_start=True,
    )
    token = mint_avatar_token(
        api_key="devkey", api_secret="secret", room=room_name, identity=AVATAR, agent_identity=AGENT
    )
    speech, rate = sf.read(SPEECH, dtype="int16")
    assert rate == RATE
    try:
        async with (
            httpx.AsyncClient(base_url=server.url, headers=AUTH, timeout=30) as http,
            Viewer(lk_url, room_name, out) as viewer,
        ):
            info = await _create(
                http,
                {
                    "type": "livekit",
                    "url": lk_url,
                    "room": room_name,
                    "identity": AVATAR,
                    "agent_identity": AGENT,
                    "token": token,
                },
            )
            await viewer.wait_for_video()
            await asyncio.sleep(1.0)
            for name, clip in (("speech", speech), ("beeps", beep_train(4.0))):
                began = time.perf_counter()
                await _speak(output, clip)
                event = await asyncio.wait_for(output.wait_for_playout(), timeout=20)
                out.finished.append((name, event, 0.0))
                out.clips[name] = (began, time.perf_counter() + 0.5)
            started: list[float] = []
            output.on("playback_started", lambda _ev: started.append(time.monotonic()))
            await _speak(output, quiet_tone(6.0))
            deadline = time.monotonic() + 15
            while not started and time.monotonic() < deadline:
                await asyncio.sleep(0.02)
            await asyncio.sleep(1.0)
            cleared_at = time.monotonic()
            output.clear_buffer()
            event = await asyncio.wait_for(output.wait_for_playout(), timeout=5)
            out.finished.append(("cleared", event, time.monotonic() - cleared_at))
            out.info = (await http.get(f"/v1/sessions/{info['id']}")).json()
            await http.delete(f"/v1/sessions/{info['id']}")
    finally:
        await agent_room.disconnect()
    return out


@pytest.fixture(scope="module")
def livekit_serve(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServeProcess]:
    tmp: Path = tmp_path_factory.mktemp("serve-lk")
    server = start_serve(
        tmp,
        "--decoder",
        "colocated",
        "--resolution",
        f"{SIZE}x{SIZE}",
        "--sync-probe",
        api={"livekit_api_key": "devkey", "livekit_api_secret": "secret"},
    )
    yield server
    server.stop()


@pytest.fixture(scope="module")
def silent(livekit_serve: ServeProcess, livekit_server) -> Observed:
    return asyncio.run(_silent_call(livekit_serve, livekit_server.url))


@pytest.fixture(scope="module")
def agent(livekit_serve: ServeProcess, livekit_server) -> Observed:
    return asyncio.run(_agent_call(livekit_serve, livekit_server.url))


def _window(observed: Observed) -> list[tuple[float, int, int, float]]:
    start = observed.video[0][0] + WARMUP_S
    return [v for v in observed.video if start <= v[0] < start + WINDOW_S]


def test_subscriber_receives_avatar_video_of_the_configured_size(silent: Observed) -> None:
    assert silent.video, "the subscriber received no avatar_video frames"
    assert {(w, h) for _, w, h, _ in silent.video} == {(SIZE, SIZE)}
    assert silent.sources == {
        VIDEO_TRACK_NAME: rtc.TrackSource.SOURCE_CAMERA,
        AUDIO_TRACK_NAME: rtc.TrackSource.SOURCE_MICROPHONE,
    }


def test_video_keeps_flowing_at_16_fps_for_10_s_without_any_audio(silent: Observed) -> None:
    fps = len(_window(silent)) / WINDOW_S
    print(f"\nsilent call: subscriber video {fps:.2f} fps over {WINDOW_S:.0f} s; session {silent.info}")
    assert abs(fps - FPS) <= 1.0


def test_subscriber_receives_avatar_audio_alongside_the_video(silent: Observed) -> None:
    span = silent.audio[-1][0] - silent.audio[0][0] if silent.audio else 0.0
    assert span >= WINDOW_S
    assert max(r for _, r in silent.audio) < 0.01  # silence mode publishes silence


def test_silent_session_generates_chunks_in_silence_mode(silent: Observed) -> None:
    assert silent.info["state"] == "running"
    # 12.5 s of playout at 0.75 s per chunk, generated about one chunk ahead.
    assert silent.info["chunks_generated"] >= 15
    assert silent.info["first_frame_latency_s"] is None  # no speech, no speech latency


def test_agent_speech_clip_ends_with_playback_finished_not_interrupted(agent: Observed) -> None:
    name, event, _ = agent.finished[0]
    assert name == "speech"
    print(f"\nspeech.wav: playback_finished position {event.playback_position:.2f} s")
    assert event.interrupted is False
    assert event.playback_position == pytest.approx(4.778, abs=0.1)


def test_clear_mid_segment_yields_interrupted_within_two_seconds(agent: Observed) -> None:
    name, event, elapsed = agent.finished[2]
    assert name == "cleared"
    print(
        f"\nclear -> playback_finished(interrupted) in {elapsed * 1000:.0f} ms, "
        f"at {event.playback_position:.2f} s"
    )
    assert event.interrupted is True
    assert elapsed < 2.0
    assert 0.0 < event.playback_position < 6.0


def _av_offsets(observed: Observed) -> list[float]:
    """White (probe) frame arrival minus loud-audio onset arrival, seconds, for each beep of the beep clip."""
    lo, hi = observed.clips["beeps"]
    flashes = [
        t
        for i, (t, _w, _h, luma) in enumerate(observed.video)
        if lo <= t <= hi and luma > 200 and (i == 0 or observed.video[i - 1][3] <= 200)
    ]
    onsets = [
        t
        for i, (t, rms) in enumerate(observed.audio)
        if lo <= t <= hi and rms > 0.25 and (i == 0 or observed.audio[i - 1][1] <= 0.25)
    ]
    offsets = []
    for t_video in flashes:
        nearest = min(onsets, key=lambda t_audio: abs(t_audio - t_video), default=None)
        if nearest is not None and abs(nearest - t_video) < 0.25:
            offsets.append(t_video - nearest)
    return offsets


def test_av_offset_at_the_subscriber_is_within_one_frame(agent: Observed) -> None:
    offsets = _av_offsets(agent)
    assert len(offsets) >= 5, f"only {len(offsets)} probe flash / beep pairs matched"
    median = statistics.median(offsets)
    print(
        f"\nsubscriber A/V offset (video - audio) over {len(offsets)} beeps: median {median * 1000:+.1f} ms, "
        f"min {min(offsets) * 1000:+.1f} ms, max {max(offsets) * 1000:+.1f} ms"
    )
    assert abs(median) <= ONE_FRAME_S


def test_agent_session_reports_first_frame_latency_and_chunks(agent: Observed) -> None:
    assert agent.info["state"] == "running"
    assert agent.info["first_frame_latency_s"] is not None
    assert 0.0 < agent.info["first_frame_latency_s"] < 5.0
    assert agent.info["ttbc"]["count"] == agent.info["chunks_generated"] - 1 > 0
