"""The avatar-worker protocol against a real livekit-server and the real agent side (livekit-agents).

The agent is a plain ``rtc.Room`` joined as kind ``agent`` with livekit-agents' ``DataStreamAudioOutput``
(exactly what a LiveKit voice agent installs); the avatar is our ``LiveKitPublisher`` + ``AvatarProtocol``
with a stand-in player that "plays" received audio in real time through the publisher, one 1/16 s frame at
a time, and reports playout like the future session code will.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pytest
from livekit import api, rtc
from livekit.agents import AgentSession
from livekit.agents.voice.avatar import DataStreamAudioOutput
from livekit.agents.voice.io import PlaybackFinishedEvent

from server.livekit.agent_plugin import AvatarSession
from server.livekit.avatar_protocol import (
    AgentStateChanged,
    AudioChunk,
    AvatarProtocol,
    Cleared,
    SegmentEnded,
    SegmentStarted,
)
from server.livekit.publisher import LiveKitPublisher
from server.livekit.token import ATTRIBUTE_PUBLISH_ON_BEHALF, mint_avatar_token

WIDTH, HEIGHT, FPS, RATE = 64, 64, 16, 16000
SPF = RATE // FPS
AVATAR, AGENT = "tm-avatar", "voice-agent"

pytestmark = pytest.mark.filterwarnings("ignore:The HMAC key is 6 bytes long")


def tone(seconds: float, rate: int = RATE) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    return (0.3 * np.sin(2 * np.pi * 220 * t) * 32767).astype(np.int16)


@dataclass
class Player:
    """Plays the protocol's audio in real time through the publisher and reports playout."""

    protocol: AvatarProtocol
    publisher: LiveKitPublisher
    events: list[Any] = field(default_factory=list)
    _buffer: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float32))
    _segment_played: int = 0
    _segment_ended: bool = False
    _clear: bool = False

    async def consume(self) -> None:
        async for event in self.protocol:
            self.events.append(event)
            if isinstance(event, SegmentStarted):
                self._segment_played, self._segment_ended = 0, False
            elif isinstance(event, AudioChunk):
                self._buffer = np.concatenate([self._buffer, event.pcm])
            elif isinstance(event, SegmentEnded):
                self._segment_ended = True
            elif isinstance(event, Cleared):
                self._clear = True

    async def play(self) -> None:
        frame = np.full((HEIGHT, WIDTH, 3), 90, np.uint8)
        while True:
            if self._clear:
                self._clear, self._buffer = False, np.zeros(0, np.float32)
                await self.publisher.clear()
                self.protocol.playback_finished(self._segment_played / RATE, interrupted=True)
                self._segment_played = 0
            audio, self._buffer = self._buffer[:SPF], self._buffer[SPF:]
            if audio.size and self._segment_played == 0:
                self.protocol.playback_started()
            self._segment_played += audio.size
            await self.publisher.push(frame, np.pad(audio, (0, SPF - audio.size)))
            if self._segment_ended and not self._buffer.size and self.protocol.pending_segments:
                self.protocol.playback_finished(self._segment_played / RATE, interrupted=False)
                self._segment_ended = False


def _agent_token(room_name: str) -> str:
    return (
        api.AccessToken("devkey", "secret")
        .with_kind("agent")
        .with_identity(AGENT)
        .with_grants(api.VideoGrants(room_join=True, room=room_name, can_update_own_metadata=True))
        .to_jwt()
    )


@asynccontextmanager
async def running_avatar(url: str, token: str) -> AsyncIterator[Player]:
    """Our avatar: publisher + protocol + player, joined with ``token``."""
    publisher = LiveKitPublisher(url, token, WIDTH, HEIGHT, fps=FPS, sample_rate=RATE)
    protocol = AvatarProtocol()
    publisher.add_room_observer(protocol.attach)
    await publisher.start()
    player = Player(protocol, publisher)
    tasks = [asyncio.create_task(player.consume()), asyncio.create_task(player.play())]
    try:
        yield player
    finally:
        await protocol.wait_rpcs_sent()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await protocol.aclose()
        await publisher.aclose()


@asynccontextmanager
async def agent_and_avatar(url: str) -> AsyncIterator[tuple[rtc.Room, DataStreamAudioOutput, Player]]:
    room_name = f"proto-{uuid.uuid4().hex[:8]}"
    agent_room = rtc.Room()
    await agent_room.connect(url, _agent_token(room_name))
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
    try:
        async with running_avatar(url, token) as player:
            yield agent_room, output, player
    finally:
        await agent_room.disconnect()


async def speak(output: DataStreamAudioOutput, pcm: np.ndarray, chunk_s: float = 0.1) -> None:
    """Push a clip through the agent's audio output the way the TTS pipeline does, then end the segment."""
    step = int(chunk_s * RATE)
    for start in range(0, pcm.size, step):
        piece = pcm[start : start + step]
        await output.capture_frame(rtc.AudioFrame(piece.tobytes(), RATE, 1, piece.size))
    output.flush()


def _record(output: DataStreamAudioOutput, name: str) -> list[tuple[float, Any]]:
    seen: list[tuple[float, Any]] = []
    output.on(name, lambda ev: seen.append((time.monotonic(), ev)))
    return seen


def run(scenario: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(scenario())


def test_avatar_token_joins_as_agent_kind_publishing_on_behalf_of_the_agent() -> None:
    jwt = mint_avatar_token(
        api_key="devkey", api_secret="secret", room="r1", identity=AVATAR, agent_identity=AGENT
    )
    claims = api.TokenVerifier("devkey", "secret").verify(jwt)
    assert (claims.identity, claims.kind) == (AVATAR, "agent")
    assert claims.attributes == {ATTRIBUTE_PUBLISH_ON_BEHALF: AGENT}
    assert claims.video.room_join and claims.video.room == "r1"
    assert sorted(claims.video.can_publish_sources) == ["camera", "microphone"]


def test_avatar_token_refuses_the_agents_own_identity() -> None:
    with pytest.raises(ValueError, match="equals the agent identity"):
        mint_avatar_token(api_key="k", api_secret="s", room="r", identity=AGENT, agent_identity=AGENT)


def test_agent_gets_playback_finished_not_interrupted_after_a_clip(livekit_server) -> None:
    async def scenario() -> None:
        async with agent_and_avatar(livekit_server.url) as (_, output, player):
            started = _record(output, "playback_started")
            await speak(output, tone(1.0))
            event: PlaybackFinishedEvent = await asyncio.wait_for(output.wait_for_playout(), timeout=15)
            assert event.interrupted is False
            assert event.playback_position == pytest.approx(1.0, abs=SPF / RATE)
            assert len(started) == 1
            received = sum(e.pcm.size for e in player.events if isinstance(e, AudioChunk))
            assert received == RATE  # every sample of the clip, delivered at 16 kHz

    run(scenario)


def test_audio_at_24khz_stereo_is_delivered_as_16khz_mono(livekit_server) -> None:
    async def scenario() -> None:
        async with agent_and_avatar(livekit_server.url) as (agent_room, _, player):
            # An agent output that does not ask for 16 kHz streams its TTS rate; here 24 kHz stereo.
            output = DataStreamAudioOutput(agent_room, destination_identity=AVATAR)
            mono = tone(1.0, rate=24000)
            stereo = np.repeat(mono, 2)
            for start in range(0, mono.size, 2400):
                piece = stereo[2 * start : 2 * (start + 2400)]
                await output.capture_frame(rtc.AudioFrame(piece.tobytes(), 24000, 2, piece.size // 2))
            output.flush()
            await asyncio.wait_for(output.wait_for_playout(), timeout=15)
            started = [e for e in player.events if isinstance(e, SegmentStarted)]
            assert [(e.sample_rate, e.num_channels) for e in started] == [(24000, 2)]
            pcm = np.concatenate([e.pcm for e in player.events if isinstance(e, AudioChunk)])
            assert abs(pcm.size - RATE) <= RATE // 100
            # still the 220 Hz tone at 0.3 amplitude after downmix and resampling
            rms = np.sqrt(np.mean(pcm[RATE // 10 : -RATE // 10] ** 2))
            assert rms == pytest.approx(0.3 / np.sqrt(2), rel=0.05)

    run(scenario)


def test_clear_mid_segment_yields_interrupted_within_two_seconds(livekit_server) -> None:
    async def scenario() -> None:
        async with agent_and_avatar(livekit_server.url) as (_, output, player):
            started = _record(output, "playback_started")
            await speak(output, tone(4.0))
            deadline = time.monotonic() + 15
            while not started and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            assert started, "the avatar never reported lk.playback_started"
            await asyncio.sleep(1.0)
            cleared_at = time.monotonic()
            output.clear_buffer()
            event = await asyncio.wait_for(output.wait_for_playout(), timeout=5)
            elapsed = time.monotonic() - cleared_at
            print(f"\nclear -> playback_finished(interrupted) in {elapsed * 1000:.0f} ms, "
                  f"position {event.playback_position:.2f} s")
            assert event.interrupted is True
            assert elapsed < 2.0
            # The agent's own 2 s fallback would report the whole 4 s pushed; ours reports what was played.
            assert 0.5 < event.playback_position < 3.0
            assert any(isinstance(e, Cleared) for e in player.events)

    run(scenario)


def test_second_segment_after_a_clear_plays_to_its_end(livekit_server) -> None:
    async def scenario() -> None:
        async with agent_and_avatar(livekit_server.url) as (_, output, _player):
            await speak(output, tone(3.0))
            await asyncio.sleep(1.5)
            output.clear_buffer()
            first = await asyncio.wait_for(output.wait_for_playout(), timeout=5)
            await speak(output, tone(0.5))
            second = await asyncio.wait_for(output.wait_for_playout(), timeout=10)
            assert (first.interrupted, second.interrupted) == (True, False)
            assert second.playback_position == pytest.approx(0.5, abs=SPF / RATE)

    run(scenario)


def test_clear_buffer_from_another_participant_is_rejected(livekit_server) -> None:
    async def scenario() -> None:
        async with agent_and_avatar(livekit_server.url) as (agent_room, _output, player):
            stranger = rtc.Room()
            token = (
                api.AccessToken("devkey", "secret")
                .with_identity("stranger")
                .with_grants(api.VideoGrants(room_join=True, room=agent_room.name))
                .to_jwt()
            )
            await stranger.connect(livekit_server.url, token)
            try:
                answer = await stranger.local_participant.perform_rpc(
                    destination_identity=AVATAR, method="lk.clear_buffer", payload=""
                )
            finally:
                await stranger.disconnect()
            assert answer == "reject"
            await asyncio.sleep(0.2)  # give a wrongly accepted clear time to reach the player
            assert not any(isinstance(e, Cleared) for e in player.events)

    run(scenario)


def test_avatar_reads_the_agent_state_attribute(livekit_server) -> None:
    async def scenario() -> None:
        async with agent_and_avatar(livekit_server.url) as (agent_room, _output, player):
            await agent_room.local_participant.set_attributes({"lk.agent.state": "listening"})
            deadline = time.monotonic() + 5
            # Wait for the event itself: the consumer task sees it a loop turn after the attribute changes.
            while AgentStateChanged("listening") not in player.events and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            assert AgentStateChanged("listening") in player.events
            assert player.protocol.agent_state == "listening"

    run(scenario)


def test_avatar_session_plugin_starts_our_avatar_and_routes_agent_audio_to_it(livekit_server) -> None:
    async def scenario() -> None:
        room_name = f"plugin-{uuid.uuid4().hex[:8]}"
        agent_room = rtc.Room()
        await agent_room.connect(livekit_server.url, _agent_token(room_name))
        requests: list[tuple[str, str, dict[str, Any], dict[str, str]]] = []
        avatar_started: asyncio.Future[AsyncIterator[Player]] = asyncio.get_running_loop().create_future()

        async def fake_api(method: str, url: str, body: Any, headers: Any) -> dict[str, Any]:
            requests.append((method, url, body, dict(headers)))
            if method == "POST":
                output = body["output"]
                avatar_started.set_result(running_avatar(output["url"], output["token"]))
                return {"session_id": "s-1", "identity": output["identity"]}
            return {}

        session = AgentSession()
        plugin = AvatarSession(
            api_url="http://tm.test/",
            api_key="k-123",
            session_request={"prompt": "a friendly face"},
            avatar_identity=AVATAR,
            livekit_url=livekit_server.url,
            livekit_api_key="devkey",
            livekit_api_secret="secret",
            http_request=fake_api,
        )
        try:
            await plugin.start(session, agent_room)
            async with await avatar_started:
                await plugin.wait_for_join(timeout=10)
                output = session.output.audio
                assert isinstance(output, DataStreamAudioOutput)
                await speak(output, tone(0.5))
                event = await asyncio.wait_for(output.wait_for_playout(), timeout=10)
                assert event.interrupted is False
            await plugin.aclose()
        finally:
            await agent_room.disconnect()
        method, url, body, headers = requests[0]
        assert (method, url) == ("POST", "http://tm.test/v1/sessions")
        assert headers == {"Authorization": "Bearer k-123"}
        assert body["prompt"] == "a friendly face"
        assert {k: body["output"][k] for k in ("type", "url", "room", "identity", "agent_identity")} == {
            "type": "livekit",
            "url": livekit_server.url,
            "room": room_name,
            "identity": AVATAR,
            "agent_identity": AGENT,
        }
        assert requests[1][:2] == ("DELETE", "http://tm.test/v1/sessions/s-1")

    run(scenario)
