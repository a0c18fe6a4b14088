"""Batched sessions (``workers.batched``): chunks of several sessions in one forward per pass equal each
session denoised alone, within float32 rounding (the batch's matrix products have other shapes, and the
cache's keys are attended in another order), over several chunks, with different inputs per session."""

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
from workers.batched import BatchItem, group_items
from workers.factory import build_score_model
from workers.streaming import StreamingDiT

pytestmark = pytest.mark.equality

CFG = get_model_preset("tiny")
A = CFG.audio
ATOL = 1e-5  # float32 rounding of the same sums in other shapes/orders; a wrong cache row gives ~1e-1


def _session(stream: StreamConfig, seed: int, chunks: int) -> dict:
    gen = torch.Generator().manual_seed(seed)
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
                    1,
                    2,
                    f + A.window - 1,
                    A.frames_per_latent,
                    A.wav2vec_layers,
                    A.wav2vec_dim,
                    generator=gen,
                ),
                "speaking": torch.rand(1, 2, f, generator=gen) > 0.3,
            }
            for _ in range(chunks)
        ],
    }


def _item(state, inputs: dict, index: int) -> BatchItem:
    chunk = inputs["chunks"][index]
    audio = AudioConditioning(
        features=chunk["features"], speaking=chunk["speaking"], face_mask=inputs["face_mask"]
    )
    return BatchItem(state, index, noise=chunk["noise"], y=chunk["y"], audio=audio)


def _alone(engine: StreamingDiT, inputs: dict, chunks: int) -> list[torch.Tensor]:
    state = engine.open_session(inputs["context"], inputs["clip_fea"])
    out = []
    for i in range(chunks):
        item = _item(state, inputs, i)
        out.append(engine.denoise_chunk(state, i, y=item.y, audio=item.audio, noise=item.noise))
    return out


def _batched(
    engine: StreamingDiT, sessions: list[dict], starts: list[int], rounds: int
) -> list[list[torch.Tensor]]:
    """Round r denoises, in one batch, chunk r − starts[b] of every session b that has begun."""
    states = [engine.open_session(s["context"], s["clip_fea"]) for s in sessions]
    out: list[list[torch.Tensor]] = [[] for _ in sessions]
    for r in range(rounds):
        members = [b for b in range(len(sessions)) if 0 <= r - starts[b] < len(sessions[b]["chunks"])]
        items = [_item(states[b], sessions[b], r - starts[b]) for b in members]
        for b, x0 in zip(members, engine.denoise_batch(items), strict=True):
            out[b].append(x0)
    return out


def _count_forwards(monkeypatch, model) -> list[int]:
    """Batch sizes of every forward_step call."""
    sizes: list[int] = []
    original = model.forward_step

    def counted(x, *args, **kwargs):
        sizes.append(x.shape[0])
        return original(x, *args, **kwargs)

    monkeypatch.setattr(model, "forward_step", counted)
    return sizes


@pytest.fixture(scope="module")
def model():
    torch.set_num_threads(1)
    return build_score_model("tiny", seed=3)


@pytest.mark.parametrize("cache_mode", ["per-step", "clean-context"])
def test_two_sessions_in_one_forward_equal_each_alone(model, monkeypatch, cache_mode) -> None:
    stream = StreamConfig(height=32, width=32, cache_mode=cache_mode, train_latent_frames=9)
    engine = StreamingDiT(model, stream)
    chunks = 4  # chunk 0, chunk 1, then the ring (both parities) with the window's shift at chunk 3
    sessions = [_session(stream, seed, chunks) for seed in (1, 2)]
    alone = [_alone(engine, s, chunks) for s in sessions]
    sizes = _count_forwards(monkeypatch, model)
    batched = _batched(engine, sessions, [0, 0], chunks)
    assert sizes == [2] * (engine.passes_per_chunk * chunks)  # really one forward per pass for both
    for b in range(2):
        for i in range(chunks):
            err = (alone[b][i] - batched[b][i]).abs().max().item()
            assert err <= ATOL, f"session {b} chunk {i}: batched differs from alone by {err}"
    assert (alone[0][3] - alone[1][3]).abs().max().item() > 1e-2  # the sessions are not alike


def test_three_sessions_at_different_chunks_equal_each_alone(model, monkeypatch) -> None:
    # Sessions begin one round apart: chunks of other ring parities and window positions meet in a round;
    # only those with the same cache geometry share a forward (chunk >= 3: the window has stopped moving).
    stream = StreamConfig(height=32, width=32, train_latent_frames=9)
    engine = StreamingDiT(model, stream)
    chunks, starts = 6, [0, 1, 2]
    sessions = [_session(stream, seed, chunks) for seed in (4, 5, 6)]
    alone = [_alone(engine, s, chunks) for s in sessions]
    sizes = _count_forwards(monkeypatch, model)
    batched = _batched(engine, sessions, starts, chunks + 2)
    assert max(sizes) == 3  # round 5 (chunks 5, 4 and 3: other ring parities) shares its forwards
    assert sum(sizes) == 3 * chunks * engine.passes_per_chunk  # every chunk's every pass ran exactly once
    for b in range(3):
        for i in range(chunks):
            err = (alone[b][i] - batched[b][i]).abs().max().item()
            assert err <= ATOL, f"session {b} chunk {i}: batched differs from alone by {err}"


def test_only_chunks_of_one_cache_geometry_are_grouped(model) -> None:
    stream = StreamConfig(height=32, width=32, train_latent_frames=9)
    engine = StreamingDiT(model, stream)
    inputs = _session(stream, 7, 1)
    state = engine.open_session(inputs["context"], inputs["clip_fea"])
    items = []
    for index in (0, 3, 1, 4, 2):  # chunk classes: 0, later (window stopped), 1, later, later (still moving)
        item = _item(state, inputs, 0)
        item.chunk_index = index
        items.append(item)
    assert group_items(engine, items) == [[0], [1, 3], [2], [4]]


def test_a_session_twice_in_one_batch_is_refused(model) -> None:
    stream = StreamConfig(height=32, width=32)
    engine = StreamingDiT(model, stream)
    inputs = _session(stream, 8, 2)
    state = engine.open_session(inputs["context"], inputs["clip_fea"])
    with pytest.raises(ValueError, match="at most one chunk per session"):
        engine.denoise_batch([_item(state, inputs, 0), _item(state, inputs, 1)])


def _sp_batched_equals_single(rank: int, world: int) -> None:
    stream = StreamConfig(height=32, width=32, train_latent_frames=9)
    model = build_score_model("tiny", seed=3)
    chunks = 3
    sessions = [_session(stream, seed, chunks) for seed in (1, 2)]
    alone = [_alone(StreamingDiT(model, stream), s, chunks) for s in sessions]
    batched = _batched(StreamingDiT(model, stream, sp_group=dist.group.WORLD), sessions, [0, 0], chunks)
    for b in range(2):
        for i in range(chunks):
            err = (alone[b][i] - batched[b][i]).abs().max().item()
            assert err <= ATOL, f"rank {rank} session {b} chunk {i}: SP batched differs from alone by {err}"


def test_two_sp_workers_batch_sessions_as_one_worker_runs_them_alone(tmp_path) -> None:
    run_world(_sp_batched_equals_single, 2, tmp_path)


def test_a_degraded_chunk_in_a_batch_runs_its_own_steps_alone(model, monkeypatch) -> None:
    # engine.degrade gives one session's chunk fewer steps: that chunk leaves the shared forward and equals
    # its degraded chunk alone; the full-schedule partner is unchanged.
    stream = StreamConfig(height=32, width=32, train_latent_frames=9, denoising_steps=(1000, 500))
    engine = StreamingDiT(model, stream)
    sessions = [_session(stream, seed, 3) for seed in (11, 12)]
    states = [engine.open_session(s["context"], s["clip_fea"]) for s in sessions]
    refs = [engine.open_session(s["context"], s["clip_fea"]) for s in sessions]
    for i in range(2):
        engine.denoise_batch([_item(st, s, i) for st, s in zip(states, sessions, strict=True)])
        for ref, s in zip(refs, sessions, strict=True):
            item = _item(ref, s, i)
            engine.denoise_chunk(ref, i, y=item.y, audio=item.audio, noise=item.noise)
    full, degraded = _item(states[0], sessions[0], 2), _item(states[1], sessions[1], 2)
    degraded.steps = (0,)
    sizes = _count_forwards(monkeypatch, model)
    out = engine.denoise_batch([full, degraded])
    assert sizes == [1] * (engine.passes_per_chunk + 1)  # two passes alone for one, one pass for the other
    ref_full, ref_degraded = _item(refs[0], sessions[0], 2), _item(refs[1], sessions[1], 2)
    expect_full = engine.denoise_chunk(refs[0], 2, y=ref_full.y, audio=ref_full.audio, noise=ref_full.noise)
    expect_degraded = engine.denoise_chunk(
        refs[1], 2, y=ref_degraded.y, audio=ref_degraded.audio, noise=ref_degraded.noise, steps=(0,)
    )
    assert (out[0] - expect_full).abs().max().item() <= ATOL
    assert (out[1] - expect_degraded).abs().max().item() <= ATOL
