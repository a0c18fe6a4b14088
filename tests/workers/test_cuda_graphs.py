"""`--cuda-graphs` (workers/cuda_graphs.py) on the CPU: the start-up refusals, and `StepGraphs`' bookkeeping
with a fake capture that records the pass as a closure over the static buffers and "replays" it by running
it again into the captured output buffer — what a CUDA graph does, minus the GPU. The model's results are
never faked: a replay runs the real model on whatever the static buffers hold, so a pass whose fresh inputs
did not reach the buffers (or whose by-reference tensors moved) gives other latents than eager.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import pytest
import torch

from proto.stream_config import StreamConfig
from server.run_options import parse_run_options
from workers.cuda_graphs import StepGraphs, check_cuda_graphs
from workers.factory import build_score_model
from workers.streaming import StreamingDiT

RUN = ["--image", "i.png", "--audio", "a.wav", "--out", "o.mp4"]


class FakeCapture:
    """`Capture` without a GPU: the output buffer is fn's first result; replay reruns fn into it."""

    def __init__(self, fail: bool = False) -> None:
        self.fail = fail
        self.captured = 0
        self.replayed = 0

    def __call__(self, fn):
        if self.fail:
            raise RuntimeError("operation not permitted when stream is capturing")
        self.captured += 1
        output = fn()

        def replay() -> None:
            self.replayed += 1
            output.copy_(fn())

        return replay, output


def test_cuda_graphs_are_refused_on_a_cpu_and_with_sequence_parallelism():
    with pytest.raises(ValueError, match=r"--cuda-graphs .* needs --device cuda \(the device is cpu\)"):
        check_cuda_graphs("cpu")
    with pytest.raises(ValueError, match=r"one score worker for now \(got --score-workers 2\)"):
        check_cuda_graphs("cuda", score_workers=2)
    check_cuda_graphs("cuda")  # the checks are about the request, not about a GPU being here
    with pytest.raises(ValueError, match="needs --device cuda"):
        parse_run_options([*RUN, "--device", "cpu", "--cuda-graphs"])
    assert not parse_run_options([*RUN, "--device", "cpu"]).cuda_graphs  # off by default
    with pytest.raises(ValueError, match="needs --device cuda"):
        StreamingDiT(build_score_model("tiny"), StreamConfig(height=32, width=32), cuda_graphs=True)


def test_warmup_then_one_capture_then_replays_with_fresh_inputs():
    capture = FakeCapture()
    graphs = StepGraphs(capture, warmup=2)
    weight = torch.randn(4, 4)

    def fn(x, pair):
        return x @ weight + pair[0] * pair[1]

    for _ in range(6):
        x, pair = torch.randn(3, 4), (torch.randn(4), torch.randn(4))
        out = graphs.run(fn, (x, pair), key=("slot", 0))
        assert torch.allclose(out, x @ weight + pair[0] * pair[1], atol=1e-6)
    # calls 1-2 eager, call 3 captures (the fake runs fn to record it) and replays, calls 4-6 replay
    assert capture.captured == 1 and capture.replayed == 4
    assert graphs.stats() == {"graphs": 1, "captures": 1, "replays": 4, "disabled": None}
    out = graphs.run(fn, (torch.randn(3, 4), (torch.randn(4), torch.randn(4))), key=("slot", 0))
    out.add_(1.0)  # the caller gets a copy: the graph's own output buffer is untouched
    assert not torch.equal(out, graphs.entries[next(iter(graphs.entries))].output)


def test_keys_separate_shapes_static_arguments_none_inputs_and_by_reference_addresses():
    graphs = StepGraphs(FakeCapture(), warmup=1)
    a, b = torch.randn(4), torch.randn(4)

    def fn(x, y):
        return x * a if y is None else x * a + y

    for _ in range(2):
        graphs.run(fn, (torch.randn(4), None), by_reference=[a], key=(0,))
        graphs.run(fn, (torch.randn(4), torch.randn(4)), by_reference=[a], key=(0,))  # y present
        graphs.run(fn, (torch.randn(2, 4), None), by_reference=[a], key=(0,))  # another shape
        graphs.run(fn, (torch.randn(4), None), by_reference=[a], key=(1,))  # another offset
        graphs.run(fn, (torch.randn(4), None), by_reference=[b], key=(0,))  # another cache
    assert len(graphs.entries) == 5 and graphs.captures == 5


def test_a_sessions_graphs_are_dropped_and_the_oldest_go_past_the_cap():
    graphs = StepGraphs(FakeCapture(), warmup=1, max_graphs=3)
    first, second = object(), object()
    for key in range(2):
        graphs.run(torch.neg, (torch.randn(2),), key=key, owner=first)
    graphs.run(torch.neg, (torch.randn(2),), key=9, owner=second)
    graphs.drop(first)
    assert len(graphs.entries) == 1
    for key in range(4):
        graphs.run(torch.neg, (torch.randn(2),), key=key, owner=second)
    assert len(graphs.entries) == 3  # key 9 and key 0, the least recently used, went first
    with pytest.raises(ValueError, match="at least 1 eager call"):
        StepGraphs(FakeCapture(), warmup=0)


def test_a_failed_capture_is_logged_once_and_everything_runs_eager(caplog):
    capture = FakeCapture(fail=True)
    graphs = StepGraphs(capture, warmup=1)
    with caplog.at_level(logging.WARNING, logger="workers.cuda_graphs"):
        outs = [graphs.run(torch.neg, (torch.full((2,), float(i)),), key=i % 2) for i in range(6)]
    assert [float(o[0]) for o in outs] == [-float(i) for i in range(6)]
    assert not graphs.enabled and "stream is capturing" in str(graphs.stats()["disabled"])
    assert len([r for r in caplog.records if "capture failed" in r.message]) == 1
    assert not graphs.entries


def _sparse_stream(engine: StreamingDiT, chunks: int, seed: int) -> list[torch.Tensor]:
    cfg, stream = engine.model.config, engine.stream
    gen = torch.Generator().manual_seed(seed)
    state = engine.open_session(
        torch.randn(9, cfg.text_dim, generator=gen), torch.randn(cfg.clip_tokens, cfg.clip_dim, generator=gen)
    )
    out = []
    for i in range(chunks):
        shape = stream.latent_shape(i)
        y = torch.randn(cfg.in_dim - cfg.out_dim, *shape[1:], generator=gen)
        noise = torch.randn(len(engine.timesteps), *shape, generator=gen)
        out.append(engine.denoise_chunk(state, i, y=y, noise=noise))
    engine.close_session(state)
    return out


def test_a_sparse_causal_stream_replayed_from_graphs_equals_eager():
    """Chunks 0 and 1 have keys of their own; from chunk 2 the steady offsets alternate, so chunks 4.. replay.
    Every chunk brings new noise and I2V conditioning, which must reach the static buffers."""
    torch.manual_seed(0)
    model = build_score_model("tiny", seed=1)
    stream = StreamConfig(height=32, width=32, cache_mode="per-step", train_latent_frames=9)
    want = _sparse_stream(StreamingDiT(model, stream), 7, seed=2)
    engine = StreamingDiT(model, stream)
    capture = FakeCapture()
    engine.graphs = StepGraphs(capture, warmup=1)
    got = _sparse_stream(engine, 7, seed=2)
    for a, b in zip(got, want, strict=True):
        assert torch.allclose(a, b, atol=1e-6)  # the same ops on the same values: equal up to reordering
    steps = len(engine.timesteps)
    assert capture.captured == 2 * steps  # (even, odd) steady offsets x one slot per step
    assert capture.replayed >= 2 * steps
    assert not engine.graphs.entries  # close_session dropped the session's graphs


def test_a_convkv_stream_with_audio_guidance_replayed_from_graphs_equals_eager():
    """LiveAct's window: the memory update runs outside the graph, the audio and null-audio passes of a step
    use graphs of their own (v and v_null are both alive when CFG combines them)."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "oracles"))
    from test_liveact_equivalence import engine_rollout, rollout_stream
    from test_streaming_convkv import liveact_model, random_inputs

    model, inputs = liveact_model(), random_inputs(chunks=4)  # chunk 1 warms up, 2 captures, 3 replays
    want, _ = engine_rollout(StreamingDiT(model, rollout_stream(2.0)), inputs, 4)
    engine = StreamingDiT(model, rollout_stream(2.0))
    capture = FakeCapture()
    engine.graphs = StepGraphs(capture, warmup=1)
    got, _ = engine_rollout(engine, inputs, 4)
    for a, b in zip(got, want, strict=True):
        assert torch.allclose(a, b, atol=1e-6)
    passes = engine.passes_per_chunk  # 3 steps + 2 null-audio passes, each on a slot of its own
    assert capture.captured == passes and capture.replayed == 2 * passes
