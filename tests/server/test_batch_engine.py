"""``engine.batching.BatchChunkEngine`` in ``serve``'s engine thread (``--max-batch-sessions``): due
sessions' chunks go out as one batch once a chunk's cost is measured, and each session's chunks are decoded
and published in order as alone. Scripted executor, decoder and outputs (as in
tests/server/test_live_engine_pipeline.py)."""

from __future__ import annotations

import pytest
from test_live_engine_pipeline import STREAM, _Executor, _Log, _session, _turns

from engine.batching import BatchChunkEngine
from proto.model_config import get_model_preset
from server.live_backend import LiveBackend, LiveConfig
from server.metrics import Metrics
from server.session_registry import Entry


class _BatchExecutor(_Executor):
    def submit_batch(self, requests, tensors) -> None:
        self.log.add("submit_batch " + ",".join(f"{r.session_id}{r.chunk_index}" for r in requests))


def _backend(log: _Log, *sessions, executor=None, max_batch: int = 2) -> LiveBackend:
    config = LiveConfig(
        model=get_model_preset("tiny"), stream=STREAM, ahead_s=100.0, max_batch_sessions=max_batch
    )
    backend = LiveBackend(
        config,
        executor or _BatchExecutor(log),
        vae=None,  # type: ignore[arg-type]
        encoders=None,  # type: ignore[arg-type]
        metrics=Metrics(),
        warm_up=False,
    )
    for s in sessions:
        backend.sessions.add(Entry(s, [], None))  # type: ignore[arg-type]
    backend.engine.publisher.start()
    return backend


def test_two_due_sessions_go_out_as_one_batch_once_a_chunk_was_measured() -> None:
    log = _Log()
    a, b = _session(log, "a"), _session(log, "b")
    backend = _backend(log, a, b)
    engine = backend.engine.chunks
    assert isinstance(engine, BatchChunkEngine)
    _turns(backend, 5)
    backend.engine.publisher.stop()
    submits = [e for e in log if e.startswith("submit")]
    # No cost known yet: a0, then b0 alone (prepared before a0 was decoded); then both together.
    assert submits[:2] == ["submit a0", "submit b0"]
    # (in a batch the most urgent goes first: the order changes with the buffers)
    batches = [sorted(e.removeprefix("submit_batch ").split(",")) for e in submits[2:5]]
    assert batches == [["a1", "b1"], ["a2", "b2"], ["a3", "b3"]]
    assert engine.batch_sizes[:5] == [1, 1, 2, 2, 2]
    assert engine.costs.means.keys() == {1, 2}
    # Each session's chunks decoded and published in order, as alone.
    for s in (a, b):
        assert s.output.frames[:48] == [0] * 12 + [1] * 12 + [2] * 12 + [3] * 12
        assert s.chunks_generated >= 4


def test_max_batch_sessions_one_is_the_plain_engine() -> None:
    log = _Log()
    backend = _backend(log, _session(log, "a"), _session(log, "b"), max_batch=1)
    assert type(backend.engine.chunks).__name__ == "ChunkEngine"
    _turns(backend, 4)
    backend.engine.publisher.stop()
    assert not [e for e in log if e.startswith("submit_batch")]


def test_an_executor_that_cannot_batch_is_refused_by_name() -> None:
    log = _Log()
    with pytest.raises(
        ValueError, match=r"--max-batch-sessions 2: the executor _Executor cannot score batches"
    ):
        _backend(log, executor=_Executor(log))


def test_max_batch_sessions_is_a_validated_group_option_off_by_default(tmp_path) -> None:
    from server.serve import parse_serve_options

    config = tmp_path / "serve.toml"
    config.write_text('[api]\napi_key = "k"\n')
    argv = ["--config", str(config), "--device", "cpu"]
    assert parse_serve_options(argv).max_batch_sessions == 1
    assert parse_serve_options([*argv, "--max-batch-sessions", "3"]).max_batch_sessions == 3
    with pytest.raises(ValueError, match=r"--max-batch-sessions must be an integer >= 1 .*got 0"):
        parse_serve_options([*argv, "--max-batch-sessions", "0"])
