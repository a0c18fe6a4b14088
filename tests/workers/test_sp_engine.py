"""Ulysses sequence parallelism in the streaming engine: 2 workers give the latents of 1 worker.

The SP world runs in real processes over gloo (tests/distributed/dist_world.py), one torch thread per rank;
each rank also runs the single-rank engine on the same inputs, so the comparison needs no cross-process
plumbing. SP attends over the keys in the single-rank order, but its matrix products have other shapes (a
band of a frame's tokens, a slice of the heads), and CPU BLAS kernels round differently per shape (Intel vs
AMD, AVX-512 or not): equality is float32 within ``SP_ATOL`` (1e-5), not bitwise.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "distributed"))
from dist_world import run_world

from proto.model_config import get_model_preset
from proto.stream_config import StreamConfig
from workers.audio import AudioConditioning, face_token_mask
from workers.factory import build_score_model
from workers.sp import check_sp_shapes, frames_to_heads, heads_to_frames, shard_frames
from workers.streaming import StreamingDiT, sparse_causal_mask

pytestmark = pytest.mark.equality  # tests/test_cpu_matrix.py reruns these at 2 threads and on AVX2

CFG = get_model_preset("tiny")
A = CFG.audio
CHUNKS = 3
# Float32 rounding of the same sums in other orders: ~1e-6 seen (Intel Xeon); a wrong key order or head
# slice gives differences of order 1e-1.
SP_ATOL = 1e-5


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a - b).abs().max().item()


def _inputs(stream: StreamConfig) -> dict:
    gen = torch.Generator().manual_seed(5)
    f, lat = stream.chunk_latent_frames, stream.latent_height
    boxes = torch.tensor([[0.0, 0.0, 0.5, 0.75], [0.5, 0.25, 1.0, 1.0]])
    return {
        "context": torch.randn(9, CFG.text_dim, generator=gen),
        "clip_fea": torch.randn(CFG.clip_tokens, CFG.clip_dim, generator=gen),
        "face_mask": face_token_mask(boxes, stream.token_height, stream.token_width, f)[None].float(),
        "chunks": [
            {
                "noise": torch.randn(stream.num_steps, 16, f, lat, lat, generator=gen),
                "y": torch.randn(20, f, lat, lat, generator=gen),
                "features": torch.randn(
                    1, 2, f + A.window - 1, A.frames_per_latent, A.wav2vec_layers, A.wav2vec_dim,
                    generator=gen,
                ),
                "speaking": torch.rand(1, 2, f, generator=gen) > 0.3,
            }
            for _ in range(CHUNKS)
        ],
    }


def _run(engine: StreamingDiT, inputs: dict) -> tuple[list[torch.Tensor], object]:
    state = engine.open_session(inputs["context"], inputs["clip_fea"])
    outs = []
    for i, chunk in enumerate(inputs["chunks"]):
        audio = AudioConditioning(
            features=chunk["features"], speaking=chunk["speaking"], face_mask=inputs["face_mask"]
        )
        outs.append(engine.denoise_chunk(state, i, y=chunk["y"], audio=audio, noise=chunk["noise"]))
    return outs, state


def _sp_equals_single(rank: int, world: int, cache_mode: str, size: int) -> None:
    stream = StreamConfig(height=size, width=size, cache_mode=cache_mode)
    model = build_score_model("tiny", seed=3)
    inputs = _inputs(stream)
    single, single_state = _run(StreamingDiT(model, stream), inputs)
    parallel, state = _run(StreamingDiT(model, stream, sp_group=dist.group.WORLD), inputs)
    for i, (a, b) in enumerate(zip(single, parallel, strict=True)):
        err = _max_diff(a, b)
        assert err <= SP_ATOL, f"rank {rank} chunk {i}: SP {world} differs from SP 1 by {err}"
    # Each rank caches its own H/P heads of every token of the chunk, as one rank caches them.
    heads = CFG.num_heads // world
    assert state.cache.k.shape[-3:] == (3 * stream.tokens_per_chunk, heads, CFG.head_dim)  # c_0 + ring of 2
    mine = slice(rank * heads, (rank + 1) * heads)
    assert _max_diff(state.cache.k, single_state.cache.k[..., mine, :]) <= SP_ATOL
    assert _max_diff(state.cache.v, single_state.cache.v[..., mine, :]) <= SP_ATOL
    # The chunks are not trivially alike (the comparison can fail).
    assert (single[0] - single[2]).abs().max().item() > 1e-2


@pytest.mark.parametrize("cache_mode", ["per-step", "clean-context"])
def test_two_sp_workers_give_the_latents_of_one(tmp_path, cache_mode) -> None:
    run_world(_sp_equals_single, 2, tmp_path, cache_mode, 64)


def test_two_sp_workers_give_the_latents_of_one_when_a_band_holds_2_tokens_of_a_frame(tmp_path) -> None:
    # 32x32: 4 tokens per latent frame, 2 per worker (BLAS takes another kernel for so few rows).
    run_world(_sp_equals_single, 2, tmp_path, "per-step", 32)


def test_worker_count_that_does_not_divide_the_heads_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match=r"4 heads; --score-workers 3 does not divide them.* one of 1, 2, 4"):
        check_sp_shapes(CFG.num_heads, 16, 3, "tiny")


def test_worker_count_that_does_not_divide_a_frame_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match=r"does not divide the 6 tokens of a latent frame.* use one of 1, 2"):
        check_sp_shapes(4, 6, 4)


def test_without_a_group_the_band_layout_is_the_identity() -> None:
    tokens = torch.arange(8)
    assert shard_frames(tokens[None], None, frames=2).tolist() == [tokens.tolist()]
    x = torch.randn(1, 8, 4, 2)
    assert torch.equal(frames_to_heads(x, None, frames=2), x)
    assert torch.equal(heads_to_frames(x, None, frames=2), x)


def _band_layouts(rank: int, world: int) -> None:
    frames, tokens_per_frame, heads = 3, 4 * world, 2 * world
    x = torch.randn(1, frames * tokens_per_frame, heads, 5, generator=torch.Generator().manual_seed(0))
    band = shard_frames(x, dist.group.WORLD, frames)
    # Rank p holds tokens [p·S/P, (p+1)·S/P) of every frame.
    expected = x.unflatten(1, (frames, world, 4))[:, :, rank].flatten(1, 2)
    assert torch.equal(band, expected)
    # All tokens back in frame-major order, this rank's slice of heads; and the way back.
    gathered = frames_to_heads(band, dist.group.WORLD, frames)
    assert torch.equal(gathered, x.chunk(world, dim=2)[rank])
    assert torch.equal(heads_to_frames(gathered, dist.group.WORLD, frames), band)


def test_frames_to_heads_gives_every_token_in_frame_order_and_heads_to_frames_inverts_it(tmp_path) -> None:
    run_world(_band_layouts, 2, tmp_path)


def _masked_forward_equals_single(rank: int, world: int) -> None:
    stream = StreamConfig(height=64, width=64)
    model = build_score_model("tiny", seed=3)
    inputs = _inputs(stream)
    cross_kv = model.cross_attention_kv(inputs["context"][None], inputs["clip_fea"][None])
    x = torch.cat([c["noise"][0] for c in inputs["chunks"]], dim=1)[None]  # 3 chunks as one sequence
    y = torch.cat([c["y"] for c in inputs["chunks"]], dim=1)[None]
    mask = sparse_causal_mask(CHUNKS, stream.tokens_per_chunk)
    t = torch.tensor([500.0])
    with torch.no_grad():
        single = model(x, t, cross_kv=cross_kv, y=y, attn_mask=mask)
        parallel = model(x, t, cross_kv=cross_kv, y=y, attn_mask=mask, sp_group=dist.group.WORLD)
        unmasked = model(x, t, cross_kv=cross_kv, y=y)
    assert _max_diff(single, parallel) <= SP_ATOL
    assert _max_diff(single, unmasked) > 1e-3  # the mask matters


def test_sp_forward_with_the_sparse_causal_mask_equals_one_rank(tmp_path) -> None:
    """The full-sequence reference runs sequence-parallel too: tokens keep their order around attention."""
    run_world(_masked_forward_equals_single, 2, tmp_path)
