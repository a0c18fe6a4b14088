"""``ChunkEngine`` with an executor that holds two chunks (``max_in_flight``, the step pipeline's): chunk
t + 1 goes out before chunk t is collected, never more than two are out, results are taken in order and every
chunk is published once; an executor without the attribute keeps one in flight."""

from __future__ import annotations

from collections.abc import Mapping

import pytest
import torch

from benchmarks.step_pipeline import BlankDecoder, NoSink, RandomRequests
from engine.executor import ScoredChunk
from engine.file_stream import RunSession, run_stream
from engine.stats import StreamStats
from proto.model_config import get_model_preset
from proto.stream_config import StreamConfig
from proto.wire import ChunkRequest, SessionClose, SessionOpen

STREAM = StreamConfig(height=32, width=32)
CHUNKS = 7


class _Recorder:
    """An executor that scores instantly and records what is out."""

    def __init__(self, depth: int | None) -> None:
        if depth is not None:
            self.max_in_flight = depth
        self.out: list[int] = []
        self.log: list[tuple[str, int, int]] = []  # (event, chunk, chunks out after it)
        self.most_out = 0

    def open_session(self, message: SessionOpen, tensors: Mapping[str, torch.Tensor]) -> None:
        pass

    def submit(self, request: ChunkRequest, tensors: Mapping[str, torch.Tensor]) -> None:
        self.out.append(request.chunk_index)
        self.most_out = max(self.most_out, len(self.out))
        self.log.append(("submit", request.chunk_index, len(self.out)))

    def collect(self, request: ChunkRequest) -> ScoredChunk:
        assert self.out[0] == request.chunk_index, (self.out, request.chunk_index)  # oldest first
        self.out.pop(0)
        self.log.append(("collect", request.chunk_index, len(self.out)))
        latent = torch.zeros(STREAM.latent_shape(request.chunk_index))
        return ScoredChunk(request, latent, score_s=0.0, roundtrip_s=0.0)

    def close_session(self, message: SessionClose) -> None:
        pass

    def shutdown(self, reason: str) -> None:
        pass


@pytest.mark.parametrize(("depth", "most"), [(2, 2), (3, 3), (None, 1)])
def test_the_engine_keeps_as_many_chunks_in_flight_as_the_executor_holds(
    depth: int | None, most: int
) -> None:
    executor = _Recorder(depth)
    session = RunSession(
        RandomRequests(get_model_preset("tiny"), STREAM, CHUNKS, seed=0), BlankDecoder(STREAM), NoSink()
    )
    stats = StreamStats("test", STREAM.chunk_duration_s(1))
    run_stream(executor, session, STREAM, stats, overlap=True, device=torch.device("cpu"))
    assert executor.most_out == most
    assert executor.out == []
    assert [c.chunk_index for c in stats.chunks] == list(range(CHUNKS))
    if most > 1:  # chunk 1 went out before chunk 0 came back
        assert executor.log[:2] == [("submit", 0, 1), ("submit", 1, 2)]
