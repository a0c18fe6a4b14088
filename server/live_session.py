"""One live call of ``talkingmachines serve``: its audio timeline, its chunk inputs and where its frames go.

Timeline. A session has one audio clock in 16 kHz samples, shared by every character's ``AudioFeaturizer``
and by the published audio: video frame ``v`` plays samples ``[1000 v, 1000 (v + 1))``. Speech arrives
(HTTP, WebSocket, LiveKit byte streams) into a *pending* queue and is fed to the featurizers **just in time**,
only when a chunk is generated: exactly up to the samples that chunk needs (its frames plus the window's
look-ahead of 2 latent frames). What the pending queue cannot cover is padded with silence, so a chunk is
always ready when the playout buffer needs one — video never waits for speech (silence mode). Speaking
characters get the speech; the others get zeros of the same length, so all featurizers stay on one clock.

Consequences (by design): speech that arrives while silence chunks are queued starts after them plus the
0.5 s look-ahead already fed as silence, so first-frame latency ≈ playout buffer + 0.5 s + one chunk's
generation; speech that trickles in slower than real time is split by silence rather than stalling the video.

Barge-in (``clear``): the pending speech is dropped, the look-ahead already fed to the featurizers is zeroed
(so no old speech leaks into the next chunk), and the output drops every frame not yet played; the KV
history on the workers carries on, so the next chunk continues the same video.

Outputs: ``LiveKitSessionOutput`` (publisher + avatar-worker protocol on the server's asyncio loop) and
``FileSessionOutput`` (an MP4 written in real time: frames are written when their playout time comes, so a
file session behaves like a call — generation stays ~one chunk ahead and ``clear`` drops unwritten frames).
"""

from __future__ import annotations

import asyncio
import collections
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np

from decoder.encode import I2VConditioning
from decoder.streaming import DecodeSession
from engine.chunks import PreparedInputs, SessionTimes, chunk_request
from frontends.audio_features import AudioFeaturizer, ChunkAudio
from proto.api import SessionState
from proto.chunk_specs import chunk_request_specs
from proto.model_config import ModelConfig
from proto.stream_config import StreamConfig
from server.livekit.avatar_protocol import AudioChunk, AvatarProtocol, Cleared, SegmentEnded, SegmentStarted
from server.livekit.publisher import LiveKitPublisher
from server.publishers.file import Mp4FilePublisher

log = logging.getLogger(__name__)

# A frame whose paired audio is louder than this (RMS, full scale 1) is painted white by the sync probe.
PROBE_RMS = 0.25


@dataclass
class _Utterance:
    """Speech pushed after a pause: when it arrived and (once fed) where it starts on the timeline."""

    arrived_at: float
    start_sample: int | None = None


@dataclass
class Segment:
    """An agent's speech segment (one ``lk.audio_stream``) on the session timeline, for playout reports."""

    segment_id: str
    start_sample: int | None = None  # where its first sample was fed
    end_sample: int | None = None  # end of what was fed so far
    fed_samples: int = 0  # its own samples fed (less than end - start when silence filled an underrun)
    received_all: bool = False
    pending_samples: int = 0  # received, not yet fed
    started_sent: bool = False
    runs: list[list[int]] = field(default_factory=list)  # [timeline start, length] of each stretch fed

    def record_fed(self, position: int, count: int) -> None:
        """`count` of its samples were fed at timeline sample `position` (after what was fed before)."""
        if self.start_sample is None:
            self.start_sample = position
        if self.runs and self.runs[-1][0] + self.runs[-1][1] == position:
            self.runs[-1][1] += count
        else:
            self.runs.append([position, count])
        self.end_sample = position + count
        self.fed_samples += count
        self.pending_samples -= count

    def own_samples_before(self, sample: int) -> int:
        """How many of its own samples lie on the timeline before `sample` (silence that filled an underrun
        inside its span is not counted)."""
        return sum(max(0, min(start + length, sample) - start) for start, length in self.runs)


class SpeechFeed:
    """The session's audio clock: pending speech, just-in-time feeding of the featurizers, the played audio.

    Thread-safe: ``push``/``clear``/``set_speakers`` come from API threads and the LiveKit loop,
    ``take_chunk`` from the engine thread.
    """

    def __init__(self, featurizers: list[AudioFeaturizer], speaking: list[int]) -> None:
        self.featurizers = featurizers
        self.speaking = set(speaking)
        self.spf = featurizers[0].config.samples_per_frame
        self.sample_rate = featurizers[0].config.sample_rate
        self._lock = threading.RLock()
        self._pending: collections.deque[tuple[np.ndarray, Segment | None]] = collections.deque()
        self._pending_samples = 0
        self._fed = 0  # absolute samples fed to every featurizer
        self._tape = np.zeros(0, np.float32)  # fed audio from absolute sample _tape_offset on
        self._tape_offset = 0
        self.next_chunk = 0
        self.utterances: collections.deque[_Utterance] = collections.deque()
        self.segments: collections.deque[Segment] = collections.deque()

    @property
    def lock(self) -> threading.RLock:
        """Held while the timeline changes; the player holds it while it reads segments and utterances."""
        return self._lock

    @property
    def pending_s(self) -> float:
        return self._pending_samples / self.featurizers[0].config.sample_rate

    def push(self, pcm: np.ndarray, segment: Segment | None = None) -> None:
        """Queue speech ``[N]`` float32 16 kHz (of ``segment`` when it came from the LiveKit protocol)."""
        if pcm.size == 0:
            return
        with self._lock:
            if self._pending_samples == 0:
                self.utterances.append(_Utterance(arrived_at=time.perf_counter()))
            self._pending.append((np.asarray(pcm, np.float32), segment))
            self._pending_samples += pcm.size
            if segment is not None:
                segment.pending_samples += pcm.size

    def open_segment(self, segment_id: str) -> Segment:
        with self._lock:
            segment = Segment(segment_id)
            self.segments.append(segment)
            return segment

    def end_segment(self, segment: Segment) -> None:
        with self._lock:
            segment.received_all = True
            if segment.start_sample is None and segment.pending_samples == 0:
                segment.start_sample = segment.end_sample = self._fed  # an empty segment ends at once

    def set_speakers(self, speaking: list[int]) -> None:
        with self._lock:
            self.speaking = set(speaking)

    def clear(self, played_frame_end: int) -> list[Segment]:
        """Drop pending speech and zero what was fed past frame ``played_frame_end``; returns the segments
        that were pending (they are all finished, interrupted)."""
        with self._lock:
            self._pending.clear()
            self._pending_samples = 0
            cut = played_frame_end * self.spf
            for featurizer in self.featurizers:
                featurizer.silence_from(cut)
            start = max(0, cut - self._tape_offset)
            if start < self._tape.size:
                self._tape = self._tape.copy()
                self._tape[start:] = 0.0
            self.utterances.clear()
            dropped = list(self.segments)
            self.segments.clear()
            return dropped

    def take_chunk(self) -> tuple[int, list[ChunkAudio], np.ndarray]:
        """Feed the featurizers up to the next chunk's need and take its features.

        Returns ``(chunk_index, [ChunkAudio per character], pcm of its output frames)``.
        """
        with self._lock:
            index = self.next_chunk
            lead = self.featurizers[0]
            need = lead.required_samples(index) - self._fed
            if need > 0:
                self._feed(need)
            audio = [f.features_for_chunk(index) for f in self.featurizers]
            frames = lead.output_frames(index)
            pcm = self._tape_slice(frames.start * self.spf, frames.stop * self.spf)
            self._drop_tape_before(frames.stop * self.spf)
            self.next_chunk = index + 1
            return index, audio, pcm

    def _feed(self, need: int) -> None:
        pieces: list[np.ndarray] = []
        got = 0
        while got < need and self._pending:
            pcm, segment = self._pending[0]
            take = min(need - got, pcm.size)
            if take == pcm.size:
                self._pending.popleft()
            else:
                self._pending[0] = (pcm[take:], segment)
            position = self._fed + got
            if segment is not None:
                segment.record_fed(position, take)
            if self.utterances and self.utterances[-1].start_sample is None:
                self.utterances[-1].start_sample = position
            pieces.append(pcm[:take])
            got += take
        self._pending_samples -= got
        speech = np.concatenate(pieces) if pieces else np.zeros(0, np.float32)
        wave = np.concatenate([speech, np.zeros(need - got, np.float32)])
        for character, featurizer in enumerate(self.featurizers):
            if character in self.speaking and got:
                featurizer.push(wave)
            else:
                featurizer.push_silence(need)
        self._tape = np.concatenate([self._tape, wave])
        self._fed += need

    def _tape_slice(self, start: int, stop: int) -> np.ndarray:
        out = np.zeros(stop - start, np.float32)
        lo, hi = max(start, self._tape_offset), min(stop, self._tape_offset + self._tape.size)
        if hi > lo:
            out[lo - start : hi - start] = self._tape[lo - self._tape_offset : hi - self._tape_offset]
        return out

    def _drop_tape_before(self, absolute: int) -> None:
        drop = min(max(absolute - self._tape_offset, 0), self._tape.size)
        self._tape = self._tape[drop:]
        self._tape_offset += drop


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

    def __init__(self, path: Path, width: int, height: int, fps: int, hooks: PlayoutHooks) -> None:
        self.publisher = Mp4FilePublisher(path, width=width, height=height, fps=fps)
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


class LiveSession:
    """State of one call: inputs, decode state, output, and its lifecycle (starting → running → ended/failed).

    Args:
        session_id: the API id; also the workers' session id.
        model, stream: the serving group's model preset and stream configuration.
        feed: the session's audio clock and featurizers (one per character).
        conditioning: the I2V ``y`` source (i2v presets) or None.
        decoder: the session's streaming VAE decode state.
        seed: the session's noise seed (chunk seeds derive from it).
        sync_probe: paint frames whose audio is loud (RMS > ``PROBE_RMS``) white, to measure A/V offset.
    """

    def __init__(
        self,
        session_id: str,
        model: ModelConfig,
        stream: StreamConfig,
        feed: SpeechFeed,
        conditioning: I2VConditioning | None,
        decoder: DecodeSession,
        seed: int,
        sync_probe: bool = False,
    ) -> None:
        self.id = session_id
        self.model = model
        self.stream = stream
        self.feed = feed
        self.conditioning = conditioning
        self.decoder = decoder
        self.seed = seed
        self.sync_probe = sync_probe
        self.num_characters = len(feed.featurizers)
        self.specs = chunk_request_specs(model, stream, self.num_characters)
        self.output: SessionOutput | None = None
        self.protocol: AvatarProtocol | None = None
        self.state = SessionState.starting
        self.reason: str | None = None
        self.chunks_generated = 0
        self.times = SessionTimes()
        self.created_at = time.perf_counter()
        self.first_frame_observer: Callable[[float], None] | None = None
        self._played_end = 0  # absolute index after the last frame played
        # Bumped by every clear: a chunk prepared before a clear is dropped instead of published after it.
        self.epoch = 0

    @property
    def live(self) -> bool:
        return self.state in (SessionState.starting, SessionState.running)

    def prepare_chunk(self) -> PreparedInputs:
        """The next chunk's request: features for its window (fed just in time), ``y``, speaking flags."""
        index, audio, pcm = self.feed.take_chunk()
        request, tensors = chunk_request(self.id, index, self.seed, self.specs, audio, self.conditioning)
        first = self.feed.featurizers[0].output_frames(index).start
        return PreparedInputs(request, tensors, pcm, first)

    def probe(self, frames: np.ndarray, pcm: np.ndarray) -> np.ndarray:
        """With the sync probe on, frames whose own audio is loud become white (else unchanged)."""
        if not self.sync_probe:
            return frames
        spf = self.feed.spf
        rms = np.sqrt(np.mean(pcm[: frames.shape[0] * spf].reshape(frames.shape[0], spf) ** 2, axis=1))
        if not (rms > PROBE_RMS).any():
            return frames
        frames = frames.copy()
        frames[rms > PROBE_RMS] = 255
        return frames

    # ---- playout hooks (called by the output as frames play) --------------------------------------------

    def on_frame(self, index: int) -> None:
        """Frame ``index`` (absolute) was just published: first-frame latency and protocol reports."""
        with self.feed.lock:
            self._report_played(index)

    def _report_played(self, index: int) -> None:
        self._played_end = index + 1
        spf = self.feed.spf
        frame_end = (index + 1) * spf
        utterances = self.feed.utterances
        while (
            utterances and utterances[0].start_sample is not None and utterances[0].start_sample < frame_end
        ):
            latency = time.perf_counter() - utterances.popleft().arrived_at
            self.times.first_frame_latency_s = latency
            if self.first_frame_observer is not None:
                self.first_frame_observer(latency)
        if self.protocol is None:
            return
        segments = self.feed.segments
        for segment in list(segments):
            if segment.start_sample is None or segment.start_sample >= frame_end:
                break
            if not segment.started_sent:
                segment.started_sent = True
                self.protocol.playback_started()
        while segments:
            head = segments[0]
            done = (
                head.received_all
                and head.pending_samples == 0
                and head.end_sample is not None
                and head.end_sample <= frame_end
            )
            if not done:
                break
            segments.popleft()
            # the agent's audio played, not the span: silence that filled an underrun mid-segment is not its
            played = head.fed_samples / self.feed.sample_rate
            self.protocol.playback_finished(played, interrupted=False)

    def on_clear(self, first_unplayed: int) -> None:
        """The output dropped every frame from ``first_unplayed`` on: drop speech, report interruptions."""
        self.epoch += 1
        dropped = self.feed.clear(first_unplayed)
        if self.protocol is None:
            return
        played_to = first_unplayed * self.feed.spf
        position = 0.0
        if dropped:  # the agent's audio played before the cut, not the span (as playback_finished reports)
            position = dropped[0].own_samples_before(played_to) / self.feed.sample_rate
        if dropped or self.protocol.pending_segments:
            self.protocol.playback_finished(position, interrupted=True)
