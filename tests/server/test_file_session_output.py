"""FileSessionOutput: frames are written at their playout time, by pumps (engine ticks, arriving chunks) that
may overlap, never by the API's status reads (``buffered_s``), which only read."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import av
import numpy as np

from server.session_outputs import FileSessionOutput, PlayoutHooks

SIZE, FPS, SPF = 32, 16, 1000


def _frames(first: int, count: int) -> np.ndarray:
    """Frames whose grey level encodes their index (4 levels apart, so H.264 keeps them apart)."""
    levels = (np.arange(first, first + count) * 4 % 256).astype(np.uint8)
    return np.broadcast_to(levels[:, None, None, None], (count, SIZE, SIZE, 3)).copy()


class _Readers:
    """`count` threads calling `out.tick()` and `out.buffered_s()` as fast as they can (pumps that overlap,
    and the status reads of GET /v1/sessions/{id})."""

    def __init__(self, out: FileSessionOutput, count: int) -> None:
        self.out, self.stop, self.errors = out, threading.Event(), []
        self.threads = [threading.Thread(target=self._run) for _ in range(count)]
        for thread in self.threads:
            thread.start()

    def _run(self) -> None:
        try:
            while not self.stop.is_set():
                self.out.tick()
                self.out.buffered_s()
        except BaseException as exc:
            self.errors.append(exc)

    def join(self) -> list[BaseException]:
        self.stop.set()
        for thread in self.threads:
            thread.join()
        return self.errors


def test_concurrent_pumps_write_every_frame_once_and_in_order(tmp_path: Path) -> None:
    played: list[int] = []
    hooks = PlayoutHooks(on_frame=played.append, on_clear=lambda index: None)
    out = FileSessionOutput(tmp_path / "call.mp4", SIZE, SIZE, FPS, hooks)
    # A write slower than a frame's 62.5 ms (a loaded machine): the next frame comes due while it runs.
    original, active, peak, count_lock = out.publisher.write, [0], [0], threading.Lock()

    def slow_write(frames: np.ndarray, audio: np.ndarray) -> None:
        with count_lock:
            active[0] += 1
            peak[0] = max(peak[0], active[0])
        try:
            time.sleep(0.15)
            original(frames, audio)
        finally:
            with count_lock:
                active[0] -= 1

    out.publisher.write = slow_write  # type: ignore[method-assign]
    readers = _Readers(out, 4)
    chunks, per_chunk = 12, 12
    try:
        for chunk in range(chunks):
            first = chunk * per_chunk
            out.put_chunk(_frames(first, per_chunk), np.zeros(per_chunk * SPF, np.float32), first)
            time.sleep(per_chunk / FPS / 8)  # 8x faster than playout: frames queue, readers write them
        deadline = time.monotonic() + 30
        while len(played) < chunks * per_chunk and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        errors = readers.join()
        out.close()
    assert errors == []
    assert peak[0] == 1  # one writer at a time
    total = chunks * per_chunk
    assert sorted(played) == list(range(total))
    with av.open(str(tmp_path / "call.mp4")) as container:
        levels = [int(np.median(f.to_ndarray(format="rgb24"))) for f in container.decode(video=0)]
    assert len(levels) == total
    expected = (np.arange(total) * 4 % 256).astype(int)
    assert np.abs(np.asarray(levels) - expected).max() <= 2  # every frame once, in order


def test_close_while_readers_pump_leaves_a_playable_file(tmp_path: Path) -> None:
    hooks = PlayoutHooks(on_frame=lambda index: None, on_clear=lambda index: None)
    out = FileSessionOutput(tmp_path / "call.mp4", SIZE, SIZE, FPS, hooks)
    out.put_chunk(_frames(0, 24), np.zeros(24 * SPF, np.float32), 0)
    readers = _Readers(out, 3)
    time.sleep(0.3)
    out.close()  # the session ends while status reads go on
    time.sleep(0.1)
    assert readers.join() == []
    with av.open(str(tmp_path / "call.mp4")) as container:
        assert len(list(container.decode(video=0))) >= 1


def test_status_reads_write_nothing(tmp_path: Path) -> None:
    played: list[int] = []
    hooks = PlayoutHooks(on_frame=played.append, on_clear=lambda index: None)
    out = FileSessionOutput(tmp_path / "call.mp4", SIZE, SIZE, FPS, hooks)
    out.put_chunk(_frames(0, 24), np.zeros(24 * SPF, np.float32), 0)  # frame 0 is due at once
    written = len(played)
    time.sleep(0.3)  # ~5 more frames come due
    before = out.buffered_s()
    for _ in range(50):
        out.buffered_s()
    assert len(played) == written  # reading the buffer played nothing
    assert 0 < before < 24 / FPS  # but it counts the due frames as played
    out.tick()  # the engine's tick writes them
    assert len(played) >= written + 4
    out.close()
