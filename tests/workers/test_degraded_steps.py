"""Degraded chunks (engine.degrade) on the score side: a chunk that runs a subset of the denoising steps
equals the same chunk under a schedule made of that subset (same noise slabs), the skipped per-step cache
slots are filled by the nearest-σ rule, the next full chunk equals an uncached reference of that rule, and a
bad subset is refused on the wire before anything runs."""

import pytest
import torch

from proto.chunk_specs import chunk_noise
from proto.model_config import get_model_preset
from proto.stream_config import StreamConfig
from proto.wire import ChunkRequest, SessionOpen, TensorSpec, WireError
from workers.model import WanModel
from workers.score_rank import ScoreRank
from workers.streaming import StreamingDiT

CFG = get_model_preset("tiny")
F, LAT = 3, 8  # 64 x 64 px: 3 latent frames of 8 x 8 a chunk
TOL = 1e-5


def _stream(steps: tuple[int, ...], cache_mode: str = "per-step") -> StreamConfig:
    return StreamConfig(height=64, width=64, denoising_steps=steps, cache_mode=cache_mode)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def inputs() -> dict:
    gen = torch.Generator().manual_seed(3)
    return {
        "noise": [torch.randn(3, 16, F, LAT, LAT, generator=gen) for _ in range(3)],  # 3 chunks, 3 slabs each
        "y": [torch.randn(20, F, LAT, LAT, generator=gen) for _ in range(3)],
        "context": torch.randn(9, CFG.text_dim, generator=gen),
        "clip_fea": torch.randn(CFG.clip_tokens, CFG.clip_dim, generator=gen),
    }


def _chunk(engine: StreamingDiT, state, i: int, inputs: dict, slabs: list[int], steps=()) -> torch.Tensor:
    noise = inputs["noise"][i][slabs]
    return engine.denoise_chunk(state, i, y=inputs["y"][i], noise=noise, steps=steps)


def test_a_one_step_chunk_equals_the_chunk_of_a_one_step_schedule(model: WanModel, inputs: dict):
    """(1000, 500) with chunk 1 on step 0 only = the (1000,) schedule's chunk 1: both see chunk 0's step-0
    keys (pure noise at t = 1000, the same in both) and predict x0 from the same noise slab."""
    full = StreamingDiT(model, _stream((1000, 500)))
    state = full.open_session(inputs["context"], inputs["clip_fea"])
    _chunk(full, state, 0, inputs, [0, 1])
    degraded = _chunk(full, state, 1, inputs, [0, 1], steps=(0,))

    one = StreamingDiT(model, _stream((1000,)))
    ref_state = one.open_session(inputs["context"], inputs["clip_fea"])
    _chunk(one, ref_state, 0, inputs, [0])
    reference = _chunk(one, ref_state, 1, inputs, [0])
    assert (degraded - reference).abs().max() <= TOL
    full_chunk = StreamingDiT(model, _stream((1000, 500)))
    other = full_chunk.open_session(inputs["context"], inputs["clip_fea"])
    _chunk(full_chunk, other, 0, inputs, [0, 1])
    assert (degraded - _chunk(full_chunk, other, 1, inputs, [0, 1])).abs().max() > 1e-3  # it did skip a step


def test_a_subset_of_three_steps_equals_the_schedule_of_that_subset(model: WanModel, inputs: dict):
    """(1000, 750, 500) on steps (0, 2) = the (1000, 500) schedule (warping maps each nominal step on its
    own, so both feed the network the same timesteps), re-noised with slabs 0 and 2; chunks 0 and 1 both
    degraded."""
    full = StreamingDiT(model, _stream((1000, 750, 500)))
    state = full.open_session(inputs["context"], inputs["clip_fea"])
    sub = StreamingDiT(model, _stream((1000, 500)))
    assert sub.timesteps == (full.timesteps[0], full.timesteps[2])
    ref_state = sub.open_session(inputs["context"], inputs["clip_fea"])
    for i in range(2):
        degraded = _chunk(full, state, i, inputs, [0, 1, 2], steps=(0, 2))
        reference = _chunk(sub, ref_state, i, inputs, [0, 2])
        assert (degraded - reference).abs().max() <= TOL


def test_skipped_slots_take_the_nearest_executed_pass_and_the_next_full_chunk_follows_that_rule(
    model: WanModel, inputs: dict
):
    """After chunk 1 ran step 0 of (1000, 500), slot 1 holds chunk 1's step-0 keys; chunk 2 (full) then equals
    an uncached forward in which chunk 2's pass s sees c_0 at step s and c_1 as its step-0 pass wrote it."""
    engine = StreamingDiT(model, _stream((1000, 500)))
    state = engine.open_session(inputs["context"], inputs["clip_fea"])
    _chunk(engine, state, 0, inputs, [0, 1])
    _chunk(engine, state, 1, inputs, [0, 1], steps=(0,))
    cache = state.cache
    span = slice(cache.write_offset(1), cache.write_offset(1) + cache.tokens)
    assert torch.equal(cache.k[:, 1, :, span], cache.k[:, 0, :, span])
    assert torch.equal(cache.v[:, 1, :, span], cache.v[:, 0, :, span])
    streamed = _chunk(engine, state, 2, inputs, [0, 1])
    assert torch.isfinite(streamed).all()
    assert (streamed - _fill_rule_reference(model, engine, inputs)).abs().max() <= TOL


@torch.no_grad()
def _fill_rule_reference(model: WanModel, engine: StreamingDiT, inputs: dict) -> torch.Tensor:
    """Chunk 2's x0 by uncached forwards (float64 RoPE, explicit masks, per-frame timesteps). Chunk 0 ran
    both steps, chunk 1 step 0 only, chunk 2 both; chunk 2's pass s attends to [c_0 at step s, c_1 at step 0
    (which itself attended to c_0 at step 0), itself]."""
    t, sigma = engine.timesteps, engine.sigmas
    n0, n1, n2 = (inputs["noise"][i] for i in range(3))
    y0, y1, y2 = inputs["y"]
    cross_kv = model.cross_attention_kv(inputs["context"][None], inputs["clip_fea"][None])

    def velocity(segments: list[tuple[torch.Tensor, float, torch.Tensor, int]], mask: list[list[int]]):
        """Velocity of the last segment; segments (x, t, y, first position), mask[q] = the segments q sees."""
        x = torch.cat([s[0] for s in segments], dim=1)[None]
        tt = torch.cat([torch.full((F,), s[1], dtype=torch.float64) for s in segments])[None]
        yy = torch.cat([s[2] for s in segments], dim=1)[None]
        pos = torch.cat([torch.arange(s[3], s[3] + F) for s in segments])
        blocks = torch.tensor([[k in row for k in range(len(segments))] for row in mask])
        tokens = F * (LAT // 2) ** 2
        attn = blocks.repeat_interleave(tokens, 0).repeat_interleave(tokens, 1)
        v = model(x, tt, cross_kv=cross_kv, y=yy, frame_positions=pos, attn_mask=attn)[0]
        return v[:, -F:]

    # chunk 0, full: its step-s inputs x0_s
    v = velocity([(n0[0], t[0], y0, 0)], [[0]])
    x0_in = [
        n0[0],
        ((1 - sigma[1]) * (n0[0].double() - sigma[0] * v.double()) + sigma[1] * n0[1].double()).float(),
    ]
    # chunk 1 ran step 0 only: its keys (both slots) come from pure noise n1[0] at t[0], seeing c_0 at step 0
    c1 = (n1[0], t[0], y1, F)
    x = n2[0]
    for s in range(2):
        segments = [(x0_in[0], t[0], y0, 0), c1, (x0_in[s], t[s], y0, 0), (x, t[s], y2, 2 * F)]
        v = velocity(segments, [[0], [0, 1], [2], [1, 2, 3]])
        x0 = (x.double() - sigma[s] * v.double()).float()
        if s == 0:
            x = ((1 - sigma[1]) * x0.double() + sigma[1] * n2[1].double()).float()
    return x0


def test_clean_context_needs_no_fill_and_runs_the_subset(model: WanModel, inputs: dict):
    """In clean-context mode the σ = 0 refresh writes the chunk's keys whatever steps ran: a degraded chunk
    equals the subset schedule's chunk there too."""
    full = StreamingDiT(model, _stream((1000, 750, 500), "clean-context"))
    sub = StreamingDiT(model, _stream((1000, 500), "clean-context"))
    state = full.open_session(inputs["context"], inputs["clip_fea"])
    ref_state = sub.open_session(inputs["context"], inputs["clip_fea"])
    _chunk(full, state, 0, inputs, [0, 1, 2], steps=(0, 2))
    _chunk(sub, ref_state, 0, inputs, [0, 2])
    degraded = _chunk(full, state, 1, inputs, [0, 1, 2], steps=(0, 2))
    assert (degraded - _chunk(sub, ref_state, 1, inputs, [0, 2])).abs().max() <= TOL


@pytest.mark.parametrize("steps", [(1,), (0, 0), (0, 3), (1, 0)])
def test_a_bad_subset_is_a_wire_error_before_anything_runs(model: WanModel, steps: tuple[int, ...]):
    stream = _stream((1000, 750, 500))
    rank = ScoreRank(StreamingDiT(model, stream), stream)
    context = TensorSpec("context", (CFG.text_len, CFG.text_dim), "float32")
    clip = TensorSpec("clip_fea", (CFG.clip_tokens, CFG.clip_dim), "float32")
    boxes = TensorSpec("face_boxes", (1, 4), "float32")
    rank.open_session(
        SessionOpen("s", LAT, LAT, tensors=(context, clip, boxes)),
        {"context": context.empty().zero_(), "clip_fea": clip.empty().zero_(),
         "face_boxes": torch.tensor([[0.0, 0.0, 1.0, 1.0]])},
    )  # fmt: skip
    request = ChunkRequest("s", 0, ((True,) * F,), noise_seed=1, step_indices=steps)
    with pytest.raises(WireError, match=r"step_indices.*increase strictly from 0"):
        rank.denoise(request, {})
    assert rank.sessions["s"].state.next_chunk == 0  # nothing ran


def test_the_convkv_window_refuses_to_skip_steps():
    model = WanModel(get_model_preset("soulx-liveact-tiny"))
    engine = StreamingDiT(model, StreamConfig.for_schedule("soulx-liveact", height=64, width=64))
    assert engine.check_step_indices(()) == (0, 1, 2)
    with pytest.raises(ValueError, match="convkv-memory window cannot skip"):
        engine.check_step_indices((0, 2))


def test_the_wire_field_reaches_the_engine_on_a_score_rank():
    """A ScoreRank given ``step_indices=(0,)`` for chunk 1 returns what a direct call with steps (0,) gives,
    which is not the full chunk; the following full chunk matches the direct engine too."""
    from dataclasses import replace

    from tests.workers.test_score_rank import BOXES, STREAM, open_message, request, session_inputs
    from workers.audio import AudioConditioning, face_token_mask
    from workers.factory import build_score_model

    model = build_score_model("tiny", seed=2)
    rank = ScoreRank(model, STREAM)
    rank.open_session(open_message(), session_inputs())
    steps = {1: (0,)}
    got = []
    for i in range(3):
        msg, tensors = request("s1", i)
        got.append(rank.denoise(replace(msg, step_indices=steps.get(i, ())), tensors))

    engine = StreamingDiT(model, STREAM)
    inputs = session_inputs()
    state = engine.open_session(inputs["context"], inputs["clip_fea"])
    face_mask = face_token_mask(BOXES, STREAM.token_height, STREAM.token_width, STREAM.chunk_latent_frames)
    full_rank = ScoreRank(model, STREAM)
    full_rank.open_session(open_message(), session_inputs())
    for i in range(3):
        msg, tensors = request("s1", i)
        audio = AudioConditioning(
            features=tensors["audio"][None],
            speaking=torch.tensor(msg.speaking)[None],
            face_mask=face_mask[None].float(),
        )
        noise = chunk_noise(msg.noise_seed, STREAM.num_steps, STREAM.latent_chunk_shape)
        want = engine.denoise_chunk(
            state, i, y=tensors["y"], audio=audio, noise=noise, steps=steps.get(i, ())
        )
        assert torch.equal(got[i], want), f"chunk {i}"
        if i == 1:
            assert (got[i] - full_rank.denoise(msg, tensors)).abs().max() > 1e-3
        else:
            full_rank.denoise(msg, tensors)
