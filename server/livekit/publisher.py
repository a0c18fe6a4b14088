"""Publishes one avatar's video and audio into a LiveKit room, paced in real time.

One call to :meth:`LiveKitPublisher.push` is one video frame plus exactly ``1/fps`` seconds of the audio
that belongs to it; ``rtc.AVSynchronizer`` releases the video at exactly ``fps`` while the audio source's
native queue paces the audio, so sync holds as long as the producer keeps the pairs interleaved and keeps
up with real time. ``push`` blocks while the queues are full: the caller is paced by playout.

A dropped connection does not end the session: frames keep flowing into the (room-independent) sources
while a background task joins the room again with the same token and re-publishes both tracks. Only a
disconnect that the server or the caller meant (participant removed, room deleted, duplicate identity,
:meth:`aclose`) ends the publisher.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

import numpy as np
from livekit import rtc

logger = logging.getLogger(__name__)

VIDEO_TRACK_NAME = "avatar_video"
AUDIO_TRACK_NAME = "avatar_audio"

# Disconnects that mean "you are done here"; any other reason is a network or server failure to ride out.
_TERMINAL_DISCONNECTS = frozenset(
    {
        rtc.DisconnectReason.CLIENT_INITIATED,
        rtc.DisconnectReason.DUPLICATE_IDENTITY,
        rtc.DisconnectReason.PARTICIPANT_REMOVED,
        rtc.DisconnectReason.ROOM_DELETED,
        rtc.DisconnectReason.ROOM_CLOSED,
    }
)

RoomObserver = Callable[[rtc.Room], Awaitable[None]]


@dataclass(frozen=True)
class AVOffsetStats:
    """Publisher-side A/V offset, sampled each time a video frame is handed to the encoder.

    ``offset = video_pts - audio_playout_position`` in seconds: positive means the video is ahead of the
    audio it was paired with. The audio position is what has left the audio source's native queue.
    """

    samples: int
    last_s: float
    mean_s: float
    max_abs_s: float


class _StampedFrame(rtc.VideoFrame):
    """A video frame that remembers its presentation time, so the capture hook can measure A/V offset."""

    def __init__(self, width: int, height: int, data: bytes, pts_s: float, epoch: int) -> None:
        super().__init__(width, height, rtc.VideoBufferType.RGB24, data)
        self.pts_s = pts_s
        self.epoch = epoch


class _MeasuringVideoSource:
    """Stands in for ``rtc.VideoSource`` inside AVSynchronizer: forwards frames and samples the A/V offset
    at the instant the synchroniser releases each frame (the only point where video time is known)."""

    def __init__(self, source: rtc.VideoSource, on_capture: Callable[[rtc.VideoFrame], None]) -> None:
        self._source = source
        self._on_capture = on_capture

    def capture_frame(self, frame: rtc.VideoFrame, **kwargs: object) -> None:
        self._source.capture_frame(frame, **kwargs)
        self._on_capture(frame)


class LiveKitPublisher:
    """Joins a room with a token and publishes ``avatar_video`` (camera) and ``avatar_audio`` (microphone).

    Args:
        url: LiveKit server URL, e.g. ``ws://127.0.0.1:7880``.
        token: a JWT for the avatar participant (see ``server.livekit.token.mint_avatar_token``).
        width, height: video size in pixels; every pushed frame must be ``[height, width, 3]`` uint8 RGB.
        fps: video frame rate; ``sample_rate / fps`` must be a whole number of samples.
        sample_rate: audio rate in Hz (mono).
        video_bitrate: encoder ceiling in bits/s (explicit, so quality does not depend on SDK defaults).
        video_codec: ``rtc.VideoCodec`` value; VP8 by default (software-encoded everywhere).
        queue_ms: audio and video queue length in ms; bounds latency added by the publisher.
        reconnect_delays_s: waits between reconnect attempts; the last one repeats until
            ``reconnect_timeout_s`` has passed, then the publisher ends with a reason.
    """

    def __init__(
        self,
        url: str,
        token: str,
        width: int,
        height: int,
        fps: int = 16,
        sample_rate: int = 16000,
        *,
        video_bitrate: int = 2_000_000,
        video_codec: int = rtc.VideoCodec.VP8,
        queue_ms: float = 100.0,
        reconnect_delays_s: Sequence[float] = (0.25, 0.5, 1.0, 2.0),
        reconnect_timeout_s: float = 120.0,
    ) -> None:
        if width <= 0 or height <= 0 or width % 2 or height % 2:
            raise ValueError(f"video size {width}x{height} must be positive and even (I420 needs even sizes)")
        if fps <= 0 or sample_rate <= 0 or sample_rate % fps:
            raise ValueError(
                f"sample_rate {sample_rate} Hz is not a whole number of samples per frame at {fps} fps; "
                "pick rates so that sample_rate / fps is an integer (e.g. 16000 Hz at 16 fps -> 1000)"
            )
        if video_bitrate <= 0:
            raise ValueError(f"video_bitrate must be positive bits/s, got {video_bitrate}")
        if not reconnect_delays_s:
            raise ValueError("reconnect_delays_s must list at least one delay in seconds")
        self.url = url
        self._token = token
        self.width = width
        self.height = height
        self.fps = fps
        self.sample_rate = sample_rate
        self.samples_per_frame = sample_rate // fps
        self._video_bitrate = video_bitrate
        self._video_codec = video_codec
        self._queue_ms = queue_ms
        self._reconnect_delays_s = tuple(reconnect_delays_s)
        self._reconnect_timeout_s = reconnect_timeout_s

        self._room: rtc.Room | None = None
        self._watched_room: rtc.Room | None = None  # the room whose disconnect ends or rejoins the session
        self._observers: list[RoomObserver] = []
        self._audio_source: rtc.AudioSource | None = None
        self._video_source: rtc.VideoSource | None = None
        self._sync: rtc.AVSynchronizer | None = None
        self._reconnect_task: asyncio.Task[None] | None = None
        self._closing = False

        self._epoch = 0
        self._next_pts_s = 0.0  # presentation time of the next pushed frame, on the audio timeline
        self._audio_pushed_end_s = 0.0
        self._offset_n = 0
        self._offset_sum = 0.0
        self._offset_last = 0.0
        self._offset_max_abs = 0.0

        self.frames_pushed = 0
        self.reconnects = 0
        self.ended = asyncio.Event()
        self.end_reason: str | None = None

    # ---- lifecycle -------------------------------------------------------------------------------------

    @property
    def room(self) -> rtc.Room:
        """The currently connected room (replaced by a new object after a reconnect)."""
        if self._room is None:
            raise RuntimeError("LiveKitPublisher.room used before start(); await publisher.start() first")
        return self._room

    def add_room_observer(self, observer: RoomObserver) -> None:
        """Call ``observer(room)`` after every (re)connect, once the tracks are published.

        The avatar-worker protocol uses this to register its RPC and byte-stream handlers on each new room.
        Register observers before :meth:`start`; the first call happens inside ``start``.
        """
        self._observers.append(observer)

    async def start(self) -> None:
        """Connect and publish. Raises ``rtc.ConnectError`` with the URL if the first join fails."""
        if self._sync is not None:
            raise RuntimeError("LiveKitPublisher.start() called twice")
        self._audio_source = rtc.AudioSource(self.sample_rate, 1, queue_size_ms=int(self._queue_ms))
        self._video_source = rtc.VideoSource(self.width, self.height)
        self._sync = rtc.AVSynchronizer(
            audio_source=self._audio_source,
            video_source=_MeasuringVideoSource(self._video_source, self._on_video_captured),  # type: ignore[arg-type]
            video_fps=self.fps,
            video_queue_size_ms=self._queue_ms,
        )
        try:
            await self._connect()
        except rtc.ConnectError as e:
            await self._release_sources()
            raise rtc.ConnectError(f"could not join LiveKit at {self.url}: {e}") from e

    async def _connect(self) -> None:
        old, self._watched_room = self._room, None
        if old is not None and old.isconnected():
            # The SDK reported a drop but still holds the connection: leave it, or the server would kick
            # the new join (same identity) or the old one later.
            await old.disconnect()
        room = rtc.Room()
        # Byte streams and RPC need no media subscriptions; not subscribing saves decode work.
        await room.connect(self.url, self._token, rtc.RoomOptions(auto_subscribe=False))
        assert self._audio_source is not None and self._video_source is not None
        audio_track = rtc.LocalAudioTrack.create_audio_track(AUDIO_TRACK_NAME, self._audio_source)
        video_track = rtc.LocalVideoTrack.create_video_track(VIDEO_TRACK_NAME, self._video_source)
        await room.local_participant.publish_track(
            audio_track, rtc.TrackPublishOptions(source=rtc.TrackSource.SOURCE_MICROPHONE)
        )
        await room.local_participant.publish_track(
            video_track,
            rtc.TrackPublishOptions(
                source=rtc.TrackSource.SOURCE_CAMERA,
                video_codec=self._video_codec,
                video_encoding=rtc.VideoEncoding(max_bitrate=self._video_bitrate, max_framerate=self.fps),
                simulcast=False,
            ),
        )
        room.on("disconnected", functools.partial(self._on_disconnected, room))
        self._room = self._watched_room = room
        for observer in self._observers:
            await observer(room)
        logger.info("avatar joined %s as %s", self.url, room.local_participant.identity)

    def _on_disconnected(self, room: rtc.Room, reason: int) -> None:
        if self._closing or self.ended.is_set() or room is not self._watched_room:
            return  # a room being replaced by a rejoin reports its own end; that is not ours to act on
        name = rtc.DisconnectReason.Name(reason)
        if reason in _TERMINAL_DISCONNECTS:
            self._end(f"disconnected from LiveKit: {name}")
            return
        if self._reconnect_task is None or self._reconnect_task.done():
            logger.warning("LiveKit connection dropped (%s); reconnecting, the session keeps running", name)
            self._reconnect_task = asyncio.create_task(self._reconnect())

    async def _reconnect(self) -> None:
        deadline = time.monotonic() + self._reconnect_timeout_s
        attempt = 0
        while not self._closing:
            await asyncio.sleep(self._reconnect_delays_s[min(attempt, len(self._reconnect_delays_s) - 1)])
            try:
                await self._connect()
            except rtc.ConnectError as e:
                attempt += 1
                if time.monotonic() > deadline:
                    self._end(f"could not rejoin {self.url} for {self._reconnect_timeout_s:.0f} s: {e}")
                    return
                logger.info("rejoin attempt %d failed: %s", attempt, e)
                continue
            self.reconnects += 1
            logger.info("rejoined LiveKit after %d failed attempts", attempt)
            return

    def _end(self, reason: str) -> None:
        if not self.ended.is_set():
            self.end_reason = reason
            self.ended.set()
            logger.warning("publisher ended: %s", reason)

    async def aclose(self) -> None:
        """Leave the room and release the sources. Safe to call more than once."""
        if self._closing:
            return
        self._closing = True
        if self._reconnect_task is not None:
            self._reconnect_task.cancel()
            await asyncio.gather(self._reconnect_task, return_exceptions=True)
        if self._room is not None:
            await self._room.disconnect()
        await self._release_sources()
        self._end("closed by the caller")

    async def _release_sources(self) -> None:
        if self._sync is not None:
            await self._sync.aclose()
        if self._audio_source is not None:
            await self._audio_source.aclose()

    # ---- media -----------------------------------------------------------------------------------------

    async def push(self, frame: np.ndarray, audio: np.ndarray) -> None:
        """Queue one video frame and the audio that plays during it; blocks to pace the caller in real time.

        Args:
            frame: ``[height, width, 3]`` uint8 RGB.
            audio: ``[sample_rate / fps]`` mono samples, int16, or float32 in [-1, 1].
        """
        if self._sync is None:
            raise RuntimeError("LiveKitPublisher.push() before start(); await publisher.start() first")
        if self.ended.is_set():
            raise RuntimeError(f"LiveKitPublisher.push() after the publisher ended: {self.end_reason}")
        if frame.shape != (self.height, self.width, 3) or frame.dtype != np.uint8:
            raise ValueError(
                f"video frame has shape {tuple(frame.shape)} {frame.dtype}, the publisher expects "
                f"({self.height}, {self.width}, 3) uint8 RGB"
            )
        if audio.shape != (self.samples_per_frame,):
            raise ValueError(
                f"audio for one frame has shape {tuple(audio.shape)}, expected ({self.samples_per_frame},): "
                f"exactly 1/{self.fps} s of mono audio at {self.sample_rate} Hz"
            )
        pcm = _to_int16(audio)
        pts = self._next_pts_s
        data = np.ascontiguousarray(frame).tobytes()
        video = _StampedFrame(self.width, self.height, data, pts, self._epoch)
        audio_end = pts + self.samples_per_frame / self.sample_rate
        # Audio first: the synchroniser releases a queued video frame on its next tick, while audio waits
        # behind the native queue, so pushing video first would show each frame about one frame early.
        # The audio timeline advances before the await because the source counts the frame as queued then.
        self._audio_pushed_end_s = audio_end
        self._next_pts_s = audio_end
        await self._sync.push(
            rtc.AudioFrame(pcm.tobytes(), self.sample_rate, 1, self.samples_per_frame), audio_end
        )
        await self._sync.push(video, pts)
        self.frames_pushed += 1

    async def clear(self) -> None:
        """Drop queued audio and video that has not been played out yet (barge-in).

        Call it from the task that pushes, between two ``push`` calls: a frame whose push is in flight
        would otherwise still be played after the clear.
        """
        if self._sync is None or self._audio_source is None:
            return
        playout = self._audio_playout_s()
        await self._sync.clear_queue()
        # Restart both timelines at what was actually played, and ignore offset samples from a frame that
        # the synchroniser had already dequeued before the clear.
        self._epoch += 1
        self._audio_pushed_end_s = playout
        self._next_pts_s = playout

    async def wait_for_playout(self) -> None:
        """Return once everything pushed so far has been played out."""
        if self._sync is not None:
            await self._sync.wait_for_playout()

    @property
    def playout_position_s(self) -> float:
        """Seconds of audio played out since start (the session's playout clock)."""
        return self._audio_playout_s() if self._audio_source is not None else 0.0

    @property
    def queued_s(self) -> float:
        """Seconds of audio pushed but not yet played out (the publisher's share of the playout buffer)."""
        return self._audio_source.queued_duration if self._audio_source is not None else 0.0

    @property
    def actual_fps(self) -> float:
        """Video rate the synchroniser achieved over its last second."""
        return self._sync.actual_fps if self._sync is not None else 0.0

    def av_offset_stats(self) -> AVOffsetStats:
        mean = self._offset_sum / self._offset_n if self._offset_n else 0.0
        return AVOffsetStats(self._offset_n, self._offset_last, mean, self._offset_max_abs)

    def _audio_playout_s(self) -> float:
        assert self._audio_source is not None
        return self._audio_pushed_end_s - self._audio_source.queued_duration

    def _on_video_captured(self, frame: rtc.VideoFrame) -> None:
        if not isinstance(frame, _StampedFrame) or frame.epoch != self._epoch:
            return
        offset = frame.pts_s - self._audio_playout_s()
        self._offset_n += 1
        self._offset_sum += offset
        self._offset_last = offset
        self._offset_max_abs = max(self._offset_max_abs, abs(offset))


def _to_int16(audio: np.ndarray) -> np.ndarray:
    if audio.dtype == np.int16:
        return np.ascontiguousarray(audio)
    if audio.dtype in (np.float32, np.float64):
        return (np.clip(audio, -1.0, 1.0) * 32767.0).astype(np.int16)
    raise ValueError(f"audio dtype {audio.dtype} is not supported; pass int16 PCM or float32 in [-1, 1]")
