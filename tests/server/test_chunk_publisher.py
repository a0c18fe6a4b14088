"""engine.publish.ChunkPublisher: once a session's output fails, none of its later chunks reach the output
(they may already be queued when the failure happens), and other sessions go on."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np

from engine.chunks import SessionTimes
from engine.publish import ChunkPublisher, DecodedChunk


class _Output:
    def __init__(self, fail_at: int | None = None) -> None:
        self.fail_at = fail_at
        self.put: list[int] = []

    def put_chunk(self, frames: np.ndarray, pcm: np.ndarray, first_frame: int) -> None:
        index = int(frames[0, 0, 0, 0])
        if index == self.fail_at:
            raise OSError(f"disk full while writing chunk {index}")
        self.put.append(index)

    def tick(self) -> None:
        pass

    def buffered_s(self) -> float:
        return 1.0


def _session(name: str, output: _Output) -> SimpleNamespace:
    return SimpleNamespace(
        id=name, epoch=0, output=output, times=SessionTimes(), chunks_generated=0, live=True,
        probe=lambda frames, pcm: frames,
    )  # fmt: skip


def _chunk(session: SimpleNamespace, index: int) -> DecodedChunk:
    prepared = SimpleNamespace(pcm=np.zeros(4, np.float32), first_frame=index)
    frames = np.full((1, 2, 2, 3), index, dtype=np.uint8)
    return DecodedChunk(session, prepared, frames, epoch=0, stages={}, deadline_s=0.75)


def test_a_failed_sessions_later_chunks_are_dropped_and_the_other_session_goes_on() -> None:
    broken, healthy = _Output(fail_at=2), _Output()
    a, b = _session("a", broken), _session("b", healthy)
    publisher = ChunkPublisher(None, sessions=lambda: [a, b], depth=16, keeps_frames=False)
    for index in range(5):  # all queued before the thread runs: chunks 3 and 4 follow the failure
        publisher.submit(_chunk(a, index))
        publisher.submit(_chunk(b, index))
    publisher.start()
    assert publisher.wait_idle(5)
    publisher.stop()
    assert broken.put == [0, 1]
    assert healthy.put == [0, 1, 2, 3, 4]
    assert publisher.failures() == [("a", "publishing failed: disk full while writing chunk 2")]
    assert a.chunks_generated == 2 and b.chunks_generated == 5
