"""The master's engine thread (``EngineThread``): the only thread that talks to the score side.

The executor's collectives must be issued in one order by one thread, so every call to the workers runs
here: the warm-up, the sessions' chunks, and the session opens and closes that other threads ask for
(``open_session``, ``close_session``, queued as commands and run between chunks, when nothing is in flight).

The threads that ask never wait on a failed group: a wait for a command ends as soon as the group fails
(``GroupHealth.failed``, set by the health watcher even while this thread is blocked in a collective with a
hung worker), a command not yet started then never runs, and once the group failed queued commands are
refused without touching the workers. A close waits at most ``_CLOSE_WAIT_S`` and is otherwise left queued.

Healing: once the group failed and ``GroupHealth.restart_due()``, this thread replaces it (``_recover``):
``Renewal.replace`` gives new workers in a new world and their executor, a fresh ``ChunkEngine`` drives it,
the warm-up runs again, and the group is ready once more; a restart that fails is retried after a pause
while the health's budget lasts.

The thread runs ``engine.pipeline.ChunkEngine``: every session's chunks as one pipeline (submit chunk t+1,
decode chunk t while the workers score t+1, prepare t+2, collect t+1), and answers its questions as its
``EngineOwner``: which session goes next is earliest deadline first (``engine.scheduler``: among the running
sessions whose playout buffer, counting their chunk in flight, is below ``ahead_s``, the one whose playout
runs dry first), so generation stays a bounded distance ahead of playout and an idle session keeps its video
alive with silence chunks. A session's frames depend only on its own inputs (its seed, image, speech), never
on which other sessions are live. Decoded chunks go to the publish thread (``engine.publish``), which puts
them into their session's output off this thread's path.

Timings (``engine.publish``): a session's TTBC is the time between two consecutive publishes of its
chunks (the same definition as ``run``'s); in a call it follows the playout (a chunk is made when the buffer
needs one), so the headroom shows in the stage times, and a chunk is counted late (``deadline_misses``) when
the session's playout had run dry before it arrived.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import CancelledError, Future
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Any

import numpy as np
import torch

from engine.batching import BatchChunkEngine
from engine.executor import Executor, WorkerError
from engine.pipeline import ChunkEngine, Work
from engine.publish import ChunkPublisher
from engine.scheduler import Cost, earliest_deadline, pick_batch
from proto.api import Face, SessionState
from proto.wire import SessionClose, SessionOpen
from server.backend import BackendFailed, NoCapacity
from server.group_health import GroupHealth
from server.live_session import LiveSession
from server.live_setup import LiveConfig, SessionSetup
from server.metrics import Metrics
from server.session_outputs import LiveKitSessionOutput
from server.session_registry import Entry, SessionRegistry

log = logging.getLogger(__name__)

_TICK_S = 0.005
_ENGINE_CALL_TIMEOUT_S = 120.0
_CLOSE_WAIT_S = 2.0  # a close waits this long for the current chunk, then stays queued
_WAIT_SLICE_S = 0.05  # how often a waiting API thread looks at the group's health
# Set when ``stop`` left the engine thread behind, blocked inside torch.distributed's native code (a hung
# collective, a new world's rendezvous while the group heals). Interpreter finalisation would then destroy
# native objects that thread still uses and abort (``terminate called without an active exception``), so the
# CLI ends such a process with ``os._exit`` once the launcher has reaped the workers (``server.cli``).
LEFT_BEHIND = False
_RESTART_PAUSE_S = 2.0  # after a failed restart, before the next


class EngineThread:
    """The engine thread, its ``ChunkEngine`` and publish thread, and the ``EngineOwner`` they ask.

    Args:
        config: stream/model settings of the group (``ahead_s`` for the scheduling).
        executor: the transport to the score side (``engine.executor``); used on this thread only.
        setup: builds the warm-up's throw-away session.
        sessions: the sessions to schedule (and to finish when they fail).
        health: readiness (set once warmed up) and the group's failure.
        metrics: the ``tm_`` recorder (playout buffers, A/V offset, chunk timings).
        warm_up: run one chunk of a throw-away session before reporting ready.
    """

    def __init__(
        self,
        config: LiveConfig,
        executor: Executor,
        setup: SessionSetup,
        sessions: SessionRegistry,
        health: GroupHealth,
        metrics: Metrics,
        warm_up: bool = True,
    ) -> None:
        self.config = config
        self.executor = executor
        self.setup = setup
        self.sessions = sessions
        self.health = health
        self.metrics = metrics
        self.warm_up = warm_up
        self.publisher = ChunkPublisher(metrics, sessions.sessions)
        self.chunks = self._new_engine(executor)
        self._commands: queue.Queue[tuple[Callable[[], Any], Future[Any]]] = queue.Queue()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="master-engine", daemon=True)
        self._last_offset_report = 0.0

    def _new_engine(self, executor: Executor) -> ChunkEngine:
        """The chunk pipeline with the group's degradation options (``engine.degrade``); over batches of
        sessions with ``--max-batch-sessions`` > 1 (``engine.batching``)."""
        config = self.config
        degrade = {"degrade": config.degrade, "degrade_metrics": self.metrics}
        if config.max_batch_sessions > 1:
            return BatchChunkEngine(
                executor, config.stream, self.publisher, self, config.max_batch_sessions, **degrade
            )
        return ChunkEngine(executor, config.stream, self.publisher, self, **degrade)

    def start(self) -> None:
        self.publisher.start()
        self._thread.start()

    def stop(self, reason: str) -> None:
        """Tell the workers to stop (unless the group failed), then stop this thread and the publish
        thread."""
        if self._thread.is_alive():
            if self.health.failed is None:
                try:
                    self._call(lambda: self.executor.shutdown(reason), timeout_s=10)
                except (BackendFailed, WorkerError, NoCapacity) as exc:
                    log.warning("the workers were not told to stop: %s", exc)
            self._stop.set()
            # A thread blocked in a collective with a hung worker, or joining a new world while the group
            # heals itself, is left behind (it is a daemon).
            self._thread.join(timeout=10 if self.health.failed is None else 2)
            if self._thread.is_alive():
                global LEFT_BEHIND
                LEFT_BEHIND = True
                log.warning("the engine thread did not stop in time (it waits inside torch.distributed)")
        self.publisher.stop()

    # ---- asked by the API threads ----------------------------------------------------------------------

    def open_session(self, message: SessionOpen, tensors: dict[str, torch.Tensor], entry: Entry) -> None:
        """Open a session on the workers, between chunks, and register it (unless the group failed meanwhile:
        a session never joins a failed group).

        Raises:
            WorkerError: the open failed on the workers. BackendFailed: the group failed.
            NoCapacity: the engine did not get to it in time.
        """

        def open_on_engine() -> None:
            self.executor.open_session(message, tensors)
            self.health.add(entry)

        self._call(open_on_engine)

    def close_session(self, entry: Entry) -> None:
        """Close a session on the workers, between chunks; from then on none of its chunks goes out. Nothing
        to do once the group failed or the thread stopped; a worker failure fails the group. Waits at most
        ``_CLOSE_WAIT_S`` for the engine; past that the close stays queued and runs when the engine can."""
        if self.health.failed is not None or not self._thread.is_alive():
            return

        def close_on_engine() -> None:
            entry.closing = True
            self.executor.close_session(SessionClose(entry.session.id))

        try:
            self._call(close_on_engine, timeout_s=_CLOSE_WAIT_S, keep_queued=True)
        except WorkerError as exc:
            self.health.fail(str(exc))
        except BackendFailed:
            pass  # the group failed meanwhile: the session was failed with it
        except NoCapacity:
            log.warning("session %s: the engine did not take its close within %g s; it stays queued",
                        entry.session.id, _CLOSE_WAIT_S)

    def _call(
        self, fn: Callable[[], Any], timeout_s: float = _ENGINE_CALL_TIMEOUT_S, keep_queued: bool = False
    ) -> Any:
        """Run ``fn`` on the engine thread (the only one that talks to the workers) and wait for it, but never
        on a failed group.

        Raises:
            BackendFailed: the group failed (or the engine thread stopped) before ``fn`` returned; if it had
                not started it never will.
            NoCapacity: ``fn`` did not return within ``timeout_s``; it never runs unless ``keep_queued``.
        """
        if threading.current_thread() is self._thread:
            return fn()
        future: Future[Any] = Future()
        self._commands.put((fn, future))
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                return future.result(timeout=_WAIT_SLICE_S)
            except FutureTimeout:
                pass
            except CancelledError:
                raise BackendFailed(self.health.ready()[1]) from None
            if self.health.failed is not None or not self._thread.is_alive():
                future.cancel()
                raise BackendFailed(self.health.ready()[1])
            if time.monotonic() >= deadline:
                if not keep_queued:
                    future.cancel()
                raise NoCapacity(2.0, f"the serving group did not get to the request within {timeout_s:g} s")

    # ---- the thread ------------------------------------------------------------------------------------

    def _run(self) -> None:
        try:
            if self.warm_up:
                self._warm_up()
            self.health.warmed_up = True
            log.info("serving group warmed up; ready for sessions")
        except WorkerError as exc:
            self.health.fail(str(exc))
        while not self._stop.is_set():
            self._run_commands()  # nothing is in flight here: opens and closes go out between chunks
            if self.health.failed is not None:
                self.chunks.reset()
                if self.health.restart_due():
                    self._recover()
                else:
                    time.sleep(_TICK_S)
                continue
            if not self.chunks.turn():
                time.sleep(_TICK_S)
        self._run_commands()

    def _run_commands(self) -> None:
        while True:
            try:
                fn, future = self._commands.get_nowait()
            except queue.Empty:
                return
            if not future.set_running_or_notify_cancel():
                continue  # its caller gave up on it (the group failed, or it waited too long)
            if self.health.failed is not None:  # nothing more goes to the workers of a failed group
                future.set_exception(BackendFailed(self.health.ready()[1]))
                continue
            try:
                future.set_result(fn())
            except BaseException as exc:
                future.set_exception(exc)

    def _recover(self) -> None:
        """Replace the failed group (``Renewal.replace``), warm the new one up, and serve again."""
        renewal = self.health.renewal
        assert renewal.replace is not None
        attempt = self.health.begin_restart()
        start = time.monotonic()
        try:
            self.executor = renewal.replace()
            self.chunks = self._new_engine(self.executor)
            if self.warm_up:
                self._warm_up()
        except Exception as exc:  # whatever broke, this group cannot serve; the next restart starts over
            log.exception("restart %d of the serving group failed", attempt)
            self.health.restart_failed(f"{type(exc).__name__}: {exc}")
            self._stop.wait(_RESTART_PAUSE_S)
            return
        log.info("new score workers joined and warmed up in %.1f s", time.monotonic() - start)
        self.health.warmed_up = True
        self.health.recovered()

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

    # ---- engine.pipeline.EngineOwner (on this thread) ----------------------------------------------------

    def pick(self, in_flight: Work | None) -> LiveSession | None:
        """Earliest deadline first among the running sessions (``engine.scheduler``); a session whose output
        ended is finished here, and a chunk in flight counts as buffered for its session."""
        candidates = self._candidates([] if in_flight is None else [in_flight])
        return earliest_deadline(candidates, self.config.ahead_s)

    def pick_batch(self, in_flight: Sequence[Work], max_sessions: int, cost: Cost) -> list[LiveSession]:
        """The due sessions whose chunks go next together (``engine.scheduler.pick_batch``), as ``pick``."""
        return pick_batch(self._candidates(in_flight), self.config.ahead_s, max_sessions, cost)

    def _candidates(self, in_flight: Sequence[Work]) -> list[tuple[LiveSession, float]]:
        """The running sessions and their buffered seconds, counting their chunks in flight."""
        report_offset = time.monotonic() - self._last_offset_report > 1.0
        candidates: list[tuple[LiveSession, float]] = []
        for entry in self.sessions.entries():
            session = entry.session
            if not session.live or session.output is None or entry.closing:
                continue
            if session.output.end_reason is not None:  # the room or the publisher went away
                self.sessions.finish(entry, SessionState.ended, session.output.end_reason)
                self.chunks.close_on_workers(session.id)
                continue
            try:
                buffered = session.output.buffered_s()
            except Exception as exc:  # one session's broken output must not stop the engine for all
                log.exception("session %s failed while publishing", session.id)
                self.chunks.fail_session(session.id, f"publishing failed: {exc}")
                continue
            self.metrics.set_buffer(session.id, buffered)
            if report_offset and isinstance(session.output, LiveKitSessionOutput):
                stats = session.output.publisher.av_offset_stats()
                if stats.samples:
                    self.metrics.set_av_offset(stats.last_s)
                self._last_offset_report = time.monotonic()
            for work in in_flight:
                if work.session is session:
                    buffered += self.config.stream.chunk_duration_s(work.prepared.request.chunk_index)
            candidates.append((session, buffered))
        return candidates

    def schedulable(self, session: LiveSession) -> bool:  # type: ignore[override]
        entry = self.sessions.entry(session.id)
        return entry is not None and entry.session is session and not entry.closing and session.live

    def session_failed(self, session_id: str, reason: str) -> bool:
        entry = self.sessions.entry(session_id)
        if entry is None:
            return False
        self.sessions.finish(entry, SessionState.failed, reason)  # no longer live: never picked again
        return True

    def group_failed(self, reason: str) -> None:
        self.health.fail(reason)
