"""Whether the serving group can take sessions (``GroupHealth``): warming up, ready, draining, or failed.

Drain (``begin_drain``, what ``serve`` does on SIGTERM): ``ready()`` turns false with a reason starting
"draining", new sessions get ``NoCapacity`` (503 + Retry-After), live sessions keep generating until they end
or ``LiveBackend.shutdown`` closes them. Irreversible: a draining server only ever shuts down.

Failure (``fail``): a ``WorkerError`` from the executor, or a score worker found dead or hung by the health
watcher, fails every live session with a reason naming the rank; the first failure's reason is kept,
``ready()`` turns false and new sessions get 503 at once; the master, its API and its metrics stay up.

The health watcher (``watch``) is a thread of its own, so it notices a fault while the engine thread is
blocked in a collective with the very worker that hung: a few times a second it asks ``faults`` (``serve``:
``engine.rank_registry.RankWatch``, heartbeats and processes) and fails the group on the first fault found.
It never talks to the workers, only to the store and ``/proc``.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from proto.api import SessionState
from server.backend import BackendFailed, NoCapacity
from server.session_registry import Entry, SessionRegistry

log = logging.getLogger(__name__)

WATCH_INTERVAL_S = 0.25


class GroupHealth:
    """The group's readiness, drain and failure state (see the module docstring).

    Args:
        sessions: the backend's sessions (a group failure fails all of them).
        faults: returns descriptions of score-worker ranks that died or hung (empty when all are well);
            polled by the watcher thread once ``watch`` started it.
    """

    def __init__(self, sessions: SessionRegistry, faults: Callable[[], list[str]] | None) -> None:
        self.sessions = sessions
        self.faults = faults
        self.warmed_up = False
        self.failed: str | None = None  # why the group cannot serve, once it failed
        self._draining: tuple[float, str] | None = None  # (Retry-After seconds, why) once draining
        self._lock = threading.Lock()  # orders fail() against add(): no session joins a failed group
        self._stop = threading.Event()
        self._watcher: threading.Thread | None = None

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
            raise BackendFailed(self.ready()[1])
        if self._draining is not None:
            raise NoCapacity(*self._draining)
        if not self.warmed_up:
            raise NoCapacity(2.0, "the serving group is still warming up")

    def add(self, entry: Entry) -> None:
        """Register a session just opened on the workers, unless the group failed meanwhile.

        Raises:
            BackendFailed: the group failed (the session is not added).
        """
        with self._lock:
            if self.failed is not None:
                raise BackendFailed(self.ready()[1])
            self.sessions.add(entry)

    def ready(self) -> tuple[bool, str]:
        """``SessionBackend.ready``: (True, "ready: N live session(s)") or (False, why not)."""
        if self.failed is not None:
            return False, f"{self.failed}; restart the server to serve again"
        if self._draining is not None:
            return False, f"{self._draining[1]}: {self.sessions.count()} live session(s)"
        if not self.warmed_up:
            return False, "warming up the serving group"
        return True, f"ready: {self.sessions.count()} live session(s)"

    def fail(self, reason: str) -> str:
        """The score side failed: fail every live session; the group's reason (the first failure's)."""
        with self._lock:
            if self.failed is None:
                self.failed = f"the serving group failed: {reason}"
                log.error("%s; failing every session, the API stays up (not ready)", self.failed)
            failed = self.failed
            entries = self.sessions.entries()
        for entry in entries:
            self.sessions.finish(entry, SessionState.failed, failed)
        return failed

    # ---- the watcher thread ------------------------------------------------------------------------------

    def watch(self, interval_s: float = WATCH_INTERVAL_S) -> None:
        """Start the watcher thread (nothing to watch without ``faults``)."""
        if self.faults is None or self._watcher is not None:
            return
        self._watcher = threading.Thread(
            target=self._watch, args=(interval_s,), name="group-health", daemon=True
        )
        self._watcher.start()

    def stop_watching(self) -> None:
        self._stop.set()
        if self._watcher is not None:
            self._watcher.join(timeout=5)

    def check(self) -> None:
        """Fail the group if ``faults`` reports a score worker that died or hung (nothing once failed)."""
        if self.faults is None or self.failed is not None:
            return
        found = self.faults()
        if found:
            self.fail("; ".join(found))

    def _watch(self, interval_s: float) -> None:
        broken_since: float | None = None
        while not self._stop.wait(interval_s):
            try:
                self.check()
                broken_since = None
            except Exception:  # the store unreachable for a moment: say so once, keep watching
                if broken_since is None:
                    broken_since = time.monotonic()
                    log.exception("the health watcher could not read the workers' state")
