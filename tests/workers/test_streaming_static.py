"""The static score step: float32 RoPE tables, keys stored rotated in one preallocated view, the window's
previous-chunk shift, audio projected once per chunk, and `compile=True` against eager.

The reference is the engine as it was before the static step, kept here: Wan's float64 RoPE applied at use
to un-rotated cached keys (`WanModel.forward` with `prefix_kv`), the prefix concatenated per block, the audio
projected every pass. The streams run past the end of a short training clip (window positions, T = 9 latent
frames), so the previous chunk's stored keys are moved back by the window shift from chunk 3 on.
"""

import shutil

import pytest
import torch

from proto.model_config import get_model_preset
from proto.stream_config import StreamConfig
from workers.audio import AudioConditioning
from workers.model import WanModel
from workers.sampler import denoising_schedule, predict_x0, renoise
from workers.streaming import StreamingDiT

pytestmark = pytest.mark.equality

CFG = get_model_preset("tiny")
A = CFG.audio
CHUNKS, F, LAT = 6, 3, 8
# float32 RoPE tables vs Wan's float64 rotation, ring order vs c_0, c_{t−1}, c_t: observed 1.7e-6
ATOL = 1e-5
COMPILE_ATOL = 1e-5  # inductor reorders float32 math (observed up to 1.9e-6 on an Intel Xeon, 5 chunks)


def _inputs(seed: int) -> dict:
    gen = torch.Generator().manual_seed(seed)
    return {
        "context": torch.randn(9, CFG.text_dim, generator=gen),
        "clip_fea": torch.randn(CFG.clip_tokens, CFG.clip_dim, generator=gen),
        "chunks": [
            {
                "y": torch.randn(20, F, LAT, LAT, generator=gen),
                "noise": torch.randn(2, 16, F, LAT, LAT, generator=gen),
                "audio": AudioConditioning(
                    features=torch.randn(
                        1, 1, F + A.window - 1, A.frames_per_latent, A.wav2vec_layers, A.wav2vec_dim,
                        generator=gen,
                    ),
                    speaking=torch.ones(1, 1, F, dtype=torch.bool),
                    face_mask=(torch.rand(1, 1, F * 16, generator=gen) > 0.3).float(),
                ),
            }
            for _ in range(CHUNKS)
        ],
    }


def _stream(engine: StreamingDiT, inputs: dict) -> list[torch.Tensor]:
    state = engine.open_session(inputs["context"], inputs["clip_fea"])
    return [engine.denoise_chunk(state, i, **chunk) for i, chunk in enumerate(inputs["chunks"])]


@torch.no_grad()
def _reference_stream(model: WanModel, stream: StreamConfig, inputs: dict) -> list[torch.Tensor]:
    """The float64, rotate-at-use engine: un-rotated keys/values of c_0 and c_{t−1} per slot, captured from
    each block's k norm and v projection, prepended through `prefix_kv` with their window positions."""
    timesteps, sigmas = denoising_schedule(
        stream.denoising_steps, stream.timestep_shift, stream.warp_denoising_steps
    )
    per_step = stream.cache_mode == "per-step"
    engine = StreamingDiT(model, stream)  # for chunk_positions only
    cross_kv = model.cross_attention_kv(inputs["context"][None], inputs["clip_fea"][None])
    heads = (CFG.num_heads, CFG.head_dim)
    captured: list[list[torch.Tensor]] = [[None, None] for _ in model.blocks]  # type: ignore[misc]
    hooks = []
    for i, block in enumerate(model.blocks):
        for j, layer in enumerate((block.self_attn.norm_k, block.self_attn.v)):
            hooks.append(
                layer.register_forward_hook(
                    lambda _m, _i, out, i=i, j=j: captured[i].__setitem__(j, out.unflatten(-1, heads))
                )
            )
    first: dict[int, list] = {}
    previous: dict[int, list] = {}
    outs = []
    try:
        for c, chunk in enumerate(inputs["chunks"]):
            current, context_pos = engine.chunk_positions(c)

            def forward(x, t, slot, c=c, chunk=chunk, current=current, context_pos=context_pos):
                prefix = None
                if c == 1:
                    prefix = first[slot]
                elif c > 1:
                    prefix = [
                        (torch.cat([a[0], b[0]], 1), torch.cat([a[1], b[1]], 1))
                        for a, b in zip(first[slot], previous[slot], strict=True)
                    ]
                v = model(
                    x[None],
                    torch.tensor([t], dtype=torch.float64),
                    cross_kv=cross_kv,
                    y=chunk["y"][None],
                    audio=chunk["audio"],
                    frame_positions=current,
                    prefix_kv=prefix,
                    prefix_frame_positions=context_pos,
                )[0]
                kvs = [(k, v_) for k, v_ in captured]
                return v, kvs

            noise = chunk["noise"]
            x = noise[0]
            stored = {}
            for s, (t, sigma) in enumerate(zip(timesteps, sigmas, strict=True)):
                v, kvs = forward(x, t, s if per_step else 0)
                x0 = predict_x0(x, v, sigma)
                if per_step:
                    stored[s] = kvs
                if s + 1 < len(timesteps):
                    x = renoise(x0, sigmas[s + 1], noise[s + 1])
            if not per_step:
                stored[0] = forward(x0, 0.0, 0)[1]
            previous.update(stored)
            if c == 0:
                first.update(stored)
            outs.append(x0)
    finally:
        for h in hooks:
            h.remove()
    return outs


@pytest.mark.parametrize("cache_mode", ["per-step", "clean-context"])
def test_static_step_equals_the_float64_rotate_at_use_engine_past_the_window(model, cache_mode):
    stream = StreamConfig(height=64, width=64, cache_mode=cache_mode, train_latent_frames=9)
    engine = StreamingDiT(model, stream)
    assert [engine.previous_shift(c) for c in range(CHUNKS)] == [0, 0, 0, -3, -3, -3]
    inputs = _inputs(1)
    got = _stream(engine, inputs)
    want = _reference_stream(model, stream, inputs)
    diffs = [float((a - b).abs().max()) for a, b in zip(got, want, strict=True)]
    assert max(diffs) <= ATOL, diffs
    assert all(float(x.abs().max()) > 0 for x in got)


def test_rope_tables_are_float32_and_built_once_per_position(model):
    stream = StreamConfig(height=64, width=64, train_latent_frames=9)
    engine = StreamingDiT(model, stream)
    state = engine.open_session(torch.zeros(4, CFG.text_dim), torch.zeros(CFG.clip_tokens, CFG.clip_dim))
    assert set(engine._rope_tables) == {("chunk", 0), ("chunk", 3), ("chunk", 6)}
    assert all(t.dtype == torch.float32 for table in engine._rope_tables.values() for t in table)
    assert len(state.time_emb) == 2 and state.time_emb[0][1].shape == (1, F, 6, CFG.dim)


def test_the_audio_is_projected_once_per_chunk(model):
    stream = StreamConfig(height=64, width=64, cache_mode="clean-context")
    engine = StreamingDiT(model, stream)
    calls = []
    hooks = [
        model.audio_proj.register_forward_hook(lambda *_: calls.append("proj")),
        model.blocks[0].cross_attn.k_audio.register_forward_hook(lambda *_: calls.append("k")),
    ]
    try:
        _stream(engine, {**_inputs(2), "chunks": _inputs(2)["chunks"][:2]})
    finally:
        for h in hooks:
            h.remove()
    assert calls == ["proj", "k"] * 2  # 3 passes a chunk, one projection


@pytest.mark.skipif(
    shutil.which("gcc") is None and shutil.which("cc") is None,
    reason="torch.compile (inductor) on CPU needs a C compiler",
)
def test_compiled_blocks_equal_eager(model):
    stream = StreamConfig(height=64, width=64, train_latent_frames=9)
    inputs = {**_inputs(3), "chunks": _inputs(3)["chunks"][:5]}
    eager = _stream(StreamingDiT(model, stream), inputs)
    compiled = _stream(StreamingDiT(model, stream, compile=True), inputs)
    diffs = [float((a - b).abs().max()) for a, b in zip(compiled, eager, strict=True)]
    assert max(diffs) <= COMPILE_ATOL, diffs
