"""Endless streams: window positions, constant cache memory, pass counts and the session contract."""

import pytest
import torch

from proto.model_config import get_model_preset
from proto.stream_config import StreamConfig
from workers.model import WanModel
from workers.streaming import StreamingDiT

pytestmark = pytest.mark.equality  # tests/test_cpu_matrix.py reruns these at 2 threads and on AVX2

CFG = get_model_preset("tiny")
STREAM = StreamConfig(height=64, width=64)


@pytest.fixture(scope="module")
def model() -> WanModel:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    m = WanModel(CFG)
    m.init_weights(zero_head=False)
    return m.eval()


@pytest.fixture(scope="module")
def session_inputs() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    return {
        "context": torch.randn(8, CFG.text_dim, generator=gen),
        "clip_fea": torch.randn(CFG.clip_tokens, CFG.clip_dim, generator=gen),
        "y": torch.randn(20, 3, 8, 8, generator=gen),
    }


def _positions(engine: StreamingDiT, chunk: int) -> tuple[list[int], list[int] | None]:
    current, context = engine.chunk_positions(chunk)
    return current.tolist(), None if context is None else context.tolist()


def test_window_positions_follow_the_training_clip_then_stay_at_its_last_chunk(model):
    engine = StreamingDiT(model, STREAM)
    assert _positions(engine, 0) == ([0, 1, 2], None)
    assert _positions(engine, 1) == ([3, 4, 5], [0, 1, 2])
    assert _positions(engine, 6) == ([18, 19, 20], [0, 1, 2, 15, 16, 17])
    assert _positions(engine, 7) == ([18, 19, 20], [0, 1, 2, 15, 16, 17])
    assert _positions(engine, 60) == ([18, 19, 20], [0, 1, 2, 15, 16, 17])


def test_absolute_positions_are_true_frame_indices(model):
    engine = StreamingDiT(model, StreamConfig(height=64, width=64, position_mode="absolute"))
    assert _positions(engine, 60) == ([180, 181, 182], [0, 1, 2, 177, 178, 179])


def test_chunk_60_is_finite_and_the_cache_never_grows(model, session_inputs):
    engine = StreamingDiT(model, STREAM)
    state = engine.open_session(session_inputs["context"], session_inputs["clip_fea"])
    gen = torch.Generator().manual_seed(2)
    bytes_at_3 = pointer_at_3 = None
    for chunk in range(61):
        x0 = engine.denoise_chunk(state, chunk, y=session_inputs["y"], generator=gen)
        if chunk == 3:
            bytes_at_3, pointer_at_3 = state.nbytes, state.cache.k.data_ptr()
    assert bool(torch.isfinite(x0).all()) and x0.abs().max() > 0
    assert state.nbytes == bytes_at_3
    assert state.cache.k.data_ptr() == pointer_at_3
    # Two slots (steps) × {c_0, ring of two: c_{t−1} and c_t} × k and v, per block, float32.
    assert state.cache.nbytes == CFG.num_layers * 2 * 3 * 2 * STREAM.tokens_per_chunk * CFG.dim * 4


@pytest.mark.parametrize(("cache_mode", "passes"), [("per-step", 2), ("clean-context", 3)])
def test_forward_passes_per_chunk(model, session_inputs, cache_mode, passes):
    engine = StreamingDiT(model, StreamConfig(height=64, width=64, cache_mode=cache_mode))
    state = engine.open_session(session_inputs["context"], session_inputs["clip_fea"])
    calls = []
    handle = model.head.register_forward_hook(lambda *_: calls.append(1))  # the head runs once a pass
    try:
        for chunk in range(3):
            engine.denoise_chunk(
                state, chunk, y=session_inputs["y"], generator=torch.Generator().manual_seed(chunk)
            )
    finally:
        handle.remove()
    assert len(calls) == 3 * passes == 3 * engine.passes_per_chunk


def test_chunks_must_come_in_order(model, session_inputs):
    engine = StreamingDiT(model, STREAM)
    state = engine.open_session(session_inputs["context"], session_inputs["clip_fea"])
    with pytest.raises(ValueError, match="chunk 1 requested but the session expects chunk 0"):
        engine.denoise_chunk(state, 1, y=session_inputs["y"])


def test_reset_replays_the_stream_identically(model, session_inputs):
    engine = StreamingDiT(model, STREAM)
    state = engine.open_session(session_inputs["context"], session_inputs["clip_fea"])
    noise = torch.randn(2, 2, *STREAM.latent_chunk_shape, generator=torch.Generator().manual_seed(3))
    first = [engine.denoise_chunk(state, i, y=session_inputs["y"], noise=noise[i]) for i in range(2)]
    engine.reset_session(state)
    again = [engine.denoise_chunk(state, i, y=session_inputs["y"], noise=noise[i]) for i in range(2)]
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))


def test_wrong_noise_shape_names_the_expected_one(model, session_inputs):
    engine = StreamingDiT(model, STREAM)
    state = engine.open_session(session_inputs["context"], session_inputs["clip_fea"])
    with pytest.raises(ValueError, match=r"expected \[steps, 16, F, h, w\] = \(2, 16, 3, 8, 8\)"):
        engine.denoise_chunk(state, 0, y=session_inputs["y"], noise=torch.zeros(1, 16, 3, 8, 8))
