"""LiveKitPublisher against a real livekit-server: what a subscriber in the room actually receives.

One 10 s synthetic call (the issue's measurement window) is streamed once per module and observed by a
subscriber using the ``livekit`` SDK; the tests below each assert one property of it. Frames carry an 8-bit
frame counter in pixel blocks; once per second a white flash frame is paired with a loud 1 kHz beep in the
same frame's audio, so the A/V offset is the gap between their arrival times at the subscriber.
"""

from __future__ import annotations

import asyncio
import itertools
import statistics
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import numpy as np
import pytest
from livekit import api, rtc

from server.livekit.publisher import AUDIO_TRACK_NAME, VIDEO_TRACK_NAME, LiveKitPublisher
from server.livekit.token import mint_avatar_token

pytestmark = pytest.mark.filterwarnings("ignore:The HMAC key is 6 bytes long")

WIDTH, HEIGHT, FPS, RATE = 320, 240, 16, 16000
SPF = RATE // FPS
WARMUP_S = 2.0  # join, ICE and encoder ramp-up are excluded from the measurement
WINDOW_S = 10.0
FLASH_EVERY = FPS  # one flash + beep per second
ONE_FRAME_S = 1.0 / FPS
BAND_H = 16  # counter band height in pixels


def synthetic_frame(index: int) -> np.ndarray:
    """[HEIGHT, WIDTH, 3] uint8: a moving colour gradient (dim) or a white flash, plus the counter band."""
    if index % FLASH_EVERY == FLASH_EVERY // 2:
        frame = np.full((HEIGHT, WIDTH, 3), 255, np.uint8)
    else:
        x = (np.arange(WIDTH)[None, :] + 4 * index) % 256
        y = np.arange(HEIGHT)[:, None] % 256
        frame = np.zeros((HEIGHT, WIDTH, 3), np.uint8)
        frame[..., 0] = x // 2
        frame[..., 1] = y // 2
        frame[..., 2] = 64
    frame[:BAND_H] = 0
    block = WIDTH // 8
    for bit in range(8):
        if (index >> bit) & 1:
            frame[:BAND_H, bit * block : (bit + 1) * block] = 255
    return frame


def synthetic_audio(index: int) -> np.ndarray:
    """[SPF] float32: a quiet 440 Hz tone, or a loud 1 kHz beep on flash frames."""
    t = (index * SPF + np.arange(SPF)) / RATE
    if index % FLASH_EVERY == FLASH_EVERY // 2:
        return (0.8 * np.sin(2 * np.pi * 1000 * t)).astype(np.float32)
    return (0.03 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)


def decode_counter(luma: np.ndarray) -> int:
    block = WIDTH // 8
    value = 0
    for bit in range(8):
        inner = luma[4 : BAND_H - 4, bit * block + 8 : (bit + 1) * block - 8]
        value |= int(inner.mean() > 128) << bit
    return value


@dataclass
class Observed:
    """What the subscriber saw, with perf_counter arrival times."""

    # (arrival t, width, height, mean luma below the counter band, decoded counter)
    video: list[tuple[float, int, int, float, int]] = field(default_factory=list)
    audio: list[tuple[float, float]] = field(default_factory=list)  # t, rms (full scale = 1)
    audio_sources: list[int] = field(default_factory=list)
    video_sources: list[int] = field(default_factory=list)
    publisher_offset: float = 0.0
    publisher_offset_samples: int = 0
    publisher_fps: float = 0.0


async def _consume_video(track: rtc.Track, out: Observed) -> None:
    async for event in rtc.VideoStream(track, format=rtc.VideoBufferType.I420):
        frame = event.frame
        luma = np.frombuffer(frame.data, np.uint8)[: frame.width * frame.height].reshape(frame.height, -1)
        out.video.append((time.perf_counter(), frame.width, frame.height, float(luma[BAND_H:].mean()),
                          decode_counter(luma)))


async def _consume_audio(track: rtc.Track, out: Observed) -> None:
    async for event in rtc.AudioStream(track, sample_rate=RATE, num_channels=1, frame_size_ms=10):
        pcm = np.frombuffer(event.frame.data, np.int16).astype(np.float32) / 32768.0
        out.audio.append((time.perf_counter(), float(np.sqrt(np.mean(pcm**2)))))


async def _stream_call(server_url: str) -> Observed:
    room_name = f"pub-{uuid.uuid4().hex[:8]}"
    token = mint_avatar_token(
        api_key="devkey", api_secret="secret", room=room_name, identity="avatar", agent_identity="agent"
    )
    viewer_token = (
        api.AccessToken("devkey", "secret")
        .with_identity("viewer")
        .with_grants(api.VideoGrants(room_join=True, room=room_name))
        .to_jwt()
    )
    out = Observed()
    tasks: list[asyncio.Task[None]] = []
    viewer = rtc.Room()

    @viewer.on("track_subscribed")
    def _on_track(track: rtc.Track, publication: rtc.RemoteTrackPublication, _: object) -> None:
        if publication.name == VIDEO_TRACK_NAME:
            out.video_sources.append(publication.source)
            tasks.append(asyncio.create_task(_consume_video(track, out)))
        elif publication.name == AUDIO_TRACK_NAME:
            out.audio_sources.append(publication.source)
            tasks.append(asyncio.create_task(_consume_audio(track, out)))

    publisher = LiveKitPublisher(server_url, token, WIDTH, HEIGHT, fps=FPS, sample_rate=RATE)
    await viewer.connect(server_url, viewer_token)
    await publisher.start()
    try:
        for index in range(int((WARMUP_S + WINDOW_S + 1.0) * FPS)):
            await publisher.push(synthetic_frame(index), synthetic_audio(index))
        await publisher.wait_for_playout()
        await asyncio.sleep(0.5)
        stats = publisher.av_offset_stats()
        out.publisher_offset, out.publisher_offset_samples = stats.mean_s, stats.samples
        out.publisher_fps = publisher.actual_fps
    finally:
        await publisher.aclose()
        await viewer.disconnect()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    return out


@pytest.fixture(scope="module")
def observed(livekit_server) -> Observed:
    return asyncio.run(_stream_call(livekit_server.url))


def _window(observed: Observed) -> list[tuple[float, int, int, float, int]]:
    start = observed.video[0][0] + WARMUP_S
    return [v for v in observed.video if start <= v[0] < start + WINDOW_S]


def _av_offsets(observed: Observed) -> list[float]:
    """Flash arrival minus beep onset arrival, seconds, for each flash in the stream."""
    flashes = [t for i, (t, *_rest, luma, _c) in enumerate(observed.video)
               if luma > 200 and (i == 0 or observed.video[i - 1][3] <= 200)]
    onsets = [t for i, (t, rms) in enumerate(observed.audio)
              if rms > 0.25 and (i == 0 or observed.audio[i - 1][1] <= 0.25)]
    offsets = []
    for t_video in flashes:
        nearest = min(onsets, key=lambda t_audio: abs(t_audio - t_video), default=None)
        if nearest is not None and abs(nearest - t_video) < 0.5:
            offsets.append(t_video - nearest)
    return offsets


def test_subscriber_receives_avatar_video_at_the_published_size(observed: Observed) -> None:
    assert observed.video, "the subscriber received no avatar_video frames"
    assert {(w, h) for _, w, h, _, _ in observed.video} == {(WIDTH, HEIGHT)}


def test_tracks_are_published_as_camera_and_microphone(observed: Observed) -> None:
    assert observed.video_sources == [rtc.TrackSource.SOURCE_CAMERA]
    assert observed.audio_sources == [rtc.TrackSource.SOURCE_MICROPHONE]


def test_subscriber_receives_video_at_16_fps_over_the_window(observed: Observed) -> None:
    fps = len(_window(observed)) / WINDOW_S
    print(f"\nsubscriber video over {WINDOW_S:.0f} s: {fps:.2f} fps (publisher {observed.publisher_fps:.2f})")
    assert abs(fps - FPS) <= 1.0


def test_video_frames_arrive_in_order_without_repeats(observed: Observed) -> None:
    counters = [c for *_, c in _window(observed)]
    steps = [(b - a) % 256 for a, b in itertools.pairwise(counters)]
    assert sum(step == 1 for step in steps) >= 0.95 * len(steps)


def test_subscriber_receives_avatar_audio_with_the_tone(observed: Observed) -> None:
    span = observed.audio[-1][0] - observed.audio[0][0] if observed.audio else 0.0
    assert span >= WINDOW_S
    rms = np.array([r for _, r in observed.audio])
    # The quiet tone (rms 0.021) is there between beeps, not silence.
    assert np.median(rms) == pytest.approx(0.03 / np.sqrt(2), rel=0.35)


def test_raw_av_offset_at_the_subscriber_stays_within_two_frames(observed: Observed) -> None:
    """The bare publisher, with no receive-path compensation: a subscriber gets video 25-75 ms before the
    audio it was published with (WebRTC buffers audio longer; measured here). The product's one-frame
    compensation lives in server.session_outputs.LiveKitSessionOutput, and tests/serve holds the product's
    offset to one frame; this guards the publisher against drifting further than that compensation covers.
    """
    offsets = _av_offsets(observed)
    assert len(offsets) >= WINDOW_S - 1, f"only {len(offsets)} flash/beep pairs matched"
    median = statistics.median(offsets)
    print(
        f"\nsubscriber A/V offset (video - audio), {len(offsets)} flashes: median {median * 1000:+.1f} ms, "
        f"min {min(offsets) * 1000:+.1f} ms, max {max(offsets) * 1000:+.1f} ms"
    )
    assert abs(median) <= 2 * ONE_FRAME_S


def test_publisher_reports_its_own_av_offset_within_one_frame(observed: Observed) -> None:
    print(f"\npublisher A/V offset: mean {observed.publisher_offset * 1000:+.1f} ms "
          f"over {observed.publisher_offset_samples} frames")
    assert observed.publisher_offset_samples >= WINDOW_S * FPS
    assert abs(observed.publisher_offset) <= ONE_FRAME_S


def test_publisher_rejects_a_frame_rate_that_does_not_divide_the_sample_rate() -> None:
    with pytest.raises(ValueError, match="whole number of samples per frame"):
        LiveKitPublisher("ws://127.0.0.1:1", "token", WIDTH, HEIGHT, fps=15, sample_rate=16000)


async def _count_video_frames(url: str, room_name: str, want: int, timeout_s: float = 20.0) -> int:
    """Join as a viewer and count avatar_video frames until ``want`` arrived (or time runs out)."""
    viewer_token = (
        api.AccessToken("devkey", "secret")
        .with_identity(f"viewer-{uuid.uuid4().hex[:4]}")
        .with_grants(api.VideoGrants(room_join=True, room=room_name))
        .to_jwt()
    )
    viewer = rtc.Room()
    received = 0
    enough = asyncio.Event()

    async def count(track: rtc.Track) -> None:
        nonlocal received
        async for _ in rtc.VideoStream(track):
            received += 1
            if received >= want:
                enough.set()

    consumers: list[asyncio.Task[None]] = []

    @viewer.on("track_subscribed")
    def _on_track(track: rtc.Track, publication: rtc.RemoteTrackPublication, _: object) -> None:
        if publication.name == VIDEO_TRACK_NAME:
            consumers.append(asyncio.create_task(count(track)))

    await viewer.connect(url, viewer_token)
    try:
        await asyncio.wait_for(enough.wait(), timeout=timeout_s)
    except TimeoutError:
        pass
    finally:
        await viewer.disconnect()
        for task in consumers:
            task.cancel()
        await asyncio.gather(*consumers, return_exceptions=True)
    return received


@asynccontextmanager
async def _publishing(url: str) -> AsyncIterator[tuple[LiveKitPublisher, str]]:
    """A publisher in a fresh room with a producer task pushing frames until the block exits."""
    room_name = f"drop-{uuid.uuid4().hex[:8]}"
    token = mint_avatar_token(
        api_key="devkey", api_secret="secret", room=room_name, identity="avatar", agent_identity="agent"
    )
    publisher = LiveKitPublisher(url, token, WIDTH, HEIGHT, fps=FPS, sample_rate=RATE)
    await publisher.start()
    stop = asyncio.Event()

    async def produce() -> None:
        index = 0
        while not stop.is_set():
            await publisher.push(synthetic_frame(index), synthetic_audio(index))
            index += 1

    producer = asyncio.create_task(produce())
    try:
        yield publisher, room_name
    finally:
        stop.set()
        await asyncio.gather(producer, return_exceptions=True)
        await publisher.aclose()


async def _survive_restart(server) -> tuple[bool, int]:
    async with _publishing(server.url) as (publisher, room_name):
        await asyncio.sleep(1.0)
        server.stop(hard=True)
        await asyncio.sleep(1.0)
        server.start()
        received = await _count_video_frames(server.url, room_name, want=FPS)
        return publisher.ended.is_set(), received


async def _rejoin_after_sdk_gives_up(url: str) -> tuple[int, bool, int]:
    async with _publishing(url) as (publisher, room_name):
        await asyncio.sleep(0.5)
        # What the SDK emits once its own resume attempts are exhausted (it rides out a 20 s server outage
        # by itself, so a real give-up is too slow to provoke here).
        publisher.room.emit("disconnected", rtc.DisconnectReason.SIGNAL_CLOSE)
        deadline = time.monotonic() + 10
        while publisher.reconnects == 0 and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        received = await _count_video_frames(url, room_name, want=FPS)
        return publisher.reconnects, publisher.ended.is_set(), received


def test_publisher_keeps_the_session_through_a_server_restart(restartable_livekit_server) -> None:
    ended, received = asyncio.run(_survive_restart(restartable_livekit_server))
    assert not ended
    assert received >= FPS


def test_publisher_rejoins_and_republishes_when_the_connection_is_given_up(livekit_server) -> None:
    reconnects, ended, received = asyncio.run(_rejoin_after_sdk_gives_up(livekit_server.url))
    assert (reconnects, ended) == (1, False)
    assert received >= FPS


def test_publisher_ends_when_removed_from_the_room(livekit_server) -> None:
    async def scenario() -> tuple[bool, str | None]:
        async with _publishing(livekit_server.url) as (publisher, room_name):
            async with api.LiveKitAPI(
                livekit_server.url.replace("ws://", "http://"), "devkey", "secret"
            ) as lkapi:
                avatar = api.RoomParticipantIdentity(room=room_name, identity="avatar")
                await lkapi.room.remove_participant(avatar)
            await asyncio.wait_for(publisher.ended.wait(), timeout=10)
            return publisher.reconnects == 0, publisher.end_reason

    no_rejoin, reason = asyncio.run(scenario())
    assert no_rejoin
    assert reason is not None and "PARTICIPANT_REMOVED" in reason
