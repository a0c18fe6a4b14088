"""The chunk pipeline of the engine: sessions' chunks through prepare → submit → score → decode → publish.

``ChunkEngine.turn`` (called in a loop by the one thread that talks to the score side) submits chunk t+1's
request, decodes chunk t (of the same or another session) while the workers score t+1, prepares chunk t+2
while they still score, then collects t+1; the publish thread (``engine.publish``) hands decoded chunks to
their outputs. On a disaggregated group the time between chunks is therefore about max(score + transfer,
decode + prepare), not their sum; on a self-contained group (the master scores inline in ``submit``) the
steps run in turn. At most one chunk is in flight and one prepared ahead; ``idle()`` says when nothing is
in flight, the only time session opens and closes may go to the workers (a SessionClose before a chunk's
reply could leave that reply to be read as another session's, so closes asked for meanwhile are deferred).

An executor may hold more chunks in flight (``max_in_flight`` > 1: the step-pipeline topology,
``engine.step_pipeline``): then ``turn`` keeps up to that many submitted and collects the oldest only when the
pipe is full or nothing else can go out (``_pipelined_turn``); a session's close waits only for that
session's own chunks in flight (the executor delivers messages to every stage in order).

Which session goes next is the owner's choice (``EngineOwner.pick``, e.g. earliest deadline first,
``engine.scheduler``); a chunk in flight is passed to it so it can count that chunk as buffered. Failures:
a ``WorkerError`` fails the whole group (``EngineOwner.group_failed``); anything else fails only the session
whose step raised (``EngineOwner.session_failed``), whose caches are then freed on the workers.

Degradation (``engine.degrade``, off by default): when a session's slack goes negative, ``_prepare`` gives its
next chunk fewer denoising steps (``ChunkRequest.step_indices``), the one place that decision is made.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch

from engine.degrade import FULL, ChunkCost, ChunkQuality, DegradeConfig, DegradePolicy, Slack
from engine.executor import Executor, ScoredChunk, WorkerError
from engine.publish import ChunkPublisher, DecodedChunk, EngineSession, PreparedChunkInputs
from proto.stream_config import StreamConfig
from proto.wire import SessionClose

log = logging.getLogger(__name__)


@dataclass
class Work:
    """A session's chunk on its way through the engine: prepared, then submitted, then scored."""

    session: EngineSession
    prepared: PreparedChunkInputs
    epoch: int  # the session's epoch when prepared (a clear since then drops the chunk at publish)
    prepare_s: float
    scored: ScoredChunk | None = None
    quality: ChunkQuality = FULL  # engine.degrade's choice for this chunk (its steps also ride the request)


class EngineOwner(Protocol):
    """What the engine asks of the component that owns the sessions (``serve``'s
    ``server.engine_thread.EngineThread``)."""

    def pick(self, in_flight: Work | None) -> EngineSession | None:
        """The session whose chunk goes next (None: none is due); ``in_flight`` is being scored."""
        ...

    def schedulable(self, session: EngineSession) -> bool:
        """Whether a chunk prepared for ``session`` may still go out (not closed or failed since)."""
        ...

    def session_failed(self, session_id: str, reason: str) -> bool:
        """Finish the session as failed; False if it was already gone."""
        ...

    def group_failed(self, reason: str) -> None:
        """The score side failed: fail every session."""
        ...


class DegradeMetrics(Protocol):
    """The recorder of degraded chunks (``server.metrics.Metrics``)."""

    def observe_degraded(self, session_id: str, mode: str | None) -> None:
        """The session's next chunk is degraded in ``mode`` (None: it is full)."""
        ...


class _SessionStepError(Exception):
    """A session's own step failed (its ``__cause__``); only that session fails."""

    def __init__(self, session: EngineSession) -> None:
        super().__init__(session.id)
        self.session = session


class ChunkEngine:
    """The pipeline's state and its ``turn`` (see the module docstring).

    Args:
        executor: the transport to the score side (``engine.executor``).
        stream: the group's stream configuration (chunk durations, the deadline of each chunk).
        publisher: the publish thread decoded chunks go to (started and stopped by the owner).
        owner: sessions, their scheduling and their failures.
    """

    def __init__(
        self,
        executor: Executor,
        stream: StreamConfig,
        publisher: ChunkPublisher,
        owner: EngineOwner,
        *,
        overlap: bool = True,
        device: torch.device | None = None,
        degrade: DegradeConfig | None = None,
        degrade_metrics: DegradeMetrics | None = None,
    ) -> None:
        self.executor = executor
        self.stream = stream
        self.publisher = publisher
        self.owner = owner
        self.overlap = overlap
        self.frames = HostFrames(device or torch.device("cpu"), ring=publisher.depth + 2)
        self.in_flight: Work | None = None  # submitted, its reply not yet collected
        self._next: Work | None = None  # prepared, not yet submitted
        self._scored: Work | None = None  # collected, not yet decoded
        self._deferred_closes: list[str] = []
        self._reply_pending: set[str] = set()  # sessions whose chunk reply was not read (never closed)
        # engine.degrade: the policy, the expected latency of a full chunk, the steps of a degraded one
        self.degrade = degrade or DegradeConfig()
        self.degrade_metrics = degrade_metrics
        self._policy = DegradePolicy(self.degrade)
        self._cost = ChunkCost()
        self._reduced = self.degrade.step_indices(len(stream.denoising_steps))
        # Chunks the executor may hold at once (engine.step_pipeline: one per stage); with more than one,
        # the submitted ones wait here, oldest first, and `in_flight` stays None.
        self.depth = int(getattr(executor, "max_in_flight", 1))
        self._flight: list[Work] = []

    def idle(self) -> bool:
        return self.in_flight is None and not self._flight

    def busy(self) -> bool:
        """A chunk is prepared, in flight or scored and not yet decoded."""
        in_flight = self.in_flight is not None or bool(self._flight)
        return in_flight or self._next is not None or self._scored is not None

    def reset(self) -> None:
        """Drop the prepared and scored chunks (the group failed: nothing more goes out)."""
        self._next = self._scored = None
        self._flight = []

    def turn(self) -> bool:
        """One turn of the pipeline. False when there was nothing to do."""
        for session_id, reason in self.publisher.failures():
            self.fail_session(session_id, reason)
        if not self.overlap:
            return self._serial_turn()
        if self.depth > 1:
            return self._pipelined_turn()
        if self._next is None:
            self._next = self._guarded(None, lambda: self._prepare(self.owner.pick(None)))
        work, self._next = self._next, None
        if work is not None and not self.owner.schedulable(work.session):
            work = None  # closed or failed since it was prepared; its chunk never goes out
        if work is not None and not self._guarded(work.session, lambda: self._submit(work)):
            work = None
        scored, self._scored = self._scored, None
        if scored is not None:  # decoded while the workers score `work` (disaggregated)
            self._guarded(scored.session, lambda: self._decode(scored))
        if work is None:
            return scored is not None
        if self._next is None:  # prepared while the workers still score `work`
            self._next = self._guarded(None, lambda: self._prepare(self.owner.pick(work)))
        self._guarded(work.session, lambda: self._collect(work))
        return True

    def _serial_turn(self) -> bool:
        """Without overlap (``run --no-overlap``): prepare, score, decode and publish one chunk in turn."""
        work = self._guarded(None, lambda: self._prepare(self.owner.pick(None)))
        if work is None or not self._guarded(work.session, lambda: self._submit(work)):
            return False
        self._guarded(work.session, lambda: self._collect(work))
        scored, self._scored = self._scored, None
        if scored is not None:
            self._guarded(scored.session, lambda: self._decode(scored))
            self.publisher.wait_idle(timeout_s=float("inf"))
        return True

    def _pipelined_turn(self) -> bool:
        """``max_in_flight`` > 1: submit the prepared chunk while the pipe has room, decode the collected one,
        prepare the next, and collect the oldest when the pipe is full or nothing more is ready to go."""
        did = False
        if self._next is None and len(self._flight) < self.depth:
            newest = self._flight[-1] if self._flight else None
            self._next = self._guarded(None, lambda: self._prepare(self.owner.pick(newest)))
        if self._next is not None and len(self._flight) < self.depth:
            work, self._next = self._next, None
            if self.owner.schedulable(work.session) and self._guarded(
                work.session, lambda: self._submit_pipelined(work)
            ):
                did = True
        scored, self._scored = self._scored, None
        if scored is not None:  # decoded while the stages score what is in flight
            self._guarded(scored.session, lambda: self._decode(scored))
            did = True
        if self._next is None and self._flight:  # prepared while the stages still score
            newest = self._flight[-1]
            self._next = self._guarded(None, lambda: self._prepare(self.owner.pick(newest)))
        if self._flight and (len(self._flight) >= self.depth or self._next is None):
            oldest = self._flight[0]
            self._guarded(oldest.session, lambda: self._collect_pipelined(oldest))
            did = True
        return did

    def _submit_pipelined(self, work: Work) -> bool:
        self.executor.submit(work.prepared.request, work.prepared.tensors)
        self._flight.append(work)
        return True

    def _collect_pipelined(self, work: Work) -> None:
        self._flight.remove(work)
        try:
            work.scored = self.executor.collect(work.prepared.request)
        except BaseException:
            self._reply_pending.add(work.session.id)  # as _collect
            raise
        self._scored = work
        closes, self._deferred_closes = self._deferred_closes, []
        for session_id in closes:
            self.close_on_workers(session_id)

    def fail_session(self, session_id: str, reason: str) -> None:
        """Session ``session_id`` failed alone (its output or its own data, not the workers): finish it as
        failed and free its caches on the workers once nothing is in flight."""
        if self.owner.session_failed(session_id, reason):
            self.close_on_workers(session_id)

    def close_on_workers(self, session_id: str) -> None:
        """Free a finished session's caches on the score workers; deferred while a chunk is in flight."""
        if session_id in self._reply_pending:
            log.error("session %s failed with its chunk reply unread; its caches stay on the workers",
                      session_id)  # fmt: skip
            return
        if self.in_flight is not None or any(w.session.id == session_id for w in self._flight):
            self._deferred_closes.append(session_id)
            return
        try:
            self.executor.close_session(SessionClose(session_id))
        except WorkerError as exc:
            self.owner.group_failed(str(exc))

    # ---- steps ---------------------------------------------------------------------------------------

    def _guarded(self, session: EngineSession | None, fn: Callable[[], Any]) -> Any:
        """Run one step: a worker failure fails every session, any other failure only ``session`` (or the
        session being prepared, which ``_prepare`` names itself). None when it failed."""
        try:
            return fn()
        except WorkerError as exc:
            self.owner.group_failed(str(exc))
        except _SessionStepError as exc:
            log.error("session %s failed while generating: %s", exc.session.id, exc.__cause__)
            self.fail_session(exc.session.id, f"generation failed: {exc.__cause__}")
        except Exception as exc:  # a bug or bad state in one session must not take the others down
            if session is None:
                log.exception("picking the next session failed")
                return None
            log.exception("session %s failed while generating", session.id)
            self.fail_session(session.id, f"generation failed: {exc}")
        return None

    def _prepare(self, session: EngineSession | None) -> Work | None:
        """The next chunk of ``session`` (None: no session is due): audio features and its request."""
        if session is None:
            return None
        start = time.perf_counter()
        epoch = session.epoch
        try:
            prepared = session.prepare_chunk()
            quality = self._quality(session, prepared.request.chunk_index)
            if quality.step_indices:
                prepared.request = dataclasses.replace(prepared.request, step_indices=quality.step_indices)
        except Exception as exc:
            raise _SessionStepError(session) from exc
        return Work(session, prepared, epoch, time.perf_counter() - start, quality=quality)

    def _quality(self, session: EngineSession, chunk_index: int) -> ChunkQuality:
        """Full or degraded for the session's next chunk (``engine.degrade``), recorded on its times. Never
        the first chunk (the sink every later chunk attends to), never before a full chunk was measured."""
        if not self.degrade.enabled:
            return FULL
        slack: Slack | None = None
        if chunk_index > 0 and self._cost.expected_s is not None and session.output is not None:
            pending = sum(
                self.stream.chunk_duration_s(work.prepared.request.chunk_index)
                for work in (self.in_flight, self._scored)
                if work is not None and work.session is session
            )
            slack = Slack(session.output.buffered_s(), pending, self._cost.expected_s)
        state = session.times.degrade
        degraded = self._policy.decide(state.degraded, None if slack is None else slack.seconds)
        with session.times.lock:
            state.degraded = degraded
            state.last_slack_s = None if slack is None else slack.seconds
            state.degraded_chunks += int(degraded)
        if self.degrade_metrics is not None:
            self.degrade_metrics.observe_degraded(session.id, self.degrade.mode if degraded else None)
        return ChunkQuality(step_indices=self._reduced) if degraded else FULL

    def _submit(self, work: Work) -> bool:
        self.in_flight = work
        try:
            self.executor.submit(work.prepared.request, work.prepared.tensors)
        except BaseException:
            self.in_flight = None
            raise
        return True

    def _collect(self, work: Work) -> None:
        try:
            work.scored = self.executor.collect(work.prepared.request)
        except BaseException:
            # Its reply may still be due on the wire: a SessionClose now could leave that reply to be read
            # as another session's, so this session's caches stay on the workers (logged at close).
            self._reply_pending.add(work.session.id)
            raise
        finally:
            self.in_flight = None
        self._scored = work
        closes, self._deferred_closes = self._deferred_closes, []
        for session_id in closes:
            self.close_on_workers(session_id)

    def _decode(self, work: Work) -> None:
        """Decode a scored chunk to host frames and hand it to the publish thread."""
        session, scored = work.session, work.scored
        assert scored is not None
        if not session.live or session.output is None:
            return
        start = time.perf_counter()
        frames = self.frames.decode(self._chunk_decoder(work), scored)
        stages = {
            "prepare": work.prepare_s,
            "score": scored.score_s,
            "transfer": max(0.0, scored.roundtrip_s - scored.score_s),
            "decode": time.perf_counter() - start,
        }
        if self.degrade.enabled and not work.quality.degraded:  # the latency of a full chunk
            self._cost.observe(stages["score"] + stages["transfer"] + stages["decode"])
        # real time: chunk i must arrive while chunk i - 1 plays (LiveAct: chunk 1 during chunk 0's 21 frames)
        index = work.prepared.request.chunk_index
        deadline = self.stream.chunk_duration_s(max(index - 1, 0))
        borrowed = self.frames.cuda  # a pinned buffer of the ring, reused once published
        chunk = DecodedChunk(session, work.prepared, frames, work.epoch, stages, deadline, borrowed=borrowed)
        self.publisher.submit(chunk)

    @staticmethod
    def _chunk_decoder(work: Work) -> Any:
        """The decoder of this chunk: the session's own, unless ``engine.degrade`` chose another for it (the
        hook of a faster-decoder mode: such a decoder needs its own per-session causal cache, kept in step
        with the session's frames, before any mode may name it; none does yet)."""
        name = work.quality.decoder
        if name is None:
            return work.session.decoder
        raise ValueError(f"chunk decoder {name!r} is not available: no degrade mode provides one yet")


class HostFrames:
    """Decoded frames into host memory.

    On CPU: the decoder's uint8 frames, as a NumPy array. On CUDA: the decode runs on a side stream that waits
    for the latent's transfer event (or, colocated, for the stream that produced it), never for the device;
    the frames are copied on a copy stream that waits for the decode stream into page-locked host buffers
    (non-blocking), the allocator is told which streams use which tensors (``record_stream``), and the host
    waits for that copy's event alone. The pinned buffers form a ring of ``ring`` per frame shape: one chunk
    is being published, the publish queue holds the others, one is being copied, so a buffer is reused only
    after its chunk was published (outputs that keep frames copy them: ``DecodedChunk.borrowed``).
    """

    def __init__(self, device: torch.device, ring: int) -> None:
        self.device = device
        self.cuda = device.type == "cuda"
        self.ring = ring
        if self.cuda:
            self.decode_stream = torch.cuda.Stream(device)
            self.copy_stream = torch.cuda.Stream(device)
        self._pinned: dict[tuple[int, ...], list[torch.Tensor]] = {}
        self._next = 0

    def decode(self, decoder: Any, scored: ScoredChunk) -> np.ndarray:
        """The chunk's frames as uint8 ``[T, H, W, 3]`` in host memory."""
        if not self.cuda:
            frames: torch.Tensor = decoder.decode_chunk(scored.latent)
            return frames.cpu().numpy()
        if scored.transfer is not None:
            latent = scored.transfer.wait(self.decode_stream)["latent"]
        else:  # produced on this thread's current stream (colocated): order the decode after it
            self.decode_stream.wait_stream(torch.cuda.current_stream(self.device))
            latent = scored.latent
        frames = decoder.decode_chunk(latent, stream=self.decode_stream)
        self.copy_stream.wait_stream(self.decode_stream)
        host = self._buffer(tuple(frames.shape))
        with torch.cuda.stream(self.copy_stream):
            host.copy_(frames, non_blocking=True)
            frames.record_stream(self.copy_stream)
            copied = torch.cuda.Event()
            copied.record(self.copy_stream)
        copied.synchronize()  # the host waits for this copy only, not for the device
        return host.numpy()

    def _buffer(self, shape: tuple[int, ...]) -> torch.Tensor:
        ring = self._pinned.setdefault(shape, [])
        slot = self._next % self.ring
        self._next += 1
        while len(ring) <= slot:
            ring.append(torch.empty(shape, dtype=torch.uint8, pin_memory=True))
        return ring[slot]
