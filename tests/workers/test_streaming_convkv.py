"""The 'convkv-memory' window (SoulX-LiveAct's schedule) in `StreamingDiT`, on the tiny family.

The reference is `liveact_rollout` (tests/oracles/test_liveact_equivalence.py): LiveAct's schedule written out
uncached on `WanModel.forward` (float64 RoPE of the whole pre-RoPE cache each call, the ConvKV update by
slicing, the prefix concatenated per block), which reproduces upstream's own rollouts. Here the weights are
random (seeded), the ConvKV convolutions too (the initial 1/5 would be a plain mean, the same for every
channel, and hide a head shard compressing with the wrong channels), and the streams run 7 chunks: chunk 0,
chunk 1 over chunk 0, then five chunks with the memory updated, the recursive memory slot included.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "oracles"))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "distributed"))
from dist_world import run_world
from test_liveact_equivalence import (
    BLOCKS,
    WINDOW,
    _chunk_audio,
    _windows,
    engine_rollout,
    liveact_rollout,
    rollout_stream,
)

from proto.model_config import get_model_preset
from proto.stream_config import StreamConfig
from workers.audio import InfiniteTalkAudio
from workers.factory import build_score_model
from workers.kv_cache import MemoryKVCache
from workers.model import WanModel
from workers.streaming import StreamingDiT

pytestmark = pytest.mark.equality  # tests/test_cpu_matrix.py reruns these at 2 threads and on AVX2

TINY = get_model_preset("soulx-liveact-tiny")
CHUNKS = 7
# float32 RoPE tables (float64 in the reference), the sampler in float64 (float32 in the reference): observed
# 2.0e-6 without CFG, 3.6e-6 with CFG 2 (which amplifies v's rounding) on latents of max |x| ≈ 5.6 (Intel
# Xeon, one thread); a wrong slot, position or memory gives O(0.1).
ATOL = 1e-5
COMPILE_ATOL = 1e-5  # inductor reorders float32 math (observed 3.3e-6, CFG 2, 4 chunks)
SP_ATOL = 1e-5  # other matrix shapes per rank may round differently (tests/workers/test_sp_engine.py); 0 seen
GRID = 8  # latent height and width of `rollout_stream`: 4x4 = 16 tokens a frame, not a multiple of 5


def liveact_model(seed: int = 3) -> WanModel:
    """The tiny family with every layer random, the ConvKV convolutions included (per channel)."""
    model = build_score_model("soulx-liveact-tiny", seed=seed)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for block in model.blocks:
            for conv in (block.self_attn.memory_proj_k, block.self_attn.memory_proj_v):
                conv.weight.copy_(torch.rand(conv.weight.shape, generator=gen) * 0.4)
    return model


def random_inputs(seed: int = 5, chunks: int = CHUNKS) -> dict[str, torch.Tensor]:
    """`liveact_rollout`'s inputs, random: conditioning, a clip of wav2vec2 features, per chunk the noise."""
    gen = torch.Generator().manual_seed(seed)
    a = TINY.audio

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen)

    inputs = {
        "context": rand(9, TINY.text_dim),
        "clip_fea": rand(TINY.clip_tokens, TINY.clip_dim),
        "embedding": rand(4 * BLOCKS[1] * chunks + 53, a.wav2vec_layers, a.wav2vec_dim),
        "rollout.y": rand(20, WINDOW, GRID, GRID),
    }
    for chunk in range(chunks):
        inputs[f"rollout.noise.{chunk}"] = rand(3, 16, BLOCKS[chunk > 0], GRID, GRID)
    return inputs


def _diffs(a: list[torch.Tensor], b: list[torch.Tensor]) -> list[float]:
    return [float((x - y).abs().max()) for x, y in zip(a, b, strict=True)]


@pytest.fixture(scope="module")
def model() -> WanModel:
    torch.set_num_threads(1)
    return liveact_model()


@pytest.mark.parametrize("audio_cfg", [1.0, 2.0])
def test_the_engine_equals_the_uncached_liveact_schedule(model: WanModel, audio_cfg: float) -> None:
    inputs = random_inputs()
    got, _ = engine_rollout(StreamingDiT(model, rollout_stream(audio_cfg)), inputs, CHUNKS)
    reference = liveact_model()  # liveact_rollout hooks the model it runs
    want = liveact_rollout(reference, inputs, audio_cfg, CHUNKS)
    diffs = _diffs(got, want)
    assert max(diffs) <= ATOL, diffs
    assert [tuple(x.shape) for x in got] == [(16, BLOCKS[c > 0], GRID, GRID) for c in range(CHUNKS)]
    assert min(float((got[c] - got[c + 1]).abs().max()) for c in range(1, CHUNKS - 1)) > 1e-2


def test_the_memory_and_the_audio_guidance_matter(model: WanModel) -> None:
    """The comparisons above can fail: without the memory update, or without CFG, the latents move."""
    inputs = random_inputs(chunks=4)
    plain, _ = engine_rollout(StreamingDiT(model, rollout_stream(1.0)), inputs, 4)
    guided, _ = engine_rollout(StreamingDiT(model, rollout_stream(2.0)), inputs, 4)
    assert min(_diffs(plain, guided)) > 1e-2
    original = MemoryKVCache.update_memory
    try:
        MemoryKVCache.update_memory = lambda *_: None  # type: ignore[method-assign]
        frozen, _ = engine_rollout(StreamingDiT(model, rollout_stream(1.0)), inputs, 4)
    finally:
        MemoryKVCache.update_memory = original  # type: ignore[method-assign]
    diffs = _diffs(plain, frozen)
    assert max(diffs[:2]) == 0 and min(diffs[2:]) > 1e-2, diffs


@pytest.mark.parametrize(("audio_cfg", "slots"), [(1.0, 3), (2.0, 5)])
def test_the_cache_is_allocated_once_and_its_bytes_never_change(model: WanModel, audio_cfg, slots) -> None:
    """3 step caches (+ 2 null-audio caches with CFG) of 14 frames, written in place from chunk 2 to 20."""
    engine = StreamingDiT(model, rollout_stream(audio_cfg))
    inputs = random_inputs(chunks=21)
    state = engine.open_session(inputs["context"], inputs["clip_fea"])
    tokens = engine.stream.tokens_per_frame
    assert isinstance(state.cache, MemoryKVCache)
    assert state.cache.num_slots == slots == engine.passes_per_chunk
    assert state.cache.nbytes == TINY.num_layers * slots * 2 * WINDOW * tokens * TINY.dim * 4
    for chunk in range(21):
        first = chunk == 0
        audio = _chunk_audio(_windows(inputs, max(0, (chunk - 1) * 4 * BLOCKS[1])), first)
        y = inputs["rollout.y"][:, : BLOCKS[0]] if first else inputs["rollout.y"][:, BLOCKS[0] :]
        noise = torch.randn(3, *engine.stream.latent_shape(chunk))
        engine.denoise_chunk(state, chunk, y=y, audio=audio, noise=noise)
        if chunk == 2:
            at_2 = (state.nbytes, state.cache.k.data_ptr(), state.cache.v.data_ptr())
        if chunk >= 2:
            assert (state.nbytes, state.cache.k.data_ptr(), state.cache.v.data_ptr()) == at_2, chunk
    assert bool(torch.isfinite(state.cache.k).all())


def test_step_0_has_no_audio_path_and_the_audio_is_projected_once_per_chunk(model: WanModel) -> None:
    calls: list[str] = []
    hooks = [
        model.audio_proj.register_forward_hook(lambda *_: calls.append("proj")),
        model.blocks[0].audio_cross_attn.register_forward_hook(lambda *_: calls.append("attn")),
        model.blocks[0].register_forward_hook(lambda *_: calls.append("block")),
    ]
    try:
        engine_rollout(StreamingDiT(model, rollout_stream(1.0)), random_inputs(chunks=2), 2)
        plain, calls[:] = list(calls), []
        engine_rollout(StreamingDiT(model, rollout_stream(2.0)), random_inputs(chunks=2), 2)
    finally:
        for hook in hooks:
            hook.remove()
    # Per chunk: one projection; step 0 without the audio cross-attention, steps 1 and 2 with it.
    assert plain == ["proj", "block", "attn", "block", "attn", "block"] * 2
    # CFG: the null audio (zero windows) projected once per engine and kind of chunk (chunk 0, later), and a
    # null pass at each audio step.
    assert calls == ["proj", "proj", "block", *["attn", "block"] * 4] * 2


def test_the_memory_update_moves_the_window_as_liveact_does() -> None:
    """Slot 2 <- ConvKV(slots 2..6), slot 3 <- ConvKV(slots 7..11), slots 4..5 <- slots 12..13; the sink and
    the current chunk's slots untouched; every slot and layer alike."""
    n = 3
    cache = MemoryKVCache(2, 2, 1, n, heads=1, head_dim=2, dtype=torch.float64, device="cpu")
    frames = torch.arange(WINDOW, dtype=torch.float64).repeat_interleave(n)  # token -> its frame slot
    cache.k.copy_(frames[:, None, None].expand(WINDOW * n, 1, 2))
    cache.v.copy_(-cache.k)
    seen = []

    def compress(layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        seen.append((layer, sorted(set(k[0, :, 0, 0].tolist()))))
        return k.unflatten(1, (-1, 5)).mean(2), v.unflatten(1, (-1, 5)).mean(2)

    cache.update_memory(1, compress)
    runs = [[2.0, 3.0, 4.0, 5.0, 6.0], [7.0, 8.0, 9.0, 10.0, 11.0]]  # frame slots each compression reads
    assert seen == [(layer, run) for layer in range(2) for run in runs]
    keys = cache.k[:, 1, 0, :, 0, 0].unflatten(1, (WINDOW, n))  # [layers, frame slot, token]
    assert torch.equal(keys[:, :2], frames.view(WINDOW, n)[:2].expand(2, 2, n))
    # Memory token m is the mean of tokens 5m..5m+4 of the 5 stacked frames (raster order): with 3 tokens a
    # frame, frame slots (2, 2, 2, 3, 3), (3, 4, 4, 4, 5), (5, 5, 6, 6, 6).
    assert torch.allclose(keys[:, 2], torch.tensor([2.4, 4.0, 5.6], dtype=torch.float64).expand(2, n))
    assert torch.allclose(keys[:, 3], torch.tensor([7.4, 9.0, 10.6], dtype=torch.float64).expand(2, n))
    assert torch.equal(keys[:, 4:6], frames.view(WINDOW, n)[12:14].expand(2, 2, n))
    assert torch.equal(keys[:, 6:], frames.view(WINDOW, n)[6:].expand(2, 8, n))
    assert torch.equal(cache.v[:, 1], -cache.k[:, 1])
    assert torch.equal(cache.k[:, 0, 0, :, 0, 0], frames.expand(2, -1))  # the other slot is untouched
    assert (cache.write_offset(0), cache.visible(0)) == (0, 6 * n)
    assert (cache.write_offset(1), cache.visible(5)) == (6 * n, 14 * n)


def test_a_head_shard_compresses_with_its_channels_of_the_convolution(model: WanModel) -> None:
    attn = model.blocks[1].self_attn
    k, v = torch.randn(2, 1, 20, TINY.num_heads, TINY.head_dim).unbind(0)
    full = attn.compress_memory(k, v)
    for first in range(0, TINY.num_heads, 2):
        part = attn.compress_memory(k[:, :, first : first + 2], v[:, :, first : first + 2], first_head=first)
        for whole, shard in zip(full, part, strict=True):
            assert torch.allclose(whole[:, :, first : first + 2], shard, atol=1e-6)
    with pytest.raises(ValueError, match=r"heads \[3, 3 \+ H\)"):
        attn.compress_memory(k[:, :, :2], v[:, :, :2], first_head=3)


def test_wrong_models_and_inputs_are_refused(model: WanModel) -> None:
    with pytest.raises(ValueError, match=r"the 'convkv-memory' window compresses 5 frames.*memory=None"):
        StreamingDiT(build_score_model("tiny"), rollout_stream(1.0))
    with pytest.raises(ValueError, match="not the 'sparse-causal' window; stream it with StreamConfig"):
        StreamingDiT(model, StreamConfig(height=64, width=64))
    inputs = random_inputs(chunks=1)
    engine = StreamingDiT(model, rollout_stream(2.0))
    state = engine.open_session(inputs["context"], inputs["clip_fea"])
    y, noise = inputs["rollout.y"][:, :6], inputs["rollout.noise.0"]
    later = InfiniteTalkAudio(windows=_windows(inputs, 0)[:, 21:], starts_clip=False)
    with pytest.raises(ValueError, match="chunk 0's audio has starts_clip=False"):
        engine.denoise_chunk(state, 0, y=y, audio=later, noise=noise)
    with pytest.raises(ValueError, match=r"audio_cfg=2\.0 guides every chunk's audio steps"):
        engine.denoise_chunk(state, 0, y=y, audio=None, noise=noise)
    with pytest.raises(ValueError, match=r"noise has shape \(3, 16, 8, 8, 8\), expected .*6, 8, 8\)"):
        engine.denoise_chunk(state, 0, y=y, audio=later, noise=torch.zeros(3, 16, 8, GRID, GRID))


@pytest.mark.skipif(
    shutil.which("gcc") is None and shutil.which("cc") is None,
    reason="torch.compile (inductor) on CPU needs a C compiler",
)
def test_compiled_blocks_equal_eager(model: WanModel) -> None:
    inputs = random_inputs(chunks=4)
    eager, _ = engine_rollout(StreamingDiT(model, rollout_stream(2.0)), inputs, 4)
    compiled, _ = engine_rollout(StreamingDiT(model, rollout_stream(2.0), compile=True), inputs, 4)
    diffs = _diffs(compiled, eager)
    assert max(diffs) <= COMPILE_ATOL, diffs


def _sp_equals_single(rank: int, world: int, audio_cfg: float) -> None:
    model = liveact_model()
    inputs = random_inputs(chunks=4)
    stream = rollout_stream(audio_cfg)
    single, single_state = engine_rollout(StreamingDiT(model, stream), inputs, 4)
    parallel, state = engine_rollout(StreamingDiT(model, stream, sp_group=dist.group.WORLD), inputs, 4)
    diffs = _diffs(single, parallel)
    assert max(diffs) <= SP_ATOL, f"rank {rank}: SP {world} differs from SP 1 by {diffs}"
    # Each rank holds its H/P heads of every token of the window, and they are one rank's, memory included.
    heads = TINY.num_heads // world
    assert state.cache.k.shape[-3:] == (WINDOW * stream.tokens_per_frame, heads, TINY.head_dim)
    mine = slice(rank * heads, (rank + 1) * heads)
    assert float((state.cache.k - single_state.cache.k[..., mine, :]).abs().max()) <= SP_ATOL
    assert float((state.cache.v - single_state.cache.v[..., mine, :]).abs().max()) <= SP_ATOL


@pytest.mark.parametrize("audio_cfg", [1.0, 2.0])
def test_two_sp_workers_give_the_latents_of_one(tmp_path, audio_cfg: float) -> None:
    run_world(_sp_equals_single, 2, tmp_path, audio_cfg)
