"""The ``SessionBackend`` of ``talkingmachines serve``: live sessions on one serving group.

Threads (all on the master, rank 0):

- API threads (uvicorn's worker pool) call the ``SessionBackend`` methods. ``create_session`` does the
  session set-up there (VAE encode of the reference image, CLIP and umT5, the LiveKit join) and then asks the
  engine to open the session on the workers; the other methods only touch thread-safe session state.
- The **engine thread** is the only one that talks to the score side (the executor's collectives must be
  issued in one order by one thread). It runs ``engine.pipeline.ChunkEngine``: every session's chunks as one
  pipeline (submit chunk t+1, decode chunk t while the workers score t+1, prepare t+2, collect t+1), sessions
  picked earliest deadline first (``engine.scheduler``: among the running sessions whose playout buffer,
  counting their chunk in flight, is below ``ahead_s``, the one whose playout runs dry first), so generation
  stays a bounded distance ahead of playout and an idle session keeps its video alive with silence chunks.
  Session opens and closes go out between chunks, when nothing is in flight. A session's frames depend only
  on its own inputs (its seed, image, speech), never on which other sessions are live.
- The **publish thread** (``engine.publish``) puts each decoded chunk into its session's output (the file
  output's encoding, the LiveKit hand-off) and ticks the outputs, off the engine thread's path.
- The **LiveKit loop** (one asyncio loop thread) runs every session's publisher, avatar-worker protocol and
  real-time player.

Drain (``begin_drain``, what ``serve`` does on SIGTERM): ``ready()`` turns false with a reason starting
"draining", new sessions get ``NoCapacity`` (503 + Retry-After), live sessions keep generating until they end
or ``shutdown`` closes them.

Failure: a ``WorkerError`` from the executor, or a score-worker process found dead (checked every tick via
``dead_workers``), fails every live session with a reason naming the rank; ``ready()`` turns false and new
sessions get 503; the master, its API and its metrics stay up.

Timings (``engine.publish``): a session's TTBC is the time between two consecutive publishes of its
chunks (the same definition as ``run``'s); in a call it follows the playout (a chunk is made when the buffer
needs one), so the headroom shows in the stage times, and a chunk is counted late (``deadline_misses``) when
the session's playout had run dry before it arrived.
"""

from __future__ import annotations

import collections
import logging
import queue
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

import numpy as np

from decoder.vae import WanVAE
from engine.executor import Executor, WorkerError
from engine.pipeline import ChunkEngine, Work
from engine.publish import ChunkPublisher
from engine.scheduler import earliest_deadline
from frontends.conditioning import ConditioningEncoders
from proto.api import Face, SessionCreate, SessionInfo, SessionState, TTBCStats
from proto.wire import SessionClose
from server.backend import BackendFailed, InvalidRequest, NoCapacity, SessionEnded, UnknownSession
from server.live_session import LiveSession
from server.live_setup import LiveConfig, SessionSetup
from server.metrics import Metrics
from server.session_outputs import AsyncLoopThread, LiveKitSessionOutput

log = logging.getLogger(__name__)

_TICK_S = 0.005
_WORKER_CHECK_S = 0.25
_ENDED_KEPT = 256  # ended/failed sessions whose info stays visible
_ENGINE_CALL_TIMEOUT_S = 120.0


@dataclass
class _Entry:
    session: LiveSession
    faces: list[Face]
    identity: str | None
    # Set on the engine thread just before the session's SessionClose goes to the workers: the engine never
    # schedules a chunk for it again (a ChunkRequest after SessionClose is a protocol error on the workers).
    closing: bool = False


class LiveBackend:
    """Runs live sessions on a serving group (see the module docstring).

    Args:
        config: stream/model settings of the group.
        executor: the transport to the score side (``engine.executor``); used by the engine thread only.
        vae: the master's VAE (I2V encode at set-up, streaming decode per session).
        encoders: CLIP + umT5 for the session conditioning.
        metrics: the ``tm_`` recorder shared with the API.
        dead_workers: returns descriptions of score-worker ranks that died (empty when all live).
        warm_up: run one chunk of a throw-away session before reporting ready.
    """

    def __init__(
        self,
        config: LiveConfig,
        executor: Executor,
        vae: WanVAE,
        encoders: ConditioningEncoders,
        metrics: Metrics,
        dead_workers: Callable[[], list[str]] | None = None,
        warm_up: bool = True,
    ) -> None:
        self.config = config
        self.executor = executor
        self.vae = vae
        self.encoders = encoders
        self.metrics = metrics
        self.dead_workers = dead_workers
        self.warm_up = warm_up
        self._loop = AsyncLoopThread()
        self.setup = SessionSetup(config, vae, encoders, self._loop)
        self._lock = threading.Lock()
        self._setup_lock = threading.Lock()
        self._sessions: dict[str, _Entry] = {}
        self._ended: collections.OrderedDict[str, SessionInfo] = collections.OrderedDict()
        self._commands: queue.Queue[tuple[Callable[[], Any], Future[Any]]] = queue.Queue()
        self._stop = threading.Event()
        self._ready = False
        self._failed: str | None = None
        self._publisher = ChunkPublisher(metrics, self._live_sessions)
        self._chunks = ChunkEngine(executor, config.stream, self._publisher, self)
        self._draining: tuple[float, str] | None = None  # (Retry-After seconds, why) once draining
        self._engine = threading.Thread(target=self._run_engine, name="master-engine", daemon=True)
        self._last_worker_check = 0.0
        self._last_offset_report = 0.0

    # ---- lifecycle -------------------------------------------------------------------------------------

    def start(self) -> LiveBackend:
        self._publisher.start()
        self._engine.start()
        return self

    def begin_drain(self, retry_after_s: float, why: str) -> None:
        """Refuse new sessions from now on (``NoCapacity(retry_after_s)``, ``ready()`` false with ``why``);
        live sessions go on. Irreversible: a draining server only ever shuts down."""
        self._draining = (retry_after_s, why)

    def live_count(self) -> int:
        """Sessions not yet ended or failed."""
        with self._lock:
            return len(self._sessions)

    def shutdown(self, reason: str = "server stopping") -> None:
        """End every session, tell the workers to stop, stop the threads."""
        for session_id in list(self._sessions):
            try:
                self.close(session_id, reason=reason)
            except Exception:  # shutting down: one broken session must not keep the others open
                log.exception("closing session %s at shutdown failed", session_id)
        if self._engine.is_alive():
            if self._failed is None:
                self._call(lambda: self.executor.shutdown(reason), timeout_s=10)
            self._stop.set()
            self._engine.join(timeout=10)
        self._publisher.stop()
        self._loop.stop()

    # ---- SessionBackend --------------------------------------------------------------------------------

    def create_session(self, spec: SessionCreate, image: np.ndarray, faces: Sequence[Face]) -> SessionInfo:
        if self._failed is not None:
            raise BackendFailed(self._failed)
        if self._draining is not None:
            raise NoCapacity(*self._draining)
        if not self._ready:
            raise NoCapacity(2.0, "the serving group is still warming up")
        prompt = spec.prompt_spec()
        if prompt is not None and (prompt.text_embedding or prompt.image_embedding):
            raise InvalidRequest(
                "this server has no store of precomputed embeddings; send prompt text instead of "
                "text_embedding/image_embedding names"
            )
        text = prompt.text if prompt is not None and prompt.text else self.config.default_prompt
        session_id = uuid.uuid4().hex[:16]
        with self._setup_lock:
            session, message, tensors = self.setup.build(session_id, image, list(faces), text, spec.speaking)
        identity = self.setup.attach_output(session, spec.output, lambda: self._clear_session(session))
        session.first_frame_observer = self.metrics.observe_first_frame
        try:
            self._call(lambda: self.executor.open_session(message, tensors))
        except WorkerError as exc:
            self._fail_all(str(exc))
            session.output.close()
            raise BackendFailed(self._failed or str(exc)) from exc
        session.state = SessionState.running
        with self._lock:
            self._sessions[session_id] = _Entry(session, list(faces), identity)
        self.metrics.session_started(session_id)
        log.info("session %s running (%d character(s))", session_id, session.num_characters)
        return self._info(self._sessions[session_id])

    def get(self, session_id: str) -> SessionInfo:
        with self._lock:
            entry = self._sessions.get(session_id)
            if entry is None:
                if session_id in self._ended:
                    return self._ended[session_id]
                raise UnknownSession(session_id)
        return self._info(entry)

    def list_sessions(self) -> list[SessionInfo]:
        with self._lock:
            entries = list(self._sessions.values())
            ended = list(self._ended.values())
        return [self._info(e) for e in entries] + ended

    def push_audio(self, session_id: str, pcm: np.ndarray) -> None:
        self._live(session_id).feed.push(pcm)

    def set_speakers(self, session_id: str, speaking: Sequence[int]) -> SessionInfo:
        entry = self._live_entry(session_id)
        beyond = [i for i in speaking if i >= entry.session.num_characters]
        if beyond:
            raise InvalidRequest(
                f"speaking indices {beyond} name characters that do not exist; session {session_id!r} has "
                f"{entry.session.num_characters} character(s), indices 0..{entry.session.num_characters - 1}"
            )
        entry.session.feed.set_speakers(list(speaking))
        return self._info(entry)

    def clear(self, session_id: str) -> None:
        self._clear_session(self._live(session_id))

    def close(self, session_id: str, reason: str = "closed by the client") -> SessionInfo:
        with self._lock:
            entry = self._sessions.get(session_id)
            if entry is None:
                if session_id in self._ended:
                    return self._ended[session_id]
                raise UnknownSession(session_id)
        session = entry.session

        def close_on_engine() -> None:
            entry.closing = True
            self.executor.close_session(SessionClose(session_id))

        if self._failed is None and self._engine.is_alive():
            try:
                self._call(close_on_engine)
            except WorkerError as exc:
                self._fail_all(str(exc))
        self._finish(entry, SessionState.ended if session.live else session.state, session.reason or reason)
        return self.get(session_id)

    def ready(self) -> tuple[bool, str]:
        if self._failed is not None:
            return False, self._failed
        if self._draining is not None:
            return False, f"{self._draining[1]}: {len(self._sessions)} live session(s)"
        if not self._ready:
            return False, "warming up the serving group"
        return True, f"ready: {len(self._sessions)} live session(s)"

    # ---- helpers ---------------------------------------------------------------------------------------

    def _live_entry(self, session_id: str) -> _Entry:
        with self._lock:
            entry = self._sessions.get(session_id)
            if entry is None:
                if session_id in self._ended:
                    raise SessionEnded(session_id, self._ended[session_id].reason)
                raise UnknownSession(session_id)
        if not entry.session.live:
            raise SessionEnded(session_id, entry.session.reason)
        return entry

    def _live(self, session_id: str) -> LiveSession:
        return self._live_entry(session_id).session

    def _clear_session(self, session: LiveSession) -> None:
        if session.output is not None:
            session.output.clear()

    def _info(self, entry: _Entry) -> SessionInfo:
        session = entry.session
        times = session.times
        ttbc = TTBCStats(deadline_s=self.config.stream.chunk_duration_s(1))
        with times.lock:  # one consistent snapshot of the generator thread's counters
            values = np.asarray(times.ttbc)
            chunks_generated = session.chunks_generated
            deadline_misses = times.deadline_misses
        if values.size:
            ttbc = TTBCStats(
                count=len(values),
                mean_s=float(values.mean()),
                p50_s=float(np.percentile(values, 50)),
                p95_s=float(np.percentile(values, 95)),
                max_s=float(values.max()),
                deadline_s=self.config.stream.chunk_duration_s(1),
                deadline_misses=deadline_misses,
            )
        buffered = session.output.buffered_s() if session.output is not None and session.live else 0.0
        return SessionInfo(
            id=session.id,
            state=session.state,
            reason=session.reason,
            chunks_generated=chunks_generated,
            playout_buffer_s=buffered,
            first_frame_latency_s=times.first_frame_latency_s,
            ttbc=ttbc,
            livekit_identity=entry.identity,
            faces=entry.faces,
            speaking=sorted(session.feed.speaking),
        )

    def _finish(self, entry: _Entry, state: SessionState, reason: str) -> None:
        """Move a session to ``ended``/``failed``: release its output and decode state, keep its info."""
        session = entry.session
        with self._lock:
            if self._sessions.get(session.id) is not entry:
                return
            session.state, session.reason = state, reason
            info = self._info(entry)
            del self._sessions[session.id]
            self._ended[session.id] = info
            while len(self._ended) > _ENDED_KEPT:
                self._ended.popitem(last=False)
        if session.output is not None:
            try:
                session.output.close()
            except Exception:  # the session is over either way; its output's failure is only logged
                log.exception("closing the output of session %s failed", session.id)
        self.metrics.session_ended(session.id)
        level = logging.ERROR if state == SessionState.failed else logging.INFO
        log.log(level, "session %s %s: %s", session.id, state.value, reason)

    def _fail_all(self, reason: str) -> None:
        if self._failed is None:
            self._failed = f"the serving group failed: {reason}"
            log.error("%s; failing every session, the API stays up (not ready)", self._failed)
        for entry in list(self._sessions.values()):
            self._finish(entry, SessionState.failed, self._failed)

    def _call(self, fn: Callable[[], Any], timeout_s: float = _ENGINE_CALL_TIMEOUT_S) -> Any:
        """Run ``fn`` on the engine thread (the only one that talks to the workers) and wait for it."""
        if threading.current_thread() is self._engine:
            return fn()
        future: Future[Any] = Future()
        self._commands.put((fn, future))
        return future.result(timeout=timeout_s)

    # ---- engine ----------------------------------------------------------------------------------------

    def _run_engine(self) -> None:
        try:
            if self.warm_up:
                self._warm_up()
            self._ready = True
            log.info("serving group warmed up; ready for sessions")
        except WorkerError as exc:
            self._fail_all(str(exc))
        while not self._stop.is_set():
            self._run_commands()  # nothing is in flight here: opens and closes go out between chunks
            if self._failed is not None:
                self._chunks.reset()
                time.sleep(_TICK_S)
                continue
            self._check_workers()
            if not self._chunks.turn():
                time.sleep(_TICK_S)
        self._run_commands()

    def _run_commands(self) -> None:
        while True:
            try:
                fn, future = self._commands.get_nowait()
            except queue.Empty:
                return
            try:
                future.set_result(fn())
            except BaseException as exc:
                future.set_exception(exc)

    def _check_workers(self) -> None:
        now = time.monotonic()
        if self.dead_workers is None or now - self._last_worker_check < _WORKER_CHECK_S:
            return
        self._last_worker_check = now
        dead = self.dead_workers()
        if dead:
            self._fail_all(f"{', '.join(dead)}; restart the server to serve again")

    # ---- engine.pipeline.EngineOwner (engine thread) ------------------------------------------------------

    def schedulable(self, session: LiveSession) -> bool:  # type: ignore[override]
        entry = self._sessions.get(session.id)
        return entry is not None and entry.session is session and not entry.closing and session.live

    def session_failed(self, session_id: str, reason: str) -> bool:
        entry = self._sessions.get(session_id)
        if entry is None:
            return False
        self._finish(entry, SessionState.failed, reason)  # out of _sessions: never picked again
        return True

    def group_failed(self, reason: str) -> None:
        self._fail_all(reason)

    def pick(self, in_flight: Work | None) -> LiveSession | None:
        """Earliest deadline first among the running sessions (``engine.scheduler``); a session whose output
        ended is finished here, and a chunk in flight counts as buffered for its session."""
        report_offset = time.monotonic() - self._last_offset_report > 1.0
        candidates: list[tuple[LiveSession, float]] = []
        for entry in list(self._sessions.values()):
            session = entry.session
            if not session.live or session.output is None or entry.closing:
                continue
            if session.output.end_reason is not None:  # the room or the publisher went away
                self._finish(entry, SessionState.ended, session.output.end_reason)
                self._chunks.close_on_workers(session.id)
                continue
            try:
                buffered = session.output.buffered_s()
            except Exception as exc:  # one session's broken output must not stop the engine for all
                log.exception("session %s failed while publishing", session.id)
                self._chunks.fail_session(session.id, f"publishing failed: {exc}")
                continue
            self.metrics.set_buffer(session.id, buffered)
            if report_offset and isinstance(session.output, LiveKitSessionOutput):
                stats = session.output.publisher.av_offset_stats()
                if stats.samples:
                    self.metrics.set_av_offset(stats.last_s)
                self._last_offset_report = time.monotonic()
            if in_flight is not None and in_flight.session is session:
                buffered += self.config.stream.chunk_duration_s(in_flight.prepared.request.chunk_index)
            candidates.append((session, buffered))
        return earliest_deadline(candidates, self.config.ahead_s)

    def _live_sessions(self) -> list[LiveSession]:
        with self._lock:
            return [entry.session for entry in self._sessions.values()]

    def _warm_up(self) -> None:
        """Open a throw-away session, generate one chunk end to end, close it."""
        stream = self.config.stream
        image = np.full((stream.height, stream.width, 3), 128, np.uint8)
        face = Face(box=(0, 0, stream.width, stream.height), box_norm=(0.0, 0.0, 1.0, 1.0), source="fallback")
        session, message, tensors = self.setup.build("warm-up", image, [face], "warm up", [0])
        self.executor.open_session(message, tensors)
        prepared = session.prepare_chunk()
        self.executor.submit(prepared.request, prepared.tensors)
        scored = self.executor.collect(prepared.request)
        latent = scored.transfer.wait()["latent"] if scored.transfer is not None else scored.latent
        session.decoder.decode_chunk(latent)
        self.executor.close_session(SessionClose("warm-up"))
