"""Sessions that end or fail alone free their caches on the workers (and the others go on)."""

from __future__ import annotations

from types import SimpleNamespace

from engine.chunks import SessionTimes
from proto.api import SessionState
from proto.model_config import get_model_preset
from proto.stream_config import StreamConfig
from proto.wire import SessionClose
from server.live_backend import LiveBackend, LiveConfig
from server.metrics import Metrics
from server.session_registry import Entry
from server.speech_feed import SpeechFeed


class _Executor:
    def __init__(self) -> None:
        self.closed: list[str] = []

    def close_session(self, message: SessionClose) -> None:
        self.closed.append(message.session_id)


class _Output:
    def __init__(self, end_reason: str | None) -> None:
        self.end_reason = end_reason
        self.closed = False

    def tick(self) -> None:
        pass

    def buffered_s(self) -> float:
        return 0.0

    def close(self) -> None:
        self.closed = True


class _Session(SimpleNamespace):
    @property
    def live(self) -> bool:  # as LiveSession's: only a running session is live
        return self.state in (SessionState.starting, SessionState.running)


def _session(session_id: str, end_reason: str | None) -> SimpleNamespace:
    return _Session(
        id=session_id,
        epoch=0,
        state=SessionState.running,
        reason=None,
        output=_Output(end_reason),
        chunks_generated=0,
        times=SessionTimes(),
        feed=SpeechFeed([], [], fps=16),  # no featurizer: no chunk is prepared here
    )


def test_an_output_that_ended_finishes_its_session_and_closes_it_on_the_workers() -> None:
    config = LiveConfig(model=get_model_preset("tiny"), stream=StreamConfig(height=64, width=64))
    executor = _Executor()
    backend = LiveBackend(
        config, executor, vae=None, encoders=None, metrics=Metrics(), warm_up=False  # type: ignore[arg-type]
    )
    gone, playing = _session("gone", "the room was deleted"), _session("playing", None)
    for s in (gone, playing):
        backend.sessions.add(Entry(s, [], None))  # type: ignore[arg-type]

    picked = backend.engine.pick(None)  # what the engine thread does every tick

    assert picked is playing  # the live one still gets chunks
    assert executor.closed == ["gone"]  # exactly the ended one is freed on the workers
    assert gone.output.closed and not playing.output.closed
    info = backend.get("gone")
    assert info.state == SessionState.ended and info.reason == "the room was deleted"
    assert backend.live_count() == 1


class _RecordingExecutor(_Executor):
    def __init__(self, collect_error: Exception | None = None) -> None:
        super().__init__()
        self.collect_error = collect_error
        self.submitted: list[str] = []

    def submit(self, request: SimpleNamespace, tensors: dict) -> None:
        self.submitted.append(request.session_id)

    def collect(self, request: SimpleNamespace) -> None:
        raise self.collect_error or AssertionError("not reached in these tests")


def _backend(executor: _Executor) -> LiveBackend:
    config = LiveConfig(model=get_model_preset("tiny"), stream=StreamConfig(height=64, width=64))
    return LiveBackend(
        config, executor, vae=None, encoders=None, metrics=Metrics(), warm_up=False  # type: ignore[arg-type]
    )


def _failing_prepare() -> None:
    raise ValueError("corrupt audio in the feed")


def test_a_session_that_fails_while_generating_is_freed_on_the_workers_alone() -> None:
    executor = _RecordingExecutor()
    backend = _backend(executor)
    broken, playing = _session("broken", None), _session("playing", None)
    broken.prepare_chunk = _failing_prepare
    for s in (broken, playing):
        backend.sessions.add(Entry(s, [], None))  # type: ignore[arg-type]

    backend.engine.chunks.turn()  # picks `broken` (both due; the first wins the tie) and fails preparing it

    assert executor.closed == ["broken"] and executor.submitted == []
    info = backend.get("broken")
    assert info.state == SessionState.failed and "corrupt audio in the feed" in info.reason
    assert backend.live_count() == 1 and backend.health.failed is None  # the others go on


def test_a_session_whose_output_breaks_is_freed_on_the_workers() -> None:
    executor = _RecordingExecutor()
    backend = _backend(executor)
    broken, playing = _session("broken", None), _session("playing", None)

    def boom() -> float:
        raise OSError("disk full")

    broken.output.buffered_s = boom
    for s in (broken, playing):
        backend.sessions.add(Entry(s, [], None))  # type: ignore[arg-type]

    assert backend.engine.pick(None) is playing
    assert executor.closed == ["broken"] and backend.get("broken").state == SessionState.failed


def test_no_close_while_the_failed_sessions_chunk_request_awaits_its_reply() -> None:
    executor = _RecordingExecutor(collect_error=ValueError("latent of the wrong shape"))
    backend = _backend(executor)
    broken = _session("broken", None)
    request = SimpleNamespace(session_id="broken", chunk_index=0)
    broken.prepare_chunk = lambda: SimpleNamespace(request=request, tensors={})
    backend.sessions.add(Entry(broken, [], None))  # type: ignore[arg-type]

    backend.engine.chunks.turn()  # type: ignore[arg-type]

    assert executor.submitted == ["broken"] and executor.closed == []  # its reply may still be due
    assert backend.get("broken").state == SessionState.failed
