"""``serve``'s engine runs its sessions' chunks as a pipeline: the next request goes out before the previous
chunk is decoded, the chunk after it is prepared while the workers score, publishing happens on its own
thread, and closes wait until nothing is in flight. Scripted executor, decoder and outputs record the order.
"""

from __future__ import annotations

import threading
from types import SimpleNamespace

import numpy as np
import torch

from engine.chunks import SessionTimes
from engine.executor import ScoredChunk
from proto.api import SessionState
from proto.model_config import get_model_preset
from proto.stream_config import StreamConfig
from proto.wire import SessionClose
from server.live_backend import LiveBackend, LiveConfig
from server.metrics import Metrics
from server.session_registry import Entry
from server.speech_feed import SpeechFeed

STREAM = StreamConfig(height=32, width=32)


class _Log(list):
    def add(self, event: str) -> None:
        self.append(event)


class _Executor:
    """Records submit/collect/close in order; collect returns a latent tagged with the chunk."""

    def __init__(self, log: _Log) -> None:
        self.log = log

    def submit(self, request, tensors) -> None:
        self.log.add(f"submit {request.session_id}{request.chunk_index}")

    def collect(self, request) -> ScoredChunk:
        self.log.add(f"collect {request.session_id}{request.chunk_index}")
        latent = torch.full((1,), float(request.chunk_index))
        return ScoredChunk(request, latent, score_s=0.01, roundtrip_s=0.02)

    def close_session(self, message: SessionClose) -> None:
        self.log.add(f"close {message.session_id}")


class _Decoder:
    def __init__(self, log: _Log, session_id: str) -> None:
        self.log, self.session_id = log, session_id

    def decode_chunk(self, latent: torch.Tensor) -> torch.Tensor:
        self.log.add(f"decode {self.session_id}{int(latent.item())}")
        return torch.full((12, 2, 2, 3), int(latent.item()), dtype=torch.uint8)


class _Output:
    """Buffered seconds are what was put minus what played (the test plays by hand)."""

    def __init__(self, log: _Log, session_id: str, fps: int = 16) -> None:
        self.log, self.session_id, self.fps = log, session_id, fps
        self.frames: list[int] = []
        self.played = 0
        self.end_reason = None
        self.publish_threads: set[str] = set()

    def put_chunk(self, frames: np.ndarray, pcm: np.ndarray, first_frame: int) -> None:
        self.publish_threads.add(threading.current_thread().name)
        self.frames.extend(int(f[0, 0, 0]) for f in frames)
        self.log.add(f"publish {self.session_id}{int(frames[0, 0, 0, 0])}")

    def tick(self) -> None:
        pass

    def buffered_s(self) -> float:
        return max(0, len(self.frames) - self.played) / self.fps

    def close(self) -> None:
        pass


class _Session(SimpleNamespace):
    @property
    def live(self) -> bool:
        return self.state in (SessionState.starting, SessionState.running)


def _session(log: _Log, session_id: str) -> _Session:
    counter = iter(range(1000))

    def prepare_chunk() -> SimpleNamespace:
        index = next(counter)
        log.add(f"prepare {session_id}{index}")
        request = SimpleNamespace(session_id=session_id, chunk_index=index)
        return SimpleNamespace(request=request, tensors={}, pcm=np.zeros(12_000, np.float32), first_frame=0)

    return _Session(
        id=session_id,
        epoch=0,
        state=SessionState.running,
        reason=None,
        output=_Output(log, session_id),
        decoder=_Decoder(log, session_id),
        chunks_generated=0,
        times=SessionTimes(),
        feed=SpeechFeed([], [], fps=16),  # no featurizer: no chunk is prepared here
        prepare_chunk=prepare_chunk,
        probe=lambda frames, pcm: frames,
    )


def _backend(log: _Log, *sessions: _Session, ahead_s: float = 100.0) -> LiveBackend:
    config = LiveConfig(model=get_model_preset("tiny"), stream=STREAM, ahead_s=ahead_s)
    backend = LiveBackend(
        config, _Executor(log), vae=None, encoders=None, metrics=Metrics(), warm_up=False  # type: ignore[arg-type]
    )
    for s in sessions:
        backend.sessions.add(Entry(s, [], None))  # type: ignore[arg-type]
    backend.engine.publisher.start()
    return backend


def _turns(backend: LiveBackend, count: int) -> None:
    for _ in range(count):
        backend.engine.chunks.turn()
    backend.engine.chunks.turn()  # the last scored chunk is decoded on the next turn
    assert backend.engine.publisher.wait_idle(5)


def test_the_next_request_goes_out_before_the_previous_chunk_is_decoded() -> None:
    log = _Log()
    session = _session(log, "a")
    backend = _backend(log, session)
    _turns(backend, 3)
    backend.engine.publisher.stop()
    steps = [e for e in log if not e.startswith("publish")]
    assert steps[:12] == [
        "prepare a0", "submit a0", "prepare a1", "collect a0",  # the first turn has nothing to decode
        "submit a1", "decode a0", "prepare a2", "collect a1",  # a0 decoded while the workers score a1
        "submit a2", "decode a1", "prepare a3", "collect a2",
    ]  # fmt: skip
    # Every chunk is published in order, on the publish thread, not the engine's.
    assert session.output.frames == [0] * 12 + [1] * 12 + [2] * 12
    assert session.output.publish_threads == {"master-publish"}
    assert session.chunks_generated == 3 and len(session.times.ttbc) == 2  # the first chunk has no TTBC


def test_two_sessions_interleave_earliest_deadline_first_and_each_gets_its_own_chunks_in_order() -> None:
    log = _Log()
    a, b = _session(log, "a"), _session(log, "b")
    backend = _backend(log, a, b)
    _turns(backend, 6)
    backend.engine.publisher.stop()
    submits = [e.split()[1] for e in log if e.startswith("submit")]
    assert submits[:6] == ["a0", "b0", "a1", "b1", "a2", "b2"]
    assert a.output.frames[:36] == [0] * 12 + [1] * 12 + [2] * 12
    assert b.output.frames[:36] == a.output.frames[:36]


def test_a_session_with_a_chunk_in_flight_counts_it_as_buffered() -> None:
    log = _Log()
    session = _session(log, "a")
    backend = _backend(log, session, ahead_s=0.5)  # less than one chunk (0.5625 s for chunk 0)
    backend.engine.chunks.turn()
    # Chunk 0 was in flight while the engine picked again: nothing was prepared ahead for `a`.
    assert [e for e in log if e.startswith("prepare")] == ["prepare a0"]
    backend.engine.publisher.stop()


def test_a_close_while_a_chunk_is_in_flight_waits_for_its_reply() -> None:
    log = _Log()
    a, b = _session(log, "a"), _session(log, "b")
    backend = _backend(log, a, b)
    decode = a.decoder.decode_chunk

    def decode_while_b_ends(latent):
        b.output.end_reason = "the room was deleted"  # b's room goes away while b0 is scored
        return decode(latent)

    backend.engine.chunks.turn()  # a0 scored; b0 prepared ahead
    a.decoder.decode_chunk = decode_while_b_ends
    backend.engine.chunks.turn()  # b0 in flight; picking finds b ended: its close waits for b0's reply
    backend.engine.publisher.stop()
    assert log.index("close b") > log.index("collect b0")
    assert backend.get("b").state == SessionState.ended


def test_frames_of_a_chunk_prepared_before_a_clear_are_not_published() -> None:
    log = _Log()
    session = _session(log, "a")
    backend = _backend(log, session)
    backend.engine.chunks.turn()  # a0 scored, a1 prepared
    session.epoch += 1  # barge-in: a0 and a1 were prepared before it
    _turns(backend, 2)
    backend.engine.publisher.stop()
    assert session.output.frames[:12] == [2] * 12  # a2 is the first chunk prepared after the clear
