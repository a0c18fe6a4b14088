"""The ``SessionBackend`` of ``talkingmachines serve``: live sessions on one serving group.

``LiveBackend`` is the facade the API calls (``server.backend.SessionBackend``, plus ``start``, drain and
``shutdown`` for ``serve``); the work is done by its collaborators:

- ``SessionSetup`` (``server.live_setup``) builds a session on the calling API thread: the VAE encode of the
  reference image, CLIP and umT5, its featurizers and decoder, and its output (the LiveKit join, or an MP4).
- ``SessionRegistry`` (``server.session_registry``) holds the live sessions and the recently ended ones:
  lookups, the API's ``UnknownSession``/``SessionEnded`` errors, the ``SessionInfo`` snapshots, and ending.
- ``GroupHealth`` (``server.group_health``): warming up, ready, draining, or failed (a worker error, or a
  score worker its watcher thread finds dead or hung, fails every session; the API stays up, not ready),
  and whether a failed group is replaced (``Renewal``: the engine thread does it, within a restart budget).
- ``EngineThread`` (``server.engine_thread``), the only thread that talks to the score side: the warm-up,
  the sessions' chunks through ``engine.pipeline.ChunkEngine`` (earliest deadline first), and the session
  opens and closes, between chunks; its publish thread (``engine.publish``) puts the decoded chunks into the
  sessions' outputs.
- ``AsyncLoopThread`` (``server.session_outputs``): the one asyncio loop that runs every session's LiveKit
  publisher, avatar-worker protocol and real-time player.

The API threads (uvicorn's worker pool) call the methods below; apart from ``create_session`` (set-up, then
the open on the engine thread) and ``close`` (the close on the engine thread) they only touch thread-safe
session state, and those two never wait on a failed group (``EngineThread._call``): a create on a failed
group is refused at once (503 with the reason), a close of a session the failure ended returns its info.
"""

from __future__ import annotations

import logging
import threading
import uuid
from collections.abc import Callable, Sequence

import numpy as np

from decoder.vae import WanVAE
from engine.executor import Executor, WorkerError
from frontends.conditioning import ConditioningEncoders
from proto.api import Face, SessionCreate, SessionInfo, SessionState
from server.audio_ledger import AudioAccount, AudioLedger
from server.backend import BackendFailed, InvalidRequest, NoCapacity
from server.engine_thread import EngineThread
from server.group_health import GroupHealth, Renewal
from server.live_setup import LiveConfig, SessionSetup
from server.metrics import Metrics
from server.session_outputs import AsyncLoopThread
from server.session_registry import Entry, SessionRegistry

log = logging.getLogger(__name__)


class LiveBackend:
    """Runs live sessions on a serving group (see the module docstring).

    Args:
        config: stream/model settings of the group.
        executor: the transport to the score side (``engine.executor``); used by the engine thread only.
        vae: the master's VAE (I2V encode at set-up, streaming decode per session).
        encoders: CLIP + umT5 for the session conditioning.
        metrics: the ``tm_`` recorder shared with the API.
        faults: returns descriptions of score-worker ranks that died or hung (empty when all are well);
            the health watcher thread polls it.
        warm_up: run one chunk of a throw-away session before reporting ready.
        renewal: how to replace a failed group (``server.group_health.Renewal``); None: a failed group
            stays failed.
    """

    def __init__(
        self,
        config: LiveConfig,
        executor: Executor,
        vae: WanVAE,
        encoders: ConditioningEncoders,
        metrics: Metrics,
        faults: Callable[[], list[str]] | None = None,
        warm_up: bool = True,
        renewal: Renewal | None = None,
    ) -> None:
        self.config = config
        self.metrics = metrics
        self._loop = AsyncLoopThread()
        self.setup = SessionSetup(
            config, vae, encoders, self._loop, audio_observer=metrics.observe_audio_settled
        )
        self._setup_lock = threading.Lock()
        self.sessions = SessionRegistry(config.stream, metrics)
        self.health = GroupHealth(self.sessions, faults, renewal)
        self.engine = EngineThread(config, executor, self.setup, self.sessions, self.health, metrics, warm_up)

    # ---- lifecycle -------------------------------------------------------------------------------------

    def start(self) -> LiveBackend:
        self.engine.start()
        self.health.watch()
        return self

    def begin_drain(self, retry_after_s: float, why: str) -> None:
        """Refuse new sessions from now on (``NoCapacity(retry_after_s)``, ``ready()`` false with ``why``);
        live sessions go on. Irreversible: a draining server only ever shuts down."""
        self.health.begin_drain(retry_after_s, why)

    def live_count(self) -> int:
        """Sessions not yet ended or failed."""
        return self.sessions.count()

    def shutdown(self, reason: str = "server stopping") -> None:
        """End every session, tell the workers to stop, stop the threads."""
        for entry in self.sessions.entries():
            try:
                self.close(entry.session.id, reason=reason)
            except Exception:  # shutting down: one broken session must not keep the others open
                log.exception("closing session %s at shutdown failed", entry.session.id)
        self.health.stop_watching()
        self.engine.stop(reason)
        self._loop.stop()

    # ---- SessionBackend --------------------------------------------------------------------------------

    def create_session(self, spec: SessionCreate, image: np.ndarray, faces: Sequence[Face]) -> SessionInfo:
        self.health.admit()
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
        identity = self.setup.attach_output(session, spec.output, session.request_clear)
        session.first_frame_observer = self.metrics.observe_first_frame
        session.state = SessionState.running
        entry = Entry(session, list(faces), identity)
        try:
            self.engine.open_session(message, tensors, entry)  # registers it, unless the group failed
        except WorkerError as exc:
            self.health.fail(str(exc))
            session.output.close()
            raise BackendFailed(self.health.ready()[1]) from exc
        except (BackendFailed, NoCapacity):
            session.output.close()
            raise
        log.info("session %s running (%d character(s))", session_id, session.num_characters)
        return self.sessions.snapshot(entry)

    def get(self, session_id: str) -> SessionInfo:
        return self.sessions.info(session_id)

    def list_sessions(self) -> list[SessionInfo]:
        return self.sessions.infos()

    def push_audio(self, session_id: str, pcm: np.ndarray, source: str | None = None) -> AudioAccount:
        return self.sessions.live_entry(session_id).session.feed.offer(pcm, source)

    def audio_ledger(self, session_id: str) -> AudioLedger:
        return self.sessions.live_entry(session_id).session.feed.ledger

    def set_speakers(self, session_id: str, speaking: Sequence[int]) -> SessionInfo:
        entry = self.sessions.live_entry(session_id)
        beyond = [i for i in speaking if i >= entry.session.num_characters]
        if beyond:
            raise InvalidRequest(
                f"speaking indices {beyond} name characters that do not exist; session {session_id!r} has "
                f"{entry.session.num_characters} character(s), indices 0..{entry.session.num_characters - 1}"
            )
        entry.session.feed.set_speakers(list(speaking))
        return self.sessions.snapshot(entry)

    def clear(self, session_id: str) -> None:
        self.sessions.live_entry(session_id).session.request_clear()

    def close(self, session_id: str, reason: str = "closed by the client") -> SessionInfo:
        found = self.sessions.find(session_id)
        if isinstance(found, SessionInfo):
            return found  # ended before: its final info, unchanged
        session = found.session
        self.engine.close_session(found)
        state = SessionState.ended if session.live else session.state
        self.sessions.finish(found, state, session.reason or reason)
        return self.sessions.info(session_id)

    def ready(self) -> tuple[bool, str]:
        return self.health.ready()
