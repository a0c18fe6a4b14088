"""``serve``'s engine with ``--degrade steps``: a session whose playout buffer falls short of a full chunk's
(slow) latency gets reduced-step chunks, holds that choice inside the hysteresis band, returns to full once
its buffer recovers, and the metrics and the session's status count it. The executor is scripted (every
chunk reports 2 s of scoring, the injected slow stage) and so is the playout buffer; no wall-clock timing."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import torch

from engine.chunks import SessionTimes
from engine.degrade import DegradeConfig
from engine.executor import ScoredChunk
from proto.api import SessionState
from proto.model_config import get_model_preset
from proto.stream_config import StreamConfig
from proto.wire import ChunkRequest
from server.live_backend import LiveBackend, LiveConfig
from server.metrics import Metrics
from server.session_registry import Entry
from server.speech_feed import SpeechFeed

STREAM = StreamConfig(height=32, width=32)  # steps (1000, 500); chunks after the first last 0.75 s
SLOW_SCORE_S = 2.0


class _Executor:
    def __init__(self) -> None:
        self.submitted: list[tuple[int, tuple[int, ...]]] = []

    def submit(self, request: ChunkRequest, tensors) -> None:
        self.submitted.append((request.chunk_index, request.step_indices))

    def collect(self, request: ChunkRequest) -> ScoredChunk:
        latent = torch.zeros(1)
        return ScoredChunk(request, latent, score_s=SLOW_SCORE_S, roundtrip_s=SLOW_SCORE_S + 0.01)


class _Output:
    """The playout buffer is what the test says it is."""

    end_reason = None

    def __init__(self) -> None:
        self.buffer_s = 0.0

    def put_chunk(self, frames: np.ndarray, pcm: np.ndarray, first_frame: int) -> None:
        pass

    def tick(self) -> None:
        pass

    def buffered_s(self) -> float:
        return self.buffer_s

    def close(self) -> None:
        pass


class _Session(SimpleNamespace):
    @property
    def live(self) -> bool:
        return self.state in (SessionState.starting, SessionState.running)


def _session() -> _Session:
    counter = iter(range(1000))

    def prepare_chunk() -> SimpleNamespace:
        request = ChunkRequest("a", next(counter), ((True,) * 3,), noise_seed=0)
        return SimpleNamespace(request=request, tensors={}, pcm=np.zeros(12_000, np.float32), first_frame=0)

    decoder = SimpleNamespace(decode_chunk=lambda latent: torch.zeros((12, 2, 2, 3), dtype=torch.uint8))
    return _Session(
        id="a",
        epoch=0,
        state=SessionState.running,
        reason=None,
        output=_Output(),
        decoder=decoder,
        chunks_generated=0,
        times=SessionTimes(),
        feed=SpeechFeed([], [], fps=16),  # no featurizer: no chunk is prepared here
        prepare_chunk=prepare_chunk,
        probe=lambda frames, pcm: frames,
    )


def _degraded_series(metrics: Metrics) -> tuple[float | None, float | None]:
    chunks = metrics.registry.get_sample_value("tm_degraded_chunks_total", {"mode": "steps"})
    return chunks, metrics.registry.get_sample_value("tm_degraded_sessions")


def test_a_late_session_drops_to_fewer_steps_and_comes_back_with_hysteresis() -> None:
    degrade = DegradeConfig(mode="steps", steps=1, enter_s=0.0, leave_s=0.25)
    config = LiveConfig(model=get_model_preset("tiny"), stream=STREAM, ahead_s=100.0, degrade=degrade)
    executor, metrics, session = _Executor(), Metrics(), _session()
    backend = LiveBackend(config, executor, vae=None, encoders=None, metrics=metrics, warm_up=False)  # type: ignore[arg-type]
    backend.sessions.add(Entry(session, [], None))  # type: ignore[arg-type]
    engine = backend.engine.chunks
    backend.engine.publisher.start()
    try:
        engine.turn()  # prepares chunk 0 (never degraded) and chunk 1 (no full chunk measured yet): full
        # Turn k prepares chunk k with chunk k - 1 in flight: slack = buffer + 0.75 − ~2.01 (a full chunk).
        # buffer 0 → −1.26 (degrade), 1.3 → +0.04 (inside the band: hold), 1.6 → +0.34 (> 0.25: full),
        # 1.0 → −0.26 (degrade).
        buffers = [0.0, 1.3, 1.6, 1.3, 1.0, 1.3, 1.6]
        gauges = []
        for buffer in buffers:
            session.output.buffer_s = buffer
            engine.turn()
            gauges.append(_degraded_series(metrics)[1])
        engine.turn()
        assert backend.engine.publisher.wait_idle(5)
    finally:
        backend.engine.publisher.stop()
    steps = dict(executor.submitted)
    assert [steps[i] for i in range(9)] == [(), (), (0,), (0,), (), (), (0,), (0,), ()]
    assert gauges == [1.0, 1.0, 0.0, 0.0, 1.0, 1.0, 0.0]
    assert _degraded_series(metrics)[0] == 4.0
    info = backend.sessions.info("a")
    assert info.degraded_chunks == 4 and info.degraded is False
    assert session.times.degrade.last_slack_s is not None and session.times.degrade.last_slack_s > 0.25


def test_off_never_degrades_however_late() -> None:
    config = LiveConfig(model=get_model_preset("tiny"), stream=STREAM, ahead_s=100.0)
    executor, metrics, session = _Executor(), Metrics(), _session()
    backend = LiveBackend(config, executor, vae=None, encoders=None, metrics=metrics, warm_up=False)  # type: ignore[arg-type]
    backend.sessions.add(Entry(session, [], None))  # type: ignore[arg-type]
    backend.engine.publisher.start()
    try:
        for _ in range(5):
            backend.engine.chunks.turn()
    finally:
        backend.engine.publisher.stop()
    assert {steps for _, steps in executor.submitted} == {()}
    assert _degraded_series(metrics) == (0.0, 0.0)
