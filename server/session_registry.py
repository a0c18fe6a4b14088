"""The sessions a ``LiveBackend`` knows (``SessionRegistry``): the live ones by id, the final info of the
last ``_ENDED_KEPT`` that ended or failed, the lookups behind the API's ``UnknownSession``/``SessionEnded``
errors, the ``SessionInfo`` snapshots, and the one move from live to ended (``finish``).

Thread-safe: the API threads read and add, the engine thread and the publish thread read and finish.
"""

from __future__ import annotations

import collections
import logging
import threading
from dataclasses import dataclass

import numpy as np

from proto.api import AudioAccounting, Face, SessionInfo, SessionState, TTBCStats
from proto.stream_config import StreamConfig
from server.audio_ledger import AudioAccount
from server.backend import SessionEnded, UnknownSession
from server.live_session import LiveSession
from server.memory_trim import TRIMMER
from server.metrics import Metrics

log = logging.getLogger(__name__)

_ENDED_KEPT = 256  # ended/failed sessions whose info stays visible


@dataclass
class Entry:
    """A live session and what the API was told about it."""

    session: LiveSession
    faces: list[Face]
    identity: str | None
    # Set on the engine thread just before the session's SessionClose goes to the workers: the engine never
    # schedules a chunk for it again (a ChunkRequest after SessionClose is a protocol error on the workers).
    closing: bool = False


class SessionRegistry:
    """The live sessions and the recently ended ones (see the module docstring).

    Args:
        stream: the group's stream configuration (a chunk's deadline in the TTBC stats).
        metrics: the ``tm_`` recorder (sessions started and ended).
    """

    def __init__(self, stream: StreamConfig, metrics: Metrics) -> None:
        self.stream = stream
        self.metrics = metrics
        self._lock = threading.Lock()
        self._live: dict[str, Entry] = {}
        self._ended: collections.OrderedDict[str, SessionInfo] = collections.OrderedDict()

    def add(self, entry: Entry) -> None:
        """Register a running session."""
        with self._lock:
            self._live[entry.session.id] = entry
        self.metrics.session_started(entry.session.id)

    def find(self, session_id: str) -> Entry | SessionInfo:
        """The live session's entry, or the final info of an ended one.

        Raises:
            UnknownSession: never created, or ended and forgotten.
        """
        with self._lock:
            entry = self._live.get(session_id)
            if entry is not None:
                return entry
            if session_id in self._ended:
                return self._ended[session_id]
        raise UnknownSession(session_id)

    def info(self, session_id: str) -> SessionInfo:
        """The session's current info, or its final info once ended. Raises UnknownSession."""
        found = self.find(session_id)
        return found if isinstance(found, SessionInfo) else self.snapshot(found)

    def live_entry(self, session_id: str) -> Entry:
        """The entry of a session that still takes audio and commands. Raises UnknownSession, SessionEnded."""
        found = self.find(session_id)
        if isinstance(found, SessionInfo):
            raise SessionEnded(session_id, found.reason)
        if not found.session.live:
            raise SessionEnded(session_id, found.session.reason)
        return found

    def entry(self, session_id: str) -> Entry | None:
        """The live session's entry; None when it is not (or no longer) live here."""
        with self._lock:
            return self._live.get(session_id)

    def entries(self) -> list[Entry]:
        with self._lock:
            return list(self._live.values())

    def sessions(self) -> list[LiveSession]:
        """The live sessions (the publish thread ticks their outputs)."""
        return [entry.session for entry in self.entries()]

    def infos(self) -> list[SessionInfo]:
        """Every session known: the live ones' current info, then the ended ones' final info."""
        with self._lock:
            entries = list(self._live.values())
            ended = list(self._ended.values())
        return [self.snapshot(e) for e in entries] + ended

    def count(self) -> int:
        """Sessions not yet ended or failed."""
        with self._lock:
            return len(self._live)

    def finish(self, entry: Entry, state: SessionState, reason: str) -> None:
        """Move a session to ``ended``/``failed``: release its output and decode state, keep its info.

        The output stops playing first; then the audio it did not play is counted dropped (``SpeechFeed.
        close``), and the kept info carries that final account."""
        session = entry.session
        with self._lock:
            if self._live.get(session.id) is not entry:
                return
            session.state, session.reason = state, reason
            info = self.snapshot(entry)
            del self._live[session.id]
            self._ended[session.id] = info
            while len(self._ended) > _ENDED_KEPT:
                self._ended.popitem(last=False)
        if session.output is not None:
            try:
                session.output.close()
            except Exception:  # the session is over either way; its output's failure is only logged
                log.exception("closing the output of session %s failed", session.id)
        final = session.feed.close(reason)
        with self._lock:
            if session.id in self._ended:
                self._ended[session.id] = info.model_copy(update={"audio": _accounting(final)})
        self.metrics.session_ended(session.id)
        TRIMMER.request()  # its buffers are freed: hand the heap they leave back to the OS
        level = logging.ERROR if state == SessionState.failed else logging.INFO
        log.log(
            level,
            "session %s %s: %s (audio: %.2f s accepted, %.2f s played, %.2f s dropped)",
            session.id,
            state.value,
            reason,
            final.accepted_s,
            final.played_s,
            final.dropped_s,
        )

    def snapshot(self, entry: Entry) -> SessionInfo:
        """The session's info now (one consistent read of the engine's counters)."""
        session = entry.session
        times = session.times
        ttbc = TTBCStats(deadline_s=self.stream.chunk_duration_s(1))
        with times.lock:  # one consistent snapshot of the generator thread's counters
            values = np.asarray(times.ttbc)
            chunks_generated = session.chunks_generated
            deadline_misses = times.deadline_misses
            degrade = times.degrade
            degraded, degraded_chunks = degrade.degraded, degrade.degraded_chunks
        if values.size:
            ttbc = TTBCStats(
                count=len(values),
                mean_s=float(values.mean()),
                p50_s=float(np.percentile(values, 50)),
                p95_s=float(np.percentile(values, 95)),
                max_s=float(values.max()),
                deadline_s=self.stream.chunk_duration_s(1),
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
            degraded=degraded,
            degraded_chunks=degraded_chunks,
            audio=_accounting(session.feed.ledger.account()),
        )


def _accounting(account: AudioAccount) -> AudioAccounting:
    return AudioAccounting(
        accepted_s=account.accepted_s,
        played_s=account.played_s,
        dropped_s=account.dropped_s,
        pending_s=account.pending_s,
        max_pending_s=account.max_pending_s,
    )
