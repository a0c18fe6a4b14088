"""A hung score worker: the health watcher fails the group while the engine thread is still blocked in the
collective with it, ``/readyz`` turns false at once with the watcher's reason, and API calls that need the
engine thread (open, close) answer promptly instead of waiting for it. A failed group is replaced on the
engine thread within a restart budget, then stays failed and says so. Scripted executors, renewals and
sessions; the real-process version is tests/serve/test_serve_worker_faults.py."""

from __future__ import annotations

import threading
import time
from types import SimpleNamespace

import pytest

from engine.executor import WorkerError
from proto.api import SessionState
from proto.model_config import get_model_preset
from proto.stream_config import StreamConfig
from proto.wire import SessionClose
from server import engine_thread
from server.backend import BackendFailed
from server.group_health import Renewal
from server.live_backend import LiveBackend, LiveConfig
from server.metrics import Metrics
from server.session_registry import Entry
from tests.server.test_live_backend_release import _session as running_session


class _HungExecutor:
    """``collect`` blocks until released, as the master's wait for a stopped worker's reply does."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.in_collect = threading.Event()
        self.opened: list[str] = []
        self.closed: list[str] = []

    def open_session(self, message: SimpleNamespace, tensors: dict) -> None:
        self.opened.append(message.session_id)

    def submit(self, request: SimpleNamespace, tensors: dict) -> None:
        pass

    def collect(self, request: SimpleNamespace) -> None:
        self.in_collect.set()
        self.release.wait()
        raise RuntimeError("Connection reset by peer")

    def close_session(self, message: SessionClose) -> None:
        self.closed.append(message.session_id)

    def shutdown(self, reason: str) -> None:
        pass


def _session(session_id: str) -> SimpleNamespace:
    request = SimpleNamespace(session_id=session_id, chunk_index=0)
    session = running_session(session_id, None)
    session.prepare_chunk = lambda: SimpleNamespace(request=request, tensors={})
    return session


@pytest.fixture
def hung() -> tuple[LiveBackend, _HungExecutor, list[str]]:
    """A started backend whose engine thread is blocked in ``collect`` for session "a"; the test sets
    ``faults`` (what the watcher reads) to make the watcher see the hang."""
    faults: list[str] = []
    executor = _HungExecutor()
    config = LiveConfig(model=get_model_preset("tiny"), stream=StreamConfig(height=64, width=64))
    backend = LiveBackend(
        config, executor, vae=None, encoders=None, metrics=Metrics(),  # type: ignore[arg-type]
        faults=lambda: list(faults), warm_up=False,
    )
    backend.sessions.add(Entry(_session("a"), [], None))  # type: ignore[arg-type]
    backend.start()
    assert executor.in_collect.wait(5)
    yield backend, executor, faults
    executor.release.set()
    backend.shutdown()


def test_the_watcher_fails_the_group_while_the_engine_is_blocked_and_names_the_rank(hung) -> None:
    backend, _, faults = hung
    assert backend.ready()[0]
    faults.append("score worker rank 1 (score worker 0) stopped responding (no heartbeat for 5.0 s)")
    deadline = time.monotonic() + 2
    while backend.ready()[0] and time.monotonic() < deadline:
        time.sleep(0.01)
    ok, reason = backend.ready()
    assert not ok and "rank 1" in reason and "stopped responding" in reason
    info = backend.get("a")
    assert info.state == SessionState.failed and "stopped responding" in info.reason


def test_a_close_waiting_for_the_blocked_engine_returns_once_the_group_fails(hung) -> None:
    backend, executor, faults = hung
    backend.sessions.add(Entry(_session("b"), [], None))  # type: ignore[arg-type]
    result: dict[str, object] = {}

    def close() -> None:
        start = time.monotonic()
        result["info"] = backend.close("b")
        result["s"] = time.monotonic() - start

    closer = threading.Thread(target=close)
    closer.start()
    time.sleep(0.3)
    assert closer.is_alive()  # the engine is busy with "a"'s chunk: the close waits for it...
    faults.append("score worker rank 1 stopped responding")
    closer.join(2)
    assert not closer.is_alive()  # ...but not for a failed group
    assert result["info"].state == SessionState.failed and "stopped responding" in result["info"].reason
    assert executor.closed == []  # nothing went to the workers of the failed group


def test_a_close_does_not_wait_long_for_a_busy_engine_and_reaches_the_workers_later(
    hung, monkeypatch
) -> None:
    backend, executor, _ = hung
    monkeypatch.setattr(engine_thread, "_CLOSE_WAIT_S", 0.2)
    backend.sessions.add(Entry(_session("b"), [], None))  # type: ignore[arg-type]
    start = time.monotonic()
    info = backend.close("b")  # the engine is still busy with "a"'s chunk, and nothing failed
    assert time.monotonic() - start < 1
    assert info.state == SessionState.ended and backend.sessions.entry("b") is None
    assert executor.closed == []
    executor.release.set()  # the engine gets out of "a"'s chunk (which fails "a" alone) and is free again
    _wait(lambda: executor.closed == ["b"])
    assert executor.closed == ["b"]  # the queued close went to the workers after all


def test_an_open_on_a_failed_group_is_refused_promptly_and_never_reaches_the_workers(hung) -> None:
    backend, executor, faults = hung
    result: dict[str, object] = {}

    def open_session() -> None:
        start = time.monotonic()
        try:
            backend.engine.open_session(SimpleNamespace(session_id="c"), {}, Entry(_session("c"), [], None))
        except BackendFailed as exc:
            result["error"] = exc
        result["s"] = time.monotonic() - start

    opener = threading.Thread(target=open_session)
    opener.start()
    time.sleep(0.3)
    faults.append("score worker rank 1 stopped responding")
    opener.join(2)
    assert not opener.is_alive()
    assert "stopped responding" in str(result["error"])
    executor.release.set()  # the engine thread gets out of the collective; the queued open must not run
    time.sleep(0.3)
    assert executor.opened == [] and backend.sessions.entry("c") is None


class _DeadExecutor(_HungExecutor):
    """The worker died: the chunk's reply never comes (a broken collective)."""

    def collect(self, request: SimpleNamespace) -> None:
        raise WorkerError("score worker rank 1 (score worker 0) died (killed by SIGKILL)")


def _healing_backend(executor: object, renewal: Renewal) -> LiveBackend:
    config = LiveConfig(model=get_model_preset("tiny"), stream=StreamConfig(height=64, width=64))
    return LiveBackend(
        config, executor, vae=None, encoders=None, metrics=Metrics(),  # type: ignore[arg-type]
        faults=lambda: [], warm_up=False, renewal=renewal,
    )


def _wait(predicate: object, timeout_s: float = 5) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate() and time.monotonic() < deadline:  # type: ignore[operator]
        time.sleep(0.01)


def test_a_failed_group_is_replaced_on_the_engine_thread_and_serves_again() -> None:
    calls: list[str] = []
    replacement = _HungExecutor()

    def replace() -> _HungExecutor:
        calls.append("replace")
        return replacement

    renewal = Renewal(replace, lambda: calls.append("stop_workers"), max_restarts=1, window_s=600)
    backend = _healing_backend(_DeadExecutor(), renewal)
    backend.sessions.add(Entry(_session("a"), [], None))  # type: ignore[arg-type]
    backend.start()
    try:
        _wait(lambda: calls == ["stop_workers", "replace"] and backend.ready()[0])
        assert calls == ["stop_workers", "replace"]  # the failed workers are killed before the new ones
        assert backend.ready() == (True, "ready: 0 live session(s)")
        info = backend.get("a")
        assert info.state == SessionState.failed and "died (killed by SIGKILL)" in info.reason
        assert "replacing the score workers (restart 1 of 1 within 600 s)" in info.reason
        entry = Entry(_session("b"), [], None)
        backend.engine.open_session(SimpleNamespace(session_id="b"), {}, entry)  # type: ignore[arg-type]
        assert replacement.opened == ["b"] and backend.sessions.entry("b") is entry  # on the new group
    finally:
        replacement.release.set()
        backend.shutdown()


def test_failed_restarts_are_retried_within_the_budget_then_the_group_stays_failed(monkeypatch) -> None:
    monkeypatch.setattr(engine_thread, "_RESTART_PAUSE_S", 0.01)
    attempts: list[float] = []

    def replace() -> None:
        attempts.append(time.monotonic())
        raise RuntimeError("the new workers did not join")

    backend = _healing_backend(_DeadExecutor(), Renewal(replace, lambda: None, max_restarts=2, window_s=600))
    backend.sessions.add(Entry(_session("a"), [], None))  # type: ignore[arg-type]
    backend.start()
    try:
        _wait(lambda: "gave up" in backend.ready()[1])
        ok, reason = backend.ready()
        assert not ok and len(attempts) == 2
        assert "died (killed by SIGKILL)" in reason and "restart 2 failed: RuntimeError: the new" in reason
        assert reason.endswith("gave up: the score workers were replaced 2 time(s) within 600 s already; "
                               "restart the server to serve again")
        time.sleep(0.1)
        assert len(attempts) == 2  # no more
    finally:
        backend.shutdown()


def test_a_group_that_is_not_replaced_says_what_the_operator_must_do() -> None:
    backend = _healing_backend(_DeadExecutor(), Renewal(otherwise="the orchestrator must restart the group"))
    backend.health.fail("score worker rank 1 died")
    ok, reason = backend.ready()
    assert not ok and reason.endswith("score worker rank 1 died; the orchestrator must restart the group")
    with pytest.raises(BackendFailed, match="the orchestrator must restart the group"):
        backend.health.admit()
