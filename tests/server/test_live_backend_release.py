"""A session whose output ends (its LiveKit room or publisher went away) frees its caches on the workers."""

from __future__ import annotations

import threading
from types import SimpleNamespace

from proto.api import SessionState
from proto.model_config import get_model_preset
from proto.stream_config import StreamConfig
from proto.wire import SessionClose
from server.live_backend import LiveBackend, LiveConfig, _Entry
from server.metrics import Metrics


class _Executor:
    def __init__(self) -> None:
        self.closed: list[str] = []

    def close_session(self, message: SessionClose) -> None:
        self.closed.append(message.session_id)


class _Output:
    def __init__(self, end_reason: str | None) -> None:
        self.end_reason = end_reason
        self.closed = False

    def buffered_s(self) -> float:
        return 0.0

    def close(self) -> None:
        self.closed = True


def _session(session_id: str, end_reason: str | None) -> SimpleNamespace:
    return SimpleNamespace(
        id=session_id,
        state=SessionState.running,
        reason=None,
        live=True,
        output=_Output(end_reason),
        chunks_generated=0,
        times=SimpleNamespace(ttbc=[], deadline_misses=0, first_frame_latency_s=None, lock=threading.Lock()),
        feed=SimpleNamespace(speaking=set()),
    )


def test_an_output_that_ended_finishes_its_session_and_closes_it_on_the_workers() -> None:
    config = LiveConfig(model=get_model_preset("tiny"), stream=StreamConfig(height=64, width=64))
    executor = _Executor()
    backend = LiveBackend(
        config, executor, vae=None, encoders=None, metrics=Metrics(), warm_up=False  # type: ignore[arg-type]
    )
    gone, playing = _session("gone", "the room was deleted"), _session("playing", None)
    backend._sessions = {s.id: _Entry(s, [], None) for s in (gone, playing)}  # type: ignore[arg-type]

    picked = backend._pick()  # what the engine thread does every tick

    assert picked is playing  # the live one still gets chunks
    assert executor.closed == ["gone"]  # exactly the ended one is freed on the workers
    assert gone.output.closed and not playing.output.closed
    info = backend.get("gone")
    assert info.state == SessionState.ended and info.reason == "the room was deleted"
    assert backend.live_count() == 1
