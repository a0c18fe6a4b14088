"""Where a live session's frames go, played out in real time: ``LiveKitSessionOutput`` (publisher and
avatar-worker protocol on the server's asyncio loop, ``AsyncLoopThread``) and ``FileSessionOutput`` (an MP4
written in real time: frames are written when their playout time comes, so a file session behaves like a
call — generation stays ~one chunk ahead and ``clear`` drops unwritten frames).

An output tells its session what played through ``PlayoutHooks``; barge-in (``clear``) drops every frame not
yet played and reports the first one dropped.
"""

from __future__ import annotations

import asyncio
import collections
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

from server.livekit.avatar_protocol import AudioChunk, AvatarProtocol, Cleared, SegmentEnded, SegmentStarted
from server.livekit.publisher import LiveKitPublisher
from server.publishers.file import Mp4FilePublisher
from server.speech_feed import Segment, SpeechFeed


class SessionOutput(Protocol):
    """Where a session's frames go. ``put_chunk`` and ``tick`` are called by the engine thread;
    ``buffered_s`` by it and by status reads, and changes nothing."""

    def put_chunk(self, frames: np.ndarray, pcm: np.ndarray, first_frame: int) -> None: ...

    def tick(self) -> None:
        """Called on every engine tick: play out whatever is due (a file output writes it)."""

    def buffered_s(self) -> float: ...

    def clear(self) -> None: ...

    def close(self) -> None: ...

    @property
    def end_reason(self) -> str | None: ...


@dataclass
class PlayoutHooks:
    """What the session wants to hear from its output as frames are played."""

    on_frame: Callable[[int], None]  # absolute frame index just published
    on_clear: Callable[[int], None]  # absolute index of the first frame not played


class AsyncLoopThread:
    """One asyncio loop on its own thread, shared by every LiveKit session of the server."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run, name="livekit-loop", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_forever()

    def submit(self, coro: object) -> Future[object]:
        return asyncio.run_coroutine_threadsafe(coro, self.loop)  # type: ignore[arg-type]

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=5)


class LiveKitSessionOutput:
    """Plays a session's frames into a LiveKit room in real time and speaks the avatar-worker protocol.

    The player task pushes one frame and its 1/fps s of audio at a time (``LiveKitPublisher.push`` paces it).
    When generation falls behind it repeats the last frame with silent audio rather than stall the track
    (counted in ``starved_frames``). The protocol's audio goes into the session like any other speech.

    ``video_delay_frames``: each video frame is pushed that many frame periods after its audio. Measured on
    this machine with a real livekit-server, a subscriber receives the video 50-80 ms *before* the audio
    it was published with (the WebRTC receive path buffers audio longer: tests/livekit/test_publisher.py
    measures -50 ms at 320x240, tests/serve measured -80 ms at 32x32 without the delay); one frame (62.5 ms)
    of sender-side compensation brings the subscriber's offset to within a frame. Playout reports
    (``on_frame``) follow the video.
    """

    def __init__(
        self,
        loop: AsyncLoopThread,
        publisher: LiveKitPublisher,
        protocol: AvatarProtocol,
        hooks: PlayoutHooks,
        feed: SpeechFeed,
        on_clear_request: Callable[[], None],
        video_delay_frames: int = 1,
    ) -> None:
        if video_delay_frames < 0:
            raise ValueError(f"video_delay_frames must be >= 0, got {video_delay_frames}")
        self.loop = loop
        self.publisher = publisher
        self.protocol = protocol
        self.hooks = hooks
        self.feed = feed
        self.on_clear_request = on_clear_request
        self.fps = publisher.fps
        self.spf = publisher.samples_per_frame
        self._lock = threading.Lock()
        self._queue: collections.deque[tuple[np.ndarray, np.ndarray, int]] = collections.deque()
        self._clear_requested = False
        self._last_frame: np.ndarray | None = None
        self.video_delay_frames = video_delay_frames
        self._held: collections.deque[tuple[np.ndarray, int]] = collections.deque()
        self._next_index = 0
        self._tasks: list[asyncio.Task[None]] = []
        self.starved_frames = 0
        self._segment: Segment | None = None

    async def start(self) -> None:
        self.publisher.add_room_observer(self.protocol.attach)
        await self.publisher.start()
        self._tasks = [asyncio.create_task(self._play()), asyncio.create_task(self._listen())]

    # ---- engine side -----------------------------------------------------------------------------------

    def put_chunk(self, frames: np.ndarray, pcm: np.ndarray, first_frame: int) -> None:
        with self._lock:
            for i in range(frames.shape[0]):
                self._queue.append((frames[i], pcm[i * self.spf : (i + 1) * self.spf], first_frame + i))

    def tick(self) -> None:
        """Nothing to do: the player thread paces the frames into the room."""

    def buffered_s(self) -> float:
        with self._lock:
            queued = len(self._queue)
        return queued / self.fps + self.publisher.queued_s

    def clear(self) -> None:
        """Request a barge-in; the player drops the queue and the publisher's queue between two pushes."""
        with self._lock:
            self._clear_requested = True

    def close(self) -> None:
        self.loop.submit(self._aclose()).result(timeout=15)

    @property
    def end_reason(self) -> str | None:
        return self.publisher.end_reason if self.publisher.ended.is_set() else None

    # ---- loop side -------------------------------------------------------------------------------------

    async def _play(self) -> None:
        silence = np.zeros(self.spf, np.float32)
        while not self.publisher.ended.is_set():
            with self._lock:
                clear, self._clear_requested = self._clear_requested, False
                if clear:
                    first_unplayed = self._queue[0][2] if self._queue else self._next_index
                    self._queue.clear()
                item = self._queue.popleft() if self._queue else None
            if clear:
                await self.publisher.clear()
                self.hooks.on_clear(first_unplayed)
            if item is None:
                if self._last_frame is None:
                    await asyncio.sleep(0.005)
                    continue
                self.starved_frames += 1
                await self.publisher.push(self._last_frame, silence)
                continue
            frame, audio, index = item
            self._next_index = index + 1
            self._held.append((frame, index))
            video, video_index = (
                self._held.popleft()
                if len(self._held) > self.video_delay_frames
                else (
                    self._held[0][0],
                    None,
                )
            )
            self._last_frame = video
            await self.publisher.push(video, audio)
            if video_index is not None:
                self.hooks.on_frame(video_index)

    async def _listen(self) -> None:
        async for event in self.protocol:
            if isinstance(event, SegmentStarted):
                self._segment = self.feed.open_segment(event.segment_id)
            elif isinstance(event, AudioChunk):
                self.feed.push(event.pcm, self._segment)
            elif isinstance(event, SegmentEnded):
                if self._segment is not None:
                    self.feed.end_segment(self._segment)
                self._segment = None
            elif isinstance(event, Cleared):
                self._segment = None
                self.on_clear_request()

    async def _aclose(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.protocol.aclose()
        await self.publisher.aclose()


class FileSessionOutput:
    """Writes a session's frames to an MP4 at their playout time (a recording of the call, real-time paced).

    Frames wait in a queue until the wall clock reaches their slot, so ``buffered_s`` is the same notion of
    "generated, not yet played" as on LiveKit and ``clear`` drops what is not yet written. Frames are
    written by ``pump``: on every engine tick (``tick``) and when a chunk arrives, both on the engine thread;
    ``buffered_s`` (also read by the API's session status on the HTTP thread) only reads. ``_write_lock``
    keeps the MP4 writes in order and one at a time (PyAV's muxer is not thread-safe; two interleaved writes
    failed with EINVAL, when status reads still wrote), ``_lock`` guards the queue.
    """

    def __init__(
        self, path: Path, width: int, height: int, fps: int, hooks: PlayoutHooks, sample_rate: int = 16_000
    ) -> None:
        """sample_rate: the rate of the chunks' audio (``SpeechFeed.output_rate``: 48 kHz at 24 fps)."""
        self.publisher = Mp4FilePublisher(path, width=width, height=height, fps=fps, sample_rate=sample_rate)
        self.fps = fps
        self.hooks = hooks
        self._lock = threading.Lock()
        self._write_lock = threading.Lock()
        self._closed = False
        self._queue: collections.deque[tuple[np.ndarray, np.ndarray, int]] = collections.deque()
        self._clock_start: float | None = None
        self._written = 0
        self._spf: int | None = None

    def put_chunk(self, frames: np.ndarray, pcm: np.ndarray, first_frame: int) -> None:
        spf = pcm.size // max(frames.shape[0], 1)
        with self._lock:
            self._spf = spf
            if self._clock_start is None:
                self._clock_start = time.perf_counter()
            for i in range(frames.shape[0]):
                self._queue.append((frames[i], pcm[i * spf : (i + 1) * spf], first_frame + i))
        self.pump()

    def pump(self) -> None:
        with self._write_lock:  # batches are taken and written in one order, one writer at a time
            with self._lock:
                if self._clock_start is None or self._closed:
                    return
                due = int((time.perf_counter() - self._clock_start) * self.fps) + 1
                batch = []
                while self._queue and self._written < due:
                    batch.append(self._queue.popleft())
                    self._written += 1
                if not self._queue and self._written < due:
                    # Starved: the playout clock restarts at the next frame instead of running ahead.
                    self._clock_start = time.perf_counter() - self._written / self.fps
            if batch:
                self.publisher.write(np.stack([b[0] for b in batch]), np.concatenate([b[1] for b in batch]))
        for _, _, index in batch:
            self.hooks.on_frame(index)

    def tick(self) -> None:
        self.pump()

    def buffered_s(self) -> float:
        with self._lock:
            if self._clock_start is None:
                return 0.0
            played = (time.perf_counter() - self._clock_start) * self.fps
            return max(0.0, (self._written + len(self._queue) - played) / self.fps)

    def clear(self) -> None:
        with self._lock:
            first_unplayed = self._queue[0][2] if self._queue else None
            self._queue.clear()
        if first_unplayed is not None:
            self.hooks.on_clear(first_unplayed)

    def close(self) -> None:
        with self._write_lock:
            with self._lock:
                self._closed = True
                self._queue.clear()
            self.publisher.close()

    @property
    def end_reason(self) -> str | None:
        return None
