"""The avatar side of the LiveKit Agents avatar-worker protocol, with only the ``livekit`` RTC SDK.

Wire protocol (livekit-agents ``voice/avatar/_datastream_io.py``, the agent side being
``DataStreamAudioOutput``):

- agent -> avatar: one byte stream per speech segment on topic ``lk.audio_stream``; attributes
  ``sample_rate`` and ``num_channels``; body raw interleaved int16 little-endian PCM, sent faster than real
  time; the stream's trailer ends the segment.
- agent -> avatar: RPC ``lk.clear_buffer`` (payload ``""``) on barge-in; answered ``"ok"``, or ``"reject"``
  when the caller is not our agent.
- avatar -> agent: RPC ``lk.playback_started`` (payload ``""``) when a segment starts to play, and RPC
  ``lk.playback_finished`` with JSON ``{"playback_position": s, "interrupted": bool,
  "synchronized_transcript": null}`` once per segment — on natural end and after a clear. The agent builds
  its ``PlaybackFinishedEvent(**payload)``, so no other keys may be sent.
- the agent participant's attribute ``lk.agent.state`` is one of initializing, idle, listening, thinking,
  speaking.

The session code consumes :class:`AvatarProtocol` as an async iterator of events (16 kHz mono float32
audio) and reports playout with :meth:`AvatarProtocol.playback_started` and
:meth:`AvatarProtocol.playback_finished`; everything LiveKit-specific stays here.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass

import numpy as np
from livekit import rtc

logger = logging.getLogger(__name__)

AUDIO_STREAM_TOPIC = "lk.audio_stream"
RPC_CLEAR_BUFFER = "lk.clear_buffer"
RPC_PLAYBACK_STARTED = "lk.playback_started"
RPC_PLAYBACK_FINISHED = "lk.playback_finished"
ATTRIBUTE_AGENT_STATE = "lk.agent.state"
ATTRIBUTE_PUBLISH_ON_BEHALF = "lk.publish_on_behalf"
# With no chunk and no trailer for this long, the trailer is taken as lost and the segment ends (upstream
# uses the same value; the sender writes faster than real time, so a healthy stream is never this idle).
STREAM_IDLE_TIMEOUT_S = 10.0


@dataclass(frozen=True)
class SegmentStarted:
    """The agent opened a new speech segment (its original format; audio is delivered at 16 kHz mono)."""

    segment_id: str
    sample_rate: int
    num_channels: int


@dataclass(frozen=True)
class AudioChunk:
    """Audio of the current segment: ``pcm`` is ``[N]`` float32 in [-1, 1], mono, at the output rate."""

    segment_id: str
    pcm: np.ndarray


@dataclass(frozen=True)
class SegmentEnded:
    """All audio of the segment has been delivered (it may still be playing)."""

    segment_id: str


@dataclass(frozen=True)
class Cleared:
    """Barge-in: drop every queued frame, then call ``playback_finished(position_s, interrupted=True)``."""


@dataclass(frozen=True)
class AgentStateChanged:
    """The agent's ``lk.agent.state`` attribute changed (e.g. ``listening`` can drive a listening pose)."""

    state: str


ProtocolEvent = SegmentStarted | AudioChunk | SegmentEnded | Cleared | AgentStateChanged


@dataclass
class _Segment:
    segment_id: str
    started_sent: bool = False


class AvatarProtocol:
    """Receives the agent's audio segments and reports playout back to it.

    Segment bookkeeping makes the guarantees the agent relies on: ``lk.playback_started`` at most once and
    ``lk.playback_finished`` exactly once per segment. Segments become *pending* when their stream opens
    and stop being pending when :meth:`playback_finished` reports them.

    Args:
        agent_identity: the agent whose audio we play. ``None`` resolves it at attach time from our own
            ``lk.publish_on_behalf`` attribute (set in the token), else the first participant of kind AGENT.
        output_sample_rate: rate of :class:`AudioChunk` audio in Hz.
        rpc_retries: attempts per outgoing RPC (the agent may not have registered its handler yet).
    """

    def __init__(
        self, *, agent_identity: str | None = None, output_sample_rate: int = 16000, rpc_retries: int = 3
    ) -> None:
        self._agent_identity = agent_identity
        self._output_rate = output_sample_rate
        self._rpc_retries = rpc_retries
        self._room: rtc.Room | None = None
        self._events: asyncio.Queue[ProtocolEvent | None] = asyncio.Queue()
        self._readers: asyncio.Queue[rtc.ByteStreamReader] = asyncio.Queue()
        self._pending: deque[_Segment] = deque()
        self._current: _Segment | None = None
        self._current_cleared = False
        self._superseded = asyncio.Event()
        self._rpc_queue: asyncio.Queue[tuple[str, str]] = asyncio.Queue()
        self._tasks: list[asyncio.Task[None]] = []
        self._segment_counter = 0
        self._playback_started_supported = True
        self.agent_state: str | None = None

    # ---- wiring ----------------------------------------------------------------------------------------

    @property
    def agent_identity(self) -> str | None:
        return self._agent_identity

    async def attach(self, room: rtc.Room) -> None:
        """Register the protocol's handlers on a connected room; call again with the new room after a rejoin
        (``LiveKitPublisher.add_room_observer(protocol.attach)`` does that)."""
        self._room = room
        if self._agent_identity is None:
            self._agent_identity = room.local_participant.attributes.get(ATTRIBUTE_PUBLISH_ON_BEHALF)
        if self._agent_identity is None:
            self._agent_identity = next(
                (
                    p.identity
                    for p in room.remote_participants.values()
                    if p.kind == rtc.ParticipantKind.PARTICIPANT_KIND_AGENT
                ),
                None,
            )
        room.register_byte_stream_handler(AUDIO_STREAM_TOPIC, self._on_stream_opened)
        room.local_participant.register_rpc_method(RPC_CLEAR_BUFFER, self._on_clear_buffer)
        room.on("participant_attributes_changed", self._on_attributes_changed)
        room.on("participant_connected", self._on_participant_connected)
        agent = room.remote_participants.get(self._agent_identity or "")
        if agent is not None:
            self._update_agent_state(agent.attributes.get(ATTRIBUTE_AGENT_STATE))
        if not self._tasks:
            self._tasks = [asyncio.create_task(self._read_segments()), asyncio.create_task(self._send_rpcs())]

    async def aclose(self) -> None:
        """Stop reading and sending; the event iterator ends."""
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []
        if self._room is not None and self._room.isconnected():
            self._room.unregister_byte_stream_handler(AUDIO_STREAM_TOPIC)
            self._room.local_participant.unregister_rpc_method(RPC_CLEAR_BUFFER)
        self._events.put_nowait(None)

    def __aiter__(self) -> AsyncIterator[ProtocolEvent]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[ProtocolEvent]:
        while (event := await self._events.get()) is not None:
            yield event

    # ---- playout reports (called by the session's player) ----------------------------------------------

    @property
    def pending_segments(self) -> int:
        """Segments received whose playback has not been reported finished."""
        return len(self._pending)

    def playback_started(self) -> None:
        """The oldest pending segment's first audio is playing; sends ``lk.playback_started`` once for it."""
        segment = next((s for s in self._pending if not s.started_sent), None)
        if segment is None:
            return
        segment.started_sent = True
        if self._playback_started_supported:
            self._rpc_queue.put_nowait((RPC_PLAYBACK_STARTED, ""))

    def playback_finished(self, position_s: float, interrupted: bool) -> None:
        """Report the end of playback and send ``lk.playback_finished``.

        ``interrupted=False``: the oldest pending segment played to its end, ``position_s`` seconds of it.
        ``interrupted=True`` (after :class:`Cleared`): every pending segment is finished; the oldest one
        played ``position_s`` seconds, the later ones never started (position 0). With nothing pending the
        call is a no-op, so the agent never receives more reports than segments.
        """
        if not self._pending:
            logger.debug("playback_finished(%s, %s) with nothing pending; ignored", position_s, interrupted)
            return
        count = len(self._pending) if interrupted else 1
        for i in range(count):
            self._pending.popleft()
            payload = {
                "playback_position": float(position_s) if i == 0 else 0.0,
                "interrupted": bool(interrupted),
                "synchronized_transcript": None,
            }
            self._rpc_queue.put_nowait((RPC_PLAYBACK_FINISHED, json.dumps(payload)))

    async def wait_rpcs_sent(self) -> None:
        """Return once every queued playout report has been delivered (or given up on)."""
        await self._rpc_queue.join()

    # ---- incoming --------------------------------------------------------------------------------------

    def _on_stream_opened(self, reader: rtc.ByteStreamReader, participant_identity: str) -> None:
        if participant_identity != self._agent_identity:
            logger.warning(
                "ignoring %s stream from %r; this avatar plays audio of agent %r",
                AUDIO_STREAM_TOPIC,
                participant_identity,
                self._agent_identity,
            )
            return
        if self._current is not None:
            # The agent never overlaps segments: a new header while one is open means its trailer was lost.
            self._superseded.set()
        self._readers.put_nowait(reader)

    def _on_clear_buffer(self, data: rtc.RpcInvocationData) -> str:
        if data.caller_identity != self._agent_identity:
            logger.warning("rejecting %s from %r (not our agent)", RPC_CLEAR_BUFFER, data.caller_identity)
            return "reject"
        if self._current is not None:
            self._current_cleared = True
            self._superseded.set()
        self._events.put_nowait(Cleared())
        return "ok"

    def _on_attributes_changed(self, changed: dict[str, str], participant: rtc.Participant) -> None:
        if participant.identity == self._agent_identity and ATTRIBUTE_AGENT_STATE in changed:
            self._update_agent_state(changed[ATTRIBUTE_AGENT_STATE])

    def _on_participant_connected(self, participant: rtc.RemoteParticipant) -> None:
        if self._agent_identity is None and participant.kind == rtc.ParticipantKind.PARTICIPANT_KIND_AGENT:
            self._agent_identity = participant.identity
        if participant.identity == self._agent_identity:
            self._update_agent_state(participant.attributes.get(ATTRIBUTE_AGENT_STATE))

    def _update_agent_state(self, state: str | None) -> None:
        if state and state != self.agent_state:
            self.agent_state = state
            self._events.put_nowait(AgentStateChanged(state))

    async def _read_segments(self) -> None:
        while True:
            reader = await self._readers.get()
            attributes = reader.info.attributes or {}
            try:
                sample_rate = int(attributes["sample_rate"])
                channels = int(attributes["num_channels"])
            except (KeyError, ValueError):
                logger.error(
                    "%s stream %s lacks integer sample_rate/num_channels attributes (%r); skipped",
                    AUDIO_STREAM_TOPIC,
                    reader.info.stream_id,
                    attributes,
                )
                continue
            self._segment_counter += 1
            segment = _Segment(f"{reader.info.stream_id or 'segment'}#{self._segment_counter}")
            self._current, self._current_cleared = segment, False
            self._superseded.clear()
            self._pending.append(segment)
            self._events.put_nowait(SegmentStarted(segment.segment_id, sample_rate, channels))
            await self._pump(reader, segment, sample_rate, channels)
            if not self._current_cleared:
                self._events.put_nowait(SegmentEnded(segment.segment_id))
            self._current = None

    async def _pump(self, reader: rtc.ByteStreamReader, segment: _Segment, rate: int, channels: int) -> None:
        decoder = _PcmDecoder(rate, channels, self._output_rate)
        chunks = aiter(reader)
        superseded = asyncio.ensure_future(self._superseded.wait())
        try:
            while True:
                next_chunk = asyncio.ensure_future(anext(chunks))
                done, _ = await asyncio.wait(
                    {next_chunk, superseded},
                    timeout=STREAM_IDLE_TIMEOUT_S,
                    return_when=asyncio.FIRST_COMPLETED,
                )
                if next_chunk not in done:
                    next_chunk.cancel()
                    if not self._current_cleared:
                        why = "superseded by a newer stream" if superseded in done else "idle"
                        logger.warning("segment %s ended without its trailer (%s)", segment.segment_id, why)
                    break
                try:
                    data = next_chunk.result()
                except StopAsyncIteration:
                    break
                if self._current_cleared:
                    break
                pcm = decoder.push(data)
                if pcm.size:
                    self._events.put_nowait(AudioChunk(segment.segment_id, pcm))
            if not self._current_cleared:
                tail = decoder.flush()
                if tail.size:
                    self._events.put_nowait(AudioChunk(segment.segment_id, tail))
        finally:
            superseded.cancel()

    # ---- outgoing --------------------------------------------------------------------------------------

    async def _send_rpcs(self) -> None:
        # One sender keeps started-before-finished order and never blocks the real-time player.
        while True:
            method, payload = await self._rpc_queue.get()
            try:
                await self._perform_rpc(method, payload)
            finally:
                self._rpc_queue.task_done()

    async def _perform_rpc(self, method: str, payload: str) -> None:
        for attempt in range(1, self._rpc_retries + 1):
            if self._room is None or self._agent_identity is None:
                logger.error("cannot send %s: no room or agent identity yet", method)
                return
            try:
                await self._room.local_participant.perform_rpc(
                    destination_identity=self._agent_identity, method=method, payload=payload
                )
                return
            except rtc.RpcError as e:
                if e.code == rtc.RpcError.ErrorCode.UNSUPPORTED_METHOD and method == RPC_PLAYBACK_STARTED:
                    # The agent registers playback_started only with wait_playback_start=True; stop sending.
                    self._playback_started_supported = False
                    return
                if attempt == self._rpc_retries:
                    logger.error("%s to %s failed %d times: %s", method, self._agent_identity, attempt, e)
                    return
                await asyncio.sleep(0.1)


class _PcmDecoder:
    """int16 interleaved PCM bytes at any rate/channel count -> float32 mono at the output rate."""

    def __init__(self, rate: int, channels: int, output_rate: int) -> None:
        if rate <= 0 or channels <= 0:
            raise ValueError(f"audio stream declares sample_rate={rate}, num_channels={channels}; need > 0")
        self._rate = rate
        self._channels = channels
        self._carry = b""
        self._resampler = (
            rtc.AudioResampler(rate, output_rate, num_channels=1, quality=rtc.AudioResamplerQuality.HIGH)
            if rate != output_rate
            else None
        )

    def push(self, data: bytes) -> np.ndarray:
        data = self._carry + data
        frame_bytes = 2 * self._channels
        usable = len(data) - len(data) % frame_bytes
        self._carry = data[usable:]
        if usable == 0:
            return np.zeros(0, np.float32)
        mono = np.frombuffer(data[:usable], dtype="<i2").reshape(-1, self._channels).mean(axis=1)
        if self._resampler is None:
            return (mono / 32768.0).astype(np.float32)
        pcm = mono.round().astype(np.int16)
        frames = self._resampler.push(rtc.AudioFrame(pcm.tobytes(), self._rate, 1, pcm.size))
        return _frames_to_float(frames)

    def flush(self) -> np.ndarray:
        if self._resampler is None:
            return np.zeros(0, np.float32)
        return _frames_to_float(self._resampler.flush())


def _frames_to_float(frames: list[rtc.AudioFrame]) -> np.ndarray:
    if not frames:
        return np.zeros(0, np.float32)
    pcm = np.concatenate([np.frombuffer(f.data, dtype=np.int16) for f in frames])
    return (pcm / 32768.0).astype(np.float32)

