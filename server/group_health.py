"""Whether the serving group can take sessions (``GroupHealth``): warming up, ready, draining, or failed.

Drain (``begin_drain``, what ``serve`` does on SIGTERM): ``ready()`` turns false with a reason starting
"draining", new sessions get ``NoCapacity`` (503 + Retry-After), live sessions keep generating until they end
or ``LiveBackend.shutdown`` closes them. Irreversible: a draining server only ever shuts down.

Failure (``fail``): a ``WorkerError`` from the executor, or a score-worker process found dead (polled by the
engine thread through ``check_workers``), fails every live session with a reason naming the rank; the first
failure's reason is kept, ``ready()`` turns false and new sessions get 503; the master, its API and its
metrics stay up.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from proto.api import SessionState
from server.backend import BackendFailed, NoCapacity
from server.session_registry import SessionRegistry

log = logging.getLogger(__name__)

_WORKER_CHECK_S = 0.25


class GroupHealth:
    """The group's readiness, drain and failure state (see the module docstring).

    Args:
        sessions: the backend's sessions (a group failure fails all of them).
        dead_workers: returns descriptions of score-worker ranks that died (empty when all live).
    """

    def __init__(self, sessions: SessionRegistry, dead_workers: Callable[[], list[str]] | None) -> None:
        self.sessions = sessions
        self.dead_workers = dead_workers
        self.warmed_up = False
        self.failed: str | None = None  # why the group cannot serve, once it failed
        self._draining: tuple[float, str] | None = None  # (Retry-After seconds, why) once draining
        self._last_worker_check = 0.0

    def begin_drain(self, retry_after_s: float, why: str) -> None:
        """Refuse new sessions from now on (``NoCapacity(retry_after_s)``, ``ready()`` false with ``why``);
        live sessions go on."""
        self._draining = (retry_after_s, why)

    def admit(self) -> None:
        """Raise unless a new session may start now.

        Raises:
            BackendFailed: the group failed. NoCapacity: draining, or still warming up.
        """
        if self.failed is not None:
            raise BackendFailed(self.failed)
        if self._draining is not None:
            raise NoCapacity(*self._draining)
        if not self.warmed_up:
            raise NoCapacity(2.0, "the serving group is still warming up")

    def ready(self) -> tuple[bool, str]:
        """``SessionBackend.ready``: (True, "ready: N live session(s)") or (False, why not)."""
        if self.failed is not None:
            return False, self.failed
        if self._draining is not None:
            return False, f"{self._draining[1]}: {self.sessions.count()} live session(s)"
        if not self.warmed_up:
            return False, "warming up the serving group"
        return True, f"ready: {self.sessions.count()} live session(s)"

    def fail(self, reason: str) -> str:
        """The score side failed: fail every live session; the group's reason (the first failure's)."""
        if self.failed is None:
            self.failed = f"the serving group failed: {reason}"
            log.error("%s; failing every session, the API stays up (not ready)", self.failed)
        for entry in self.sessions.entries():
            self.sessions.finish(entry, SessionState.failed, self.failed)
        return self.failed

    def check_workers(self) -> None:
        """Fail the group if a score worker died (polled at most every ``_WORKER_CHECK_S``)."""
        now = time.monotonic()
        if self.dead_workers is None or now - self._last_worker_check < _WORKER_CHECK_S:
            return
        self._last_worker_check = now
        dead = self.dead_workers()
        if dead:
            self.fail(f"{', '.join(dead)}; restart the server to serve again")
