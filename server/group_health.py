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

Healing (``Renewal``, when this server started its workers itself): a failure with a restart left kills the
failed workers at once (``Renewal.stop_workers``; that also frees an engine thread blocked on them), and the
engine thread replaces them (``begin_restart``, ``Renewal.replace``, a warm-up, ``recovered``): ``/readyz``
is false meanwhile with a reason saying so, and true again once the new group warmed up. At most
``max_restarts`` restarts within ``window_s``; past that, or with restarts off, or under an external
launcher (no ``Renewal``), the group stays failed and ``/readyz`` says why and what to do.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from proto.api import SessionState
from server.backend import BackendFailed, NoCapacity
from server.session_registry import Entry, SessionRegistry

log = logging.getLogger(__name__)

WATCH_INTERVAL_S = 0.25


@dataclass(frozen=True)
class Renewal:
    """Whether and how a failed group is replaced (``serve``: ``server.score_group.ScoreGroup.renewal``).

    replace: on the engine thread: new score workers in a new world; returns its executor. None: never.
    stop_workers: from any thread: kill the failed workers now.
    max_restarts: replacements allowed within ``window_s`` seconds (0: never replace).
    otherwise: what the operator must do once the group is not (or no longer) replaced.
    """

    replace: Callable[[], Any] | None = None
    stop_workers: Callable[[], None] | None = None
    max_restarts: int = 0
    window_s: float = 600.0
    otherwise: str = "restart the server to serve again"

    @property
    def possible(self) -> bool:
        return self.replace is not None and self.max_restarts > 0


class GroupHealth:
    """The group's readiness, drain and failure state (see the module docstring).

    Args:
        sessions: the backend's sessions (a group failure fails all of them).
        faults: returns descriptions of score-worker ranks that died or hung (empty when all are well);
            polled by the watcher thread once ``watch`` started it.
        renewal: whether and how to replace a failed group (default: never).
    """

    def __init__(
        self,
        sessions: SessionRegistry,
        faults: Callable[[], list[str]] | None,
        renewal: Renewal | None = None,
    ) -> None:
        self.sessions = sessions
        self.faults = faults
        self.renewal = renewal or Renewal()
        self.warmed_up = False
        self.failed: str | None = None  # why the group cannot serve, once it failed
        self._draining: tuple[float, str] | None = None  # (Retry-After seconds, why) once draining
        self._lock = threading.Lock()  # orders fail() against add(): no session joins a failed group
        self._stop = threading.Event()
        self._watcher: threading.Thread | None = None
        self._restarts: collections.deque[float] = collections.deque()  # when each restart began
        self._restarting = False  # a restart is under way
        self._failed_at = 0.0

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
            return False, f"{self.failed}; {self._outlook()}"
        if self._draining is not None:
            return False, f"{self._draining[1]}: {self.sessions.count()} live session(s)"
        if not self.warmed_up:
            return False, "warming up the serving group"
        return True, f"ready: {self.sessions.count()} live session(s)"

    def fail(self, reason: str) -> str:
        """The score side failed: fail every live session (their reason says what happens next); the group's
        reason (the first failure's). With a restart left, the failed workers are killed at once."""
        with self._lock:
            first = self.failed is None
            if first:
                self.failed = f"the serving group failed: {reason}"
                self._failed_at = time.monotonic()
            failed = self.failed
            outlook = self._outlook()
            entries = self.sessions.entries()
        if first:
            log.error("%s; failing every session, the API stays up (not ready); %s", failed, outlook)
            if self.restart_due() and self.renewal.stop_workers is not None:
                try:
                    self.renewal.stop_workers()
                except Exception:  # the engine thread's replace kills them again
                    log.exception("killing the failed score workers failed")
        for entry in entries:
            self.sessions.finish(entry, SessionState.failed, f"{failed}; {outlook}")
        return failed

    # ---- healing (the engine thread) ---------------------------------------------------------------------

    def restart_due(self) -> bool:
        """The group failed and may be replaced now (a restart left within the window)."""
        if self.failed is None or not self.renewal.possible:
            return False
        self._forget_old_restarts()
        return len(self._restarts) < self.renewal.max_restarts

    def begin_restart(self) -> int:
        """A restart begins (``restart_due()`` was true); returns its number within the window."""
        self._restarts.append(time.monotonic())
        self._restarting = True
        log.warning("replacing the score workers (restart %d of %d within %g s)", len(self._restarts),
                    self.renewal.max_restarts, self.renewal.window_s)  # fmt: skip
        return len(self._restarts)

    def restart_failed(self, error: str) -> None:
        """The restart under way failed; the group stays failed (another restart may follow)."""
        self._restarting = False
        with self._lock:
            self.failed = f"{self.failed}; restart {len(self._restarts)} failed: {error}"
        log.error("%s; %s", self.failed, self._outlook())

    def recovered(self) -> None:
        """The restart under way succeeded: the new group warmed up; sessions may start again."""
        with self._lock:
            was, self.failed = self.failed, None
            self._restarting = False
        log.warning("the serving group is ready again, %.1f s after it failed (restart %d of %d within "
                    "%g s); %s", time.monotonic() - self._failed_at, len(self._restarts),
                    self.renewal.max_restarts, self.renewal.window_s, was)  # fmt: skip

    def _forget_old_restarts(self) -> None:
        while self._restarts and time.monotonic() - self._restarts[0] > self.renewal.window_s:
            self._restarts.popleft()

    def _outlook(self) -> str:
        """What happens to a failed group: replaced (and how often already), or not and why."""
        renewal = self.renewal
        if not renewal.possible:
            return renewal.otherwise
        if self._restarting:
            return (f"replacing the score workers (restart {len(self._restarts)} of {renewal.max_restarts} "
                    f"within {renewal.window_s:g} s); create new sessions once /readyz is ready")
        if self.restart_due():
            return (f"replacing the score workers (restart {len(self._restarts) + 1} of "
                    f"{renewal.max_restarts} within {renewal.window_s:g} s); create new sessions once "
                    "/readyz is ready")
        return (f"gave up: the score workers were replaced {renewal.max_restarts} time(s) within "
                f"{renewal.window_s:g} s already; {renewal.otherwise}")

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
