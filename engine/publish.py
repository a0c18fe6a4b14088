"""The publish side of the engine: decoded chunks go to their session's output on a thread of their own, so
that encoding (the file output's x264/AAC) and the LiveKit hand-off never sit on the engine thread's
critical path (which scores, decodes and prepares).

``ChunkPublisher`` owns one thread. The engine thread ``submit``s a decoded chunk (bounded queue: it blocks
while ``depth`` chunks wait, which keeps generation a bounded distance ahead of publishing); the thread puts
it into the session's output, records the session's timings and the metrics, and between chunks ticks every
output (a file output writes the frames whose playout time has come). An output that raises is reported
through ``failures()`` for the engine thread to fail that session alone (it talks to the workers).

Timings (one definition for ``run`` and ``serve``, ``engine/stats.py``): a session's TTBC is the time between
two consecutive publishes of its chunks; its first chunk has none. Stage times are recorded separately. A
chunk is *late* (a deadline miss) when its session's output had already played everything before it
arrived — the viewer saw a stall — except for a session's first chunk and the first chunk after a clear.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch

from proto.wire import ChunkRequest

log = logging.getLogger(__name__)

_TICK_S = 0.005
_SUBMIT_POLL_S = 0.1
_KEEP_TTBC = 1000  # per-session TTBC samples kept (bounded memory over hours)


class PreparedChunkInputs(Protocol):
    """A chunk's request and what the master keeps to publish it (``engine.chunks.PreparedInputs``)."""

    request: ChunkRequest
    tensors: dict[str, torch.Tensor]
    pcm: np.ndarray  # [frames * samples per frame] float32, the audio of the chunk's output frames
    first_frame: int  # absolute index of the chunk's first output video frame


class SessionOutput(Protocol):
    """Where a session's frames go (``server.session_outputs``' file and LiveKit outputs)."""

    def put_chunk(self, frames: np.ndarray, pcm: np.ndarray, first_frame: int) -> None: ...

    def tick(self) -> None: ...

    def buffered_s(self) -> float: ...

    @property
    def end_reason(self) -> str | None: ...


class EngineSession(Protocol):
    """What the engine needs of a session (``server.live_session.LiveSession``)."""

    id: str
    epoch: int  # bumped by every clear (barge-in)
    output: SessionOutput | None
    decoder: Any  # decoder.streaming.DecodeSession: decode_chunk(latent) -> uint8 [T, H, W, 3]
    times: Any  # engine.chunks.SessionTimes
    chunks_generated: int

    @property
    def live(self) -> bool: ...

    def prepare_chunk(self) -> PreparedChunkInputs: ...

    def probe(self, frames: np.ndarray, pcm: np.ndarray) -> np.ndarray: ...


class ChunkMetrics(Protocol):
    """The recorder of published chunks (``server.metrics.Metrics``)."""

    def observe_chunk(
        self, ttbc_s: float | None, stages: dict[str, float], deadline_s: float, missed: bool | None
    ) -> None: ...


@dataclass
class DecodedChunk:
    """A session's chunk, decoded to host frames ``[T, H, W, 3]`` uint8, with its timings so far.

    epoch: the session's ``epoch`` when the chunk was prepared (a clear since then drops the chunk).
    stages: seconds of prepare, score, transfer and decode.
    borrowed: ``frames`` live in a reused (pinned) buffer: an output that keeps them gets a copy.
    """

    session: EngineSession
    prepared: PreparedChunkInputs
    frames: np.ndarray
    epoch: int
    stages: dict[str, float]
    deadline_s: float
    borrowed: bool = False


@dataclass
class Published:
    """A chunk its output took: its TTBC (None for a session's first), the five stage times, and when
    (``perf_counter``)."""

    chunk: DecodedChunk
    ttbc_s: float | None
    stages: dict[str, float]
    published_at: float


class ChunkPublisher:
    """The publish thread (see the module docstring).

    Args:
        metrics: the ``tm_`` recorder.
        sessions: returns the live sessions whose outputs are ticked between chunks.
        depth: decoded chunks that may wait for the thread before ``submit`` blocks.
        keeps_frames: the outputs keep frames after ``put_chunk`` (playout queues): borrowed frames are
            copied first. ``run``'s MP4 sink encodes them at once and needs no copy.
        on_published: called on the publish thread after each chunk (``run``'s per-chunk stats).
    """

    def __init__(
        self,
        metrics: ChunkMetrics | None,
        sessions: Callable[[], Iterable[EngineSession]],
        depth: int = 1,
        keeps_frames: bool = True,
        on_published: Callable[[Published], None] | None = None,
    ) -> None:
        self.metrics = metrics
        self.sessions = sessions
        self.depth = depth
        self.keeps_frames = keeps_frames
        self.on_published = on_published
        self._queue: queue.Queue[DecodedChunk] = queue.Queue(maxsize=depth)
        self._failures: queue.Queue[tuple[str, str]] = queue.Queue()
        # Sessions whose output failed: their later chunks are dropped here, at once, not written to a
        # broken output while the engine has yet to see the failure (session ids are never reused).
        self._failed: set[str] = set()
        self._stop = threading.Event()
        self._idle = threading.Event()
        self._idle.set()
        self._thread = threading.Thread(target=self._run, name="master-publish", daemon=True)

    def start(self) -> ChunkPublisher:
        self._thread.start()
        return self

    def stop(self) -> None:
        """Publish what is queued, then stop the thread."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=10)

    def submit(self, chunk: DecodedChunk) -> None:
        """Queue a decoded chunk; blocks while the queue is full (the thread is publishing)."""
        self._idle.clear()
        while True:
            try:
                self._queue.put(chunk, timeout=_SUBMIT_POLL_S)
                return
            except queue.Full:
                if not self._thread.is_alive():
                    raise RuntimeError("the publish thread stopped") from None

    def wait_idle(self, timeout_s: float) -> bool:
        """Block until every submitted chunk is published (tests and the warm-up)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self._queue.empty() and self._idle.is_set():
                return True
            time.sleep(0.002)
        return False

    def failures(self) -> list[tuple[str, str]]:
        """(session id, reason) of every output that failed since the last call."""
        out = []
        while True:
            try:
                out.append(self._failures.get_nowait())
            except queue.Empty:
                return out

    # ---- the thread ------------------------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            try:
                chunk = self._queue.get(timeout=_TICK_S)
            except queue.Empty:
                if self._stop.is_set():
                    return
                self._idle.set()
                self._tick()
                continue
            self._publish(chunk)
            self._tick()

    def _tick(self) -> None:
        for session in list(self.sessions()):
            output = session.output
            if output is None or not session.live or session.id in self._failed:
                continue
            try:
                output.tick()  # a file output writes its due frames here
            except Exception as exc:  # one session's broken output must not stop the others
                log.exception("session %s failed while publishing", session.id)
                self._fail(session.id, f"publishing failed: {exc}")

    def _fail(self, session_id: str, reason: str) -> None:
        self._failed.add(session_id)
        self._failures.put((session_id, reason))

    def _publish(self, chunk: DecodedChunk) -> None:
        session, prepared = chunk.session, chunk.prepared
        output = session.output
        if output is None or not session.live or session.epoch != chunk.epoch or session.id in self._failed:
            return  # ended, failed, or cleared (barge-in) since the chunk was prepared: its frames are stale
        times = session.times
        start = time.perf_counter()
        try:
            stalled = times.last_publish is not None and times.last_epoch == chunk.epoch
            stalled = stalled and output.buffered_s() <= 0.0
            frames = chunk.frames.copy() if chunk.borrowed and self.keeps_frames else chunk.frames
            frames = session.probe(frames, prepared.pcm)
            output.put_chunk(frames, prepared.pcm, prepared.first_frame)
        except Exception as exc:
            log.exception("session %s failed while publishing", session.id)
            self._fail(session.id, f"publishing failed: {exc}")
            return
        published = time.perf_counter()
        ttbc = None if times.last_publish is None else published - times.last_publish
        with times.lock:
            times.last_publish, times.last_epoch = published, chunk.epoch
            session.chunks_generated += 1
            if ttbc is not None:
                times.ttbc.append(ttbc)
                if len(times.ttbc) > _KEEP_TTBC:
                    del times.ttbc[: _KEEP_TTBC // 2]
            if stalled:
                times.deadline_misses += 1
        stages = {**chunk.stages, "publish": published - start}
        if self.metrics is not None:
            self.metrics.observe_chunk(ttbc, stages, deadline_s=chunk.deadline_s, missed=stalled)
        if self.on_published is not None:
            try:
                self.on_published(Published(chunk, ttbc, stages, published))
            except Exception as exc:
                log.exception("recording chunk %d of %s failed", prepared.request.chunk_index, session.id)
                self._fail(session.id, f"recording the chunk's timing failed: {exc}")
