"""Ulysses sequence parallelism in the streaming engine: 2 workers give the latents of 1 worker.

The SP world runs in real processes over gloo (tests/distributed/dist_world.py); each rank also runs the
single-rank engine on the same inputs, so the comparison needs no cross-process plumbing.
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
from workers.sp import band_major, check_sp_shapes, shard_frames
from workers.streaming import StreamingDiT

CFG = get_model_preset("tiny")
A = CFG.audio
CHUNKS = 3


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


def _sp_equals_single(rank: int, world: int, cache_mode: str) -> None:
    stream = StreamConfig(height=64, width=64, cache_mode=cache_mode)
    model = build_score_model("tiny", seed=3)
    inputs = _inputs(stream)
    single, _ = _run(StreamingDiT(model, stream), inputs)
    parallel, state = _run(StreamingDiT(model, stream, sp_group=dist.group.WORLD), inputs)
    # Each rank caches its own H/P heads of every token of the chunk.
    assert state.cache.k.shape[-3:] == (stream.tokens_per_chunk, CFG.num_heads // world, CFG.head_dim)
    for i, (a, b) in enumerate(zip(single, parallel, strict=True)):
        err = (a - b).abs().max().item()
        assert err <= 1e-5, f"rank {rank} chunk {i}: SP {world} differs from SP 1 by {err}"
    # The chunks are not trivially alike (the comparison can fail).
    assert (single[0] - single[2]).abs().max().item() > 1e-2


@pytest.mark.parametrize("cache_mode", ["per-step", "clean-context"])
def test_two_sp_workers_give_the_latents_of_one(tmp_path, cache_mode) -> None:
    run_world(_sp_equals_single, 2, tmp_path, cache_mode)


def test_worker_count_that_does_not_divide_the_heads_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match=r"4 heads; --score-workers 3 does not divide them.* one of 1, 2, 4"):
        check_sp_shapes(CFG.num_heads, 16, 3, "tiny")


def test_worker_count_that_does_not_divide_a_frame_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match=r"does not divide the 6 tokens of a latent frame.* use one of 1, 2"):
        check_sp_shapes(4, 6, 4)


def test_band_major_is_the_order_seq_to_head_concatenates_shards_in() -> None:
    """2 frames of 4 tokens over 2 ranks: rank 0 holds tokens 0,1 | 4,5, rank 1 holds 2,3 | 6,7."""
    tokens = torch.arange(8)
    assert band_major(tokens, 2, frames=2, tokens_per_frame=4).tolist() == [0, 1, 4, 5, 2, 3, 6, 7]
    assert shard_frames(tokens[None], None, frames=2).tolist() == [tokens.tolist()]
